"""Segmentation data: loading any supported source as `datasets`, and the paper's augmentation.

Every source ends up as the same two `datasets.Dataset` splits with the columns `image`, `label`
(undecoded: `{"bytes", "path"}` for files, or whatever the source holds), `sample_id` (the file, or
"NAME SPLIT row N") and `sample_index` (the row number). Decoding happens inside the transforms, in
the DataLoader workers, so that a truncated file or a wrong label map raises an error that names the
sample, instead of failing somewhere inside `datasets` with no hint of which file was at fault.

The training transform is the mmsegmentation pipeline the SegFormer paper trained with (resize with
a random ratio, crop with a limit on the share of one class, flip, photometric distortion, ImageNet
normalisation, pad); optionally, before it, copy-paste of chosen classes from another frame. Every random
draw for a sample comes from generators seeded with `(seed, epoch, sample_index)` (copy-paste's with a stream
number added), so a sample's augmentation does not depend on the number of workers or processes, nor on any
global random state: an interrupted run resumes with exactly the batches it would have seen.
"""

from __future__ import annotations

import io
import json
import logging
import math
import multiprocessing
import multiprocessing.context
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import datasets
import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from .image_processing_segformer_hf import rescaled_size, resize_image, resize_label

if TYPE_CHECKING:
    from .arguments import TrainingConfig
    from .streaming import StreamingTrainLoader

logger = logging.getLogger(__name__)

Size = tuple[int, int]

DATA_FORMATS = ("auto", "pairs", "ade20k", "cityscapes", "imagefolder", "parquet")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
LABEL_FILES = ("classes.json", "id2label.json")

# Names under which datasets publish the same split; a requested name also finds its aliases.
SPLIT_ALIASES = (
    ("train", "training"),
    ("validation", "val", "valid", "dev"),
    ("test", "testing"),
)

# mmseg's PhotoMetricDistortion defaults, which every SegFormer recipe uses.
BRIGHTNESS_DELTA = 32
CONTRAST_RANGE = (0.5, 1.5)
SATURATION_RANGE = (0.5, 1.5)
HUE_DELTA = 18

# mmseg's RandomCrop: how many extra crops are tried when one class dominates the crop.
CROP_RETRIES = 10


EXIF_ORIENTATION = 0x0112


class BadSampleError(ValueError):
    """A sample whose files or values cannot be used; the message names the sample and the problem.

    The only error `skip_bad_samples` tolerates: a bug in the pipeline itself must still stop the run.
    """


# Loading ---------------------------------------------------------------------------------------------------


def load_segmentation_dataset(
    *,
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    data_dir: str | os.PathLike | None = None,
    data_format: str = "auto",
    train_split: str = "train",
    validation_split: str = "validation",
    image_column: str = "image",
    label_column: str = "label",
    validation_fraction: float = 0.1,
    seed: int = 42,
) -> dict[str, datasets.Dataset]:
    """The training and validation splits of a Hub dataset or a local directory, in the standard columns.

    `dataset_name` is anything `datasets.load_dataset` accepts (a Hub id or a local dataset directory);
    its `image_column` and `label_column` become `image` and `label`. `data_dir` is a local tree in
    one of `DATA_FORMATS` (`auto` detects it, see `detect_data_format`). A split is found under its
    own name or a common alias (`validation` also finds `val`, ADE20K's `training` answers `train`).
    Without a validation split, a seeded `validation_fraction` of the training split is held out.

    Returns:
        `{"train": Dataset, "validation": Dataset}` with columns image, label, sample_id, sample_index.

    Raises:
        ValueError: both or neither source given, unknown format, missing split or column, empty split.
        FileNotFoundError: `data_dir` does not exist.
    """
    splits, source = _load_splits(
        dataset_name, dataset_config_name, data_dir, data_format, image_column, label_column
    )
    train_name = _find_split(splits, train_split)
    if train_name is None:
        raise ValueError(
            f"{source} has no training split {train_split!r}; available splits: {sorted(splits)}. "
            "Set train_split to one of them."
        )
    validation_name = _find_split(splits, validation_split)
    train = _materialise(splits[train_name], source, train_name)
    if validation_name is not None:
        return {"train": train, "validation": _materialise(splits[validation_name], source, validation_name)}
    logger.info(
        "%s has no split %r: holding out %.0f%% of %r as validation (seed %d)",
        source,
        validation_split,
        100 * validation_fraction,
        train_name,
        seed,
    )
    train, validation = _hold_out(train, validation_fraction, seed, source)
    return {"train": train, "validation": validation}


def load_evaluation_split(
    *,
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    data_dir: str | os.PathLike | None = None,
    data_format: str = "auto",
    split: str = "validation",
    image_column: str = "image",
    label_column: str = "label",
) -> datasets.Dataset:
    """One split to evaluate on, in the standard columns (see `load_segmentation_dataset`).

    Unlike training, a missing split is an error: evaluating on a hold-out drawn from the training
    data would silently measure something else.
    """
    splits, source = _load_splits(
        dataset_name, dataset_config_name, data_dir, data_format, image_column, label_column
    )
    name = _find_split(splits, split)
    if name is None:
        raise ValueError(f"{source} has no split {split!r}; available splits: {sorted(splits)}")
    return _materialise(splits[name], source, name)


def _load_splits(
    dataset_name: str | None,
    dataset_config_name: str | None,
    data_dir: str | os.PathLike | None,
    data_format: str,
    image_column: str,
    label_column: str,
) -> tuple[dict[str, datasets.Dataset | _FileSplit], str]:
    """All splits of the source (on-disk layouts not yet listed), and a name for it in messages."""
    if (dataset_name is None) == (data_dir is None):
        raise ValueError("Give exactly one data source: dataset_name (Hub id or dataset path) or data_dir")
    if data_format not in DATA_FORMATS:
        raise ValueError(f"data_format must be one of {', '.join(DATA_FORMATS)}; got {data_format!r}")
    if dataset_name is not None:
        loaded = datasets.load_dataset(dataset_name, dataset_config_name)
        splits = _standard_splits(loaded, dataset_name, image_column, label_column)
        source = dataset_name
    else:
        root = Path(data_dir)
        if not root.is_dir():
            raise FileNotFoundError(f"data_dir {root} does not exist or is not a directory")
        if data_format == "auto":
            data_format = detect_data_format(root)
        source = f"{root} ({data_format})"
        if data_format in ("imagefolder", "parquet"):
            loaded = datasets.load_dataset(data_format, data_dir=str(root))
            splits = _standard_splits(loaded, str(root), image_column, label_column)
        else:
            splits = _file_layout_splits(root, data_format)
    return splits, source


def detect_data_format(data_dir: str | os.PathLike) -> str:
    """Which on-disk layout `data_dir` holds: ade20k, cityscapes, pairs, parquet or imagefolder.

    Raises:
        ValueError: no known layout; the message says what each layout looks like.
    """
    root = Path(data_dir)
    if _ade20k_root(root) is not None:
        return "ade20k"
    if (root / "leftImg8bit").is_dir() and (root / "gtFine").is_dir():
        return "cityscapes"
    if _pairs_split_dirs(root):
        return "pairs"
    if next(root.rglob("*.parquet"), None) is not None:
        return "parquet"
    if any(next(root.rglob(f"metadata.{ext}"), None) for ext in ("jsonl", "csv")):
        return "imagefolder"
    raise ValueError(
        f"Cannot tell the layout of {root}. Expected one of: pairs ({{split}}/images/* with "
        "{split}/labels/* of the same stem, or images/ + labels/), ade20k (images/{training,validation}/ "
        "+ annotations/...), cityscapes (leftImg8bit/ + gtFine/), parquet files, or an imagefolder with "
        "metadata.jsonl/csv holding file_name and label_file_name. Or set data_format explicitly."
    )


def _standard_splits(
    loaded: datasets.DatasetDict | datasets.Dataset, source: str, image_column: str, label_column: str
) -> dict[str, datasets.Dataset]:
    if isinstance(loaded, datasets.Dataset):
        loaded = datasets.DatasetDict({"train": loaded})
    return {
        name: _standard_columns(split, source, name, image_column, label_column)
        for name, split in loaded.items()
    }


def _standard_columns(
    dataset: datasets.Dataset, source: str, split: str, image_column: str, label_column: str
) -> datasets.Dataset:
    """Keeps the image and label columns as `image`/`label`, undecoded, and names every row."""
    missing = [column for column in (image_column, label_column) if column not in dataset.column_names]
    if missing:
        raise ValueError(
            f"{source} split {split!r} has no column {' or '.join(map(repr, missing))}; available columns: "
            f"{dataset.column_names}. Set image_column and label_column to the image and label-map columns."
        )
    if image_column == label_column:
        raise ValueError(f"image_column and label_column are both {image_column!r}")
    dataset = dataset.select_columns([image_column, label_column])
    renames = {old: new for old, new in ((image_column, "image"), (label_column, "label")) if old != new}
    if renames:  # (a stream refuses to rename a column to its own name)
        dataset = dataset.rename_columns(renames)
    for column in ("image", "label"):
        if isinstance(dataset.features[column], datasets.Image):
            dataset = dataset.cast_column(column, datasets.Image(decode=False))
    return dataset


def _file_layout_splits(root: Path, data_format: str) -> dict[str, _FileSplit]:
    """The splits of a pairs, ade20k or cityscapes tree; files are listed only for the splits used."""
    if data_format == "pairs":
        return {
            name: _FileSplit(root, partial(_pairs_split, directory))
            for name, directory in _pairs_split_dirs(root).items()
        }
    if data_format == "ade20k":
        ade_root = _ade20k_root(root)
        if ade_root is None:
            raise ValueError(
                f"{root} is not an ADE20K tree: expected images/{{training,validation}}/*.jpg and "
                "annotations/{training,validation}/*.png (ADEChallengeData2016)"
            )
        return {
            split.name: _FileSplit(root, partial(_ade20k_split, ade_root, split.name))
            for split in sorted((ade_root / "images").iterdir())
            if split.is_dir()
        }
    if data_format == "cityscapes":
        if not (root / "leftImg8bit").is_dir():
            raise ValueError(f"{root} is not a Cityscapes tree: expected leftImg8bit/ and gtFine/")
        return {
            split.name: _FileSplit(root, partial(_cityscapes_split, root, split.name))
            for split in sorted((root / "leftImg8bit").iterdir())
            if split.is_dir()
        }
    raise ValueError(f"not a file layout: {data_format}")


def _pairs_split_dirs(root: Path) -> dict[str, Path]:
    """Split name -> directory holding images/ and labels/ (a flat root counts as the `train` split)."""
    found = {
        child.name: child
        for child in sorted(root.iterdir())
        if child.is_dir() and (child / "images").is_dir() and (child / "labels").is_dir()
    }
    if not found and (root / "images").is_dir() and (root / "labels").is_dir():
        found["train"] = root
    return found


def _pairs_split(directory: Path) -> list[tuple[Path, Path]]:
    return _match_by_stem(_image_files(directory / "images"), _image_files(directory / "labels"), directory)


def _ade20k_split(ade_root: Path, split: str) -> list[tuple[Path, Path]]:
    images = ade_root / "images" / split
    return _match_by_stem(_image_files(images), _image_files(ade_root / "annotations" / split), images)


def _ade20k_root(root: Path) -> Path | None:
    for candidate in (root, root / "ADEChallengeData2016"):
        images, annotations = candidate / "images", candidate / "annotations"
        if annotations.is_dir() and any((images / split).is_dir() for split in ("training", "validation")):
            return candidate
    return None


def _cityscapes_split(root: Path, split: str) -> list[tuple[Path, Path]]:
    pairs, missing = [], []
    for image in sorted((root / "leftImg8bit" / split).glob("*/*_leftImg8bit.png")):
        stem = image.name[: -len("_leftImg8bit.png")]
        label = root / "gtFine" / split / image.parent.name / f"{stem}_gtFine_labelTrainIds.png"
        if label.is_file():
            pairs.append((image, label))
        else:
            missing.append(label)
    if missing:
        raise ValueError(
            f"{len(missing)} Cityscapes image(s) of split {split!r} have no *_gtFine_labelTrainIds.png, e.g. "
            f"{missing[0]}. Generate the train-id maps with cityscapesscripts' createTrainIdLabelImgs."
        )
    return pairs


def _image_files(directory: Path) -> list[Path]:
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def _match_by_stem(images: list[Path], labels: list[Path], where: Path) -> list[tuple[Path, Path]]:
    """Pairs each image with the label map of the same stem; an image without one is an error."""
    by_stem: dict[str, Path] = {}
    for label in labels:
        if label.stem in by_stem:
            raise ValueError(
                f"{where}: two label maps share the stem {label.stem!r}: {by_stem[label.stem]}, {label}"
            )
        by_stem[label.stem] = label
    image_stems = [image.stem for image in images]
    duplicates = sorted(stem for stem, count in Counter(image_stems).items() if count > 1)
    if duplicates:
        raise ValueError(f"{where}: several images share the stem(s) {duplicates[:5]}")
    unmatched = [image for image in images if image.stem not in by_stem]
    if unmatched:
        raise ValueError(
            f"{where}: {len(unmatched)} image(s) have no label map of the same stem, e.g. "
            f"{', '.join(str(p) for p in unmatched[:3])}"
        )
    orphans = sorted(set(by_stem) - set(image_stems))
    if orphans:
        logger.warning(
            "%s: %d label map(s) have no image and are ignored, e.g. %s", where, len(orphans), orphans[:3]
        )
    return [(image, by_stem[image.stem]) for image in images]


def _find_split(splits: Mapping[str, Any], requested: str) -> str | None:
    """`requested` itself if present, else its one present alias (`validation` -> `val`), else None."""
    if requested in splits:
        return requested
    for group in SPLIT_ALIASES:
        if requested in group:
            present = [name for name in group if name in splits]
            return present[0] if len(present) == 1 else None
    return None


@dataclass(frozen=True)
class _FileSplit:
    """One split of an on-disk layout: how to list its (image, label) pairs, and the root that names them."""

    root: Path
    list_pairs: Callable[[], list[tuple[Path, Path]]]


def _materialise(split: datasets.Dataset | _FileSplit, source: str, name: str) -> datasets.Dataset:
    """The split with `sample_id` and `sample_index` added; it must have rows.

    `sample_index` is the row number in the source split; it stays attached to its sample through
    any later split, selection, shuffle or shard, so a sample's augmentation does not depend on them.
    """
    if isinstance(split, _FileSplit):
        pairs = split.list_pairs()
        dataset = datasets.Dataset.from_dict(
            {
                "image": [str(image.resolve()) for image, _ in pairs],
                "label": [str(label.resolve()) for _, label in pairs],
                "sample_id": [image.relative_to(split.root).as_posix() for image, _ in pairs],
            },
            features=datasets.Features(
                {
                    "image": datasets.Image(decode=False),
                    "label": datasets.Image(decode=False),
                    "sample_id": datasets.Value("string"),
                }
            ),
        )
    else:
        dataset = split.add_column("sample_id", [f"{source} {name} row {row}" for row in range(len(split))])
    if len(dataset) == 0:
        raise ValueError(f"Split {name!r} of {source} is empty: it has no image/label pairs")
    return dataset.add_column("sample_index", list(range(len(dataset))))


def _hold_out(
    train: datasets.Dataset, fraction: float, seed: int, source: str
) -> tuple[datasets.Dataset, datasets.Dataset]:
    if not 0 < fraction < 1:
        raise ValueError(
            f"validation_fraction must be in (0, 1) to split a validation set off; got {fraction}"
        )
    if len(train) < 2:
        raise ValueError(
            f"{source}: cannot split a validation set off a training split of {len(train)} sample"
        )
    parts = train.train_test_split(test_size=fraction, seed=seed, shuffle=True)
    return parts["train"], parts["test"]


# Class names -----------------------------------------------------------------------------------------------


def resolve_id2label(
    *,
    id2label: Mapping[int | str, str] | None = None,
    id2label_file: str | os.PathLike | None = None,
    dataset: datasets.Dataset | None = None,
    data_dir: str | os.PathLike | None = None,
) -> dict[int, str]:
    """The class names, from the first source that has them.

    In order: the explicit `id2label` mapping; `id2label_file` (JSON, either `{"id2label": {...}}` as
    in classes.json, a flat `{"0": "sky", ...}` or a list of names); a `ClassLabel` feature of the
    dataset's label column; `classes.json` or `id2label.json` in `data_dir`.

    Raises:
        ValueError: no source has names, or the ids are not exactly 0..N-1.
    """
    if id2label:
        return _checked_id2label(id2label, "the id2label setting")
    if id2label_file is not None:
        return _read_id2label_file(Path(id2label_file))
    if dataset is not None and "label" in dataset.features:
        names = _class_label_names(dataset.features["label"])
        if names:
            return {index: name for index, name in enumerate(names)}
    if data_dir is not None:
        for name in LABEL_FILES:
            candidate = Path(data_dir) / name
            if candidate.is_file():
                return _read_id2label_file(candidate)
    raise ValueError(
        "No class names found: set id2label (a mapping id -> name) or id2label_file (a JSON file), or put "
        f"{' or '.join(LABEL_FILES)} in the data directory"
        + (f" ({data_dir})" if data_dir is not None else "")
        + ". The dataset's label column has no ClassLabel feature."
    )


def resolve_palette(
    num_labels: int,
    *,
    id2label_file: str | os.PathLike | None = None,
    data_dir: str | os.PathLike | None = None,
) -> list[list[int]] | None:
    """The colours of the `num_labels` classes as the data set publishes them ([R, G, B] lists), or None.

    They come from the same files as the class names (`id2label_file`, else `classes.json` or
    `id2label.json` in `data_dir`): a "palette" or "palette_rgb" list, as in the bundled demo data.
    Training saves them in the model config, so masks and legends drawn later use the data set's colours.

    Raises:
        ValueError: the palette is not a list of [R, G, B] triples in 0..255, or has too few colours.
    """
    candidates = [Path(id2label_file)] if id2label_file is not None else []
    if data_dir is not None:
        candidates += [Path(data_dir) / name for name in LABEL_FILES]
    for path in candidates:
        if not path.is_file():
            continue
        try:
            payload = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            return None  # resolve_id2label reports an unreadable class file
        colours = payload.get("palette", payload.get("palette_rgb")) if isinstance(payload, dict) else None
        if colours is None:
            return None
        if not isinstance(colours, list) or not all(
            isinstance(colour, list)
            and len(colour) == 3
            and all(isinstance(value, int) and 0 <= value <= 255 for value in colour)
            for colour in colours
        ):
            raise ValueError(f"{path}: the palette must be a list of [R, G, B] integers in 0..255")
        if len(colours) < num_labels:
            raise ValueError(f"{path}: the palette has {len(colours)} colours for {num_labels} classes")
        # Extra colours (e.g. for the void label) belong to no class the model predicts.
        return colours[:num_labels]
    return None


def _read_id2label_file(path: Path) -> dict[int, str]:
    try:
        payload = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: cannot read class names: {error}") from error
    if isinstance(payload, dict) and "id2label" in payload:
        payload = payload["id2label"]
    if isinstance(payload, list):
        payload = dict(enumerate(payload))
    if not isinstance(payload, dict):
        raise ValueError(
            f"{path}: expected {{'id2label': {{...}}}}, a flat {{'0': 'name'}} mapping or a list"
        )
    return _checked_id2label(payload, str(path))


def _checked_id2label(mapping: Mapping[Any, Any], source: str) -> dict[int, str]:
    try:
        id2label = {int(key): str(value) for key, value in mapping.items()}
    except (TypeError, ValueError) as error:
        raise ValueError(f"{source}: class ids must be integers: {error}") from error
    if sorted(id2label) != list(range(len(id2label))):
        raise ValueError(
            f"{source}: class ids must be exactly 0..{len(id2label) - 1}; got {sorted(id2label)}"
        )
    return dict(sorted(id2label.items()))


def _class_label_names(feature: Any) -> list[str] | None:
    """Names of a ClassLabel, also inside List/Sequence features (per-pixel label lists)."""
    while feature is not None:
        if isinstance(feature, datasets.ClassLabel):
            return list(feature.names)
        feature = getattr(feature, "feature", None)
    return None


# Decoding and checking one sample --------------------------------------------------------------------------


def decode_sample(
    image: Any,
    label: Any,
    *,
    sample_index: int,
    sample_id: str,
    num_labels: int,
    ignore_index: int,
    reduce_labels: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """The checked (H, W, 3) uint8 RGB image and (H, W) int64 label map of one sample.

    Accepts what a `datasets` column may hold: `{"bytes", "path"}` (undecoded Image feature), a PIL
    image, a file path, or an array. Grayscale, RGBA, 16-bit and palette images are converted to RGB;
    label maps keep their ids (the indices of a palette PNG, not its colours). `reduce_labels` (ADE20K)
    maps 0 to `ignore_index` and every other id v to v - 1; it is applied here and nowhere else.

    Raises:
        BadSampleError: unreadable file, image and label of different sizes, a colour-coded label map,
            or label values that are neither classes nor `ignore_index` (listed). The message names
            the sample by index and file (or row).
    """
    where = f"Sample {sample_index} ({sample_id})"
    image_array = _image_to_rgb(_decode(image, where, "image"), where)
    label_where = where + (f", label file {_path_of(label)}" if _path_of(label) else "")
    label_array = _label_to_ids(_decode(label, label_where, "label map"), label_where)
    if image_array.shape[:2] != label_array.shape:
        (height, width), (label_height, label_width) = image_array.shape[:2], label_array.shape
        raise BadSampleError(
            f"{label_where}: the image is {width}x{height} (WxH) but its label map is "
            f"{label_width}x{label_height}"
        )
    if reduce_labels:
        label_array = _reduce_labels(label_array, ignore_index)
    _check_label_values(label_array, num_labels, ignore_index, reduce_labels, label_where)
    return image_array, label_array


def _path_of(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("path")
    if isinstance(value, str | os.PathLike):
        return str(value)
    return getattr(value, "filename", None) or None


def _decode(value: Any, where: str, what: str) -> Image.Image | np.ndarray:
    """A fully loaded PIL image (or an array, for array columns); a broken file names the sample."""
    if isinstance(value, np.ndarray | torch.Tensor | list):
        return np.asarray(value)
    try:
        if isinstance(value, Image.Image):
            value.load()
            return value
        if isinstance(value, dict):
            data, path = value.get("bytes"), value.get("path")
            if data is None and path is None:
                raise ValueError("neither bytes nor a path")
            source = io.BytesIO(data) if data is not None else path
        elif isinstance(value, str | os.PathLike):
            source = value
        else:
            raise TypeError(f"unsupported {what} value of type {type(value).__name__}")
        with Image.open(source) as opened:
            opened.load()
            return opened.copy()
    except Exception as error:
        path = _path_of(value)
        raise BadSampleError(
            f"{where}: cannot read the {what}{f' {path}' if path else ''} (truncated or not an image?): "
            f"{type(error).__name__}: {error}"
        ) from error


def _image_to_rgb(image: Image.Image | np.ndarray, where: str) -> np.ndarray:
    """(H, W, 3) uint8: gray is repeated, alpha dropped, palettes looked up, 16 bits scaled to 8."""
    if isinstance(image, Image.Image):
        # Upright as its EXIF orientation says, as transformers' `load_image` (and so the pipeline) shows it:
        # a rotated JPEG would otherwise pair sideways with a label map drawn on the upright picture.
        if image.getexif().get(EXIF_ORIENTATION, 1) != 1:
            image = ImageOps.exif_transpose(image)
        if image.mode.startswith("I") or image.mode == "F":
            image = np.asarray(image)
        else:
            return np.asarray(image.convert("RGB"))
    array = np.asarray(image)
    if array.ndim == 3 and array.shape[-1] in (1, 2, 4):
        # gray(+alpha) -> gray; RGBA -> RGB
        array = array[..., :1] if array.shape[-1] < 3 else array[..., :3]
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=-1)
    if array.ndim != 3 or array.shape[-1] != 3:
        raise BadSampleError(
            f"{where}: expected an image of shape (H, W, 3), got an array of shape {array.shape}"
        )
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    if np.issubdtype(array.dtype, np.integer):
        # 16-bit images use the whole 0..65535 range; 65535 / 257 = 255 exactly.
        return np.clip(np.rint(array / 257.0), 0, 255).astype(np.uint8)
    if np.issubdtype(array.dtype, np.floating):
        scale = 255.0 if np.nanmax(array) <= 1.0 else 1.0
        return np.clip(np.rint(np.nan_to_num(array) * scale), 0, 255).astype(np.uint8)
    raise BadSampleError(f"{where}: unsupported image data type {array.dtype}")


def _label_to_ids(label: Image.Image | np.ndarray, where: str) -> np.ndarray:
    """(H, W) int64 class ids. A palette PNG gives its indices; RGB with three equal channels its gray."""
    if isinstance(label, Image.Image):
        if label.mode in ("LA", "PA"):
            label = label.getchannel(0)
        elif label.mode not in ("1", "L", "P", "RGB", "RGBA", "F") and not label.mode.startswith("I"):
            raise BadSampleError(
                f"{where}: unsupported label map mode {label.mode}; save class ids as 8/16-bit gray"
            )
        array = np.asarray(label)
    else:
        array = np.asarray(label)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim == 3 and array.shape[-1] in (3, 4):
        colours = array[..., :3]
        if not (
            np.array_equal(colours[..., 0], colours[..., 1])
            and np.array_equal(colours[..., 0], colours[..., 2])
        ):
            distinct = np.unique(colours.reshape(-1, 3), axis=0)
            examples = ", ".join(str(tuple(int(c) for c in colour)) for colour in distinct[:3])
            raise BadSampleError(
                f"{where}: the label map is colour-coded RGB ({len(distinct)} distinct colours, "
                f"e.g. {examples}); class ids are expected (one channel, or three equal channels). "
                "Convert colours to ids with the dataset's palette first."
            )
        array = colours[..., 0]
    if array.ndim != 2:
        raise BadSampleError(f"{where}: expected a (H, W) label map, got an array of shape {array.shape}")
    if np.issubdtype(array.dtype, np.floating):
        if not np.all(np.isfinite(array)) or not np.array_equal(array, np.round(array)):
            raise BadSampleError(
                f"{where}: the label map holds non-integer values; class ids must be integers"
            )
    elif not (np.issubdtype(array.dtype, np.integer) or array.dtype == np.bool_):
        raise BadSampleError(f"{where}: unsupported label data type {array.dtype}")
    return array.astype(np.int64)


def _reduce_labels(label: np.ndarray, ignore_index: int) -> np.ndarray:
    """0 ("other") -> ignore_index, v -> v - 1; pixels already at ignore_index stay ignored (as mmseg)."""
    reduced = label - 1
    reduced[(label == 0) | (label == ignore_index)] = ignore_index
    return reduced


def _check_label_values(
    label: np.ndarray, num_labels: int, ignore_index: int, reduce_labels: bool, where: str
) -> None:
    """Every value must be a class id or ignore_index; a single-label (binary) model takes 0/1 masks.

    A binary mask saved as 0/255 is an error, not silently mapped: 255 is also the usual ignore index,
    so the mapping would guess. With ignore_index 255 such a mask cannot be told from a 0/1 mask with
    ignored pixels, hence only a warning (once) when a mask holds 0 and 255 but no 1.
    """
    binary = num_labels == 1
    num_classes = 2 if binary else num_labels
    values, _ = value_counts(label)
    bad = [int(v) for v in values if v != ignore_index and not 0 <= v < num_classes]
    if not bad:
        if binary and ignore_index in values and 1 not in values:
            _warn_once(
                "binary mask without foreground",
                f"{where}: a binary mask without foreground (1) but with ignored pixels ({ignore_index}). "
                f"If the masks are saved as 0/{ignore_index}, their foreground is being ignored: store 0/1.",
            )
        return
    shown = ", ".join(map(str, bad[:10])) + (f" and {len(bad) - 10} more" if len(bad) > 10 else "")
    hints = []
    if binary:
        hints.append(
            "a single-label (binary) model takes masks of 0 (background) and 1 (foreground); a mask saved "
            "as 0/255 needs thresholding to 0/1 first (e.g. np.where(mask > 127, 1, 0))"
        )
    elif not reduce_labels and bad[-1] == num_labels:
        hints.append(
            "ids look 1-based: if 0 means 'other' and the classes are 1..N (as in ADE20K), "
            "set reduce_labels: true"
        )
    if reduce_labels:
        hints.append("reduce_labels is on (0 -> ignored, v -> v-1): is that right for this dataset?")
    if len(bad) == 1:
        hints.append(f"if {bad[0]} marks pixels to ignore, set ignore_index: {bad[0]}")
    raise BadSampleError(
        f"{where}: label values {shown} are outside the {num_classes} classes [0, {num_classes}) and are not "
        f"ignore_index ({ignore_index})" + (f". Hint: {'; '.join(hints)}" if hints else "")
    )


def value_counts(label: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`np.unique(label, return_counts=True)`: the distinct values, sorted, and how often each occurs.

    Counted with `np.bincount` when the values are ids in 0..65535 (class ids always are): about ten
    times faster than unique's hashing and sorting, which cost a DataLoader worker 10-20% of a sample's
    time in the label check and the crop draws. Other values (negative ignore indices) take unique.
    """
    flat = label.ravel()
    if flat.size == 0 or flat.min() < 0 or flat.max() >= 1 << 16:
        return np.unique(flat, return_counts=True)
    counts = np.bincount(flat)
    values = np.flatnonzero(counts)
    return values, counts[values]


_WARNED: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    """Logs `message` the first time `key` comes up in this process (not once per sample)."""
    if key not in _WARNED:
        _WARNED.add(key)
        logger.warning(message)


# Geometry -----------------------------------------------------------------------------------------------


# The keep-ratio resize rule (`rescaled_size`), `resize_image` and `resize_label` live in the image
# processor's file, which travels with every saved model: the pipeline resizes exactly as training did.


def random_crop_box(
    label: np.ndarray,
    crop_size: Size,
    cat_max_ratio: float,
    ignore_index: int,
    rng: np.random.Generator,
) -> tuple[int, int]:
    """(top, left) of a crop_size window, drawn as mmseg's RandomCrop draws it.

    With `cat_max_ratio` < 1 a window is accepted only if it holds more than one class and no class
    covers `cat_max_ratio` or more of its non-ignored pixels. Up to 10 windows are checked; after 10
    rejections one more is drawn and used unchecked. The window is smaller than crop_size where the
    image is (the padding comes later).
    """
    crop_height, crop_width = crop_size
    height, width = label.shape

    def draw() -> tuple[int, int]:
        top = int(rng.integers(0, max(height - crop_height, 0) + 1))
        left = int(rng.integers(0, max(width - crop_width, 0) + 1))
        return top, left

    top, left = draw()
    if cat_max_ratio < 1.0:
        for _ in range(CROP_RETRIES):
            window = label[top : top + crop_height, left : left + crop_width]
            values, counts = value_counts(window)
            counts = counts[values != ignore_index]
            if len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
                break
            top, left = draw()
    return top, left


# Photometric distortion ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PhotometricParams:
    """One draw of mmseg's PhotoMetricDistortion; None means that step is not applied."""

    brightness_delta: float | None
    contrast_first: bool
    contrast_alpha: float | None
    saturation_alpha: float | None
    hue_delta: int | None


def draw_photometric_params(rng: np.random.Generator) -> PhotometricParams:
    """Each of the four distortions applies with probability 0.5, contrast before or after the HSV part."""
    brightness = float(rng.uniform(-BRIGHTNESS_DELTA, BRIGHTNESS_DELTA)) if rng.integers(2) else None
    contrast_first = bool(rng.integers(2))
    contrast = float(rng.uniform(*CONTRAST_RANGE)) if rng.integers(2) else None
    saturation = float(rng.uniform(*SATURATION_RANGE)) if rng.integers(2) else None
    # mmseg draws np.random.randint(-18, 18): the upper bound is exclusive, so -18..17.
    hue = int(rng.integers(-HUE_DELTA, HUE_DELTA)) if rng.integers(2) else None
    return PhotometricParams(brightness, contrast_first, contrast, saturation, hue)


def apply_photometric_distortion(image: np.ndarray, params: PhotometricParams) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> distorted uint8, in mmseg's order and with its 8-bit rounding between steps.

    Brightness adds a delta, contrast scales, saturation scales S and hue shifts H (OpenCV units of 2
    degrees) in HSV. HSV is computed in floating point rather than OpenCV's 8-bit HSV, which only
    removes a rounding of H and S that the original has.
    """
    pixels = image.astype(np.float32)
    if params.brightness_delta is not None:
        pixels = _clip_to_uint8_range(pixels + params.brightness_delta)
    if params.contrast_first and params.contrast_alpha is not None:
        pixels = _clip_to_uint8_range(pixels * params.contrast_alpha)
    if params.saturation_alpha is not None:
        pixels = np.rint(scale_saturation(pixels, params.saturation_alpha))
    if params.hue_delta is not None:
        pixels = np.rint(rotate_hue(pixels, 2.0 * params.hue_delta))
    if not params.contrast_first and params.contrast_alpha is not None:
        pixels = _clip_to_uint8_range(pixels * params.contrast_alpha)
    return np.clip(pixels, 0, 255).astype(np.uint8)


def _clip_to_uint8_range(pixels: np.ndarray) -> np.ndarray:
    # mmseg clips to 0..255 and casts to uint8, which truncates.
    return np.floor(np.clip(pixels, 0.0, 255.0))


def scale_saturation(pixels: np.ndarray, alpha: float) -> np.ndarray:
    """(..., 3) float32 RGB in 0..255 with HSV saturation S -> min(alpha * S, 1), hue and value kept.

    Straight in RGB, without converting to HSV and back (half the time, the same values up to float
    rounding): with V the largest channel and C = V - min the chroma, S = C / V and every channel's
    distance below V is proportional to S, so it scales by S' / S = min(alpha, V / C).
    """
    value = pixels.max(axis=-1, keepdims=True)
    chroma = value - pixels.min(axis=-1, keepdims=True)
    most = np.divide(value, chroma, out=np.full_like(value, np.inf), where=chroma > 0)  # gray: any factor
    return value - (value - pixels) * np.minimum(np.float32(alpha), most)


def rotate_hue(pixels: np.ndarray, degrees: float) -> np.ndarray:
    """(..., 3) float32 RGB in 0..255 with its HSV hue moved by `degrees`, saturation and value kept.

    The hue in sixths of the colour wheel h = H / 60 comes from the largest channel; channel n of the
    result is V - C * clip(min(k, 4 - k), 0, 1) with k = (offset_n + h') mod 6 (the standard HSV -> RGB
    formula, V * S being the chroma C). Gray pixels (C = 0) stay as they are.
    """
    red, green, blue = pixels[..., 0], pixels[..., 1], pixels[..., 2]
    value = pixels.max(axis=-1)
    chroma = value - pixels.min(axis=-1)
    safe_chroma = np.where(chroma > 0, chroma, np.float32(1.0))
    sixths = np.where(
        value == red,
        (green - blue) / safe_chroma,
        np.where(
            value == green,
            (blue - red) / safe_chroma + np.float32(2.0),
            (red - green) / safe_chroma + np.float32(4.0),
        ),
    )
    k = np.mod(
        _HSV_CHANNEL_OFFSETS + (sixths + np.float32(degrees) / np.float32(60.0))[..., None], np.float32(6.0)
    )
    return value[..., None] - chroma[..., None] * np.clip(np.minimum(k, np.float32(4.0) - k), 0.0, 1.0)


_HSV_CHANNEL_OFFSETS = np.array([5.0, 3.0, 1.0], dtype=np.float32)  # red, green, blue


# Transforms --------------------------------------------------------------------------------------------


def normalize(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 -> (3, H, W) float32 with the ImageNet mean and std every SegFormer uses.

    Plain numpy: tiny torch operations pay a thread-pool cost that dominates at these sizes.
    """
    mean = np.asarray(IMAGENET_DEFAULT_MEAN, dtype=np.float32) * 255.0
    std = np.asarray(IMAGENET_DEFAULT_STD, dtype=np.float32) * 255.0
    # (H, W, 3) -> (3, H, W)
    return ((image.astype(np.float32) - mean) / std).transpose(2, 0, 1)


def _rows(batch: dict[str, list]) -> Iterable[tuple[Any, Any, str, int]]:
    missing = [column for column in ("image", "label", "sample_id", "sample_index") if column not in batch]
    if missing:
        raise KeyError(
            f"The dataset lacks the column(s) {missing}; load it with load_segmentation_dataset, which adds "
            "sample_id and sample_index."
        )
    return zip(batch["image"], batch["label"], batch["sample_id"], batch["sample_index"])


def _checked_pair(value: Sequence[int], name: str) -> Size:
    pair = tuple(int(v) for v in value)
    if len(pair) != 2 or min(pair) <= 0:
        raise ValueError(f"{name} must be two positive integers, got {value}")
    return pair


class _SampleDecoding:
    """What both transforms share: how a row's image and label are decoded and checked."""

    num_labels: int
    ignore_index: int
    reduce_labels: bool

    def decode(
        self, image: Any, label: Any, sample_id: str, sample_index: int
    ) -> tuple[np.ndarray, np.ndarray]:
        return decode_sample(
            image,
            label,
            sample_index=sample_index,
            sample_id=sample_id,
            num_labels=self.num_labels,
            ignore_index=self.ignore_index,
            reduce_labels=self.reduce_labels,
        )


# Copy-paste of chosen classes ----------------------------------------------------------------------------

# The stream number that separates copy-paste's draws from the rest of a sample's augmentation draws.
COPY_PASTE_STREAM = 1


@dataclass(frozen=True)
class CopyPaste:
    """Copy-paste augmentation: some classes' pixels of another training frame pasted over a frame.

    Thin, rare classes (CamVid's poles and signs) are learnt from few contexts: a from-scratch model
    learns "thin thing in front of a building" as Building. Pasting them, at the place they had in
    their own frame, in front of another frame's content shows them against many backgrounds (the
    ClassMix of Olsson et al. 2021, limited to chosen classes). With `probability` a frame gets the
    `class_ids` pixels of a donor drawn uniformly from `donors`, the training frames that hold at least
    one of them (`donor_frames`), before the resize, crop and flip.
    """

    class_ids: tuple[int, ...]
    probability: float
    donors: datasets.Dataset

    def __post_init__(self) -> None:
        if not self.class_ids:
            raise ValueError("copy-paste needs at least one class")
        if not 0 < self.probability <= 1:
            raise ValueError(f"copy_paste_prob must be in (0, 1], got {self.probability}")
        if len(self.donors) == 0:
            raise ValueError("copy-paste needs at least one donor frame")


def paste_classes(
    image: np.ndarray,
    label: np.ndarray,
    donor_image: np.ndarray,
    donor_label: np.ndarray,
    class_ids: Sequence[int],
) -> tuple[np.ndarray, np.ndarray]:
    """`image` and `label` with the donor's pixels of `class_ids` put in their place, at the same position.

    A donor of another size is first resized to the frame's (bilinear image, nearest-neighbour label), so
    that an object keeps its place relative to the frame (a pole stays on the ground, a sign at its height).
    """
    if donor_label.shape != label.shape:
        donor_image = resize_image(donor_image, label.shape)
        donor_label = resize_label(donor_label, label.shape)
    pasted = np.isin(donor_label, class_ids)
    image, label = image.copy(), label.copy()
    image[pasted] = donor_image[pasted]
    label[pasted] = donor_label[pasted]
    return image, label


def label_map_of(
    dataset: datasets.Dataset, index: int, *, ignore_index: int = 255, reduce_labels: bool = False
) -> np.ndarray:
    """Row `index`'s label map alone (its image is not decoded), as class ids, `reduce_labels` applied.

    Raises:
        BadSampleError: an unreadable label map, named by row and sample id.
    """
    row = dataset[index]
    where = f"Sample {index} ({row.get('sample_id', index)})"
    label = _label_to_ids(_decode(row["label"], where, "label map"), where)
    return _reduce_labels(label, ignore_index) if reduce_labels else label


def donor_frames(
    dataset: datasets.Dataset,
    class_ids: Sequence[int],
    *,
    ignore_index: int = 255,
    reduce_labels: bool = False,
    skip_bad_samples: bool = False,
) -> datasets.Dataset:
    """The frames of `dataset` whose label maps hold at least one pixel of `class_ids` (one pass over the labels).

    Raises:
        BadSampleError: an unreadable label map (without `skip_bad_samples`, which leaves it out instead).
        ValueError: no frame holds any of the classes (there would be nothing to paste).
    """
    holding = []
    for index in range(len(dataset)):
        try:
            label = label_map_of(dataset, index, ignore_index=ignore_index, reduce_labels=reduce_labels)
        except BadSampleError as error:
            if not skip_bad_samples:
                raise
            logger.warning("Not a copy-paste donor: %s", error)
            continue
        if np.isin(label, class_ids).any():
            holding.append(index)
    if not holding:
        raise ValueError(
            f"copy_paste_classes: none of the {len(dataset)} training frames holds a pixel of the classes "
            f"{list(class_ids)}, so there is nothing to paste"
        )
    return dataset.select(holding)


@dataclass(frozen=True)
class AugmentationDraws:
    """Every random choice of one sample's training augmentation (see `SegmentationTrainTransform.draw`)."""

    resized_size: Size  # (h, w) of the keep-ratio resize with the drawn ratio
    crop_box: tuple[int, int]  # (top, left) of the crop in the resized image
    flip: bool
    photometric: PhotometricParams | None  # None: photometric distortion is off


class SegmentationTrainTransform(_SampleDecoding):
    """The paper's (mmseg's) training augmentation, as a `datasets` batch transform for `with_transform`.

    resize (keep ratio, img_scale x a ratio drawn from ratio_range) -> random crop (cat_max_ratio)
    -> horizontal flip -> photometric distortion -> ImageNet normalisation -> pad to crop_size (image
    with 0, the mean colour after normalisation; label with ignore_index). Labels are resized with
    nearest neighbour. The random draws of a sample come only from `(seed, epoch, sample_index)`; call
    `set_epoch` before each epoch's DataLoader iterator is created (workers copy the transform then).

    A bad sample raises `BadSampleError`, or with `skip_bad_samples` becomes a placeholder of crop
    size (zero image, all-ignored label) flagged `skipped`, so batch sizes stay equal on all processes.
    """

    # What `transform_sample` gives each sample, besides the skipped flag and sample_id.
    columns: tuple[str, ...] = ("pixel_values", "labels")

    def __init__(
        self,
        *,
        crop_size: Sequence[int],
        img_scale: Sequence[int],
        ratio_range: Sequence[float] = (0.5, 2.0),
        cat_max_ratio: float = 0.75,
        flip_prob: float = 0.5,
        photometric_distortion: bool = True,
        ignore_index: int = 255,
        reduce_labels: bool = False,
        num_labels: int,
        seed: int = 0,
        skip_bad_samples: bool = False,
        copy_paste: CopyPaste | None = None,
    ) -> None:
        self.crop_size = _checked_pair(crop_size, "crop_size")
        self.img_scale = _checked_pair(img_scale, "img_scale")
        low, high = (float(r) for r in ratio_range)
        if not 0 < low <= high:
            raise ValueError(f"ratio_range must be [low, high] with 0 < low <= high, got {ratio_range}")
        if not 0 < cat_max_ratio <= 1:
            raise ValueError(f"cat_max_ratio must be in (0, 1], got {cat_max_ratio}")
        if not 0 <= flip_prob <= 1:
            raise ValueError(f"flip_prob must be in [0, 1], got {flip_prob}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0 (it seeds numpy's SeedSequence), got {seed}")
        self.ratio_range = (low, high)
        self.cat_max_ratio = float(cat_max_ratio)
        self.flip_prob = float(flip_prob)
        self.photometric_distortion = bool(photometric_distortion)
        self.ignore_index = int(ignore_index)
        self.reduce_labels = bool(reduce_labels)
        self.num_labels = int(num_labels)
        self.seed = int(seed)
        self.skip_bad_samples = bool(skip_bad_samples)
        self.copy_paste = copy_paste
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def rng(self, sample_index: int) -> np.random.Generator:
        """The one generator all of a sample's random draws in this epoch come from."""
        return np.random.default_rng([self.seed, self.epoch, int(sample_index)])

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        output: dict[str, list] = {key: [] for key in (*self.columns, "skipped", "sample_id")}
        for image, label, sample_id, sample_index in _rows(batch):
            try:
                image_array, label_array = self.decode(image, label, sample_id, sample_index)
                if self.copy_paste is not None:
                    image_array, label_array = self.paste_donor(image_array, label_array, sample_index)
                sample = self.transform_sample(image_array, label_array, self.rng(sample_index))
                skipped = False
            except BadSampleError as error:
                if not self.skip_bad_samples:
                    raise
                logger.warning(
                    "Skipping a bad training sample (an all-ignored placeholder takes its place): %s", error
                )
                sample, skipped = self.placeholder_sample(), True
            for key in self.columns:
                output[key].append(sample[key])
            output["skipped"].append(skipped)
            output["sample_id"].append(sample_id)
        return output

    def paste_donor(
        self, image: np.ndarray, label: np.ndarray, sample_index: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """The sample with, when drawn, the `copy_paste` classes' pixels of a donor frame pasted over it.

        The draws (whether to paste, which donor) come from their own generator, seeded like `rng` plus a
        stream number: runs without copy-paste keep every draw they had, and the paste, like the rest of
        the augmentation, depends only on `(seed, epoch, sample_index)`.
        """
        copy_paste = self.copy_paste
        rng = np.random.default_rng([self.seed, self.epoch, int(sample_index), COPY_PASTE_STREAM])
        if rng.random() >= copy_paste.probability:
            return image, label
        donor = copy_paste.donors[int(rng.integers(len(copy_paste.donors)))]
        try:
            donor_image, donor_label = self.decode(
                donor["image"], donor["label"], donor["sample_id"], donor["sample_index"]
            )
        except BadSampleError as error:
            if not self.skip_bad_samples:
                raise BadSampleError(f"copy-paste donor for sample {sample_index}: {error}") from error
            logger.warning("Not pasting from a bad donor sample: %s", error)
            return image, label
        return paste_classes(image, label, donor_image, donor_label, copy_paste.class_ids)

    def transform_sample(
        self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator
    ) -> dict[str, Any]:
        """One decoded sample's columns: here its augmented pixel_values and labels."""
        pixel_values, labels = self.augment(image, label, rng)
        return {"pixel_values": pixel_values, "labels": labels}

    def placeholder_sample(self) -> dict[str, Any]:
        """The columns of a bad sample's stand-in (see `placeholder`)."""
        pixel_values, labels = self.placeholder()
        return {"pixel_values": pixel_values, "labels": labels}

    def draw(self, label: np.ndarray, rng: np.random.Generator) -> tuple[AugmentationDraws, np.ndarray]:
        """All of a sample's random draws, in their one fixed order, and its label resized and cropped.

        The crop box depends on the resized label (`cat_max_ratio`), so the label is resized here; the
        (H', W') label window (flipped when drawn) comes back so that no caller resizes it twice. Both
        augmentation paths (numpy here, batched torch in `augmentation`) apply exactly these draws.
        """
        ratio = rng.uniform(*self.ratio_range)
        scale = (int(self.img_scale[0] * ratio), int(self.img_scale[1] * ratio))
        size = rescaled_size(*label.shape, scale)
        label = resize_label(label, size)
        top, left = random_crop_box(label, self.crop_size, self.cat_max_ratio, self.ignore_index, rng)
        crop_height, crop_width = self.crop_size
        label = label[top : top + crop_height, left : left + crop_width]
        flip = bool(rng.random() < self.flip_prob)
        photometric = draw_photometric_params(rng) if self.photometric_distortion else None
        return AugmentationDraws(size, (top, left), flip, photometric), label[:, ::-1] if flip else label

    def augment(
        self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(H, W, 3) uint8 + (H, W) ids -> (3, *crop_size) float32 + (*crop_size) int64."""
        draws, label = self.draw(label, rng)
        (top, left), (height, width) = draws.crop_box, label.shape
        image = resize_image(image, draws.resized_size)[top : top + height, left : left + width]
        if draws.flip:
            image = image[:, ::-1]
        if draws.photometric is not None:
            image = apply_photometric_distortion(image, draws.photometric)

        pixel_values = np.zeros((3, *self.crop_size), dtype=np.float32)
        labels = np.full(self.crop_size, self.ignore_index, dtype=np.int64)
        height, width = label.shape
        pixel_values[:, :height, :width] = normalize(image)
        labels[:height, :width] = label
        return torch.from_numpy(pixel_values), torch.from_numpy(labels)

    def placeholder(self) -> tuple[torch.Tensor, torch.Tensor]:
        """What replaces a bad sample: a zero image (the mean colour), an all-ignored label, of crop size.

        It stays in the batch rather than being dropped by the collate function: batch sizes then stay
        equal on every process, and a batch of bad samples only is still a batch the training step can
        run. It teaches nothing: with every pixel ignored it has no loss, and the model leaves samples
        without a labelled pixel out of its BatchNorm statistics (`SegformerHFDecodeHead.normalize`),
        so it gets exactly zero gradient and the others get the gradient of the batch without it.
        Its image content therefore does not matter.
        """
        return (
            torch.zeros(3, *self.crop_size, dtype=torch.float32),
            torch.full(self.crop_size, self.ignore_index, dtype=torch.int64),
        )


class SegmentationDecodeTransform(SegmentationTrainTransform):
    """The worker half of `augment_device` cuda: decode and draw here, augment the batch on the device.

    Per sample it yields the decoded uint8 image at its original size, the label already resized,
    cropped, flipped and padded to crop_size (the crop draw needs the resized label anyway, and a crop
    is smaller to ship than the full map), and the draws as tensors (`draws_as_tensors`). The image's
    resize, crop, flip, photometric distortion and normalisation are left to
    `augmentation.DeviceAugmentation`, which applies these draws batched in torch. The draws come
    from the same `(seed, epoch, sample_index)` generator in the same order as in
    `SegmentationTrainTransform`, so both paths augment a sample alike.
    """

    columns = ("image", "labels", "draws")

    def transform_sample(
        self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator
    ) -> dict[str, Any]:
        draws, label = self.draw(label, rng)
        return self._decoded_columns(image, label, draws)

    def placeholder_sample(self) -> dict[str, Any]:
        # A 1x1 black image cropped at the origin; the device side zeroes it and ignores its label.
        no_draws = AugmentationDraws((1, 1), (0, 0), False, None)
        return self._decoded_columns(np.zeros((1, 1, 3), np.uint8), np.zeros((0, 0), np.int64), no_draws)

    def _decoded_columns(
        self, image: np.ndarray, label: np.ndarray, draws: AugmentationDraws
    ) -> dict[str, Any]:
        """The full-size image, the label window padded to crop_size, and the draws as tensors."""
        labels = np.full(self.crop_size, self.ignore_index, dtype=np.int64)
        labels[: label.shape[0], : label.shape[1]] = label
        return {
            "image": torch.from_numpy(np.require(image, requirements=["C", "W"])),
            "labels": torch.from_numpy(labels),
            "draws": draws_as_tensors(draws),
        }


def draws_as_tensors(draws: AugmentationDraws) -> dict[str, torch.Tensor]:
    """One sample's draws as tensors that a DataLoader batches and an accelerator moves to its device.

    `photometric` is (brightness delta, contrast first, contrast alpha, saturation alpha, hue delta),
    NaN for a step that is not applied.
    """
    params = draws.photometric or PhotometricParams(None, False, None, None, None)
    photometric = [
        params.brightness_delta,
        float(params.contrast_first),
        params.contrast_alpha,
        params.saturation_alpha,
        params.hue_delta,
    ]
    return {
        "resized_size": torch.tensor(draws.resized_size, dtype=torch.int64),
        "crop_box": torch.tensor(draws.crop_box, dtype=torch.int64),
        "flip": torch.tensor(draws.flip),
        "photometric": torch.tensor([math.nan if v is None else v for v in photometric], dtype=torch.float64),
    }


class SegmentationEvalTransform(_SampleDecoding):
    """Evaluation preprocessing as the paper tests: resize keeping the ratio to img_scale, normalise.

    Labels stay at the original resolution (after reduce_labels), so the metric is computed there.
    A bad sample raises `BadSampleError`, or with `skip_bad_samples` yields None for both fields and
    `eval_collate_fn` drops it from the batch and counts it.
    """

    def __init__(
        self,
        *,
        img_scale: Sequence[int] | None,
        ignore_index: int = 255,
        reduce_labels: bool = False,
        num_labels: int,
        skip_bad_samples: bool = False,
    ) -> None:
        # None: the network sees each image at its own size (what sliding-window inference wants).
        self.img_scale = None if img_scale is None else _checked_pair(img_scale, "img_scale")
        self.ignore_index = int(ignore_index)
        self.reduce_labels = bool(reduce_labels)
        self.num_labels = int(num_labels)
        self.skip_bad_samples = bool(skip_bad_samples)

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        output: dict[str, list] = {"pixel_values": [], "labels": [], "sample_id": []}
        for image, label, sample_id, sample_index in _rows(batch):
            try:
                image_array, label_array = self.decode(image, label, sample_id, sample_index)
                if self.img_scale is not None:
                    image_array = resize_image(image_array, rescaled_size(*label_array.shape, self.img_scale))
                pixel_values = torch.from_numpy(np.ascontiguousarray(normalize(image_array)))
                labels = torch.from_numpy(label_array)
            except BadSampleError as error:
                if not self.skip_bad_samples:
                    raise
                logger.warning("Skipping a bad evaluation sample (left out of the metric): %s", error)
                pixel_values, labels = None, None
            output["pixel_values"].append(pixel_values)
            output["labels"].append(labels)
            output["sample_id"].append(sample_id)
        return output


# Collation ---------------------------------------------------------------------------------------------


def train_collate_fn(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """{"pixel_values": (B, 3, h, w), "labels": (B, h, w) int64, "num_skipped": placeholders in the batch,
    "sample_ids": which samples these are (to trace a bad batch, and to check data order)}."""
    return {
        "pixel_values": torch.stack([sample["pixel_values"] for sample in samples]),
        "labels": torch.stack([sample["labels"] for sample in samples]),
        "num_skipped": sum(bool(sample.get("skipped", False)) for sample in samples),
        "sample_ids": [sample.get("sample_id") for sample in samples],
    }


def decoded_collate_fn(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Batches `SegmentationDecodeTransform` samples for `augmentation.DeviceAugmentation`.

    {"images": (B, H_max, W_max, 3) uint8 zero-padded, "image_sizes": (B, 2), "labels": (B, h, w)
    int64, "draws": {name: (B, ...)}, "skipped": (B,) bool, "num_skipped"}.
    """
    heights = [sample["image"].shape[0] for sample in samples]
    widths = [sample["image"].shape[1] for sample in samples]
    images = torch.zeros(len(samples), max(heights), max(widths), 3, dtype=torch.uint8)
    for index, sample in enumerate(samples):
        images[index, : heights[index], : widths[index]] = sample["image"]
    skipped = [bool(sample.get("skipped", False)) for sample in samples]
    return {
        "images": images,
        "image_sizes": torch.tensor(list(zip(heights, widths)), dtype=torch.int64),
        "labels": torch.stack([sample["labels"] for sample in samples]),
        "draws": {
            key: torch.stack([sample["draws"][key] for sample in samples]) for key in samples[0]["draws"]
        },
        "skipped": torch.tensor(skipped),
        "num_skipped": sum(skipped),
    }


def eval_collate_fn(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Batches evaluation samples of possibly different sizes, dropping the skipped ones.

    pixel_values is a (B, 3, h, w) tensor when all resized images agree in size, else a list of
    (3, h, w); labels likewise at the original resolution. A batch whose samples were all skipped
    has empty lists.
    """
    kept = [sample for sample in samples if sample["pixel_values"] is not None]
    return {
        "pixel_values": _stack_if_same_shape([sample["pixel_values"] for sample in kept]),
        "labels": _stack_if_same_shape([sample["labels"] for sample in kept]),
        "num_skipped": len(samples) - len(kept),
    }


def _stack_if_same_shape(tensors: list[torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
    if tensors and all(t.shape == tensors[0].shape for t in tensors):
        return torch.stack(tensors)
    return tensors


# Data loaders --------------------------------------------------------------------------------------------


def build_train_dataloader(
    dataset: datasets.Dataset,
    transform: SegmentationTrainTransform,
    *,
    batch_size: int,
    num_workers: int,
    seed: int,
    collate_fn: Callable[[list[dict[str, Any]]], dict[str, Any]] = train_collate_fn,
) -> DataLoader:
    """Shuffled, full batches of augmented crops; the transform runs lazily in the DataLoader workers.

    The loader has its own generator: otherwise every new iterator draws its worker seed from the
    global RNG, and a run resumed mid-epoch (one extra iterator) would drop out differently from the
    uninterrupted run.

    Raises:
        ValueError: the split holds fewer samples than one batch (there would be no step to train).
    """
    if len(dataset) < batch_size:
        raise ValueError(
            f"The training split has {len(dataset)} samples, fewer than one batch of {batch_size}: "
            "no training step could be made. Lower per_device_train_batch_size or use more samples."
        )
    return DataLoader(
        dataset.with_transform(transform),
        batch_size=batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=num_workers,
        collate_fn=collate_fn,
        **worker_process_options(num_workers),
        generator=torch.Generator().manual_seed(seed),
    )


def build_eval_dataloader(
    dataset: datasets.Dataset,
    transform: SegmentationEvalTransform,
    *,
    batch_size: int,
    num_workers: int,
    num_shards: int = 1,
    shard_index: int = 0,
) -> DataLoader:
    """Validation batches: images resized for the network, labels at their original resolution.

    With several processes each takes a contiguous shard (`datasets`' `shard`, not a padding sampler),
    so no sample is evaluated twice and the summed confusion statistics are exact.
    """
    if num_shards > 1:
        dataset = dataset.shard(num_shards=num_shards, index=shard_index, contiguous=True)
    return DataLoader(
        dataset.with_transform(transform),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=eval_collate_fn,
        **worker_process_options(num_workers),
    )


# Worker processes and termination signals ----------------------------------------------------------------
#
# Ctrl-C, `timeout`, Slurm and Kubernetes signal the whole process group. The main process turns SIGINT/SIGTERM
# into a flag and saves a checkpoint at the next step boundary (`checkpointing.InterruptFlag`); a worker that
# died of the same signal would crash the loop first. So workers never act on a group's signal, only on their
# parent's own request to stop (multiprocessing's `terminate()`, which the interpreter's exit sends to every
# daemonic child before joining it: a worker that ignored that too would hang its parent's exit for ever).

TERMINATION_SIGNALS = frozenset({signal.SIGINT, signal.SIGTERM})


class _SignalSafeForkProcess(multiprocessing.context.ForkProcess):
    """A forked process that starts with SIGINT/SIGTERM blocked (the signal mask survives the fork).

    Between the fork and the worker's `worker_init_fn` there would otherwise be a window in which a group's
    signal finds PyTorch's worker handler (which dies of any SIGTERM not sent by the parent); a signal sent
    in that window now waits, pending, until `ignore_termination_signals` takes it.
    """

    def start(self) -> None:
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, TERMINATION_SIGNALS)
        try:
            super().start()
        finally:
            # A signal that reached this process meanwhile is delivered here, to the main process's handler.
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)


class SignalSafeForkContext(multiprocessing.context.ForkContext):
    """The fork context whose processes start with SIGINT/SIGTERM blocked (see `_SignalSafeForkProcess`)."""

    Process = _SignalSafeForkProcess


def worker_process_options(num_workers: int) -> dict[str, Any]:
    """The DataLoader arguments that give its workers the signal contract above.

    `ignore_termination_signals` as `worker_init_fn`; where workers are forked (the default on Linux up to
    Python 3.13) a `SignalSafeForkContext`, so they start with the signals blocked; elsewhere (spawn,
    forkserver) the platform's default context, where the window before `worker_init_fn` remains.
    """
    options: dict[str, Any] = {"worker_init_fn": ignore_termination_signals}
    method = multiprocessing.get_start_method(allow_none=True) or multiprocessing.get_all_start_methods()[0]
    if num_workers > 0 and method == "fork":
        options["multiprocessing_context"] = SignalSafeForkContext()
    return options


def ignore_termination_signals(worker_id: int) -> None:
    """`worker_init_fn`: a worker ignores SIGINT/SIGTERM from anyone but its parent, which decides when to stop.

    Both signals stay blocked and a daemon thread takes them with `sigwaitinfo`, which tells who sent each:
    a SIGTERM from the parent ends the worker at once; any other is dropped. (`SIG_IGN` could not tell the
    parent's `terminate()` from the group's signal.)
    """
    signal.pthread_sigmask(signal.SIG_BLOCK, TERMINATION_SIGNALS)
    threading.Thread(
        target=_take_termination_signals, args=(os.getppid(),), name="termination-signals", daemon=True
    ).start()


def _take_termination_signals(parent_pid: int) -> None:
    while True:
        received = signal.sigwaitinfo(TERMINATION_SIGNALS)
        if received.si_signo == signal.SIGTERM and received.si_pid == parent_pid:
            os._exit(0)


# What a training run needs, from its config ---------------------------------------------------------------


def load_training_data(
    config: TrainingConfig,
) -> tuple[datasets.Dataset | datasets.IterableDataset, datasets.Dataset, dict[int, str]]:
    """(train split, validation split, id2label) as the config describes them, sample caps applied.

    With `config.streaming` the training split is a `datasets.IterableDataset` read as it is used, and
    the validation split is read into memory once (see `streaming`).
    """
    if config.streaming:
        return _load_streaming_training_data(config)
    splits = load_segmentation_dataset(
        **_data_source(config),
        validation_fraction=config.validation_fraction,
        seed=config.seed,
    )
    id2label = resolve_id2label(
        id2label=config.id2label,
        id2label_file=config.id2label_file,
        dataset=splits["train"],
        data_dir=config.data_dir,
    )
    train, validation = splits["train"], splits["validation"]
    if config.max_train_samples is not None:
        train = train.select(range(min(config.max_train_samples, len(train))))
    if config.max_eval_samples is not None:
        validation = validation.select(range(min(config.max_eval_samples, len(validation))))
    return train, validation, id2label


def _data_source(config: TrainingConfig) -> dict[str, Any]:
    """Where the config's data comes from: the arguments map-style loading and streaming share."""
    return {
        "dataset_name": config.dataset_name,
        "dataset_config_name": config.dataset_config_name,
        "data_dir": config.data_dir,
        "data_format": config.data_format,
        "train_split": config.train_split,
        "validation_split": config.validation_split,
        "image_column": config.image_column,
        "label_column": config.label_column,
    }


def _load_streaming_training_data(
    config: TrainingConfig,
) -> tuple[datasets.IterableDataset, datasets.Dataset, dict[int, str]]:
    from .streaming import read_split, stream_segmentation_dataset

    streams = stream_segmentation_dataset(
        **_data_source(config),
        max_train_samples=config.max_train_samples,
        max_eval_samples=config.max_eval_samples,
    )
    id2label = resolve_id2label(
        id2label=config.id2label, id2label_file=config.id2label_file, data_dir=config.data_dir
    )
    return streams["train"], read_split(streams["validation"]), id2label


def num_samples(dataset: datasets.Dataset | datasets.IterableDataset) -> int | None:
    """The number of samples of a split; None for a stream, whose length is not known before its end."""
    return None if isinstance(dataset, datasets.IterableDataset) else len(dataset)


def train_transform_for(
    config: TrainingConfig,
    dataset: datasets.Dataset | datasets.IterableDataset,
    id2label: Mapping[int, str],
) -> SegmentationTrainTransform:
    """The config's training augmentation of `dataset` (the paper's pipeline with the recipe's sizes).

    With `augment_device` other than cpu the workers only decode and draw (`SegmentationDecodeTransform`):
    the batches are then finished by `augmentation.DeviceAugmentation` on the accelerator. With
    `copy_paste_classes` the donor frames are found here (`copy_paste_for`).
    """
    on_device = config.augment_device != "cpu"
    return (SegmentationDecodeTransform if on_device else SegmentationTrainTransform)(
        crop_size=tuple(config.crop_size),
        img_scale=tuple(config.img_scale),
        ratio_range=tuple(config.ratio_range),
        cat_max_ratio=config.cat_max_ratio,
        flip_prob=config.flip_prob,
        photometric_distortion=config.photometric_distortion,
        ignore_index=config.ignore_index,
        reduce_labels=config.reduce_labels,
        num_labels=len(id2label),
        seed=config.seed,
        skip_bad_samples=config.skip_bad_samples,
        copy_paste=copy_paste_for(config, dataset, id2label),
    )


def copy_paste_for(
    config: TrainingConfig,
    dataset: datasets.Dataset | datasets.IterableDataset,
    id2label: Mapping[int, str],
) -> CopyPaste | None:
    """The config's copy-paste augmentation (None without `copy_paste_classes`), its donors found in `dataset`.

    Raises:
        ValueError: a class that is neither a name of `id2label` nor one of its ids, a stream (donors are
            drawn by index), or no frame holding the classes.
    """
    if not config.copy_paste_classes:
        return None
    if isinstance(dataset, datasets.IterableDataset):
        raise ValueError(
            "copy_paste_classes draws donor frames by index, which a stream cannot give: "
            "use it with map-style data (streaming: false)"
        )
    class_ids = class_ids_of(config.copy_paste_classes, id2label, "copy_paste_classes")
    started = time.perf_counter()
    donors = donor_frames(
        dataset,
        class_ids,
        ignore_index=config.ignore_index,
        reduce_labels=config.reduce_labels,
        skip_bad_samples=config.skip_bad_samples,
    )
    logger.info(
        "copy-paste: %d of %d training frames hold %s (found in %.1f s)",
        len(donors),
        len(dataset),
        ", ".join(id2label[class_id] for class_id in class_ids),
        time.perf_counter() - started,
    )
    return CopyPaste(class_ids=class_ids, probability=config.copy_paste_prob, donors=donors)


def class_ids_of(classes: Sequence[str | int], id2label: Mapping[int, str], setting: str) -> tuple[int, ...]:
    """The ids of `classes`, each given by its name in `id2label` (exactly, else ignoring case) or by its id.

    Raises:
        ValueError: names `setting` and lists the classes it does not know, with the known ones.
    """
    by_name = {name: class_id for class_id, name in id2label.items()}
    by_folded_name = {name.casefold(): class_id for class_id, name in id2label.items()}
    ids, unknown = [], []
    for entry in classes:
        text = str(entry).strip()
        if text in by_name:
            ids.append(by_name[text])
        elif text.casefold() in by_folded_name:
            ids.append(by_folded_name[text.casefold()])
        elif text.lstrip("-").isdigit() and int(text) in id2label:
            ids.append(int(text))
        else:
            unknown.append(entry)
    if unknown:
        known = ", ".join(f"{class_id} {name}" for class_id, name in sorted(id2label.items()))
        raise ValueError(f"{setting}: unknown class(es) {unknown}; the classes are: {known}")
    return tuple(sorted(set(ids)))


def eval_transform_for(config: TrainingConfig, num_labels: int) -> SegmentationEvalTransform:
    """The config's validation preprocessing: resized for its inference protocol, labels at full resolution."""
    return SegmentationEvalTransform(
        img_scale=config.inference_protocol().img_scale,
        ignore_index=config.ignore_index,
        reduce_labels=config.reduce_labels,
        num_labels=num_labels,
        skip_bad_samples=config.skip_bad_samples,
    )


def train_dataloader_for(
    config: TrainingConfig,
    dataset: datasets.Dataset | datasets.IterableDataset,
    id2label: Mapping[int, str],
    num_shards: int = 1,
    shard_index: int = 0,
    device: torch.device | str | None = None,
) -> tuple[DataLoader | StreamingTrainLoader, SegmentationTrainTransform]:
    """The training loader and its transform (whose epoch the loop sets) for the config's augmentation.

    A map-style split gives a DataLoader that Accelerate shards over the processes. A stream gives a
    `streaming.StreamingTrainLoader` over this process's part of it (`num_shards`, `shard_index`)
    whose batches are already on `device`: Accelerate leaves it alone.
    """
    transform = train_transform_for(config, dataset, id2label)
    on_device = config.augment_device != "cpu"
    if isinstance(dataset, datasets.IterableDataset):
        if on_device:
            raise ValueError("augment_device is for map-style data: use augment_device cpu with streaming")
        from .streaming import streaming_train_loader

        loader = streaming_train_loader(
            dataset,
            transform,
            batch_size=config.per_device_train_batch_size,
            num_workers=config.dataloader_num_workers,
            seed=config.seed,
            shuffle_buffer_size=config.shuffle_buffer_size,
            num_shards=num_shards,
            shard_index=shard_index,
            device=device,
        )
        return loader, transform
    loader = build_train_dataloader(
        dataset,
        transform,
        batch_size=config.per_device_train_batch_size,
        num_workers=config.dataloader_num_workers,
        seed=config.seed,
        collate_fn=decoded_collate_fn if on_device else train_collate_fn,
    )
    return loader, transform


def eval_dataloader_for(
    config: TrainingConfig,
    dataset: datasets.Dataset,
    num_labels: int,
    num_shards: int = 1,
    shard_index: int = 0,
) -> DataLoader:
    """The validation loader for the config's inference protocol (this process's shard of it)."""
    transform = eval_transform_for(config, num_labels)
    return build_eval_dataloader(
        dataset,
        transform,
        batch_size=config.per_device_eval_batch_size,
        num_workers=config.dataloader_num_workers,
        num_shards=num_shards,
        shard_index=shard_index,
    )


def class_weights_for(
    config: TrainingConfig, dataset: datasets.Dataset, num_labels: int
) -> list[float] | None:
    """The loss's class weights: as given, computed from the training labels (`auto`), or None."""
    if config.class_weights is None:
        return None
    if not config.class_weights.auto:
        return config.class_weights.values
    frequencies = class_frequencies(
        dataset,
        num_labels,
        ignore_index=config.ignore_index,
        reduce_labels=config.reduce_labels,
        seed=config.seed,
    )
    weights = frequency_class_weights(frequencies, power=config.class_weights_power)
    logger.info("class_weights auto: %s", ", ".join(f"{weight:.2f}" for weight in weights))
    return weights


def class_frequencies(
    dataset: datasets.Dataset,
    num_labels: int,
    *,
    ignore_index: int = 255,
    reduce_labels: bool = False,
    max_samples: int = 1000,
    seed: int = 0,
) -> np.ndarray:
    """Share of each class among the labelled pixels of (a seeded sample of at most `max_samples` of) a split."""
    indices = np.arange(len(dataset))
    if len(indices) > max_samples:
        indices = np.sort(np.random.default_rng(seed).choice(indices, max_samples, replace=False))
    counts = np.zeros(num_labels, dtype=np.int64)
    for index in indices.tolist():
        label = label_map_of(dataset, index, ignore_index=ignore_index, reduce_labels=reduce_labels)
        valid = label[(label != ignore_index) & (label >= 0) & (label < num_labels)]
        counts += np.bincount(valid.ravel(), minlength=num_labels)[:num_labels]
    if counts.sum() == 0:
        raise ValueError("class_weights auto: the training labels hold no labelled pixel")
    return counts / counts.sum()


def frequency_class_weights(frequencies: np.ndarray, offset: float = 1.02, power: float = 1.0) -> list[float]:
    """ENet's class weighting (Paszke et al. 2016): w = (1 / ln(offset + p)) ** power for a class of pixel share p.

    Bounded (between 1 / ln(1 + offset) ~ 1.4 for a class covering everything and 1 / ln(offset) ~ 50 for
    an absent one), so a rare class is weighted up without one tiny class dominating the loss. ENet's
    weights (`power` 1) maximise recall: on CamVid a weight of 38 for Pedestrian against 3.3 for Road buys
    0.81 accuracy at 0.16 IoU. `power` 0.5 narrows that range to its square root: fewer false positives
    (Pedestrian 0.25 IoU in the same time), less recall for the thinnest classes (docs/time_to_accuracy.md).
    """
    return [float((1.0 / np.log(offset + share)) ** power) for share in frequencies]


# The loader's position, for checkpoints --------------------------------------------------------------------


def train_loader_state(loader: Any) -> dict[str, Any] | None:
    """What a checkpoint must remember of this process's training loader, as JSON; None for a map-style loader.

    A map-style loader's position follows from the step count (the resumed run skips the batches
    done); a stream's does not, so it reports its own (`StreamingTrainLoader.state_dict`).
    """
    return loader.state_dict() if is_streaming_loader(loader) else None


def restore_train_loader_state(
    loader: Any, positions: list[dict[str, Any]] | None, process_index: int = 0, num_processes: int = 1
) -> int | None:
    """Puts a stream back where each process's `train_loader_state` left it (`positions`, one per process,
    as saved in the checkpoint); returns the stream's epoch, or None for a map-style loader.

    Raises:
        ValueError: the checkpoint and the run disagree on streaming, or on the number of processes.
    """
    if not is_streaming_loader(loader):
        if positions is not None:
            raise ValueError("The checkpoint was made by a streaming run: resume it with streaming: true")
        return None
    if positions is None:
        raise ValueError("The checkpoint holds no position in the stream: resume it with streaming: false")
    if len(positions) != num_processes:
        raise ValueError(
            f"The checkpoint holds the stream positions of {len(positions)} processes; resume this streaming "
            f"run with as many processes (not {num_processes})"
        )
    loader.load_state_dict(positions[process_index])
    return loader.epoch


def is_streaming_loader(loader: Any) -> bool:
    from .streaming import StreamingTrainLoader

    return isinstance(loader, StreamingTrainLoader)
