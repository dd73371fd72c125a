"""Files in and out: image inputs checked before any work, and outputs written atomically.

An output is written to a temporary file beside its destination and renamed over it, so a crash or a
kill leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps


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
    """The image at `path` as RGB, fully decoded, turned upright as its EXIF orientation says.

    transformers' `load_image` (and so the pipeline) applies the EXIF orientation; so must we, or a
    rotated JPEG is predicted sideways here and upright there.

    Raises:
        ValueError: the file is not an image PIL can read (the message names the file).
    """
    try:
        with Image.open(path) as image:
            return ImageOps.exif_transpose(image).convert("RGB")
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
    text = json.dumps(nan_to_none(payload), indent=2, allow_nan=False) + "\n"
    write_atomic(path, lambda temporary: temporary.write_text(text, encoding="utf-8"))


def nan_to_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: nan_to_none(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [nan_to_none(item) for item in value]
    if isinstance(value, (np.floating, np.integer)):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value
