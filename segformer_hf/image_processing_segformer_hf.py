"""The image processor of segformer_hf models: the preprocessing and inference protocol a model was validated with.

transformers' `SegformerImageProcessor` resizes every image to one fixed (height, width), squashing its
aspect ratio. SegFormer is trained and evaluated the mmseg way instead: each image is resized keeping its
ratio to fit a (long side, short side) bound, `img_scale`. This processor does exactly that, with the
same arithmetic as segformer_hf's evaluation data (torch bilinear, rounded back to uint8, ImageNet mean
and std), so the transformers pipeline, `AutoImageProcessor` users and `segformer-hf predict` feed the
network what the reported validation metrics were computed on.

It also carries the rest of the protocol the model was validated with (`inference_mode`, the sliding
window's `crop_size` and `stride`, test-time `scales` and `flip`, `size_divisor`): segformer_hf's
`InferenceProtocol.from_image_processor` reads them back. A plain forward pass (the pipeline's) honours
the resize only; sliding windows and test-time augmentation are `segformer_hf.inference`'s job.

This file is self-contained on purpose (it imports only numpy, torch and transformers): `save_pretrained`
copies it next to the weights, so that `AutoImageProcessor.from_pretrained(..., trust_remote_code=True)`
works where segformer_hf is not installed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

Size = tuple[int, int]
# What a call may override.
_SETTINGS = (
    "do_resize",
    "img_scale",
    "do_rescale",
    "rescale_factor",
    "do_normalize",
    "image_mean",
    "image_std",
    "do_reduce_labels",
)


def rescaled_size(height: int, width: int, scale: Sequence[int]) -> Size:
    """(h, w) that fits `scale` = (long, short) edge limits, keeping the aspect ratio (mmcv's imrescale).

    The factor is min(long / longer side, short / shorter side), and sides round half up.
    """
    long_edge, short_edge = max(scale), min(scale)
    factor = min(long_edge / max(height, width), short_edge / min(height, width))
    return int(height * factor + 0.5), int(width * factor + 0.5)


def resize_image(image: np.ndarray, size: Size) -> np.ndarray:
    """(H, W, 3) uint8 -> (h, w, 3) uint8, bilinear without antialiasing (as OpenCV's INTER_LINEAR)."""
    if image.shape[:2] == tuple(size):
        return image
    # (H, W, 3) -> (1, 3, H, W)
    pixels = torch.from_numpy(image.transpose(2, 0, 1).astype(np.float32))[None]
    resized = F.interpolate(pixels, size=tuple(size), mode="bilinear", align_corners=False)
    # (1, 3, h, w) -> (h, w, 3)
    return np.clip(np.rint(resized[0].numpy().transpose(1, 2, 0)), 0, 255).astype(np.uint8)


def resize_label(label: np.ndarray, size: Size) -> np.ndarray:
    """Nearest neighbour as OpenCV's INTER_NEAREST: target pixel i takes source pixel floor(i * H / h)."""
    height, width = label.shape
    rows = np.arange(size[0]) * height // size[0]
    columns = np.arange(size[1]) * width // size[1]
    return label[rows[:, None], columns[None, :]]


class SegformerHFImageProcessor(BaseImageProcessor):
    """Keep-ratio resize to `img_scale`, rescale, normalise; label maps at any size from the logits.

    Args:
        do_resize: resize each image to fit `img_scale` (ignored when `img_scale` is None).
        img_scale: (long side, short side) bound of the keep-ratio resize, or None for each image's own size.
        do_rescale: multiply pixel values by `rescale_factor` (1/255: uint8 to [0, 1]).
        rescale_factor: see `do_rescale`.
        do_normalize: subtract `image_mean` and divide by `image_std`, per channel.
        image_mean: per-channel mean, ImageNet's by default (as every SegFormer checkpoint).
        image_std: per-channel standard deviation, ImageNet's by default.
        do_reduce_labels: label maps given to the processor map 0 to 255 and shift the rest down by one
            (ADE20K's "other" class).
        inference_mode: "whole" (one forward pass per image) or "slide" (windows of `crop_size`).
        crop_size: the sliding window's (height, width); None for whole-image inference.
        stride: the sliding window's (height, width) stride; None for segformer_hf's default rule.
        scales: test-time scale ratios (multi-scale inference), or None.
        flip: whether predictions average the mirrored image too.
        size_divisor: round each test-time-scaled side up to a multiple of this, or None.
    """

    model_input_names = ["pixel_values"]

    def __init__(
        self,
        do_resize: bool = True,
        img_scale: Sequence[int] | None = None,
        do_rescale: bool = True,
        rescale_factor: float = 1 / 255,
        do_normalize: bool = True,
        image_mean: Sequence[float] | None = None,
        image_std: Sequence[float] | None = None,
        do_reduce_labels: bool = False,
        inference_mode: str = "whole",
        crop_size: Sequence[int] | None = None,
        stride: Sequence[int] | None = None,
        scales: Sequence[float] | None = None,
        flip: bool = False,
        size_divisor: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.do_resize = bool(do_resize)
        self.img_scale = _pair_or_none(img_scale, "img_scale")
        self.do_rescale = bool(do_rescale)
        self.rescale_factor = float(rescale_factor)
        self.do_normalize = bool(do_normalize)
        self.image_mean = [float(value) for value in (image_mean or IMAGENET_DEFAULT_MEAN)]
        self.image_std = [float(value) for value in (image_std or IMAGENET_DEFAULT_STD)]
        self.do_reduce_labels = bool(do_reduce_labels)
        self.inference_mode = str(inference_mode)
        self.crop_size = _pair_or_none(crop_size, "crop_size")
        self.stride = _pair_or_none(stride, "stride")
        self.scales = None if scales is None else [float(scale) for scale in scales]
        self.flip = bool(flip)
        self.size_divisor = None if size_divisor is None else int(size_divisor)

    def preprocess(
        self,
        images: Any,
        segmentation_maps: Any = None,
        return_tensors: str | None = None,
        **overrides: Any,
    ) -> BatchFeature:
        """`pixel_values` (and `labels` when `segmentation_maps` are given) for one image or a list.

        Images are PIL images or uint8 arrays ((H, W, 3), (3, H, W) or (H, W)). Any attribute of the
        processor can be overridden for the call (`img_scale=None` keeps each image's own size). Images
        of different aspect ratios come out at different sizes: they are stacked into one tensor only
        when all sizes agree. Label maps are resized with nearest neighbour to their image's size.
        """
        unknown = sorted(set(overrides) - set(_SETTINGS))
        if unknown:
            raise ValueError(f"Unknown preprocessing settings {unknown}; known: {list(_SETTINGS)}")
        settings = {name: overrides.get(name, getattr(self, name)) for name in _SETTINGS}
        images = _as_list(images)
        label_maps = None if segmentation_maps is None else _as_list(segmentation_maps)
        if label_maps is not None and len(label_maps) != len(images):
            raise ValueError(f"Got {len(images)} images but {len(label_maps)} segmentation maps")
        scale = settings["img_scale"] if settings["do_resize"] else None
        pixel_values, labels = [], []
        for index, image in enumerate(images):
            rgb = _as_rgb_array(image)
            size = rgb.shape[:2] if scale is None else rescaled_size(*rgb.shape[:2], scale)
            pixel_values.append(self._normalised(resize_image(rgb, size), settings))
            if label_maps is not None:
                label = np.asarray(label_maps[index]).astype(np.int64)
                if settings["do_reduce_labels"]:
                    label = np.where(label == 0, 255, label - 1)
                    label[label == 254] = 255
                labels.append(resize_label(label, size))
        data = {"pixel_values": _stack_if_same_size(pixel_values)}
        if label_maps is not None:
            data["labels"] = _stack_if_same_size(labels)
        if return_tensors is not None and any(isinstance(value, list) for value in data.values()):
            raise ValueError(
                "These images come out at different sizes (the resize keeps each one's aspect ratio), so they "
                "cannot be one tensor: process them one at a time, or use return_tensors=None."
            )
        return BatchFeature(data=data, tensor_type=return_tensors)

    @staticmethod
    def _normalised(image: np.ndarray, settings: dict[str, Any]) -> np.ndarray:
        """(h, w, 3) uint8 -> (3, h, w) float32.

        Rescaling and normalisation are one step, (x - mean * 255) / (std * 255) in float32, the exact
        arithmetic of segformer_hf's evaluation data, so that both give bit-identical network inputs.
        """
        pixels = image.astype(np.float32)
        if settings["do_rescale"] and settings["do_normalize"]:
            scale = np.float32(1.0 / settings["rescale_factor"])
            mean = np.asarray(settings["image_mean"], dtype=np.float32) * scale
            std = np.asarray(settings["image_std"], dtype=np.float32) * scale
            pixels = (pixels - mean) / std
        elif settings["do_rescale"]:
            pixels = pixels * np.float32(settings["rescale_factor"])
        elif settings["do_normalize"]:
            mean = np.asarray(settings["image_mean"], dtype=np.float32)
            std = np.asarray(settings["image_std"], dtype=np.float32)
            pixels = (pixels - mean) / std
        # (h, w, 3) -> (3, h, w)
        return np.ascontiguousarray(pixels.transpose(2, 0, 1))

    def post_process_semantic_segmentation(
        self, outputs: Any, target_sizes: Sequence[Sequence[int]] | None = None
    ) -> list[torch.Tensor]:
        """Label maps (H, W) from a model's output: logits upsampled bilinearly to each target size, then
        the arg-max class (a single-label model: class 1 where its logit is positive).

        `target_sizes` are (height, width) per image, usually the original image sizes; None keeps the
        logits' own resolution (a quarter of the processed image).
        """
        logits = outputs.logits if hasattr(outputs, "logits") else outputs["logits"]
        logits = logits.float()
        if target_sizes is not None and len(target_sizes) != len(logits):
            raise ValueError(f"Got {len(target_sizes)} target sizes for a batch of {len(logits)} logits")
        label_maps = []
        for index, image_logits in enumerate(logits):
            if target_sizes is not None:
                size = tuple(int(side) for side in target_sizes[index])
                # (K, h, w) -> (1, K, H, W) -> (K, H, W)
                image_logits = F.interpolate(
                    image_logits[None], size=size, mode="bilinear", align_corners=False
                )[0]
            if image_logits.shape[0] == 1:
                label_maps.append((image_logits[0] > 0).long())
            else:
                label_maps.append(image_logits.argmax(dim=0))
        return label_maps


def _pair_or_none(value: Any, name: str) -> list[int] | None:
    if value is None:
        return None
    if isinstance(value, int):
        value = (value, value)
    pair = [int(side) for side in value]
    if len(pair) != 2 or min(pair) <= 0:
        raise ValueError(f"{name} must be two positive sides, got {value!r}")
    return pair


def _as_list(images: Any) -> list[Any]:
    if isinstance(images, (list, tuple)):
        return list(images)
    if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4:
        return list(images)
    return [images]


def _as_rgb_array(image: Any) -> np.ndarray:
    """(H, W, 3) uint8 from a PIL image or a uint8 array / tensor ((H, W, 3), (3, H, W) or gray (H, W))."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    array = image.numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if array.dtype != np.uint8:
        raise ValueError(
            f"Expected a PIL image or uint8 pixels, got {array.dtype}: pass images as loaded, before any scaling"
        )
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    elif array.ndim == 3 and array.shape[0] == 3 and array.shape[-1] != 3:
        # (3, H, W) -> (H, W, 3)
        array = array.transpose(1, 2, 0)
    if array.ndim != 3 or array.shape[-1] != 3:
        raise ValueError(f"Expected an RGB image, got pixels of shape {array.shape}")
    return np.ascontiguousarray(array)


def _stack_if_same_size(arrays: list[np.ndarray]) -> np.ndarray | list[np.ndarray]:
    if all(array.shape == arrays[0].shape for array in arrays):
        return np.stack(arrays)
    return arrays


__all__ = ["SegformerHFImageProcessor", "rescaled_size", "resize_image", "resize_label"]
