"""`segformer-hf predict`: segment image files into colour masks, overlays and a legend.

For every input image NAME.EXT it writes NAME_mask.png (the predicted classes in colour; a palette PNG
whose pixel values are the class ids when there are at most 256 classes), NAME_overlay.png (the mask
alpha-blended over the image) and, once, legend.png (class colours and names). Colours come from
--classes_file, else the model config's palette (training saves the data set's there), else a fixed
default palette. Images are predicted with the protocol the model was validated with (saved in its image
processor: keep-ratio resize, whole or sliding window, scales, flip), which the flags below override.
Every input is checked before any work starts, and every file is written atomically.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import torch

from .files import list_image_files, load_rgb_image, verify_image_file, write_atomic
from .inference import InferenceProtocol, add_inference_arguments, load_model_for_inference, segment
from .visualization import colorize, overlay, render_legend, resolve_palette


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="segformer-hf predict", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("inputs", nargs="+", help="image files and/or directories of images")
    parser.add_argument("--model", required=True, help="model directory or Hub repo id")
    parser.add_argument(
        "--output", required=True, type=Path, help="directory for the masks, overlays and legend"
    )
    add_inference_arguments(parser)
    parser.add_argument("--alpha", type=float, default=0.5, help="weight of the mask colours in the overlay")
    parser.add_argument("--classes_file", type=Path, default=None, help="JSON with a palette (and id2label)")
    parser.add_argument("--window_batch_size", type=int, default=8, help="slide windows per forward pass")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--trust_remote_code", action="store_true")
    return parser


def check_inputs(args: argparse.Namespace) -> list[Path]:
    """The image files to segment; raises ValueError/FileNotFoundError before any work is done."""
    if args.output.exists() and not args.output.is_dir():
        raise ValueError(f"--output {args.output} is a file; give a directory for the masks and overlays")
    image_paths = list_image_files(args.inputs)
    for path in image_paths:
        verify_image_file(path)
    stems = [path.stem for path in image_paths]
    duplicates = sorted({stem for stem in stems if stems.count(stem) > 1})
    if duplicates:
        raise ValueError(f"several inputs share a file name, outputs would collide: {duplicates}")
    return image_paths


def resolve_protocol(args: argparse.Namespace, image_processor: Any) -> tuple[InferenceProtocol, Any]:
    """(the protocol, the image processor that prepares images for it): the model's saved protocol with
    the flags on top, so a prediction is made the way the model was validated (and as the pipeline does).

    A checkpoint that records no protocol (a plain `SegformerImageProcessor`) is used with its own
    processor as saved, unless --img_scale or --no_resize ask for a keep-ratio resize or none.
    """
    saved = InferenceProtocol.from_image_processor(image_processor)
    protocol = InferenceProtocol.from_args(args, saved)
    protocol.validate()
    if saved is None and args.img_scale is None and not args.no_resize:
        return protocol, image_processor
    preprocessing = protocol.image_processor(
        image_mean=image_processor.image_mean,
        image_std=image_processor.image_std,
        rescale_factor=getattr(image_processor, "rescale_factor", 1 / 255),
    )
    return protocol, preprocessing


def main(argv: list[str] | None = None) -> int:
    """Exit 0 when every image was segmented, 2 for bad arguments or inputs, 1 for an image that fails to load."""
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    args = build_parser().parse_args(argv)
    try:
        image_paths = check_inputs(args)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, image_processor = load_model_for_inference(
        args.model, trust_remote_code=args.trust_remote_code, device=device
    )
    try:
        protocol, preprocessing = resolve_protocol(args, image_processor)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    id2label = {int(index): name for index, name in model.config.id2label.items()}
    palette = resolve_palette(model.config.num_labels, config=model.config, classes_file=args.classes_file)

    args.output.mkdir(parents=True, exist_ok=True)
    write_atomic(args.output / "legend.png", render_legend(id2label, palette).save)
    for path in image_paths:
        try:
            image = load_rgb_image(path)
        except ValueError as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
        (label_map,) = segment(
            model, image, preprocessing, protocol, window_batch_size=args.window_batch_size
        )
        write_atomic(args.output / f"{path.stem}_mask.png", colorize(label_map, palette).save)
        write_atomic(
            args.output / f"{path.stem}_overlay.png", overlay(image, label_map, palette, args.alpha).save
        )
        print(f"{path} -> {args.output / path.stem}_{{mask,overlay}}.png", flush=True)
    print(f"Legend: {args.output / 'legend.png'}")
    return 0
