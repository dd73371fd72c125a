"""Segment images with a trained model: a colour mask and an overlay per image, plus one legend.

    python scripts/predict.py --model outputs/demo data/camvid-demo/val/images --output predictions
    python scripts/predict.py --model nvidia/segformer-b0-finetuned-cityscapes-1024-1024 street.png \\
        --output predictions --mode slide --crop_size 1024 --stride 768 --no_resize

For every input image NAME.EXT it writes NAME_mask.png (the predicted classes in colour; a palette
PNG whose pixel values are the class ids when there are at most 256 classes), NAME_overlay.png (the
mask alpha-blended over the image) and, once, legend.png (class colours and names). Colours come from
--classes_file, else a `palette` in the model config, else a fixed default palette. Every file is
written atomically.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import torch  # noqa: E402

from segformer_hf.inference import (  # noqa: E402
    INFERENCE_MODES,
    colorize,
    list_image_files,
    load_model_for_inference,
    load_rgb_image,
    overlay,
    parse_scales,
    render_legend,
    resolve_palette,
    segment,
    verify_image_file,
    write_atomic,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("inputs", nargs="+", help="image files and/or directories of images")
    parser.add_argument("--model", required=True, help="model directory or Hub repo id")
    parser.add_argument(
        "--output", required=True, type=Path, help="directory for the masks, overlays and legend"
    )
    parser.add_argument("--mode", choices=INFERENCE_MODES, default="whole")
    parser.add_argument("--crop_size", type=int, nargs="+", default=[512], help="slide window: S or H W")
    parser.add_argument("--stride", type=int, nargs="+", default=[341], help="slide stride: S or H W")
    parser.add_argument(
        "--scales", type=parse_scales, default=None, help="test-time scales, e.g. 0.5,1.0,1.5"
    )
    parser.add_argument("--flip", action="store_true", help="also predict the mirrored image and average")
    parser.add_argument("--size_divisor", type=int, default=None, help="round scaled sides up to a multiple")
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
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        image_paths = list_image_files(args.inputs)
    except FileNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        # Fail before any work is done on a file that is not an image.
        for path in image_paths:
            verify_image_file(path)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    stems = [path.stem for path in image_paths]
    duplicates = sorted({stem for stem in stems if stems.count(stem) > 1})
    if duplicates:
        print(
            f"error: several inputs share a file name, outputs would collide: {duplicates}", file=sys.stderr
        )
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
    legend = render_legend(id2label, palette)
    write_atomic(args.output / "legend.png", legend.save)
    for path in image_paths:
        try:
            image = load_rgb_image(path)
        except ValueError as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
        (label_map,) = segment(
            model,
            image,
            normalisation,
            args.mode,
            crop_size=args.crop_size if len(args.crop_size) == 2 else args.crop_size[0],
            stride=args.stride if len(args.stride) == 2 else args.stride[0],
            scales=args.scales,
            flip=args.flip,
            size_divisor=args.size_divisor,
            window_batch_size=args.window_batch_size,
        )
        write_atomic(args.output / f"{path.stem}_mask.png", colorize(label_map, palette).save)
        write_atomic(
            args.output / f"{path.stem}_overlay.png", overlay(image, label_map, palette, args.alpha).save
        )
        print(f"{path} -> {args.output / path.stem}_{{mask,overlay}}.png", flush=True)
    print(f"Legend: {args.output / 'legend.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
