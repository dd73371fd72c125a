"""Time to accuracy: validation mean IoU against training wall time, for a recipe and a time budget.

    python scripts/benchmark_training.py --budget_minutes 10                          # the demo recipe
    python scripts/benchmark_training.py --config camvid-b0 --data_dir ../shared/data/camvid --init_from null --budget_minutes 30 \\
        --models ours transformers --eval_every_seconds 120 --output_dir outputs/tta-camvid

Each model trains with the package's own loop (`training.set_up`, `training_batches`,
`optimization_step`: the recipe's data, augmentation, AdamW groups and schedule) until its training
clock reaches the budget or the recipe's `max_train_steps`, whichever comes first; the learning-rate
schedule is the recipe's, over `max_train_steps`. Validation mean IoU (`evaluation.evaluate_model`, the
recipe's protocol) is measured before the first step, every `--eval_every_steps` steps or
`--eval_every_seconds` seconds of training, and at the end. The training clock stops while evaluating:
evaluation time is reported on its own. The clock starts after the set-up (data and model loading).

`--models ours transformers` runs the same loop a second time with transformers'
`SegformerForSemanticSegmentation`, converted with `segformer_hf.to_transformers` from our model as
initialised with the same seed (so both start from the same weights and the same first mean IoU), on the
same data in the same order, for the same budget.

Writes OUTPUT_DIR/curve.json (every point: step, training seconds, evaluation seconds so far, mean IoU,
loss) and OUTPUT_DIR/curve.png (mean IoU against training minutes, one line per model). Every flag not
listed below is a training argument (`--crop_size 64 64`, `--max_train_samples 8`).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw, ImageFont

from segformer_hf import to_transformers
from segformer_hf.arguments import TrainingConfig, parse_args
from segformer_hf.files import write_json_atomic
from segformer_hf.training import (
    Run,
    build_model,
    end_training,
    optimization_step,
    set_up,
    training_batches,
    validation_metrics,
)

MODELS = ("ours", "transformers")
COLOURS = {"ours": (31, 119, 180), "transformers": (255, 127, 14)}


def parse_arguments(argv: list[str] | None = None) -> tuple[argparse.Namespace, TrainingConfig]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="demo", help="recipe: a YAML file or a shipped recipe's name")
    parser.add_argument("--budget_minutes", type=float, required=True, help="training wall time per model")
    parser.add_argument("--eval_every_steps", type=int, default=None, help="evaluate every N steps")
    parser.add_argument(
        "--eval_every_seconds",
        type=float,
        default=None,
        help="evaluate every S seconds of training (default: budget/10)",
    )
    parser.add_argument("--models", nargs="+", choices=MODELS, default=["ours"])
    parser.add_argument("--output_dir", type=Path, default=Path("outputs/benchmark_training"))
    args, training_flags = parser.parse_known_args(argv)
    if args.budget_minutes <= 0:
        parser.error("--budget_minutes must be > 0")
    if args.eval_every_steps is None and args.eval_every_seconds is None:
        args.eval_every_seconds = args.budget_minutes * 60 / 10
    config = parse_args(
        ["--config", args.config, "--report_to", "none", "--resume_from_checkpoint", "null", *training_flags]
    )
    return args, config


def transformers_twin(
    config: TrainingConfig, id2label: dict[int, str], class_weights: list[float] | None = None
) -> torch.nn.Module:
    """transformers' Segformer holding exactly the weights our model starts from with this seed."""
    if class_weights is not None or config.use_ohem or config.dice_weight:
        raise SystemExit(
            "transformers' Segformer has no class weights, OHEM or Dice loss: compare with --class_weights null "
            "--use_ohem false --dice_weight 0"
        )
    return to_transformers(build_model(config, id2label))


def train_for_budget(config: TrainingConfig, model_name: str, args: argparse.Namespace) -> dict[str, Any]:
    """One model's curve: trained by the package's loop, evaluated on a clock that stops while evaluating."""
    run = set_up(config, model_builder=transformers_twin if model_name == "transformers" else None)
    budget = args.budget_minutes * 60
    clock = TrainingClock()
    points = [evaluate_point(run, clock)]
    for batch in training_batches(run):
        if not optimization_step(run, batch):
            continue
        run.progress.update(1)
        out_of_time = clock.seconds() >= budget
        if out_of_time or run.finished or evaluation_due(run, points[-1], clock.seconds(), args):
            points.append(evaluate_point(run, clock))
        if out_of_time or run.finished:
            break
    run.progress.close()
    end_training(run)
    return {
        "model_class": type(run.model).__name__,  # unwrapped by `end_training`
        "steps": run.state.global_step,
        "train_seconds": points[-1]["train_seconds"],  # the last point is taken when training ends
        "eval_seconds": clock.paused_seconds,
        "stopped_by": "budget" if points[-1]["train_seconds"] >= budget else "max_train_steps",
        "best_mean_iou": max(point["mean_iou"] for point in points),
        "points": points,
    }


class TrainingClock:
    """Wall time of training only: `pause()`/`resume()` around evaluations, whose time is counted apart."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.paused_seconds = 0.0
        self._paused_at: float | None = None

    def seconds(self) -> float:
        _synchronize()
        now = self._paused_at if self._paused_at is not None else time.perf_counter()
        return now - self.started - self.paused_seconds

    def pause(self) -> None:
        _synchronize()
        self._paused_at = time.perf_counter()

    def resume(self) -> None:
        self.paused_seconds += time.perf_counter() - self._paused_at
        self._paused_at = None


def _synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def evaluation_due(run: Run, last: dict[str, Any], seconds: float, args: argparse.Namespace) -> bool:
    by_steps = (
        args.eval_every_steps is not None and run.state.global_step - last["step"] >= args.eval_every_steps
    )
    by_time = (
        args.eval_every_seconds is not None and seconds - last["train_seconds"] >= args.eval_every_seconds
    )
    return by_steps or by_time


def evaluate_point(run: Run, clock: TrainingClock) -> dict[str, Any]:
    """Validation mean IoU now, with the clock stopped; one point of the curve."""
    clock.pause()
    metrics = validation_metrics(run)
    clock.resume()
    return {
        "step": run.state.global_step,
        "train_seconds": clock.seconds(),
        "eval_seconds": clock.paused_seconds,
        "mean_iou": float(metrics["mean_iou"]),
        "loss": run.step_loss if run.state.global_step else None,
    }


# The plot (PIL: no plotting library needed for one chart) --------------------------------------------------

WIDTH, HEIGHT, MARGIN = 900, 560, 70


def axis_ticks(maximum: float, most_intervals: int = 6) -> list[float]:
    """Round tick values 0, step, 2 step, ... <= maximum: the smallest step of 1, 2, 2.5 or 5 times a power of
    ten that leaves at most `most_intervals` intervals.

    A 10-minute budget ends a few milliseconds past 10 minutes: its ticks are 0, 2, ..., 10, not 10.01 / 5.
    """
    power = 10.0 ** math.floor(math.log10(maximum / most_intervals))
    step = next(power * f for f in (1.0, 2.0, 2.5, 5.0, 10.0) if maximum / (power * f) <= most_intervals)
    return [round(index * step, 12) for index in range(int(maximum / step * (1 + 1e-9)) + 1)]


def plot_curves(runs: dict[str, dict[str, Any]], title: str, path: Path) -> None:
    """Mean IoU (y) against training minutes (x), one line and marker per evaluation, per model."""
    image = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    x_max = max(point["train_seconds"] for run in runs.values() for point in run["points"]) / 60 or 1.0
    y_max = min(1.0, max(0.05, 1.1 * max(run["best_mean_iou"] for run in runs.values())))
    left, top, right, bottom = MARGIN, 40, WIDTH - 20, HEIGHT - MARGIN

    def position(minutes: float, iou: float) -> tuple[float, float]:
        return left + (right - left) * minutes / x_max, bottom - (bottom - top) * iou / y_max

    draw.rectangle([left, top, right, bottom], outline="black")
    for minutes in axis_ticks(x_max):
        x, _ = position(minutes, 0.0)
        draw.line([x, bottom, x, bottom + 5], fill="black")
        draw.text((x - 12, bottom + 8), f"{minutes:g}", fill="black", font=font)
    for iou in axis_ticks(y_max):
        _, y = position(0.0, iou)
        draw.line([left - 5, y, left, y], fill="black")
        draw.text((left - 45, y - 6), f"{iou:g}", fill="black", font=font)
    draw.text(((left + right) / 2 - 80, HEIGHT - 30), "training wall time (minutes)", fill="black", font=font)
    draw.text((8, 12), "validation mean IoU", fill="black", font=font)
    draw.text((left + 150, 12), title, fill="black", font=font)
    for row, (name, run) in enumerate(runs.items()):
        colour = COLOURS[name]
        xy = [position(p["train_seconds"] / 60, p["mean_iou"]) for p in run["points"]]
        if len(xy) > 1:
            draw.line(xy, fill=colour, width=2)
        for x, y in xy:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
        legend_y = top + 15 + 18 * row
        draw.line([right - 280, legend_y, right - 255, legend_y], fill=colour, width=3)
        label = f"{name}: {run['steps']} steps, best {run['best_mean_iou']:.3f}"
        draw.text((right - 250, legend_y - 6), label, fill="black", font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def main(argv: list[str] | None = None) -> int:
    args, config = parse_arguments(argv)
    runs = {}
    for name in args.models:
        runs[name] = train_for_budget(
            dataclasses.replace(config, output_dir=str(args.output_dir / name)), name, args
        )
        print(
            f"{name}: {runs[name]['steps']} steps in {runs[name]['train_seconds']:.1f} s of training "
            f"(+{runs[name]['eval_seconds']:.1f} s evaluating), best mean IoU {runs[name]['best_mean_iou']:.4f}",
            flush=True,
        )
    report = {
        "recipe": args.config,
        "budget_minutes": args.budget_minutes,
        "eval_every_steps": args.eval_every_steps,
        "eval_every_seconds": args.eval_every_seconds,
        "device": "cuda: " + torch.cuda.get_device_name()
        if torch.cuda.is_available()
        else platform.processor() or "cpu",
        "torch": torch.__version__,
        "config": config.to_dict(),
        "runs": runs,
    }
    write_json_atomic(args.output_dir / "curve.json", report)
    plot_curves(runs, f"{args.config}, budget {args.budget_minutes:g} min", args.output_dir / "curve.png")
    print(f"wrote {args.output_dir / 'curve.json'} and {args.output_dir / 'curve.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
