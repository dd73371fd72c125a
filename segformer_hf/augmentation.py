"""The training augmentation as batched torch operations on the accelerator (`augment_device: cuda`).

With `augment_device: cpu` (the default) DataLoader workers run the whole augmentation in numpy
(`data.SegmentationTrainTransform`); on a fast GPU two workers cannot keep up. With `cuda` the
workers only decode and draw (`data.SegmentationDecodeTransform`), and `DeviceAugmentation` turns the
batch of uint8 images into normalised crops on the device: keep-ratio bilinear resize, crop, flip,
photometric distortion, ImageNet normalisation and padding, for the whole batch at once.

The draws are the numpy path's, from the same `(seed, epoch, sample_index)` generator in the same
order, so a sample gets the same crop box, flip and photometric parameters on either path, and the
same labels. Images agree up to float rounding: the resize is computed only over the crop window
(source coordinates as in PyTorch's bilinear `interpolate` with align_corners=False), so a pixel on a
rounding boundary may land one 8-bit level away, which the photometric steps can widen to a few levels.
"""

from __future__ import annotations

from typing import Any

import torch

from .data import Size
from .inference import imagenet_normalization


class DeviceAugmentation:
    """Turns a `data.decoded_collate_fn` batch into the training batch, on the batch's device.

    Returns {"pixel_values": (B, 3, h, w) float32 (channels-last memory), "labels": (B, h, w) int64,
    "num_skipped"}: what `data.train_collate_fn` returns for the numpy path. Skipped (bad) samples become
    the numpy path's placeholder (zero image, every pixel ignored).
    """

    def __init__(self, crop_size: Size, ignore_index: int) -> None:
        self.crop_size = (int(crop_size[0]), int(crop_size[1]))
        self.ignore_index = int(ignore_index)
        mean, std = imagenet_normalization()
        # float32 times 255 as data.normalize computes them, so both paths normalise by the same numbers.
        self.mean = torch.tensor(mean, dtype=torch.float32) * 255.0
        self.std = torch.tensor(std, dtype=torch.float32) * 255.0

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        images, draws = batch["images"], batch["draws"]
        device = images.device
        crop_height, crop_width = self.crop_size
        top, left = draws["crop_box"].unbind(1)
        resized_height, resized_width = draws["resized_size"].unbind(1)
        source_height, source_width = batch["image_sizes"].unbind(1)
        # The crop window is smaller than crop_size where the resized image is; the rest is padding.
        valid_height = (resized_height - top).clamp(max=crop_height)
        valid_width = (resized_width - left).clamp(max=crop_width)
        rows = torch.arange(crop_height, device=device)
        columns = torch.arange(crop_width, device=device)
        row_inside = rows[None, :] < valid_height[:, None]  # (B, h)
        column_inside = columns[None, :] < valid_width[:, None]  # (B, w)
        # A flipped crop reads its columns right to left within the window.
        flipped_columns = torch.where(draws["flip"][:, None], valid_width[:, None] - 1 - columns, columns)
        row_taps = bilinear_taps(top[:, None] + rows, source_height, resized_height, row_inside)
        column_taps = bilinear_taps(
            left[:, None] + flipped_columns, source_width, resized_width, column_inside
        )
        crops = resample_crops(images, row_taps, column_taps)  # (B, h, w, 3) float32 in 0..255
        crops = photometric_distortion(crops, draws["photometric"].to(device=device, dtype=torch.float32))
        # (B, h, w, 3) -> (B, 3, h, w) as a channels-last view: the layout the model's first conv wants.
        pixel_values = ((crops - self.mean.to(device)) / self.std.to(device)).permute(0, 3, 1, 2)
        inside = (row_inside[:, :, None] & column_inside[:, None, :]) & ~batch["skipped"][:, None, None]
        pixel_values = pixel_values * inside[:, None]
        labels = batch["labels"].long().masked_fill(batch["skipped"][:, None, None], self.ignore_index)
        return {"pixel_values": pixel_values, "labels": labels, "num_skipped": batch["num_skipped"]}


def bilinear_taps(
    target: torch.Tensor, source_size: torch.Tensor, resized_size: torch.Tensor, inside: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(first index, second index, weight of the second) per target pixel (B, n) along one axis.

    PyTorch's bilinear rule with align_corners=False: source x = max((i + 0.5) * S / s - 0.5, 0), read
    between floor(x) and the next pixel (the same one at the border). An unresized axis (S == s) reads
    pixel i exactly. Pixels outside the window read pixel 0 (they are masked afterwards).
    """
    scale = (source_size.to(torch.float32) / resized_size.to(torch.float32))[:, None]
    position = ((target.to(torch.float32) + 0.5) * scale - 0.5).clamp(min=0.0)
    first = position.to(torch.int64)
    second = first + (first < source_size[:, None] - 1).to(torch.int64)
    weight = (position - first.to(torch.float32)).clamp(0.0, 1.0)
    return first * inside, second * inside, weight


def resample_crops(
    images: torch.Tensor,
    row_taps: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    column_taps: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, h, w, 3) float32: the crop of each bilinearly resized image, rounded.

    Rows are gathered first (in uint8, so only the crop's rows are ever converted to float); each output
    is w0 * (row interpolation) + w1 * (row interpolation), the order PyTorch's CPU kernel uses.
    """
    batch = torch.arange(images.shape[0], device=images.device)
    row_first, row_second, row_weight = row_taps
    column_first, column_second, column_weight = column_taps

    def columns_of(rows: torch.Tensor) -> torch.Tensor:
        # (B, h) row indices -> (B, h, w, 3): that row's pixels at both column taps, interpolated.
        picked = images[batch[:, None], rows]  # (B, h, W, 3)
        gather = batch[:, None, None], torch.arange(rows.shape[1], device=images.device)[None, :, None]
        left = picked[(*gather, column_first[:, None, :])].to(torch.float32)
        right = picked[(*gather, column_second[:, None, :])].to(torch.float32)
        weight = column_weight[:, None, :, None]
        return (1.0 - weight) * left + weight * right

    weight = row_weight[:, :, None, None]
    resized = (1.0 - weight) * columns_of(row_first) + weight * columns_of(row_second)
    return resized.round().clamp(0.0, 255.0)


def photometric_distortion(pixels: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """mmseg's PhotoMetricDistortion on (B, h, w, 3) RGB in 0..255, per-sample params (B, 5).

    The params are `data.draws_as_tensors`' (brightness delta, contrast first, contrast alpha,
    saturation alpha, hue delta), NaN for a step not applied; the steps, their order and their 8-bit
    rounding are `data.apply_photometric_distortion`'s. Every step runs on the whole batch and a mask
    keeps its result only for the samples that drew it.
    """
    brightness, contrast_first, contrast, saturation, hue = (
        column[:, None, None, None] for column in params.unbind(1)
    )
    contrast_first = contrast_first > 0

    def truncated(values: torch.Tensor) -> torch.Tensor:
        return values.clamp(0.0, 255.0).floor()

    def step(applies: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        return torch.where(applies, result, pixels)

    pixels = step(~brightness.isnan(), truncated(pixels + brightness.nan_to_num()))
    pixels = step(contrast_first & ~contrast.isnan(), truncated(pixels * contrast.nan_to_num()))
    pixels = step(~saturation.isnan(), scale_saturation(pixels, saturation.nan_to_num()).round())
    pixels = step(~hue.isnan(), rotate_hue(pixels, 2.0 * hue.nan_to_num()).round())
    pixels = step(~contrast_first & ~contrast.isnan(), truncated(pixels * contrast.nan_to_num()))
    return pixels.clamp(0.0, 255.0)


def scale_saturation(pixels: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """`data.scale_saturation` in torch, `alpha` broadcast against (..., 3) pixels."""
    value = pixels.amax(dim=-1, keepdim=True)
    chroma = value - pixels.amin(dim=-1, keepdim=True)
    most = torch.where(chroma > 0, value / chroma, torch.inf)  # gray: any factor
    return value - (value - pixels) * torch.minimum(alpha, most)


def rotate_hue(pixels: torch.Tensor, degrees: torch.Tensor) -> torch.Tensor:
    """`data.rotate_hue` in torch, `degrees` broadcast against (..., 3) pixels."""
    red, green, blue = pixels.unbind(-1)
    value = pixels.amax(dim=-1)
    chroma = value - pixels.amin(dim=-1)
    safe_chroma = torch.where(chroma > 0, chroma, 1.0)
    sixths = torch.where(
        value == red,
        (green - blue) / safe_chroma,
        torch.where(value == green, (blue - red) / safe_chroma + 2.0, (red - green) / safe_chroma + 4.0),
    )
    offsets = torch.tensor([5.0, 3.0, 1.0], dtype=pixels.dtype, device=pixels.device)  # red, green, blue
    k = torch.remainder(offsets + (sixths[..., None] + degrees / 60.0), 6.0)
    return value[..., None] - chroma[..., None] * torch.minimum(k, 4.0 - k).clamp(0.0, 1.0)
