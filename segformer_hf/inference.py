"""Inference as the SegFormer paper evaluates: whole image, sliding window, multi-scale + flip.

The functions work on any semantic-segmentation model whose output has `logits` at a fraction of
the input resolution (ours and transformers' `SegformerForSemanticSegmentation` alike) and on an
already normalised batch `pixel_values` (B, 3, H, W). They return float32 scores at the requested
`output_size`, the size of the label map being predicted, so that callers never have to remember
which resolution the network ran at.

`InferenceProtocol` names one way of predicting (mode, resize bound, window, stride, scales, flip)
with one default rule for each setting; training's evaluation, `segformer-hf evaluate` and
`segformer-hf predict` all take one, so a model is judged the way it is used.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import platform
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForSemanticSegmentation, SegformerImageProcessor
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

Size = tuple[int, int]

logger = logging.getLogger(__name__)

INFERENCE_MODES = ("whole", "slide")
# The paper's sliding windows overlap by a third of the crop (512 -> 341, 1024 -> 768 on Cityscapes).
DEFAULT_STRIDE_FRACTION = 2 / 3


@dataclass(frozen=True)
class InferenceProtocol:
    """How images are turned into predictions, defined once and used by every caller (mmseg's test_cfg).

    Attributes:
        mode: "whole" (one forward pass per image) or "slide" (windows of `crop_size`).
        img_scale: keep-ratio resize bound (long side, short side) applied to an image before it is
            predicted, or None to predict each image at its own size.
        crop_size: sliding-window size (height, width); needed by mode "slide".
        stride: sliding-window stride; None means `DEFAULT_STRIDE_FRACTION` of the crop.
        scales: test-time scale ratios (multi-scale); None means the image as it is.
        flip: also predict the mirrored image and average.
        size_divisor: round each scaled side up to a multiple of this (the SegFormer code's AlignedResize).
    """

    mode: str = "whole"
    img_scale: Size | None = None
    crop_size: Size | None = None
    stride: Size | None = None
    scales: tuple[float, ...] | None = None
    flip: bool = False
    size_divisor: int | None = None

    def __post_init__(self) -> None:
        # Lists from YAML, JSON or argparse become tuples: the protocol is a frozen, hashable value.
        for name in ("img_scale", "crop_size", "stride", "scales"):
            value = getattr(self, name)
            if isinstance(value, int):
                value = (value, value)
            if value is not None:
                object.__setattr__(self, name, tuple(value))

    @property
    def window_stride(self) -> Size | None:
        """The stride the sliding window really uses: the given one, else the default rule."""
        if self.stride is not None:
            return self.stride
        if self.crop_size is None:
            return None
        return tuple(max(round(side * DEFAULT_STRIDE_FRACTION), 1) for side in self.crop_size)

    def validate(self) -> None:
        """Raises ValueError naming the setting that cannot work."""
        if self.mode not in INFERENCE_MODES:
            raise ValueError(f"mode must be one of {INFERENCE_MODES}, got {self.mode!r}")
        for name in ("img_scale", "crop_size", "stride"):
            value = getattr(self, name)
            if value is not None and (len(value) != 2 or min(value) <= 0):
                raise ValueError(f"{name} must be two positive sides, got {list(value)}")
        if self.mode == "slide":
            if self.crop_size is None:
                raise ValueError("mode 'slide' needs crop_size")
            if not all(0 < s <= c for s, c in zip(self.window_stride, self.crop_size)):
                raise ValueError(
                    f"stride {list(self.window_stride)} must be positive and no larger than crop_size "
                    f"{list(self.crop_size)}, or some pixels would be covered by no window"
                )
        if self.scales is not None and (not self.scales or min(self.scales) <= 0):
            raise ValueError(f"scales must be positive ratios, got {list(self.scales)}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: what image processors and result files store."""
        return {
            name: list(value) if isinstance(value, tuple) else value for name, value in self.__dict__.items()
        }

    @classmethod
    def from_args(cls, args: argparse.Namespace, saved: InferenceProtocol | None = None) -> InferenceProtocol:
        """The protocol given by the flags of `add_inference_arguments`, on top of `saved` (the model's own).

        A flag left out keeps the saved setting; `--no_resize` means no `img_scale`. Without a saved protocol
        the defaults are whole-image inference at each image's own size.
        """
        base = saved or cls()
        given = {
            "mode": args.mode,
            "img_scale": args.img_scale,
            "crop_size": _optional_pair(args.crop_size),
            "stride": _optional_pair(args.stride),
            "scales": args.scales,
            "flip": args.flip,
            "size_divisor": args.size_divisor,
        }
        settings = {name: getattr(base, name) if value is None else value for name, value in given.items()}
        if getattr(args, "no_resize", False):
            settings["img_scale"] = None
        return cls(**settings)

    @classmethod
    def from_image_processor(cls, image_processor: Any) -> InferenceProtocol | None:
        """The protocol a model was validated with, as its saved image processor records it.

        None for an image processor that records none (transformers' own `SegformerImageProcessor`, the
        processor of checkpoints saved before segformer_hf stored its protocol).
        """
        if getattr(image_processor, "inference_mode", None) is None:
            return None
        return cls(
            mode=image_processor.inference_mode,
            img_scale=image_processor.img_scale if getattr(image_processor, "do_resize", True) else None,
            crop_size=getattr(image_processor, "crop_size", None),
            stride=getattr(image_processor, "stride", None),
            scales=getattr(image_processor, "scales", None),
            flip=bool(getattr(image_processor, "flip", False)),
            size_divisor=getattr(image_processor, "size_divisor", None),
        )

    def image_processor(self, **settings: Any) -> Any:
        """A `SegformerHFImageProcessor` that resizes as this protocol says and records it (what training
        saves with the model); `settings` are its other fields (normalisation, `do_reduce_labels`)."""
        from .image_processing_segformer_hf import SegformerHFImageProcessor

        return SegformerHFImageProcessor(
            img_scale=self.img_scale,
            inference_mode=self.mode,
            crop_size=self.crop_size,
            stride=self.stride,
            scales=self.scales,
            flip=self.flip,
            size_divisor=self.size_divisor,
            **settings,
        )


def add_inference_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of an `InferenceProtocol`, shared by `segformer-hf evaluate` and `segformer-hf predict`.

    Every flag defaults to None, "not given": the model's saved protocol fills it in (`from_args`).
    """
    group = parser.add_argument_group(
        "inference protocol (default: the one the model was validated with, saved with it)"
    )
    group.add_argument(
        "--mode", choices=INFERENCE_MODES, default=None, help="whole or slide (default: whole)"
    )
    group.add_argument(
        "--img_scale",
        type=int,
        nargs=2,
        default=None,
        metavar=("LONG", "SHORT"),
        help="keep-ratio resize bound before inference, e.g. 2048 512 (default: the model's own, else none)",
    )
    group.add_argument(
        "--no_resize",
        action="store_true",
        help="predict at each image's own size, whatever img_scale the model was validated with",
    )
    group.add_argument("--crop_size", type=int, nargs="+", default=None, help="slide window: S or H W")
    group.add_argument(
        "--stride",
        type=int,
        nargs="+",
        default=None,
        help="slide stride: S or H W (default: 2/3 of the crop)",
    )
    group.add_argument(
        "--scales", type=parse_scales, default=None, help="test-time scales, e.g. 0.5,0.75,1.0"
    )
    group.add_argument(
        "--flip",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also predict the mirrored image and average",
    )
    group.add_argument("--size_divisor", type=int, default=None, help="round scaled sides up to a multiple")


def _optional_pair(values: Sequence[int] | None) -> Size | None:
    if values is None:
        return None
    if len(values) not in (1, 2):
        raise ValueError(f"expected S or H W, got {list(values)}")
    return (values[0], values[-1])


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
    window_batch_size: int = 8,
    autocast_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Test-time augmentation: every scale, optionally also mirrored, averaged at `output_size`.

    The input is resized by each ratio in `scales` (bilinear; with `size_divisor`, each side is then
    rounded up to a multiple of it, like the SegFormer code's `AlignedResize` with 32) and, with
    `flip`, also mirrored left-right. Each view is predicted with `mode` ("whole" or "slide" with
    `crop_size`/`stride`), resized to `output_size` (default: the input size) and mirrored back.

    Each view's logits are turned into per-pixel class probabilities (softmax; sigmoid for a
    single-label model) before averaging, which is what the SegFormer/mmsegmentation code does (0.x
    `aug_test` sums `inference()`'s softmax outputs, 1.x `SegTTAModel.merge_preds` averages
    `softmax`), so a confident view cannot outvote the others by logit magnitude alone.
    Returns probabilities (B, K, *output_size).
    """
    if mode not in INFERENCE_MODES:
        raise ValueError(f"mode must be one of {INFERENCE_MODES}, got {mode!r}")
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
    protocol: InferenceProtocol | None = None,
    *,
    window_batch_size: int = 8,
    autocast_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, bool]:
    """Predicts as `protocol` says; returns (scores (B, K, *output_size), whether they are probabilities).

    `pixel_values` are already resized (the protocol's `img_scale` is applied by whoever prepared
    them). Without scales and flip this is plain whole or sliding-window inference, returning logits;
    otherwise multi-scale/flip test-time augmentation, returning averaged probabilities.
    """
    protocol = protocol or InferenceProtocol()
    protocol.validate()
    if protocol.scales or protocol.flip:
        scores = predict_multiscale(
            model,
            pixel_values,
            protocol.scales or (1.0,),
            protocol.flip,
            protocol.mode,
            output_size,
            crop_size=protocol.crop_size,
            stride=protocol.window_stride,
            size_divisor=protocol.size_divisor,
            window_batch_size=window_batch_size,
            autocast_dtype=autocast_dtype,
        )
        return scores, True
    if protocol.mode == "slide":
        scores = predict_slide(
            model,
            pixel_values,
            None,
            protocol.crop_size,
            protocol.window_stride,
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
    protocol: InferenceProtocol | None = None,
    *,
    window_batch_size: int = 8,
    autocast_dtype: torch.dtype | None = None,
) -> list[np.ndarray]:
    """Label maps (H, W) int64, one per image at the image's own size.

    `images` is one image or a list: PIL images or (H, W, 3) uint8 arrays. `image_processor_or_norm`
    is a transformers image processor (e.g. the model's own: its resize, rescale and normalisation are
    applied), or a `(mean, std)` pair of per-channel values in [0, 1] (the image is used at its own
    size), or None for ImageNet normalisation at the image's own size. The model is put in eval mode
    for the call and restored afterwards.
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
                protocol,
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


def cpu_lacks_bf16() -> bool:
    """Whether this is an x86 CPU known to lack bf16 arithmetic (bf16 autocast then runs slower than float32).

    On the CPUs that have it (AVX512-BF16 or AMX) oneDNN runs convolutions and matmuls in bf16: on the 2-core
    machine of docs/performance.md the model's part of a training step runs 1.6x faster, inference 1.3x. Training
    and `segformer-hf evaluate --bf16` warn when it is missing. Other architectures: not known, so not warned about.
    """
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    checks = [
        getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    ]
    checks = [check for check in checks if check is not None]
    return bool(checks) and not any(check() for check in checks)


def warn_if_bf16_is_emulated(device: torch.device, remedy: str) -> None:
    """Warns (naming `remedy`, the flag that turns bf16 off) when bf16 was asked for on such a CPU."""
    if device.type == "cpu" and cpu_lacks_bf16():
        logger.warning(
            "bf16 on a CPU without bf16 instructions (AVX512-BF16 or AMX): bfloat16 is emulated there and usually "
            "slower than float32; %s",
            remedy,
        )


def imagenet_normalization() -> tuple[list[float], list[float]]:
    """The (mean, std) every published SegFormer checkpoint was trained with."""
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
    `AutoModelForSemanticSegmentation` (importing any segformer_hf module registers the package with it). The image
    processor of a model trained by segformer_hf is a `SegformerHFImageProcessor` that records the
    protocol the model was validated with: `InferenceProtocol.from_image_processor` reads it back (None
    for other processors). When the checkpoint has no `preprocessor_config.json`, a default
    `SegformerImageProcessor` (ImageNet normalisation, 512x512 resize) stands in, with a note on stderr.
    """
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
