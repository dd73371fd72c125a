"""`segformer-hf predict`: segment image files into colour masks, overlays and a legend.

For every input image NAME.EXT it writes NAME_mask.png (the predicted classes in colour; a palette PNG
whose pixel values are the class ids when there are at most 256 classes), NAME_overlay.png (the mask
alpha-blended over the image) and, once, legend.png (class colours and names). Colours come from
--classes_file, else the model config's palette, else a fixed default palette. Every input is checked
before any work starts, and every file is written atomically.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

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
    parser.add_argument(
        "--no_resize",
        action="store_true",
        help="predict at each image's own size (normalised as the image processor says) instead of "
        "resizing it to the processor's size first; what sliding-window inference on large images wants",
    )
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


def main(argv: list[str] | None = None) -> int:
    """Exit 0 when every image was segmented, 2 for bad arguments or inputs, 1 for an image that fails to load."""
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    args = build_parser().parse_args(argv)
    try:
        image_paths = check_inputs(args)
        protocol = InferenceProtocol.from_args(args)
        protocol.validate()
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, image_processor = load_model_for_inference(
        args.model, trust_remote_code=args.trust_remote_code, device=device
    )
    normalisation = (
        (image_processor.image_mean, image_processor.image_std) if args.no_resize else image_processor
    )
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
            model, image, normalisation, protocol, window_batch_size=args.window_batch_size
        )
        write_atomic(args.output / f"{path.stem}_mask.png", colorize(label_map, palette).save)
        write_atomic(
            args.output / f"{path.stem}_overlay.png", overlay(image, label_map, palette, args.alpha).save
        )
        print(f"{path} -> {args.output / path.stem}_{{mask,overlay}}.png", flush=True)
    print(f"Legend: {args.output / 'legend.png'}")
    return 0
