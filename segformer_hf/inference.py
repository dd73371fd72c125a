"""Inference as the SegFormer paper evaluates: whole image, sliding window, multi-scale + flip.

The functions work on any semantic-segmentation model whose output has `logits` at a fraction of
the input resolution (ours and transformers' `SegformerForSemanticSegmentation` alike) and on an
already normalised batch `pixel_values` (B, 3, H, W). They return float32 scores at the requested
`output_size`, the size of the label map being predicted, so that callers never have to remember
which resolution the network ran at.

`evaluate_model` runs one of these modes over a data loader and computes mean IoU, on one process
or across all processes of an `accelerate` run; training and `scripts/evaluate.py` share it.
The visualisation helpers (palette, colour mask, overlay, legend) serve `scripts/predict.py` and
image logging.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

Size = tuple[int, int]

INFERENCE_MODES = ("whole", "slide")
AVERAGING_CHOICES = ("probabilities", "logits")


# Inference modes --------------------------------------------------------------------------------------


def predict_whole(
    model: torch.nn.Module,
    pixel_values: torch.Tensor,
    output_size: Size | None = None,
    *,
    autocast_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """One forward pass on the whole image; logits (B, K, *output_size) upsampled bilinearly.

    `output_size` defaults to the input size. Upsampling uses `align_corners=False`, as the paper's
    code and transformers' `post_process_semantic_segmentation` do.
    """
    with torch.inference_mode():
        logits = _forward_logits(model, pixel_values, autocast_dtype)
        return _resize(logits, output_size or tuple(pixel_values.shape[-2:]))


def predict_slide(
    model: torch.nn.Module,
    pixel_values: torch.Tensor,
    num_labels: int | None = None,
    crop_size: int | Size = 512,
    stride: int | Size = 341,
    output_size: Size | None = None,
    *,
    window_batch_size: int = 8,
    autocast_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Sliding-window inference (the paper's Cityscapes protocol); logits (B, K, *output_size).

    Windows of `crop_size` start every `stride` pixels; the last window in each direction is moved
    back to end exactly at the border, so every window has the full crop size and no pixel is missed.
    Each window's logits are upsampled to the window's size and summed into a full-size canvas, which
    is divided by how many windows covered each pixel. An image smaller than the crop is zero-padded at
    the bottom/right first (zero is the mean colour after normalisation) and the padding is cut off
    again before the final resize to `output_size` (default: the input size).

    `window_batch_size` is how many crops (windows x images) go through the model at once: larger
    is faster until memory runs out. `num_labels` defaults to `model.config.num_labels`.
    """
    crop_height, crop_width = _pair(crop_size, "crop_size")
    stride_height, stride_width = _pair(stride, "stride")
    if not (0 < stride_height <= crop_height and 0 < stride_width <= crop_width):
        raise ValueError(
            f"stride {(stride_height, stride_width)} must be positive and no larger than crop_size "
            f"{(crop_height, crop_width)}, or some pixels would be covered by no window."
        )
    if window_batch_size < 1:
        raise ValueError(f"window_batch_size must be >= 1, got {window_batch_size}")
    num_labels = num_labels or model.config.num_labels
    batch_size, _, height, width = pixel_values.shape
    output_size = output_size or (height, width)
    device, _ = _device_and_dtype(model)
    with torch.inference_mode():
        padded = F.pad(
            pixel_values.to(device),
            (0, max(crop_width - width, 0), 0, max(crop_height - height, 0)),
        )
        padded_height, padded_width = padded.shape[-2:]
        windows = [
            (top, left)
            for top in _window_starts(padded_height, crop_height, stride_height)
            for left in _window_starts(padded_width, crop_width, stride_width)
        ]
        scores = torch.zeros(batch_size, num_labels, padded_height, padded_width, device=device)
        coverage = torch.zeros(1, 1, padded_height, padded_width, device=device)
        windows_per_pass = max(window_batch_size // batch_size, 1)
        for first in range(0, len(windows), windows_per_pass):
            chunk = windows[first : first + windows_per_pass]
            # n_windows x (B, C, h, w) -> (n_windows * B, C, h, w), window-major
            crops = torch.cat(
                [padded[:, :, top : top + crop_height, left : left + crop_width] for top, left in chunk]
            )
            logits = _resize(_forward_logits(model, crops, autocast_dtype), (crop_height, crop_width))
            # (n_windows * B, K, h, w) -> (n_windows, B, K, h, w)
            logits = logits.view(len(chunk), batch_size, *logits.shape[1:])
            for (top, left), window_logits in zip(chunk, logits):
                scores[:, :, top : top + crop_height, left : left + crop_width] += window_logits
                coverage[:, :, top : top + crop_height, left : left + crop_width] += 1
        scores = scores[:, :, :height, :width] / coverage[:, :, :height, :width]
        return _resize(scores, output_size)


def predict_multiscale(
    model: torch.nn.Module,
    pixel_values: torch.Tensor,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    mode: str = "whole",
    output_size: Size | None = None,
    *,
    crop_size: int | Size | None = None,
    stride: int | Size | None = None,
    num_labels: int | None = None,
    size_divisor: int | None = None,
    average: str = "probabilities",
    window_batch_size: int = 8,
    autocast_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Test-time augmentation: every scale, optionally also mirrored, averaged at `output_size`.

    The input is resized by each ratio in `scales` (bilinear; with `size_divisor`, each side is then
    rounded up to a multiple of it, like the SegFormer code's `AlignedResize` with 32) and, with
    `flip`, also mirrored left-right. Each view is predicted with `mode` ("whole" or "slide" with
    `crop_size`/`stride`), resized to `output_size` (default: the input size) and mirrored back.

    With `average="probabilities"` (the default) each view's logits are turned into per-pixel class
    probabilities (softmax; sigmoid for a single-label model) before averaging, which is what the
    SegFormer/mmsegmentation code does (0.x `aug_test` sums `inference()`'s softmax outputs, 1.x
    `SegTTAModel.merge_preds` averages `softmax`), so a confident view cannot outvote the others by
    logit magnitude alone. `average="logits"` averages raw logits instead. Returns (B, K, *output_size).
    """
    if mode not in INFERENCE_MODES:
        raise ValueError(f"mode must be one of {INFERENCE_MODES}, got {mode!r}")
    if average not in AVERAGING_CHOICES:
        raise ValueError(f"average must be one of {AVERAGING_CHOICES}, got {average!r}")
    if not scales or any(scale <= 0 for scale in scales):
        raise ValueError(f"scales must be a non-empty list of positive ratios, got {list(scales)}")
    if mode == "slide" and (crop_size is None or stride is None):
        raise ValueError("mode='slide' needs crop_size and stride")
    height, width = pixel_values.shape[-2:]
    output_size = output_size or (height, width)
    total = None
    num_views = 0
    with torch.inference_mode():
        for scale in scales:
            scaled_size = scaled_image_size((height, width), scale, size_divisor)
            scaled = _resize(pixel_values, scaled_size)
            for mirrored in (False, True) if flip else (False,):
                view = scaled.flip(-1) if mirrored else scaled
                if mode == "whole":
                    scores = predict_whole(model, view, output_size, autocast_dtype=autocast_dtype)
                else:
                    scores = predict_slide(
                        model,
                        view,
                        num_labels,
                        crop_size,
                        stride,
                        output_size,
                        window_batch_size=window_batch_size,
                        autocast_dtype=autocast_dtype,
                    )
                if mirrored:
                    scores = scores.flip(-1)
                if average == "probabilities":
                    scores = scores_to_probabilities(scores)
                total = scores if total is None else total.add_(scores)
                num_views += 1
        return total / num_views


def parse_scales(text: str) -> list[float]:
    """Test-time scales from the command line: "0.5,0.75,1.0" -> [0.5, 0.75, 1.0]."""
    return [float(value) for value in text.split(",") if value.strip()]


def scaled_image_size(size: Size, scale: float, size_divisor: int | None = None) -> Size:
    """(H, W) times `scale`, rounded half up; then rounded up to a multiple of `size_divisor` if given."""
    scaled = [max(int(side * scale + 0.5), 1) for side in size]
    if size_divisor:
        scaled = [math.ceil(side / size_divisor) * size_divisor for side in scaled]
    return scaled[0], scaled[1]


def scores_to_probabilities(scores: torch.Tensor) -> torch.Tensor:
    """Per-pixel class probabilities from logits (B, K, H, W): softmax, or sigmoid when K == 1."""
    return scores.sigmoid() if scores.shape[1] == 1 else scores.softmax(dim=1)


def scores_to_labels(scores: torch.Tensor, are_probabilities: bool = False) -> torch.Tensor:
    """Label map (B, H, W) from scores (B, K, H, W): the arg-max class, or a threshold when K == 1.

    A single-label (binary) model predicts class 1 where its probability exceeds 0.5, i.e. where its
    logit is positive.
    """
    if scores.shape[1] == 1:
        threshold = 0.5 if are_probabilities else 0.0
        return (scores[:, 0] > threshold).long()
    return scores.argmax(dim=1)


def predict_scores(
    model: torch.nn.Module,
    pixel_values: torch.Tensor,
    output_size: Size | None = None,
    *,
    mode: str = "whole",
    crop_size: int | Size | None = None,
    stride: int | Size | None = None,
    scales: Sequence[float] | None = None,
    flip: bool = False,
    size_divisor: int | None = None,
    average: str = "probabilities",
    window_batch_size: int = 8,
    autocast_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, bool]:
    """Dispatches to the right mode; returns (scores (B, K, *output_size), whether they are probabilities).

    Without `scales` and `flip` this is plain whole or sliding-window inference on the input as it is;
    otherwise multi-scale/flip test-time augmentation.
    """
    if mode not in INFERENCE_MODES:
        raise ValueError(f"mode must be one of {INFERENCE_MODES}, got {mode!r}")
    if scales or flip:
        scores = predict_multiscale(
            model,
            pixel_values,
            scales or (1.0,),
            flip,
            mode,
            output_size,
            crop_size=crop_size,
            stride=stride,
            size_divisor=size_divisor,
            average=average,
            window_batch_size=window_batch_size,
            autocast_dtype=autocast_dtype,
        )
        return scores, average == "probabilities"
    if mode == "slide":
        if crop_size is None or stride is None:
            raise ValueError("mode='slide' needs crop_size and stride")
        scores = predict_slide(
            model,
            pixel_values,
            None,
            crop_size,
            stride,
            output_size,
            window_batch_size=window_batch_size,
            autocast_dtype=autocast_dtype,
        )
        return scores, False
    return predict_whole(model, pixel_values, output_size, autocast_dtype=autocast_dtype), False


def segment(
    model: torch.nn.Module,
    images: Any,
    image_processor_or_norm: Any = None,
    mode: str = "whole",
    *,
    crop_size: int | Size | None = None,
    stride: int | Size | None = None,
    scales: Sequence[float] | None = None,
    flip: bool = False,
    size_divisor: int | None = None,
    average: str = "probabilities",
    window_batch_size: int = 8,
    autocast_dtype: torch.dtype | None = None,
) -> list[np.ndarray]:
    """Label maps (H, W) int64, one per image at the image's own size.

    `images` is one image or a list: PIL images or (H, W, 3) uint8 arrays. `image_processor_or_norm`
    is a transformers image processor (e.g. the model's `SegformerImageProcessor`: its resize, rescale
    and normalisation are applied), or a `(mean, std)` pair of per-channel values in [0, 1] (the image
    is used at its own size), or None for ImageNet normalisation at the image's own size. The model is
    put in eval mode for the call and restored afterwards.
    """
    if isinstance(images, (Image.Image, np.ndarray)):
        images = [images]
    with _eval_mode(model):
        label_maps = []
        for image in images:
            rgb = _as_rgb_array(image)
            pixel_values = prepare_pixel_values(rgb, image_processor_or_norm)
            scores, are_probabilities = predict_scores(
                model,
                pixel_values,
                rgb.shape[:2],
                mode=mode,
                crop_size=crop_size,
                stride=stride,
                scales=scales,
                flip=flip,
                size_divisor=size_divisor,
                average=average,
                window_batch_size=window_batch_size,
                autocast_dtype=autocast_dtype,
            )
            label_maps.append(scores_to_labels(scores, are_probabilities)[0].cpu().numpy())
        return label_maps


def prepare_pixel_values(image: Any, image_processor_or_norm: Any = None) -> torch.Tensor:
    """(1, 3, h, w) float32 model input for one image, by an image processor or a (mean, std) pair."""
    if image_processor_or_norm is not None and callable(image_processor_or_norm):
        return image_processor_or_norm(images=image, return_tensors="pt")["pixel_values"]
    mean, std = image_processor_or_norm or imagenet_normalization()
    rgb = _as_rgb_array(image)
    # (H, W, 3) uint8 -> (1, 3, H, W) float in [0, 1]
    pixels = torch.from_numpy(rgb).permute(2, 0, 1).unsqueeze(0).float() / 255.0
    mean_tensor = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    std_tensor = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return (pixels - mean_tensor) / std_tensor


def imagenet_normalization() -> tuple[list[float], list[float]]:
    """The (mean, std) every published SegFormer checkpoint was trained with."""
    from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    return list(IMAGENET_DEFAULT_MEAN), list(IMAGENET_DEFAULT_STD)


def _forward_logits(
    model: torch.nn.Module, pixel_values: torch.Tensor, autocast_dtype: torch.dtype | None
) -> torch.Tensor:
    """The model's logits as float32, run on the model's device in its dtype (or under autocast)."""
    device, dtype = _device_and_dtype(model)
    pixel_values = pixel_values.to(device=device, dtype=dtype)
    with torch.autocast(device_type=device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        logits = model(pixel_values=pixel_values, return_dict=True).logits
    return logits.float()


def _device_and_dtype(model: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    parameter = next(model.parameters())
    return parameter.device, parameter.dtype


def _resize(tensor: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    size = (int(size[0]), int(size[1]))
    if tuple(tensor.shape[-2:]) == size:
        return tensor
    return F.interpolate(tensor, size=size, mode="bilinear", align_corners=False)


def _window_starts(length: int, crop: int, stride: int) -> list[int]:
    """Window origins along one axis (length >= crop): every `stride`, the last one flush with the end."""
    count = (length - crop + stride - 1) // stride + 1
    return [min(index * stride, length - crop) for index in range(count)]


def _pair(value: int | Sequence[int], name: str) -> Size:
    if isinstance(value, int):
        return value, value
    if len(value) != 2:
        raise ValueError(f"{name} must be an int or (height, width), got {value!r}")
    return int(value[0]), int(value[1])


def _as_rgb_array(image: Any) -> np.ndarray:
    if isinstance(image, Image.Image):
        return np.array(image.convert("RGB"))
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[-1] != 3 or array.dtype != np.uint8:
        raise ValueError(
            f"Expected a PIL image or an (H, W, 3) uint8 array, got {array.dtype} of shape {array.shape}"
        )
    return array


@contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Eval mode for a block, then the previous mode again (training calls evaluation mid-run)."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


# Evaluation ------------------------------------------------------------------------------------------------


def evaluate_model(
    model: torch.nn.Module,
    dataloader: Iterable[dict[str, Any]],
    num_labels: int,
    ignore_index: int,
    *,
    accelerator: Any = None,
    mode: str = "whole",
    crop_size: int | Size | None = None,
    stride: int | Size | None = None,
    scales: Sequence[float] | None = None,
    flip: bool = False,
    size_divisor: int | None = None,
    average: str = "probabilities",
    metric_backend: str = "streaming",
    window_batch_size: int = 8,
    autocast_dtype: torch.dtype | None = None,
    show_progress: bool = False,
) -> dict[str, Any]:
    """Mean IoU (and accuracies) of `model` over `dataloader`, reduced over all processes.

    Each batch holds normalised "pixel_values" (a (B, 3, h, w) tensor, or a list of (3, h, w) tensors
    when sizes differ) and "labels" at the original resolution (a (B, H, W) tensor or a list of (H, W)
    tensors). Predictions are made at each label's size with the given inference mode (see
    `predict_scores`), so the metric is computed at full resolution, as the paper reports it. A
    single-label model (`num_labels` 1) is scored over two classes, background (0) and foreground (1).

    In a distributed run every process must be given a disjoint part of the data (no padding
    duplicates: shard the dataset, or let `accelerator.prepare` split the loader with
    `even_batches=False`); the metric then sums its statistics across processes, so all processes
    return the same result. The model's training mode is restored on return.
    """
    from tqdm.auto import tqdm

    from . import metrics as seg_metrics

    # A single-label (binary) model predicts 0 (background) or 1 (foreground): two classes to score.
    metric_classes = 2 if num_labels == 1 else num_labels
    metric = seg_metrics.create_metric(metric_backend, num_labels=metric_classes, ignore_index=ignore_index)
    network = accelerator.unwrap_model(model) if accelerator is not None else model
    is_main_process = accelerator is None or accelerator.is_main_process
    num_samples = 0
    with _eval_mode(network):
        for batch in tqdm(dataloader, desc="Evaluating", disable=not (show_progress and is_main_process)):
            for pixel_values, labels in _same_size_groups(batch):
                scores, are_probabilities = predict_scores(
                    network,
                    pixel_values,
                    tuple(labels.shape[-2:]),
                    mode=mode,
                    crop_size=crop_size,
                    stride=stride,
                    scales=scales,
                    flip=flip,
                    size_divisor=size_divisor,
                    average=average,
                    window_batch_size=window_batch_size,
                    autocast_dtype=autocast_dtype,
                )
                metric.update(scores_to_labels(scores, are_probabilities).cpu(), labels.cpu())
                num_samples += len(labels)
    results = metric.compute()
    results["num_samples"] = _sum_over_processes(num_samples, accelerator)
    return results


def _same_size_groups(batch: dict[str, Any]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(pixel_values (b, 3, h, w), labels (b, H, W)) groups that can be predicted in one call."""
    pixel_values, labels = batch["pixel_values"], batch["labels"]
    if isinstance(pixel_values, torch.Tensor) and isinstance(labels, torch.Tensor):
        yield pixel_values, labels
        return
    for image, label in zip(pixel_values, labels):
        image = torch.as_tensor(image)
        # (3, h, w) -> (1, 3, h, w); (H, W) -> (1, H, W)
        yield (
            (image if image.ndim == 4 else image.unsqueeze(0)),
            torch.as_tensor(label).reshape(1, *label.shape[-2:]),
        )


def _sum_over_processes(count: int, accelerator: Any) -> int:
    if accelerator is None or accelerator.num_processes == 1:
        return count
    total = accelerator.reduce(torch.tensor([count], device=accelerator.device), reduction="sum")
    return int(total.item())


def format_metrics_table(results: dict[str, Any], id2label: dict[int, str], title: str = "Evaluation") -> str:
    """The overall metrics, then IoU and accuracy per class by name ("n/a": class absent from the labels)."""

    def number(value: Any) -> str:
        return (
            "   n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:6.4f}"
        )

    names = [str(id2label.get(index, index)) for index in range(len(results["per_category_iou"]))]
    if len(id2label) == 1 and len(names) == 2:
        # A single-label (binary) model's one class is the foreground: class 1 of its two-class metric.
        names = ["background", str(next(iter(id2label.values())))]
    name_width = max([len("class"), *map(len, names)])
    lines = [
        title,
        f"  mean IoU          {number(results['mean_iou'])}",
        f"  mean accuracy     {number(results['mean_accuracy'])}",
        f"  overall accuracy  {number(results['overall_accuracy'])}",
        "",
        f"  {'class':<{name_width}}     IoU  accuracy",
    ]
    for name, iou, accuracy in zip(names, results["per_category_iou"], results["per_category_accuracy"]):
        lines.append(f"  {name:<{name_width}}  {number(float(iou))}    {number(float(accuracy))}")
    return "\n".join(lines)


# Loading a model for inference ------------------------------------------------------------------------


def load_model_for_inference(
    model_name_or_path: str | os.PathLike,
    *,
    trust_remote_code: bool = False,
    device: torch.device | str | None = None,
    torch_dtype: torch.dtype | None = None,
) -> tuple[torch.nn.Module, Any]:
    """A semantic-segmentation model (eval mode) and its image processor, from a directory or Hub id.

    Works for segformer_hf checkpoints and for transformers' own Segformer checkpoints alike, through
    `AutoModelForSemanticSegmentation` (this package registers itself with it on import). When the
    checkpoint has no `preprocessor_config.json`, a default `SegformerImageProcessor` (ImageNet
    normalisation, 512x512 resize) stands in, with a note on stderr.
    """
    import sys

    from transformers import AutoImageProcessor, AutoModelForSemanticSegmentation, SegformerImageProcessor

    import segformer_hf  # noqa: F401  (registers the segformer_hf model type with the Auto classes)

    dtype_argument = {} if torch_dtype is None else {"dtype": torch_dtype}
    model = AutoModelForSemanticSegmentation.from_pretrained(
        model_name_or_path, trust_remote_code=trust_remote_code, **dtype_argument
    )
    try:
        image_processor = AutoImageProcessor.from_pretrained(
            model_name_or_path, trust_remote_code=trust_remote_code
        )
    except OSError:
        print(
            f"No preprocessor_config.json in {model_name_or_path}: using SegformerImageProcessor defaults "
            "(ImageNet mean/std, 512x512 resize).",
            file=sys.stderr,
        )
        image_processor = SegformerImageProcessor()
    if device is not None:
        model.to(device)
    return model.eval(), image_processor


# Visualisation ------------------------------------------------------------------------------------------


def default_palette(num_labels: int) -> np.ndarray:
    """A fixed, deterministic palette (num_labels, 3) uint8 with distinct colours for up to 256 classes.

    It is the PASCAL VOC colour map: the bits of the class index are spread over the high bits of
    R, G and B in turn, so neighbouring class ids get clearly different colours.
    """
    palette = np.zeros((num_labels, 3), dtype=np.uint8)
    for label in range(num_labels):
        value, red, green, blue = label, 0, 0, 0
        for bit in range(7, -1, -1):
            red |= (value & 1) << bit
            green |= ((value >> 1) & 1) << bit
            blue |= ((value >> 2) & 1) << bit
            value >>= 3
        palette[label] = red, green, blue
    return palette


def resolve_palette(
    num_labels: int, config: Any = None, classes_file: str | os.PathLike | None = None
) -> np.ndarray:
    """The colours (num_labels, 3) uint8 to draw classes with.

    The first source that has one wins: `classes_file` (a JSON with a "palette" or "palette_rgb" list,
    like the bundled data's classes.json), the model config's `palette`/`palette_rgb` attribute, then
    `default_palette`.

    Raises:
        ValueError: a palette has too few colours or a colour is not three values in 0..255.
    """
    if classes_file is not None:
        with open(classes_file, encoding="utf-8") as handle:
            payload = json.load(handle)
        colours = payload.get("palette", payload.get("palette_rgb"))
        if colours is None:
            raise ValueError(f"{classes_file} has no 'palette' or 'palette_rgb' list")
        return _checked_palette(colours, num_labels, str(classes_file))
    for attribute in ("palette", "palette_rgb"):
        colours = getattr(config, attribute, None) if config is not None else None
        if colours is not None:
            return _checked_palette(colours, num_labels, f"the model config's {attribute}")
    return default_palette(num_labels)


def _checked_palette(colours: Any, num_labels: int, source: str) -> np.ndarray:
    palette = np.asarray(colours)
    if palette.ndim != 2 or palette.shape[1] != 3 or not np.issubdtype(palette.dtype, np.integer):
        raise ValueError(f"The palette in {source} must be a list of [R, G, B] integer triples")
    if len(palette) < num_labels:
        raise ValueError(f"The palette in {source} has {len(palette)} colours for {num_labels} classes")
    if palette.min() < 0 or palette.max() > 255:
        raise ValueError(f"The palette in {source} has values outside 0..255")
    return palette[:num_labels].astype(np.uint8)


def colorize(label_map: np.ndarray, palette: np.ndarray) -> Image.Image:
    """A colour image of a label map (H, W).

    With at most 256 classes it is a palette ("P" mode) image: it looks coloured in any viewer and
    `np.asarray(Image.open(path))` still gives back the class ids exactly. Otherwise plain RGB.

    Raises:
        ValueError: the map holds a label without a palette colour.
    """
    label_map = np.asarray(label_map)
    if label_map.size and (label_map.min() < 0 or label_map.max() >= len(palette)):
        raise ValueError(
            f"Label map values span {label_map.min()}..{label_map.max()}, but the palette has {len(palette)} colours"
        )
    if len(palette) <= 256:
        image = Image.fromarray(label_map.astype(np.uint8), mode="P")
        image.putpalette(palette.astype(np.uint8).flatten().tolist())
        return image
    return Image.fromarray(palette[label_map])


def overlay(
    image: Image.Image, label_map: np.ndarray, palette: np.ndarray, alpha: float = 0.5
) -> Image.Image:
    """The image with its label map's colours alpha-blended on top (`alpha` is the mask's weight)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    rgb = image.convert("RGB")
    mask = colorize(label_map, palette).convert("RGB")
    if mask.size != rgb.size:
        raise ValueError(f"Label map size {mask.size} differs from image size {rgb.size} (both as W x H)")
    return Image.blend(rgb, mask, alpha)


def render_legend(id2label: dict[int, str], palette: np.ndarray, swatch_size: int = 16) -> Image.Image:
    """One row per class: a colour swatch and the class name (PIL's default font), white background."""
    font = ImageFont.load_default()
    padding = swatch_size // 2
    row_height = swatch_size + padding
    labels = [(index, str(id2label.get(index, index))) for index in range(len(palette))]
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_width = max((measure.textbbox((0, 0), name, font=font)[2] for _, name in labels), default=0)
    width = padding * 3 + swatch_size + text_width
    height = padding + row_height * len(labels)
    legend = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(legend)
    for row, (index, name) in enumerate(labels):
        top = padding + row * row_height
        colour = tuple(int(value) for value in palette[index])
        draw.rectangle(
            [padding, top, padding + swatch_size - 1, top + swatch_size - 1], fill=colour, outline="black"
        )
        text_top = top + (swatch_size - measure.textbbox((0, 0), name, font=font)[3]) // 2
        draw.text((padding * 2 + swatch_size, text_top), name, fill="black", font=font)
    return legend


def list_image_files(inputs: Iterable[str | os.PathLike]) -> list[Path]:
    """The files named in `inputs`, directories expanded to their image files (by extension, sorted).

    Raises:
        FileNotFoundError: an input does not exist, or a directory holds no image files.
    """
    image_suffixes = {suffix.lower() for suffix in Image.registered_extensions()}
    files = []
    for entry in map(Path, inputs):
        if entry.is_dir():
            found = sorted(path for path in entry.iterdir() if path.suffix.lower() in image_suffixes)
            if not found:
                raise FileNotFoundError(f"No image files in directory {entry}")
            files.extend(found)
        elif entry.is_file():
            files.append(entry)
        else:
            raise FileNotFoundError(f"No such file or directory: {entry}")
    return files


def verify_image_file(path: str | os.PathLike) -> None:
    """Cheaply checks that `path` is an image PIL can read, without decoding all its pixels.

    Raises:
        ValueError: the file is not a readable image (the message names the file).
    """
    try:
        with Image.open(path) as image:
            image.verify()
    except (OSError, SyntaxError, ValueError) as error:
        raise ValueError(f"{path} is not a readable image: {error}") from error


def load_rgb_image(path: str | os.PathLike) -> Image.Image:
    """The image at `path` as RGB, fully decoded.

    Raises:
        ValueError: the file is not an image PIL can read (the message names the file).
    """
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, SyntaxError, ValueError) as error:
        raise ValueError(f"{path} is not a readable image: {error}") from error


# Writing files atomically ----------------------------------------------------------------------------------


def write_atomic(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """Calls `write(temporary_path)` then renames the file into place: readers never see half a file.

    The temporary file sits in the destination directory (so the rename is atomic) and keeps the
    destination's suffix (so writers such as PIL pick the right format); it is removed on failure.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        write(temporary)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | os.PathLike, payload: Any) -> None:
    """JSON with NaN written as null (strict JSON has no NaN), atomically."""
    text = json.dumps(_nan_to_none(payload), indent=2, allow_nan=False) + "\n"
    write_atomic(path, lambda temporary: temporary.write_text(text, encoding="utf-8"))


def _nan_to_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _nan_to_none(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_nan_to_none(item) for item in value]
    if isinstance(value, (np.floating, np.integer)):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value
