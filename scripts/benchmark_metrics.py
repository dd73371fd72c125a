"""Times segformer_hf's mean IoU against evaluate's official `mean_iou`, after checking they agree exactly.

    python scripts/benchmark_metrics.py
    python scripts/benchmark_metrics.py --evaluate_path /tmp/evaluate_mean_iou/mean_iou.py

The data are ADE20K-like: seeded random label maps (default 60 maps of 512x512, 150 classes, about 5%
of label pixels set to the ignore index 255) and predictions that agree with the label on most pixels.
The baseline is evaluate's `mean_iou` loaded from the Hub (`evaluate.load("mean_iou")`) or from a local
copy of its script given by --evaluate_path; when neither can be loaded, the plain per-image numpy
reference of tests/reference_mean_iou.py stands in, and the table says so.

Before any timing, the results of `mean_iou`, of streaming `MeanIoU` and of the baseline must be
identical (every number, NaN in the same places); otherwise the script stops with exit code 1 and
reports nothing. Each implementation is then timed --repeats times and the best time is reported.
By default torch runs on one thread (--threads), as evaluate's numpy code does.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
# Python puts this script's directory first on sys.path, where scripts/evaluate.py would hide the
# evaluate library; the script needs nothing from that directory.
sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != Path(__file__).resolve().parent]

import numpy as np  # noqa: E402
import torch  # noqa: E402

from segformer_hf.metrics import (  # noqa: E402
    MeanIoU,
    MetricBackendUnavailable,
    create_metric,
    mean_iou,
)

RESULT_KEYS = ("mean_iou", "mean_accuracy", "overall_accuracy", "per_category_iou", "per_category_accuracy")
REPO_ROOT = Path(__file__).resolve().parent.parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--num_maps", type=int, default=60)
    parser.add_argument("--size", type=int, default=512, help="maps are size x size pixels")
    parser.add_argument("--num_labels", type=int, default=150)
    parser.add_argument("--ignore_index", type=int, default=255)
    parser.add_argument("--ignore_fraction", type=float, default=0.05, help="share of ignored label pixels")
    parser.add_argument("--dtype", choices=("uint8", "int64"), default="uint8", help="dtype of the maps")
    parser.add_argument("--batch_size", type=int, default=8, help="maps per MeanIoU.update call")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per implementation (best is kept)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads; 0 keeps torch's default")
    parser.add_argument("--device", default=None, help="also time MeanIoU on this device, e.g. cuda")
    parser.add_argument(
        "--evaluate_path",
        default="mean_iou",
        help="evaluate's mean_iou: a Hub name or a local copy of its script (default: the Hub's)",
    )
    args = parser.parse_args(argv)
    if args.dtype == "uint8" and max(args.num_labels - 1, args.ignore_index) > 255:
        parser.error("--dtype uint8 holds values up to 255: use --dtype int64 for these labels")
    return args


def make_maps(args: argparse.Namespace) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(predictions, references): seeded random maps, predictions agreeing with labels on ~70% of pixels."""
    rng = np.random.default_rng(args.seed)
    shape = (args.size, args.size)
    predictions, references = [], []
    for _ in range(args.num_maps):
        # Blocky labels (8x8 regions), as real label maps are made of regions, not noise.
        blocks = rng.integers(0, args.num_labels, size=(args.size // 8 + 1, args.size // 8 + 1))
        reference = np.kron(blocks, np.ones((8, 8), dtype=np.int64))[: args.size, : args.size]
        reference[rng.random(shape) < args.ignore_fraction] = args.ignore_index
        guess = rng.integers(0, args.num_labels, size=shape)
        prediction = np.where(rng.random(shape) < 0.7, reference, guess)
        if args.ignore_index >= args.num_labels:  # a network never predicts the ignore index
            prediction[prediction == args.ignore_index] = 0
        predictions.append(prediction.astype(args.dtype))
        references.append(reference.astype(args.dtype))
    return predictions, references


def load_baseline(args: argparse.Namespace) -> tuple[str, Callable[..., dict], Callable[..., dict] | None]:
    """(description, compute through evaluate's API, the script's own numpy function or None)."""
    try:
        adapter = create_metric(
            "evaluate",
            num_labels=args.num_labels,
            ignore_index=args.ignore_index,
            evaluate_path=args.evaluate_path,
        )
    except MetricBackendUnavailable as error:
        print(f"evaluate's mean_iou is unavailable, comparing with the reference instead:\n  {error}\n")
        sys.path.insert(0, str(REPO_ROOT / "tests"))
        from reference_mean_iou import reference_mean_iou

        return "per-image numpy reference (tests/reference_mean_iou.py)", reference_mean_iou, None
    module = adapter.module

    def compute_with_evaluate(predictions: list, references: list, **options: Any) -> dict:
        return module.compute(predictions=predictions, references=references, **options)

    # The official script defines mean_iou(results, gt_seg_maps, ...) next to its Metric class.
    script_function = getattr(sys.modules[type(module).__module__], "mean_iou", None)
    return f"evaluate.load({args.evaluate_path!r}).compute", compute_with_evaluate, script_function


def streaming_mean_iou(
    predictions: list[torch.Tensor],
    references: list[torch.Tensor],
    args: argparse.Namespace,
    device: str | None,
) -> dict:
    metric = MeanIoU(args.num_labels, args.ignore_index, device=device)
    for prediction_batch, reference_batch in zip(predictions, references):
        metric.update(prediction_batch, reference_batch)
    return metric.compute()


def first_difference(results: dict, expected: dict) -> str | None:
    for key in RESULT_KEYS:
        if not np.array_equal(np.asarray(results[key]), np.asarray(expected[key]), equal_nan=True):
            return f"{key}: {results[key]} != {expected[key]}"
    return None


def best_time(
    function: Callable[[], Any], repeats: int, synchronize: Callable[[], None] = lambda: None
) -> float:
    times = []
    for _ in range(repeats):
        synchronize()
        start = time.perf_counter()
        function()
        synchronize()
        times.append(time.perf_counter() - start)
    return min(times)


def batched(maps: list[np.ndarray], batch_size: int, device: str | None = None) -> list[torch.Tensor]:
    """(B, H, W) tensors, as a data loader yields them."""
    return [
        torch.from_numpy(np.stack(maps[start : start + batch_size])).to(device or "cpu")
        for start in range(0, len(maps), batch_size)
    ]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    predictions, references = make_maps(args)
    options = {"num_labels": args.num_labels, "ignore_index": args.ignore_index}
    baseline_name, baseline, script_function = load_baseline(args)
    prediction_batches, reference_batches = (
        batched(predictions, args.batch_size),
        batched(references, args.batch_size),
    )

    # name -> (function to time, synchronize)
    contenders: dict[str, tuple[Callable[[], dict], Callable[[], None]]] = {
        baseline_name: (lambda: baseline(predictions, references, **options), lambda: None),
    }
    if script_function is not None:
        contenders["the script's numpy mean_iou() alone (no Arrow/PNG)"] = (
            lambda: script_function(predictions, references, **options),
            lambda: None,
        )
    contenders["segformer_hf mean_iou (one call)"] = (
        lambda: mean_iou(predictions, references, **options),
        lambda: None,
    )
    contenders[f"segformer_hf MeanIoU (update per {args.batch_size} maps)"] = (
        lambda: streaming_mean_iou(prediction_batches, reference_batches, args, None),
        lambda: None,
    )
    if args.device:
        device_predictions = batched(predictions, args.batch_size, args.device)
        device_references = batched(references, args.batch_size, args.device)
        synchronize = torch.cuda.synchronize if torch.device(args.device).type == "cuda" else (lambda: None)
        contenders[f"segformer_hf MeanIoU on {args.device} (maps already there)"] = (
            lambda: streaming_mean_iou(device_predictions, device_references, args, args.device),
            synchronize,
        )

    # Identical results first; a fast wrong answer is worth nothing.
    expected = contenders[baseline_name][0]()
    for name, (function, _) in contenders.items():
        difference = first_difference(function(), expected)
        if difference is not None:
            print(f"REFUSING TO REPORT: {name} differs from {baseline_name}: {difference}", file=sys.stderr)
            return 1

    seconds = {name: best_time(function, args.repeats, sync) for name, (function, sync) in contenders.items()}
    pixels = args.num_maps * args.size * args.size
    print(
        f"{args.num_maps} maps of {args.size}x{args.size} ({args.dtype}), {args.num_labels} classes, "
        f"ignore_index {args.ignore_index} on {args.ignore_fraction:.0%} of labels; best of {args.repeats}\n"
        f"torch {torch.__version__} ({torch.get_num_threads()} CPU thread(s)), numpy {np.__version__}, "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores\n"
        f"results identical to {baseline_name}: yes (mean IoU {float(expected['mean_iou']):.6f})\n"
    )
    name_width = max(len(name) for name in seconds)
    print(f"{'implementation':<{name_width}}  {'time (ms)':>10}  {'Mpixel/s':>9}  {'speed-up':>9}")
    for name, elapsed in seconds.items():
        speed_up = seconds[baseline_name] / elapsed
        print(f"{name:<{name_width}}  {elapsed * 1e3:10.1f}  {pixels / elapsed / 1e6:9.1f}  {speed_up:8.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
