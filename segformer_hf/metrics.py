"""Mean IoU for semantic segmentation: one call, streaming over a dataset, and across processes.

The numbers are those of evaluate's `mean_iou` metric (the mmsegmentation definition), so results can
be compared with published ones and with other Hugging Face code, but they are computed differently:
evaluate takes three histograms per image in numpy (after a round trip of every map through Arrow and
PNG), whereas `MeanIoU` counts (label, prediction) value pairs with one `bincount` per chunk of pixels
into a small table that becomes the confusion matrix at the end: with numpy on one thread for CPU
maps (fast however busy the machine is), with torch on the tensors' own device otherwise. Memory is
then independent of the dataset's size, a GPU never waits on a copy of its predictions, and the counts
of several processes are summed with one all-reduce. `scripts/benchmark_metrics.py` measures the gain.

The definition, applied to each (prediction, label) pair of maps:

1. `label_map` renames label values (every rule looks at the original value), then `reduce_labels`
   shifts labels down by one (0 becomes 255 first, and 254 becomes 255 after), as for ADE20K;
2. pixels whose label equals `ignore_index` are dropped;
3. per class c in [0, num_labels): intersect = pixels with prediction == label == c, predicted =
   pixels predicted c, labelled = pixels labelled c. A value outside [0, num_labels) belongs to no
   class: such a prediction still leaves its pixel in the label's count, and vice versa;
4. counts are summed over all maps; IoU = intersect / (predicted + labelled - intersect),
   accuracy = intersect / labelled, overall accuracy = sum(intersect) / sum(labelled), and the means
   are over the classes whose value is defined (not NaN). `nan_to_num` replaces NaN in every output.

`create_metric` picks the implementation used by `inference.evaluate_model`: "streaming" (this
module) or "evaluate" (the official script from the Hub, for a cross-check when it can be reached).
`EVALUATE_MODULE_PATH` is this package's own evaluate module: `evaluate.load(EVALUATE_MODULE_PATH)`
gives the same numbers through evaluate's `add_batch`/`compute` API, offline.
"""

from __future__ import annotations

import uuid
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

METRIC_BACKENDS = ("streaming", "evaluate")

EVALUATE_MODULE_PATH = str(Path(__file__).resolve().parent / "evaluate_metric" / "mean_iou.py")

# The label table spans the values the definition treats specially; wider spans would only come
# from absurd label_map entries, and would cost memory.
_MAX_LABEL_TABLE_SIZE = 1 << 24
# Up to this many label values are counted as they are; a wider span is mapped to rows per pixel.
_MAX_COUNTED_LABEL_VALUES = 1024

# CPU maps are counted this many pixels at a time: the keys of a chunk stay in cache, and the chunks
# are few enough that per-call costs stay small (2^18 measured best between 2^16 and 2^21).
_CPU_CHUNK_PIXELS = 1 << 18


class MetricBackendUnavailable(RuntimeError):
    """The requested metric implementation cannot be loaded (e.g. evaluate's script while offline)."""


def mean_iou(
    predictions: Any,
    references: Any,
    num_labels: int,
    ignore_index: int | None,
    nan_to_num: float | None = None,
    label_map: Mapping[int, int] | None = None,
    reduce_labels: bool = False,
) -> dict[str, Any]:
    """Mean IoU of predicted label maps against reference maps, as evaluate's `mean_iou` computes it.

    `predictions` and `references` are lists of (H, W) integer maps (numpy arrays or torch tensors;
    sizes may differ between pairs), or (B, H, W) batches. Returns mean_iou, mean_accuracy and
    overall_accuracy (numpy float64) and per_category_iou and per_category_accuracy (numpy float64
    arrays of length `num_labels`). This is the statistic of the given maps only: in a distributed run
    use `MeanIoU`, whose `compute` sums the counts of all processes.
    """
    metric = MeanIoU(
        num_labels, ignore_index, nan_to_num=nan_to_num, label_map=label_map, reduce_labels=reduce_labels
    )
    metric.update(predictions, references)
    return _results_from_confusion(metric.confusion_matrix(), num_labels, nan_to_num)


class MeanIoU:
    """Streaming mean IoU: `update` with batches as they come, `compute` at the end, `reset` to reuse.

    The state is a small int64 table of pixel counts per (label value, predicted value) pair, over the
    few hundred values the definition tells apart; a value beyond them is counted at the nearest end,
    which behaves the same. Its size depends on num_labels only, never on the data. It lives on
    `device`, by default the device of the first predictions given, so GPU predictions are counted
    where they are. `confusion_matrix` folds it into classes; `compute` sums that over all processes
    when a distributed run is active and returns the same dict as `mean_iou` on every process.

    On the CPU (numpy arrays, PIL images, CPU tensors) the pairs are counted with numpy, one thread and
    no OpenMP: torch's CPU kernels split even small operations over all cores, and on a machine whose
    cores are busy with other work those threads wait on each other (60 maps took seconds instead of
    milliseconds). Maps whose values all fit a byte, as label images do, are counted as 256 x 256 byte
    pairs, the cheapest key to build and count. Tensors on another device are counted there with torch.
    """

    def __init__(
        self,
        num_labels: int,
        ignore_index: int | None,
        nan_to_num: float | None = None,
        label_map: Mapping[int, int] | None = None,
        reduce_labels: bool = False,
        device: torch.device | str | None = None,
    ) -> None:
        if isinstance(num_labels, bool) or not isinstance(num_labels, (int, np.integer)) or num_labels < 1:
            raise ValueError(f"num_labels must be a positive integer, got {num_labels!r}")
        if ignore_index is not None and not isinstance(ignore_index, (int, np.integer)):
            raise ValueError(f"ignore_index must be an integer or None, got {ignore_index!r}")
        self.num_labels = int(num_labels)
        self.ignore_index = None if ignore_index is None else int(ignore_index)
        self.nan_to_num = nan_to_num
        self.label_map = _checked_label_map(label_map)
        self.reduce_labels = bool(reduce_labels)
        self.device = torch.device(device) if device is not None else None
        rows, self._first_label = _label_rows(
            self.num_labels, self.ignore_index, self.label_map, self.reduce_labels
        )
        self._last_label = self._first_label + len(rows) - 1
        if len(rows) <= _MAX_COUNTED_LABEL_VALUES:
            # Labels are counted by value (key: value - first) and turned into rows when folding.
            self._rows_looked_up_per_pixel = None
            self._row_of_label_key = rows
        else:
            # A wide span (e.g. ignore_index 65535): each pixel's label is turned into its row first.
            self._rows_looked_up_per_pixel = rows
            self._row_of_label_key = torch.arange(self.num_labels + 2)
        # Predictions are counted by value + 1 for values -1 ... max(num_labels, 256), so that any
        # byte value needs no clamping; the column is the class, or num_labels for "no class".
        self._last_prediction = max(self.num_labels, 256)
        self._column_of_prediction_key = torch.full((self._last_prediction + 2,), self.num_labels)
        self._column_of_prediction_key[1 : self.num_labels + 1] = torch.arange(self.num_labels)
        self._counts: torch.Tensor | None = None

    def update(self, predictions: Any, references: Any) -> None:
        """Adds label maps: (B, H, W) or (H, W) tensors/arrays, or lists of (H, W) maps of any sizes."""
        # CPU maps of byte values add up here and enter the table once, after the last map.
        byte_pair_counts = np.zeros(256 * 256, dtype=np.int64)
        for where, prediction, reference in _paired_maps(predictions, references):
            prediction = _as_integer_map(prediction, "predictions", where)
            reference = _as_integer_map(reference, "references", where)
            if prediction.shape != reference.shape:
                raise ValueError(
                    f"{where}: prediction shape {tuple(prediction.shape)} differs from reference "
                    f"shape {tuple(reference.shape)}"
                )
            if self._counts is None:
                is_tensor = isinstance(prediction, torch.Tensor)
                self._start(prediction.device if is_tensor else torch.device("cpu"))
            if self.device.type == "cpu":
                self._count_with_numpy(
                    _as_flat_array(prediction), _as_flat_array(reference), byte_pair_counts
                )
            else:
                self._count_with_torch(
                    _as_flat_tensor(prediction).to(self.device), _as_flat_tensor(reference).to(self.device)
                )
        if self._counts is not None and self.device.type == "cpu":
            self._add_byte_pairs(byte_pair_counts)

    def compute(self) -> dict[str, Any]:
        """The metrics over everything added so far, summed across processes in a distributed run.

        Every process must call it (it is a collective operation then); the accumulated counts are
        kept, so more updates can follow.
        """
        confusion = _summed_over_processes(self.confusion_matrix())
        return _results_from_confusion(confusion, self.num_labels, self.nan_to_num)

    def reset(self) -> None:
        """Forgets everything added so far (the device stays)."""
        if self._counts is not None and self._counts.device.type == "cpu":
            self._counts.numpy().fill(0)
        elif self._counts is not None:
            self._counts.zero_()

    def confusion_matrix(self) -> torch.Tensor:
        """This process's pixel counts, (num_labels + 1, num_labels + 1) int64 on the CPU.

        Rows are labels (after label_map and reduce_labels), columns predictions; the last row and
        column hold values outside [0, num_labels), which belong to no class. Ignored pixels are left out.
        """
        counts = (self._counts if self._counts is not None else self._zero_counts()).cpu().numpy()
        confusion = np.zeros((self.num_labels + 2, self.num_labels + 1), dtype=np.int64)
        # (label key, prediction key) -> (label row incl. the ignored row, prediction column), in numpy
        # as all CPU work here (see the class docstring)
        rows, columns = self._row_of_label_key.numpy(), self._column_of_prediction_key.numpy()
        np.add.at(confusion, (rows[:, None], columns[None, :]), counts)
        return torch.from_numpy(confusion[: self.num_labels + 1])

    def _start(self, device: torch.device) -> None:
        """Creates the counts on `self.device`, or on `device` when none was given."""
        self.device = self.device or device
        self._counts = self._zero_counts()
        if self._rows_looked_up_per_pixel is not None:
            self._rows_looked_up_per_pixel = self._rows_looked_up_per_pixel.to(self.device)

    def _zero_counts(self) -> torch.Tensor:
        shape = (len(self._row_of_label_key), len(self._column_of_prediction_key))
        if self.device is None or self.device.type == "cpu":
            return torch.from_numpy(np.zeros(shape, dtype=np.int64))
        return torch.zeros(shape, dtype=torch.int64, device=self.device)

    def _count_with_numpy(
        self, prediction: np.ndarray, reference: np.ndarray, byte_pair_counts: np.ndarray
    ) -> None:
        """Counts flat CPU maps in cache-sized chunks, with numpy on this thread only.

        Chunks whose values all fit a byte are counted as (label * 256 + prediction) into
        `byte_pair_counts`, to be added with `_add_byte_pairs`; the others straight into the table.
        """
        counts = self._counts.numpy()  # the state itself: a CPU tensor shares its memory
        for start in range(0, len(prediction), _CPU_CHUNK_PIXELS):
            chunk = slice(start, start + _CPU_CHUNK_PIXELS)
            predicted, labels = prediction[chunk], reference[chunk]
            if _fits_a_byte(predicted) and _fits_a_byte(labels):
                byte_pair_counts += np.bincount(_byte_pairs(labels, predicted), minlength=256 * 256)
            else:
                keys = self._keys_with_numpy(predicted, labels)
                counts += np.bincount(keys, minlength=counts.size).reshape(counts.shape)

    def _add_byte_pairs(self, byte_pair_counts: np.ndarray) -> None:
        """Adds 256 x 256 (label byte, prediction byte) counts to the table (prediction keys 1...256).

        The label span always holds 0...255 (first <= -1, last >= 256), so the label keys of the bytes
        are consecutive; in a wide span they are rows, which several bytes may share.
        """
        counts, block = self._counts.numpy(), byte_pair_counts.reshape(256, 256)
        byte_keys = slice(-self._first_label, 256 - self._first_label)
        if self._rows_looked_up_per_pixel is None:
            counts[byte_keys, 1:257] += block
        else:
            np.add.at(counts[:, 1:257], self._rows_looked_up_per_pixel.numpy()[byte_keys], block)

    def _keys_with_numpy(self, prediction: np.ndarray, reference: np.ndarray) -> np.ndarray:
        """Table keys of any integer values: (label key) * width + prediction + 1, clamped to the spans."""
        width = len(self._column_of_prediction_key)
        labels = np.clip(reference.astype(np.int64), self._first_label, self._last_label)
        labels -= self._first_label
        if self._rows_looked_up_per_pixel is not None:
            labels = self._rows_looked_up_per_pixel.numpy()[labels]
        labels *= width
        labels += np.clip(prediction.astype(np.int64), -1, self._last_prediction)
        labels += 1
        return labels

    def _count_with_torch(self, prediction: torch.Tensor, reference: torch.Tensor) -> None:
        """One bincount of (label key, prediction key) pairs on the maps' device, added to the counts."""
        if prediction.dtype == reference.dtype == torch.uint8 and self._rows_looked_up_per_pixel is None:
            self._count_uint8_with_torch(prediction, reference)
            return
        width = len(self._column_of_prediction_key)
        predicted_values = _clamped(prediction, -1, self._last_prediction)
        labels = _clamped(reference, self._first_label, self._last_label)
        if self._rows_looked_up_per_pixel is None:
            # key = (label - first) * width + prediction + 1, the offsets folded into one addition
            keys = labels.mul_(width).add_(predicted_values).add_(1 - self._first_label * width)
        else:
            rows = self._rows_looked_up_per_pixel.index_select(0, labels.sub_(self._first_label))
            keys = rows.mul_(width).add_(predicted_values).add_(1)
        self._counts += torch.bincount(keys, minlength=self._counts.numel()).view(self._counts.shape)

    def _count_uint8_with_torch(self, prediction: torch.Tensor, reference: torch.Tensor) -> None:
        # Every uint8 value lies inside both spans: count the 256 x 256 value pairs as they are and add
        # them into their block of the table (label keys from -first, prediction keys from 1).
        pairs = reference.int().mul_(256).add_(prediction)
        block = torch.bincount(pairs, minlength=256 * 256).view(256, 256)
        self._counts[-self._first_label : 256 - self._first_label, 1:257] += block


class EvaluateMeanIoU:
    """The `MeanIoU` interface over evaluate's official `mean_iou` script, for cross-checks.

    Maps are handed to evaluate's `add_batch` as numpy arrays of one dtype, uint8 when the values allow
    (the official script stores maps as images: uint8 is lossless and needs no downcast warning). In a
    distributed run evaluate's own file-based gathering is used and the result of the main process is
    broadcast, so every process returns the same dict.
    `module` is the loaded `evaluate.Metric` itself, for direct use (e.g. timing it).
    """

    def __init__(
        self,
        num_labels: int,
        ignore_index: int | None,
        nan_to_num: float | None = None,
        label_map: Mapping[int, int] | None = None,
        reduce_labels: bool = False,
        evaluate_path: str = "mean_iou",
    ) -> None:
        self.evaluate_path = evaluate_path
        self._compute_arguments = {
            "num_labels": num_labels,
            "ignore_index": ignore_index,
            "nan_to_num": nan_to_num,
            "label_map": None if label_map is None else dict(label_map),
            "reduce_labels": reduce_labels,
        }
        self.module = self._load()

    def update(self, predictions: Any, references: Any) -> None:
        """Adds label maps, in any of the forms `MeanIoU.update` accepts."""
        prediction_maps = _as_map_list(predictions, "predictions")
        reference_maps = _as_map_list(references, "references")
        _check_same_count(prediction_maps, reference_maps)
        self.module.add_batch(
            predictions=_as_image_arrays(prediction_maps), references=_as_image_arrays(reference_maps)
        )

    def compute(self) -> dict[str, Any]:
        """evaluate's result over everything added since the last compute (evaluate then starts afresh)."""
        results = self.module.compute(**self._compute_arguments)
        state = _distributed_state()
        if state is not None:
            from accelerate.utils import broadcast_object_list

            results = broadcast_object_list([results], from_process=0)[0]
        return results

    def reset(self) -> None:
        """Forgets everything added so far."""
        self.module = self._load()

    def _load(self) -> Any:
        import evaluate
        from datasets import DownloadConfig
        from huggingface_hub import constants as hub_constants

        if not hasattr(evaluate, "load"):
            raise MetricBackendUnavailable(
                f"'import evaluate' found {getattr(evaluate, '__file__', evaluate)}, not the evaluate "
                "library: a file named evaluate.py earlier on sys.path (e.g. beside the script being run) "
                "hides it. Run from elsewhere or rename that file, or use metric_backend: streaming."
            )

        state = _distributed_state()
        distributed = {}
        if state is not None:
            from accelerate.utils import broadcast_object_list

            # evaluate's processes find each other's files by a shared experiment id.
            experiment_id = broadcast_object_list([uuid.uuid4().hex], from_process=0)[0]
            distributed = {
                "num_process": state.num_processes,
                "process_id": state.process_index,
                "experiment_id": experiment_id,
            }
        offline = hub_constants.HF_HUB_OFFLINE or evaluate.config.HF_EVALUATE_OFFLINE
        # Offline, look only in the local cache, so nothing can wait on the network.
        download_config = DownloadConfig(local_files_only=True) if offline else None
        try:
            return evaluate.load(self.evaluate_path, download_config=download_config, **distributed)
        except Exception as error:
            raise MetricBackendUnavailable(
                f"Could not load evaluate's mean_iou metric from {self.evaluate_path!r} "
                f"({type(error).__name__}: {error}). "
                + ("Hub access is disabled (HF_HUB_OFFLINE / HF_EVALUATE_OFFLINE). " if offline else "")
                + "Use metric_backend: streaming (the default: the same numbers, nothing to download), "
                "or pass a local copy of the script as evaluate_path."
            ) from None


def create_metric(
    backend: str, *, num_labels: int, ignore_index: int | None, **kwargs: Any
) -> MeanIoU | EvaluateMeanIoU:
    """The mean IoU accumulator for `backend`: "streaming" (`MeanIoU`) or "evaluate" (`EvaluateMeanIoU`).

    `kwargs` are the other arguments of that class (nan_to_num, label_map, reduce_labels, and `device`
    for streaming or `evaluate_path` for evaluate). Both have `update(predictions, references)`,
    `compute()` and `reset()`.

    Raises:
        ValueError: an unknown backend.
        MetricBackendUnavailable: evaluate's script cannot be loaded (offline, Hub unreachable).
    """
    if backend == "streaming":
        return MeanIoU(num_labels, ignore_index, **kwargs)
    if backend == "evaluate":
        return EvaluateMeanIoU(num_labels, ignore_index, **kwargs)
    raise ValueError(f"metric backend must be one of {METRIC_BACKENDS}, got {backend!r}")


# Inputs ------------------------------------------------------------------------------------------------


def _paired_maps(predictions: Any, references: Any) -> Iterator[tuple[str, Any, Any]]:
    """(where, prediction, reference) triples; a (B, H, W) batch is one triple, since counts just add up."""
    prediction_maps = _as_map_list(predictions, "predictions")
    reference_maps = _as_map_list(references, "references")
    _check_same_count(prediction_maps, reference_maps)
    both_arrays = all(isinstance(maps, (torch.Tensor, np.ndarray)) for maps in (predictions, references))
    if both_arrays and tuple(predictions.shape) == tuple(references.shape):
        yield f"batch of {len(prediction_maps)} maps", predictions, references
        return
    for index, (prediction, reference) in enumerate(zip(prediction_maps, reference_maps)):
        yield f"sample {index}", prediction, reference


def _check_same_count(prediction_maps: Sequence[Any], reference_maps: Sequence[Any]) -> None:
    if len(prediction_maps) != len(reference_maps):
        raise ValueError(
            f"Got {len(prediction_maps)} prediction maps but {len(reference_maps)} reference maps"
        )


def _as_map_list(maps: Any, name: str) -> Sequence[Any]:
    if isinstance(maps, (torch.Tensor, np.ndarray)):
        if maps.ndim == 2:
            return [maps]
        if maps.ndim == 3:
            return maps
        raise ValueError(
            f"{name} must be (B, H, W) or (H, W), or a list of (H, W) maps; got shape {tuple(maps.shape)}"
        )
    if isinstance(maps, (list, tuple)):
        return maps
    raise TypeError(f"{name} must be a tensor, an array or a list of (H, W) maps, got {type(maps).__name__}")


def _as_integer_map(label_map: Any, name: str, where: str) -> np.ndarray | torch.Tensor:
    """The map as an integer numpy array or tensor (a tensor stays one, anything else becomes an array)."""
    if isinstance(label_map, torch.Tensor):
        values = label_map.detach()
        is_integer = not (values.is_floating_point() or values.is_complex())
    else:
        values = np.asarray(label_map)
        is_integer = values.dtype.kind in "iub"
    if not is_integer:
        raise TypeError(f"{where}: {name} have dtype {values.dtype}; label maps must hold integer class ids")
    if values.ndim == 0:
        raise ValueError(f"{where}: {name} must be an (H, W) map, got a single value")
    return values


def _as_flat_array(label_map: np.ndarray | torch.Tensor) -> np.ndarray:
    """The map's values as a 1-D numpy array of its own integer dtype (bool as uint8), a view if possible.

    Read-only arrays (PIL, datasets) are fine: the counting never writes into its inputs.
    """
    array = label_map.cpu().numpy() if isinstance(label_map, torch.Tensor) else label_map
    array = array.reshape(-1)
    return array.view(np.uint8) if array.dtype == np.bool_ else array


def _as_flat_tensor(label_map: np.ndarray | torch.Tensor) -> torch.Tensor:
    """The map as a 1-D uint8, int32 or int64 tensor (the dtypes counted), without a copy where possible."""
    if isinstance(label_map, torch.Tensor):
        tensor = label_map
    else:
        array = label_map
        if array.dtype not in (np.uint8, np.int32, np.int64):
            array = array.astype(np.int64)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            tensor = torch.from_numpy(np.ascontiguousarray(array))
    if tensor.dtype not in (torch.uint8, torch.int32, torch.int64):
        tensor = tensor.to(torch.int64)
    return tensor.reshape(-1)


def _as_image_arrays(label_maps: Sequence[Any]) -> list[np.ndarray]:
    """The maps as numpy arrays of the first of uint8, int32, int64 that holds all their values.

    The official script stores each map as an image (uint8: a lossless PNG), and a batch of mixed
    dtypes fails evaluate's format check.
    """
    arrays = [
        label_map.detach().cpu().numpy() if isinstance(label_map, torch.Tensor) else np.asarray(label_map)
        for label_map in label_maps
    ]
    values = [(int(array.min()), int(array.max())) for array in arrays if array.size]
    low, high = min((v[0] for v in values), default=0), max((v[1] for v in values), default=0)
    for dtype in (np.uint8, np.int32):
        if np.iinfo(dtype).min <= low and high <= np.iinfo(dtype).max:
            break
    else:
        dtype = np.int64
    return [array.astype(dtype) for array in arrays]


def _checked_label_map(label_map: Mapping[int, int] | None) -> dict[int, int] | None:
    if label_map is None:
        return None
    try:
        return {int(old): int(new) for old, new in label_map.items()}
    except (TypeError, ValueError, AttributeError):
        raise ValueError(f"label_map must map integer labels to integer labels, got {label_map!r}") from None


# Counting ---------------------------------------------------------------------------------------------


def _label_rows(
    num_labels: int, ignore_index: int | None, label_map: dict[int, int] | None, reduce_labels: bool
) -> tuple[torch.Tensor, int]:
    """(rows, first value): the confusion-matrix row of every raw label value from `first` on.

    Row num_labels means "no class" (an out-of-range label) and row num_labels + 1 "ignored". The
    rows come from applying the definition (label_map, then reduce_labels, then ignore_index) to every
    value in a span holding all values treated specially plus one ordinary value on each side. A value
    beyond the span behaves exactly like the end it lies past (an out-of-range label, after the same
    shift), so inputs are clamped to the span: one table serves every option and every value.
    """
    special = [0, num_labels, 254, 255]  # with the margins below, every uint8 value lies inside
    if ignore_index is not None:
        special += [ignore_index, ignore_index + 1]
    for old, new in (label_map or {}).items():
        special += [old, new, new + 1]
    first, last = min(special) - 1, max(special) + 1
    if last - first + 1 > _MAX_LABEL_TABLE_SIZE:
        raise ValueError(
            f"label_map/ignore_index values span {first}..{last}, too wide for a lookup table; "
            f"use labels within +-{_MAX_LABEL_TABLE_SIZE // 2} of the class range"
        )
    raw = torch.arange(first, last + 1, dtype=torch.int64)
    label = raw.clone()
    for old, new in (label_map or {}).items():
        label[raw == old] = new
    if reduce_labels:
        label[label == 0] = 255
        label -= 1
        label[label == 254] = 255
    rows = torch.where((label < 0) | (label >= num_labels), num_labels, label)
    if ignore_index is not None:
        rows[label == ignore_index] = num_labels + 1
    return rows, first


def _fits_a_byte(values: np.ndarray) -> bool:
    """Whether every value lies in 0..255: no bit above the lowest eight is set in any of them.

    One OR over the values (a negative value has its high bits set) costs a fraction of a min and a max.
    """
    if values.dtype == np.uint8:
        return True
    return int(np.bitwise_or.reduce(values)) & ~0xFF == 0


def _byte_pairs(labels: np.ndarray, predictions: np.ndarray) -> np.ndarray:
    """label * 256 + prediction, for values known to fit a byte (hence the unchecked casts).

    uint16 from uint8 maps (the cheapest to build); otherwise the index type bincount counts in,
    computed straight from wider maps with no cast of theirs (measured faster than narrowing them).
    """
    dtype = np.uint16 if labels.dtype == predictions.dtype == np.uint8 else np.intp
    pairs = np.left_shift(labels, 8, dtype=dtype, casting="unsafe")
    return np.bitwise_or(pairs, predictions, out=pairs, dtype=dtype, casting="unsafe")


def _clamped(values: torch.Tensor, low: int, high: int) -> torch.Tensor:
    """A new int64 tensor of `values` clamped to [low, high]."""
    if values.dtype == torch.int64:
        return values.clamp(low, high)
    return values.long().clamp_(low, high)


# Results ----------------------------------------------------------------------------------------------


def _results_from_confusion(
    confusion: torch.Tensor, num_labels: int, nan_to_num: float | None
) -> dict[str, Any]:
    """evaluate's result dict from the (label, prediction) confusion matrix with its "outside" bins."""
    counts = confusion.cpu().numpy().astype(np.float64)
    intersect = np.diagonal(counts)[:num_labels]
    labelled = counts[:num_labels].sum(axis=1)
    predicted = counts[:, :num_labels].sum(axis=0)
    union = predicted + labelled - intersect
    with np.errstate(divide="ignore", invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # nanmean of no defined class: NaN, as evaluate
        iou = intersect / union
        accuracy = intersect / labelled
        results = {
            "mean_iou": np.nanmean(iou),
            "mean_accuracy": np.nanmean(accuracy),
            "overall_accuracy": intersect.sum() / labelled.sum(),
            "per_category_iou": iou,
            "per_category_accuracy": accuracy,
        }
    if nan_to_num is not None:
        results = {name: np.nan_to_num(value, nan=nan_to_num) for name, value in results.items()}
    return results


# Processes --------------------------------------------------------------------------------------------


def _distributed_state() -> Any:
    """accelerate's PartialState when several processes run together, else None.

    Only consulted once torch.distributed is initialised, so a single-process caller never creates
    accelerate state as a side effect (which could clash with a later `Accelerator(cpu=True)`).
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return None
    from accelerate import PartialState

    state = PartialState()
    return state if state.num_processes > 1 else None


def _summed_over_processes(confusion: torch.Tensor) -> torch.Tensor:
    state = _distributed_state()
    if state is None:
        return confusion
    from accelerate.utils import reduce

    # The collective runs on the backend's device (CUDA for NCCL), whatever device counted.
    return reduce(confusion.to(state.device), reduction="sum").to(confusion.device)


__all__ = [
    "EVALUATE_MODULE_PATH",
    "METRIC_BACKENDS",
    "EvaluateMeanIoU",
    "MeanIoU",
    "MetricBackendUnavailable",
    "create_metric",
    "mean_iou",
]
