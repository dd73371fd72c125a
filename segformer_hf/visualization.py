"""Drawing predictions for people: class palettes, colour masks, overlays, legends and validation panels.

`scripts/predict.py`, the demo app and training's image logging draw with these, so a class has the same
colour everywhere: the model config's palette when it has one, else a fixed default.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont


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


def validation_panel(
    rgb: np.ndarray, truth: np.ndarray, prediction: np.ndarray, palette: np.ndarray
) -> np.ndarray:
    """[image | ground truth | prediction] side by side (H, 3W, 3) uint8; ignored truth pixels black."""
    # One extra colour, black, for ignored pixels.
    palette = np.concatenate([palette, np.zeros((1, 3), dtype=np.uint8)])
    truth = truth.copy()
    truth[(truth < 0) | (truth >= len(palette) - 1)] = len(palette) - 1
    return np.concatenate([rgb, palette[truth], palette[prediction]], axis=1)


def stack_panels(panels: Sequence[np.ndarray]) -> np.ndarray:
    """Panels of possibly different sizes as one (N, H, W, 3) array, each resized to the first's size."""
    first = panels[0]
    resized = [
        panel
        if panel.shape == first.shape
        else np.asarray(Image.fromarray(panel).resize(first.shape[1::-1], Image.NEAREST))
        for panel in panels
    ]
    return np.stack(resized)
