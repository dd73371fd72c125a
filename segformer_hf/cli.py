"""`segformer-hf`: one command for everything the package does, each subcommand a module's `main`.

    segformer-hf train --config demo              # = accelerate launch scripts/train.py --config demo
    segformer-hf evaluate --model outputs/demo --data_dir DIR --split val
    segformer-hf predict --model outputs/demo street.jpg --output predictions

`segformer-hf train` runs in this process; for several processes or GPUs use
`accelerate launch -m segformer_hf.cli train ...` (or `accelerate launch scripts/train.py ...`).
"""

from __future__ import annotations

import importlib
import sys

# subcommand -> (module, what it does); each module has `main(argv) -> int`.
COMMANDS = {
    "train": (
        "segformer_hf.training",
        "train a SegFormer from a recipe (`train --help` lists every argument)",
    ),
    "evaluate": ("segformer_hf.evaluation", "mean IoU of a model on a dataset split"),
    "predict": ("segformer_hf.prediction", "segment images into colour masks and overlays"),
    "export": ("segformer_hf.onnx_export", "export a model to ONNX with dynamic shapes, verified"),
    "convert": ("segformer_hf.conversion", "convert reference weights (NVlabs .pth, transformers) to ours"),
    "push": ("segformer_hf.hub", "push a trained output directory to the Hub"),
    "demo": ("segformer_hf.demo", "serve a Gradio demo of a model"),
}


def usage() -> str:
    lines = ["usage: segformer-hf COMMAND [ARGS...]   (segformer-hf COMMAND --help for its arguments)", ""]
    lines += [f"  {name:<9} {summary}" for name, (_, summary) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    command, *rest = argv
    if command not in COMMANDS:
        print(f"error: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[command][0])
    return module.main(rest)


if __name__ == "__main__":
    sys.exit(main())
