"""Convert a reference SegFormer checkpoint to segformer_hf's format, optionally proving it equal.

The source is a Hub repo id or local directory in transformers' format (nvidia/segformer-*), or an
original NVlabs/mmseg `.pth` (segmentation checkpoints and MiT ImageNet encoders). The output is what
`save_pretrained` writes (safetensors, config.json with auto_map, the two remote-code files) plus a
SegformerImageProcessor config, so `AutoModelForSemanticSegmentation.from_pretrained(output,
trust_remote_code=True)` and `pipeline("image-segmentation", ...)` work on it directly.

    python scripts/convert_reference_weights.py --source nvidia/segformer-b0-finetuned-ade-512-512 \\
        --output converted/segformer-b0-ade --verify
    python scripts/convert_reference_weights.py --source mit_b2.pth --output converted/mit-b2-camvid \\
        --id2label_file configs/labels/camvid.json --ignore_mismatched_sizes

The output directory appears complete or not at all: everything is written into a temporary
directory beside it and renamed into place at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from segformer_hf import (
    SegformerHFForImageClassification,
    SegformerHFForSemanticSegmentation,
    SegformerHFModel,
    SegformerHFPreTrainedModel,
    from_reference,
    to_transformers,
)

TASKS = {
    "semantic-segmentation": (SegformerHFForSemanticSegmentation, "SegformerForSemanticSegmentation"),
    "image-classification": (SegformerHFForImageClassification, "SegformerForImageClassification"),
    "encoder": (SegformerHFModel, "SegformerModel"),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--source", required=True, help="Hub repo id, transformers directory or NVlabs .pth")
    parser.add_argument("--output", required=True, type=Path, help="directory to write (must not exist)")
    parser.add_argument("--task", choices=sorted(TASKS), default="semantic-segmentation")
    parser.add_argument("--revision", default=None, help="Hub revision of --source")
    parser.add_argument("--num_labels", type=int, default=None, help="label count of a new classifier")
    parser.add_argument(
        "--id2label_file",
        type=Path,
        default=None,
        help='JSON file with {"0": "road", ...} or {"id2label": {...}} (as in configs/labels/)',
    )
    parser.add_argument(
        "--ignore_mismatched_sizes",
        action="store_true",
        help="start a new classifier when the label count differs from the source's",
    )
    parser.add_argument(
        "--verify",
        action="store_true",
        help="run transformers' own SegFormer on the same weights and input and compare the outputs",
    )
    parser.add_argument(
        "--verify_image", type=Path, default=None, help="image for --verify (default: random)"
    )
    parser.add_argument(
        "--tolerance",
        type=float,
        default=1e-4,
        help="largest relative L2 difference --verify accepts before refusing to write the output",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    parser.add_argument("--push_to_hub", metavar="REPO", default=None, help="upload the output to this repo")
    return parser.parse_args(argv)


def read_id2label(path: Path) -> dict[int, str]:
    """Reads a label file: either a bare {id: name} mapping or one under an "id2label" key."""
    try:
        payload = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise SystemExit(f"Cannot read the label file {path}: {error}") from error
    mapping = payload.get("id2label", payload) if isinstance(payload, dict) else None
    if not isinstance(mapping, dict) or not mapping:
        raise SystemExit(f'{path} holds no {{"0": "name", ...}} mapping (bare or under "id2label").')
    try:
        id2label = {int(index): str(name) for index, name in mapping.items()}
    except ValueError as error:
        raise SystemExit(f"{path}: label ids must be integers ({error}).") from error
    if sorted(id2label) != list(range(len(id2label))):
        raise SystemExit(
            f"{path}: label ids must be 0..{len(id2label) - 1} without gaps, got {sorted(id2label)}."
        )
    return id2label


def label_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Config overrides for a new label set, from --num_labels and/or --id2label_file."""
    if args.id2label_file is None:
        return {} if args.num_labels is None else {"num_labels": args.num_labels}
    id2label = read_id2label(args.id2label_file)
    if args.num_labels is not None and args.num_labels != len(id2label):
        raise SystemExit(
            f"--num_labels {args.num_labels} contradicts {args.id2label_file}, which names {len(id2label)} labels."
        )
    return {"id2label": id2label, "label2id": {name: index for index, name in id2label.items()}}


def is_local_file(source: str) -> bool:
    return Path(source).is_file()


def source_image_processor(source: str, revision: str | None):
    """The source's own preprocessing settings where it has them, else SegformerImageProcessor's defaults.

    They are re-saved through SegformerImageProcessor rather than copied byte for byte: old Hub files name
    `SegformerFeatureExtractor`, which AutoImageProcessor no longer resolves for a non-`segformer` model type.
    """
    from transformers import SegformerImageProcessor

    if is_local_file(source):
        return SegformerImageProcessor()
    if Path(source).is_dir():
        if (Path(source) / "preprocessor_config.json").is_file():
            return SegformerImageProcessor.from_pretrained(source)
        return SegformerImageProcessor()
    try:
        return SegformerImageProcessor.from_pretrained(source, revision=revision)
    except OSError:
        print(f"{source} has no preprocessor_config.json; writing SegformerImageProcessor defaults.")
        return SegformerImageProcessor()


def transformers_reference(
    args: argparse.Namespace, model: SegformerHFPreTrainedModel
) -> tuple[torch.nn.Module, bool]:
    """transformers' own model for the comparison, and whether its head came from the source.

    A transformers-format source is loaded by transformers itself, independently of our converter; an
    NVlabs file is something transformers cannot read, so our converted weights go through
    `to_transformers` and the comparison checks the implementation rather than the key mapping.
    """
    if is_local_file(args.source):
        return to_transformers(model), True
    config_path = Path(args.source) / "config.json"
    if config_path.is_file() and json.loads(config_path.read_text()).get("model_type") != "segformer":
        # Already segformer_hf's own format: nothing for transformers to read independently.
        return to_transformers(model), True
    import transformers

    reference_class = getattr(transformers, TASKS[args.task][1])
    reference, loading_info = reference_class.from_pretrained(
        args.source, revision=args.revision, output_loading_info=True
    )
    head_from_source = not loading_info["missing_keys"] and not loading_info["mismatched_keys"]
    return reference, head_from_source


def verification_input(args: argparse.Namespace, processor) -> torch.Tensor:
    if args.verify_image is not None:
        image = Image.open(args.verify_image).convert("RGB")
    else:
        size = processor.size
        height, width = size.get("height", 512), size.get("width", 512)
        pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
        image = Image.fromarray(pixels)
    return processor(images=image, return_tensors="pt")["pixel_values"]


def differences(ours: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    """(max abs, relative L2) difference of `ours` from `reference`, computed in float64."""
    difference = ours.double() - reference.double()
    relative = difference.norm() / reference.double().norm().clamp_min(torch.finfo(torch.float64).tiny)
    return difference.abs().max().item(), relative.item()


def verify(args: argparse.Namespace, model: SegformerHFPreTrainedModel, processor) -> bool:
    """Prints how far our outputs are from transformers' on one input; True when within --tolerance."""
    reference, head_from_source = transformers_reference(args, model)
    pixel_values = verification_input(args, processor)
    model.eval()
    reference.eval()
    with torch.no_grad():
        ours = model(pixel_values, output_hidden_states=True)
        theirs = reference(pixel_values, output_hidden_states=True)
    worst = 0.0
    for stage, (our_map, their_map) in enumerate(zip(ours.hidden_states, theirs.hidden_states)):
        max_abs, relative = differences(our_map, their_map)
        worst = max(worst, relative)
        print(
            f"stage {stage + 1} hidden states: max abs difference {max_abs:.3e}, relative L2 {relative:.3e}"
        )
    if args.task != "encoder":
        if head_from_source and ours.logits.shape == theirs.logits.shape:
            max_abs, relative = differences(ours.logits, theirs.logits)
            worst = max(worst, relative)
            print(f"max abs logit difference: {max_abs:.3e}")
            print(f"relative L2 logit difference: {relative:.3e}")
        else:
            print(
                "logits not compared: the head is newly initialised; only the encoder comes from the source"
            )
    passed = worst <= args.tolerance
    print(f"verification {'passed' if passed else 'FAILED'} (tolerance {args.tolerance:.1e} relative L2)")
    return passed


def save_atomically(model: SegformerHFPreTrainedModel, processor, output: Path, overwrite: bool) -> None:
    """Writes model and processor into a temporary sibling of `output`, then renames it into place."""
    if output.exists() and not overwrite:
        raise SystemExit(f"{output} already exists; pass --overwrite to replace it.")
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".partial", dir=output.parent))
    retired = None
    try:
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
        if output.exists():
            # A directory cannot be replaced by rename while it has contents: move it aside first.
            retired = output.with_name(f"{staging.name}.previous")
            os.replace(output, retired)
        os.replace(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if retired is not None and retired.exists() and not output.exists():
            os.replace(retired, output)
        raise
    if retired is not None:
        shutil.rmtree(retired, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    model_class = TASKS[args.task][0]
    overrides = label_overrides(args)
    model = from_reference(
        args.source,
        model_class,
        revision=args.revision,
        ignore_mismatched_sizes=args.ignore_mismatched_sizes,
        **overrides,
    )
    config = model.config
    print(
        f"Converted {args.source} into {type(model).__name__}: variant {config.variant or 'custom'}, "
        f"{sum(p.numel() for p in model.parameters()):,} parameters, {config.num_labels} labels."
    )
    processor = source_image_processor(args.source, args.revision)
    if args.verify and not verify(args, model, processor):
        print(f"Not writing {args.output}: the outputs differ from transformers' beyond the tolerance.")
        return 1
    save_atomically(model, processor, args.output, args.overwrite)
    print(f"Saved to {args.output}")
    if args.push_to_hub:
        from segformer_hf.hub import push_to_hub

        push_to_hub(args.output, args.push_to_hub)
        print(f"Pushed {args.output} to {args.push_to_hub}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
