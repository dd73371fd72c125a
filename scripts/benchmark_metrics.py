"""Times segformer_hf's mean IoU against evaluate's official `mean_iou`, after checking they agree exactly.

    python scripts/benchmark_metrics.py --evaluate_path /tmp/evaluate_mean_iou/mean_iou.py
    python scripts/benchmark_metrics.py --dtypes int64 --threads 1 --loads idle

The data are ADE20K-like: seeded random label maps (default 60 maps of 512x512, 150 classes, about 5%
of label pixels set to the ignore index 255) and predictions that agree with the label on most pixels,
as uint8 maps (as label images load) and as int64 maps (as tensors arrive). The baseline is evaluate's
`mean_iou` loaded from the Hub (`evaluate.load("mean_iou")`) or from a local copy of its script given by
--evaluate_path; when neither can be loaded, the plain per-image numpy reference of
tests/reference_mean_iou.py stands in, and the table says so.

Before any timing, the results of every implementation must be identical to the baseline's (every
number, NaN in the same places); otherwise the script stops with exit code 1 and reports nothing.
Each implementation is then timed --repeats times per setting and the best time is reported, with
the speed-up over the baseline (its time / ours). A setting is a number of torch CPU threads
(--threads) and a load (--loads): "idle", or "busy", where a background process runs a torch matmul
loop on as many threads as there are cores (--busy_threads), as another job on a shared machine
would. The last row, MeanIoU's torch kernel counting CPU tensors (its path for GPU tensors), shows
why CPU maps are counted with numpy instead: torch splits its operations over threads that, on a busy
machine, wait for each other.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
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
LOADS = ("idle", "busy")

# The background load: torch matmuls on `threads` threads until killed, or at the latest after
# `seconds`, so that it can never outlive the benchmark by long. It says "busy" once it is.
BUSY_LOOP = """
import sys, time
import torch
torch.set_num_threads(int(sys.argv[1]))
deadline = time.monotonic() + float(sys.argv[2])
matrix = torch.rand(384, 384)
print("busy", flush=True)
while time.monotonic() < deadline:
    matrix @ matrix
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--num_maps", type=int, default=60)
    parser.add_argument("--size", type=int, default=512, help="maps are size x size pixels")
    parser.add_argument("--num_labels", type=int, default=150)
    parser.add_argument("--ignore_index", type=int, default=255)
    parser.add_argument("--ignore_fraction", type=float, default=0.05, help="share of ignored label pixels")
    parser.add_argument(
        "--dtypes", nargs="+", choices=("uint8", "int64"), default=["uint8", "int64"], help="map dtypes"
    )
    parser.add_argument("--batch_size", type=int, default=8, help="maps per MeanIoU.update call")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per implementation (best is kept)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch CPU thread counts")
    parser.add_argument("--loads", nargs="+", choices=LOADS, default=list(LOADS), help="machine loads")
    parser.add_argument(
        "--busy_threads", type=int, default=os.cpu_count() or 2, help="threads of the background load"
    )
    parser.add_argument(
        "--busy_seconds", type=float, default=900, help="the background load stops by itself after this"
    )
    parser.add_argument("--device", default=None, help="also time MeanIoU on this device, e.g. cuda")
    parser.add_argument(
        "--evaluate_path",
        default="mean_iou",
        help="evaluate's mean_iou: a Hub name or a local copy of its script (default: the Hub's)",
    )
    args = parser.parse_args(argv)
    if "uint8" in args.dtypes and max(args.num_labels - 1, args.ignore_index) > 255:
        parser.error("uint8 maps hold values up to 255: use --dtypes int64 for these labels")
    return args


def make_maps(args: argparse.Namespace, dtype: str) -> tuple[list[np.ndarray], list[np.ndarray]]:
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
        predictions.append(prediction.astype(dtype))
        references.append(reference.astype(dtype))
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


def torch_kernel_on_cpu(
    predictions: list[torch.Tensor], references: list[torch.Tensor], args: argparse.Namespace
) -> dict:
    """MeanIoU with CPU tensors counted by its torch kernel, the one it uses for GPU tensors."""
    metric = MeanIoU(args.num_labels, args.ignore_index, device="cpu")
    metric._start(torch.device("cpu"))
    for prediction_batch, reference_batch in zip(predictions, references):
        metric._count_with_torch(prediction_batch.reshape(-1), reference_batch.reshape(-1))
    return metric.compute()


def batched(maps: list[np.ndarray], batch_size: int, device: str | None = None) -> list[torch.Tensor]:
    """(B, H, W) tensors, as a data loader yields them."""
    return [
        torch.from_numpy(np.stack(maps[start : start + batch_size])).to(device or "cpu")
        for start in range(0, len(maps), batch_size)
    ]


def contenders_for(
    args: argparse.Namespace,
    baseline: tuple[str, Callable[..., dict], Callable[..., dict] | None],
    predictions: list[np.ndarray],
    references: list[np.ndarray],
) -> dict[str, tuple[Callable[[], dict], Callable[[], None]]]:
    """name -> (function to time, synchronize), the baseline first."""
    baseline_name, baseline_compute, script_function = baseline
    options = {"num_labels": args.num_labels, "ignore_index": args.ignore_index}
    prediction_batches, reference_batches = (
        batched(predictions, args.batch_size),
        batched(references, args.batch_size),
    )
    contenders = {baseline_name: (lambda: baseline_compute(predictions, references, **options), lambda: None)}
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
    contenders["MeanIoU's torch kernel on CPU tensors (its GPU path)"] = (
        lambda: torch_kernel_on_cpu(prediction_batches, reference_batches, args),
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
    return contenders


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


@contextlib.contextmanager
def busy_machine(threads: int, seconds: float) -> Iterator[subprocess.Popen]:
    """A background process keeping `threads` cores busy with matmuls while the block runs."""
    process = subprocess.Popen(
        [sys.executable, "-c", BUSY_LOOP, str(threads), str(seconds)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": str(threads)},
    )
    try:
        if process.stdout.readline().strip() != "busy":
            raise RuntimeError(f"the background load did not start (exit code {process.wait()})")
        yield process
    finally:
        process.kill()
        process.wait()


def time_settings(
    args: argparse.Namespace, contenders: dict[str, tuple[Callable[[], dict], Callable[[], None]]]
) -> tuple[dict[tuple[int, str], dict[str, float]], dict[tuple[int, str], float]]:
    """((threads, load) -> name -> best seconds, (threads, load) -> the machine's load average after)."""
    seconds, load_averages = {}, {}
    for load in args.loads:
        background = busy_machine(args.busy_threads, args.busy_seconds) if load == "busy" else None
        with background or contextlib.nullcontext():
            for threads in args.threads:
                torch.set_num_threads(threads)
                seconds[threads, load] = {
                    name: best_time(function, args.repeats, synchronize)
                    for name, (function, synchronize) in contenders.items()
                }
                load_averages[threads, load] = os.getloadavg()[0]
    return seconds, load_averages


def print_table(
    dtype: str,
    baseline_name: str,
    seconds: dict[tuple[int, str], dict[str, float]],
    load_averages: dict[tuple[int, str], float],
) -> None:
    settings = sorted(seconds, key=lambda setting: (LOADS.index(setting[1]), setting[0]))
    names = list(seconds[settings[0]])
    headers = [f"{threads} thread{'s' if threads > 1 else ''}, {load}" for threads, load in settings]
    name_width = max(len(name) for name in names)
    column_width = max(max(len(header) for header in headers), len("99999.9 (999.9x)"))
    print(f"{dtype} maps: time in ms (speed-up = {baseline_name}'s time / this time)")
    print(f"{'implementation':<{name_width}}  " + "  ".join(f"{h:>{column_width}}" for h in headers))
    for name in names:
        cells = []
        for setting in settings:
            elapsed = seconds[setting][name]
            cell = f"{elapsed * 1e3:.1f}"
            if name != baseline_name:
                cell += f" ({seconds[setting][baseline_name] / elapsed:5.1f}x)"
            cells.append(f"{cell:>{column_width}}")
        print(f"{name:<{name_width}}  " + "  ".join(cells))
    # Other processes count too: "idle" only means that this benchmark adds no load of its own.
    loads = "  ".join(f"{load_averages[setting]:>{column_width}.1f}" for setting in settings)
    print(f"{'load average (1 min) after':<{name_width}}  {loads}\n")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    baseline = load_baseline(args)
    baseline_name = baseline[0]
    tables, mean_ious = {}, {}
    for dtype in args.dtypes:
        predictions, references = make_maps(args, dtype)
        contenders = contenders_for(args, baseline, predictions, references)
        # Identical results first; a fast wrong answer is worth nothing.
        expected = contenders[baseline_name][0]()
        for name, (function, _) in contenders.items():
            difference = first_difference(function(), expected)
            if difference is not None:
                print(
                    f"REFUSING TO REPORT: {name} differs from {baseline_name} on {dtype} maps: {difference}",
                    file=sys.stderr,
                )
                return 1
        mean_ious[dtype] = float(expected["mean_iou"])
        tables[dtype] = time_settings(args, contenders)

    print(
        f"{args.num_maps} maps of {args.size}x{args.size}, {args.num_labels} classes, ignore_index "
        f"{args.ignore_index} on {args.ignore_fraction:.0%} of labels; best of {args.repeats}; busy = "
        f"a background torch matmul loop on {args.busy_threads} threads\n"
        f"torch {torch.__version__}, numpy {np.__version__}, "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores\n"
        + "".join(
            f"{dtype} maps: results identical to {baseline_name}: yes (mean IoU {mean_iou_value:.6f})\n"
            for dtype, mean_iou_value in mean_ious.items()
        )
    )
    for dtype, (seconds, load_averages) in tables.items():
        print_table(dtype, baseline_name, seconds, load_averages)
    return 0


if __name__ == "__main__":
    sys.exit(main())
