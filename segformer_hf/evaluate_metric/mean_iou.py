"""segformer_hf's mean IoU as an evaluate metric module: `evaluate.load(path_to_this_file)`, offline.

evaluate's official `mean_iou` has to be downloaded from the Hub and stores every map as an image (so
values must fit an image's pixel type). This module keeps evaluate's interface and result dict
(`add_batch`/`add`/`compute` with num_labels, ignore_index, nan_to_num, label_map, reduce_labels) and
computes with `segformer_hf.metrics.mean_iou`. Maps are stored as integer lists, exact for any value,
and may differ in size. `segformer_hf.metrics` has the
definition and `EVALUATE_MODULE_PATH`, the path to pass to `evaluate.load`.

evaluate copies this file into its module cache before running it, so it can only use absolute
imports of installed packages (one per line, as evaluate's dependency check reads them).
"""

import datasets
import evaluate
import numpy as np

from segformer_hf.metrics import mean_iou

_DESCRIPTION = """
Mean Intersection-over-Union for semantic segmentation, with per-class IoU and accuracy and overall
pixel accuracy, identical to evaluate's `mean_iou` metric (the mmsegmentation definition).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of (H, W) integer arrays or tensors): predicted label maps; sizes may differ.
    references (`list` of (H, W) integer arrays or tensors): ground-truth label maps, same sizes.
    num_labels (`int`): number of classes; values outside [0, num_labels) belong to no class.
    ignore_index (`int`): label value whose pixels are left out.
    nan_to_num (`float`, *optional*): replaces NaN (classes never predicted nor labelled) in all outputs.
    label_map (`dict`, *optional*): old label -> new label, each rule applied to the original labels.
    reduce_labels (`bool`, defaults to `False`): labels - 1, with 0 -> 255 (e.g. ADE20K's background).

Returns:
    mean_iou (`float`), mean_accuracy (`float`), overall_accuracy (`float`),
    per_category_iou (`ndarray` (num_labels,)), per_category_accuracy (`ndarray` (num_labels,)).

Examples:
    >>> metric = evaluate.load(segformer_hf.metrics.EVALUATE_MODULE_PATH)
    >>> metric.compute(predictions=[np.array([[1, 2], [0, 255]])],
    ...                references=[np.array([[1, 2], [2, 255]])], num_labels=3, ignore_index=255)["mean_iou"]
    0.5
"""

_CITATION = """
@software{MMSegmentation_Contributors_OpenMMLab_Semantic_Segmentation_2020,
  author = {{MMSegmentation Contributors}},
  title = {{OpenMMLab Semantic Segmentation Toolbox and Benchmark}},
  url = {https://github.com/open-mmlab/mmsegmentation},
  year = {2020}
}
"""

_LABEL_MAP = datasets.List(datasets.List(datasets.Value("int64")))


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class MeanIoU(evaluate.Metric):
    """evaluate's Metric API over `segformer_hf.metrics.mean_iou`."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": _LABEL_MAP, "references": _LABEL_MAP}),
            reference_urls=["https://huggingface.co/spaces/evaluate-metric/mean_iou"],
        )

    def _compute(
        self,
        predictions,
        references,
        num_labels: int,
        ignore_index: int,
        nan_to_num: float | None = None,
        label_map: dict | None = None,
        reduce_labels: bool = False,
    ) -> dict:
        # evaluate hands the stored maps back as nested lists, one (H, W) list per map.
        return mean_iou(
            [np.asarray(prediction, dtype=np.int64) for prediction in predictions],
            [np.asarray(reference, dtype=np.int64) for reference in references],
            num_labels=num_labels,
            ignore_index=ignore_index,
            nan_to_num=nan_to_num,
            label_map=label_map,
            reduce_labels=reduce_labels,
        )
