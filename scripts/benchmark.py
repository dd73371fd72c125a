"""Side-by-side speed and memory of segformer_hf's SegFormer and transformers' on the same weights.

    python scripts/benchmark.py                                       # B0 and B2 at 512x512
    python scripts/benchmark.py --device cpu --size 256 --repeats 3   # a quick run
    python scripts/benchmark.py --device cuda --dtype bf16 --channels_last --json bench.json
    python scripts/benchmark.py --device cpu --variants b0 --size 256 --compile      # eager vs compiled

For each variant, transformers' `SegformerForSemanticSegmentation` (SDPA attention) is built with random
weights and ours is loaded from it with `from_reference`, so both hold the same parameters. Before any
timing the two must agree on the same inputs: in float32 (TF32 off), eval mode, with labels, the
relative L2 difference of the logits and of the loss must be at most 1e-5 for every variant, or the
script reports nothing and exits with status 1.

Workloads, each run alternately by the two models (ours first on even repeats, transformers' first on
odd ones) after warm-up runs, timed to completion (CUDA is synchronised), summarised by the median:

  inference latency     batch 1, eval mode under torch.inference_mode
  inference throughput  batch 8, the same (reported as images per second too)
  training step         batch 2 with labels: forward with the loss, backward, AdamW step

On the CPU, the inference workloads also time onnxruntime (CPU execution provider, as many intra-op
threads as torch) running our model exported with segformer_hf.onnx_export (verified by the export
itself, and its logits also held to the tolerance above against transformers'); --no_onnx leaves it out.
`--dtype bf16` times both models under bfloat16 autocast, on the CPU too (fast where the CPU computes in bf16:
AVX512-BF16 or AMX); onnxruntime runs the float32 export, so that column is then left out.

`--compile` measures instead what torch.compile (inductor) gives each model: eager and compiled runs of the
latency and training workloads, alternated, with the ratio compiled / eager per model, and the compile
time: the first call (tracing, compiling and one run) and the first call at a NEW size (--size plus
--new_size_offset), which with dynamic shapes (--dynamic true) reuses the first graph instead of
compiling again. Compiled logits must match eager ones (relative L2 <= 1e-4; 3e-2 under `--dtype bf16`
or fp16, where eager and compiled autocast round at different points) or nothing is reported. With
`--dtype` both the eager and the compiled runs are under that autocast.
`--freezing` turns on inductor's freezing for the inference graphs (the weights become constants, folded
and pre-packed), the CPU inference setting that makes compiling pay (docs/performance.md):

    python scripts/benchmark.py --device cpu --variants b0 --size 256 --compile --dynamic false --freezing

Ratios are ours / transformers': below 1 is faster (or smaller); the onnxruntime ratio is onnxruntime /
transformers'. Peak memory is the most memory one step
holds above what was allocated before it: on CUDA, torch.cuda.max_memory_allocated; on CPU, the
high-water mark of the bytes held by PyTorch's CPU allocator (every tensor and oneDNN buffer), replayed
from the profiler's allocation events, which is the CPU analogue of max_memory_allocated (the process'
RSS would also count the C allocator's caching and everything else in the process).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import torch  # noqa: E402
import transformers  # noqa: E402
from torch import nn  # noqa: E402
from transformers import AutoModelForSemanticSegmentation  # noqa: E402

from segformer_hf import SegformerHFConfig  # noqa: E402
from segformer_hf.configuration_segformer_hf import VARIANTS  # noqa: E402
from segformer_hf.conversion import from_reference, transformers_config  # noqa: E402
from segformer_hf.files import write_json_atomic  # noqa: E402
from segformer_hf.onnx_export import EXPORTERS, INPUT_NAME, OUTPUT_NAME, OnnxVerificationError  # noqa: E402

TOLERANCE = 1e-5
# Compiled logits against eager ones under the same precision. Autocast rounds at different points once
# inductor fuses kernels: in bf16, B0's compiled logits are ~9e-3 from eager ones, as far as eager bf16
# itself is from float32; a wrong graph is off by ~1.
COMPILE_TOLERANCE = {"fp32": 1e-4, "bf16": 3e-2, "fp16": 3e-2}
DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
IGNORED_FRACTION = 0.05
ONNX_NAME = "onnxruntime"
MODEL_NAMES = ("ours", "transformers")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--variants", nargs="+", default=["b0", "b2"], choices=sorted(VARIANTS))
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda if available")
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), default="fp32", help="bf16/fp16: autocast (bf16 only on the CPU)"
    )
    parser.add_argument("--channels_last", action="store_true", help="models and inputs in channels-last")
    parser.add_argument(
        "--compile", action="store_true", help="eager vs torch.compile for both models, with compile times"
    )
    parser.add_argument(
        "--dynamic",
        choices=["auto", "true", "false"],
        default="true",
        help="torch.compile's dynamic: true marks sizes dynamic from the start; auto recompiles once",
    )
    parser.add_argument(
        "--compile_mode",
        choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"],
        default="default",
        help="torch.compile's mode for both models (reduce-overhead: CUDA graphs on a GPU)",
    )
    parser.add_argument(
        "--freezing",
        action="store_true",
        help="--compile: inductor's freezing for the inference graphs (weights folded in as constants and "
        "pre-packed for oneDNN/the GEMM templates; the model must not change after compiling)",
    )
    parser.add_argument(
        "--new_size_offset", type=int, default=32, help="--compile: the NEW size is size + this"
    )
    parser.add_argument("--size", type=int, default=512, help="image side in pixels")
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per model and workload")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs per model and workload first")
    parser.add_argument("--latency_batch", type=int, default=1)
    parser.add_argument("--throughput_batch", type=int, default=8)
    parser.add_argument("--train_batch", type=int, default=2)
    parser.add_argument("--num_labels", type=int, default=150, help="classes (150: ADE20K)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no_memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument("--json", type=Path, default=None, help="also write every number to this file")
    parser.add_argument("--no_onnx", action="store_true", help="skip the onnxruntime column (CPU only)")
    parser.add_argument(
        "--onnx_exporter",
        choices=EXPORTERS,
        default="torchscript",
        help="exporter for the onnxruntime column",
    )
    args = parser.parse_args(argv)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda was asked for but torch.cuda.is_available() is False")
    if args.device == "cpu" and args.dtype == "fp16":
        parser.error("--dtype fp16 (autocast) is for --device cuda; on the CPU use bf16 or fp32")
    if args.freezing and not args.compile:
        parser.error("--freezing is an option of --compile")
    if args.freezing and args.dynamic == "auto":
        # Inductor (torch 2.13) fails at the second size: the frozen graph's pre-packed convolutions disagree
        # with the strides of the graph recompiled with symbolic sizes (transformers' Segformer too).
        parser.error("--freezing fails at a new size with --dynamic auto; use --dynamic true or false")
    for name in ("size", "repeats", "latency_batch", "throughput_batch", "train_batch", "num_labels"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.warmup < 0:
        parser.error(f"--warmup cannot be negative, got {args.warmup}")
    if args.num_labels < 2:
        parser.error("--num_labels must be at least 2 (the cross-entropy head)")
    return args


# Models and inputs ----------------------------------------------------------------------------------------


def build_models(variant: str, num_labels: int, seed: int) -> dict[str, nn.Module]:
    """transformers' model with random weights, and ours converted from it (identical parameters)."""
    config = SegformerHFConfig.from_variant(variant, num_labels=num_labels)
    torch.manual_seed(seed)
    reference = AutoModelForSemanticSegmentation.from_config(
        transformers_config(config), attn_implementation="sdpa"
    )
    ours = from_reference(reference)
    return {"ours": ours, "transformers": reference}


def make_inputs(
    batch_size: int, size: int, num_labels: int, ignore_index: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised-image-like pixels and labels with a few ignored pixels (the loss must skip them)."""
    generator = torch.Generator().manual_seed(seed)
    pixel_values = torch.randn(batch_size, 3, size, size, generator=generator)
    labels = torch.randint(0, num_labels, (batch_size, size, size), generator=generator)
    ignored = torch.rand(batch_size, size, size, generator=generator) < IGNORED_FRACTION
    return pixel_values, labels.masked_fill(ignored, ignore_index)


def prepare(model: nn.Module, device: torch.device, channels_last: bool) -> nn.Module:
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def use_ieee_float32() -> None:
    """TF32 off for matmuls and convolutions: float32 must mean float32 on every GPU generation.

    Through the legacy flags on purpose: once cuDNN's newer per-operator ``fp32_precision`` is set, torch
    2.13 refuses to read ``torch.backends.cudnn.allow_tf32`` in the same process, and ``torch.export`` (the
    ONNX column) reads it.
    """
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


# Agreement -------------------------------------------------------------------------------------------------


def relative_l2(value: torch.Tensor, reference: torch.Tensor) -> float:
    value, reference = value.detach().double(), reference.detach().double()
    return float((value - reference).norm() / reference.norm().clamp(min=torch.finfo(torch.float64).tiny))


def check_agreement(
    models: dict[str, nn.Module], pixel_values: torch.Tensor, labels: torch.Tensor, onnx_session: Any = None
) -> dict[str, Any]:
    """Logits and loss of both models in eval mode, float32, no autocast; agree when both <= TOLERANCE.

    With an onnxruntime session, its logits are held to the same tolerance against transformers'.
    """
    outputs = {}
    with torch.no_grad():
        for name, model in models.items():
            model.eval()
            output = model(pixel_values=pixel_values, labels=labels)
            outputs[name] = (output.logits.float(), output.loss.float())
    (our_logits, our_loss), (reference_logits, reference_loss) = outputs["ours"], outputs["transformers"]
    logits_error = relative_l2(our_logits, reference_logits)
    loss_error = relative_l2(our_loss, reference_loss)
    result = {
        "logits_relative_l2": logits_error,
        "loss_relative_l2": loss_error,
        "tolerance": TOLERANCE,
        # `<=` is False for NaN, so a NaN anywhere counts as disagreement.
        "agree": logits_error <= TOLERANCE and loss_error <= TOLERANCE,
    }
    if onnx_session is not None:
        (onnx_logits,) = onnx_session.run([OUTPUT_NAME], {INPUT_NAME: pixel_values.cpu().numpy()})
        onnx_error = relative_l2(torch.from_numpy(onnx_logits), reference_logits.cpu())
        result["onnxruntime_logits_relative_l2"] = onnx_error
        result["agree"] = result["agree"] and onnx_error <= TOLERANCE
    return result


def export_for_onnxruntime(model: nn.Module, path: Path, exporter: str) -> Any:
    """Our model as a verified ONNX file at `path`, and an onnxruntime session with torch's thread count."""
    from segformer_hf.onnx_export import export_onnx, onnxruntime_session

    export_onnx(model, path, exporter=exporter)
    return onnxruntime_session(path, threads=torch.get_num_threads())


# Timing and memory -----------------------------------------------------------------------------------------


def synchronizer(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def inference_step(
    model: nn.Module, pixel_values: torch.Tensor, autocast: Callable[[], Any]
) -> Callable[[], None]:
    def step() -> None:
        model.eval()
        with torch.inference_mode(), autocast():
            model(pixel_values=pixel_values)

    return step


def onnxruntime_step(session: Any, pixel_values: torch.Tensor) -> Callable[[], None]:
    feed = {INPUT_NAME: pixel_values.cpu().contiguous().numpy()}

    def step() -> None:
        session.run([OUTPUT_NAME], feed)

    return step


def training_step(
    model: nn.Module, pixel_values: torch.Tensor, labels: torch.Tensor, autocast: Callable[[], Any]
) -> Callable[[], None]:
    # lr is irrelevant to speed; a small one keeps the weights (and so the work) close to the start.
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)

    def step() -> None:
        model.train()
        with autocast():
            loss = model(pixel_values=pixel_values, labels=labels).loss
        loss.backward()
        optimizer.step()
        # Freed here rather than at the start of the next step, so that a step holds nothing from before
        # it besides weights and optimizer state, and its peak memory means the same on CPU and CUDA.
        optimizer.zero_grad(set_to_none=True)

    return step


def time_alternating(
    steps: dict[str, Callable[[], None]], warmup: int, repeats: int, synchronize: Callable[[], None]
) -> dict[str, list[float]]:
    """Seconds per run of each step, alternating models so that drifts in machine load hit both alike."""
    names = list(steps)
    for _ in range(warmup):
        for name in names:
            steps[name]()
    synchronize()
    seconds = {name: [] for name in names}
    for repeat in range(repeats):
        for name in names if repeat % 2 == 0 else reversed(names):
            synchronize()
            start = time.perf_counter()
            steps[name]()
            synchronize()
            seconds[name].append(time.perf_counter() - start)
    return seconds


def peak_memory_bytes(step: Callable[[], None], device: torch.device) -> int | None:
    """Most bytes held during one `step` above what was held before it (see the module docstring)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    with warnings.catch_warnings():
        # Each measurement is a profiler session of its own, so torch's note on clearing events between
        # the cycles of one session does not apply.
        warnings.filterwarnings("ignore", message=".*Profiler clears events.*")
        activities = [torch.profiler.ProfilerActivity.CPU]
        with torch.profiler.profile(activities=activities, profile_memory=True) as prof:
            step()
    return _cpu_peak_from_profile(prof)


def _cpu_peak_from_profile(prof: torch.profiler.profile) -> int | None:
    """Replays the profiler's allocation (+bytes) and free (-bytes) events in time order."""
    try:
        events = prof.profiler.kineto_results.events()
    except AttributeError:  # a torch whose profiler no longer exposes its raw events
        return None
    changes = sorted(
        (event.start_ns(), event.nbytes())
        for event in events
        if event.name() == "[memory]" and event.device_type() == torch.autograd.DeviceType.CPU
    )
    held = peak = 0
    for _, change in changes:
        held += change
        peak = max(peak, held)
    return peak


# Running and reporting -------------------------------------------------------------------------------------


def workloads(args: argparse.Namespace) -> list[tuple[str, int, bool]]:
    """(name, batch size, is training) of every measured workload."""
    return [
        ("inference latency", args.latency_batch, False),
        ("inference throughput", args.throughput_batch, False),
        ("training step", args.train_batch, True),
    ]


def autocast_for(dtype: str, device: torch.device) -> Callable[[], Any]:
    """A factory of the context every timed step runs in: autocast to `dtype`, or nothing for fp32."""
    autocast_dtype = DTYPES[dtype]

    def autocast() -> Any:
        if autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=autocast_dtype)

    return autocast


def benchmark_variant(
    models: dict[str, nn.Module],
    args: argparse.Namespace,
    device: torch.device,
    ignore_index: int,
    onnx_session: Any = None,
) -> list[dict[str, Any]]:
    autocast = autocast_for(args.dtype, device)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    synchronize = synchronizer(device)
    rows = []
    for index, (name, batch_size, training) in enumerate(workloads(args)):
        pixel_values, labels = make_inputs(
            batch_size, args.size, args.num_labels, ignore_index, seed=args.seed + 1 + index
        )
        pixel_values = pixel_values.to(device).contiguous(memory_format=memory_format)
        labels = labels.to(device)
        steps = {
            model_name: training_step(model, pixel_values, labels, autocast)
            if training
            else inference_step(model, pixel_values, autocast)
            for model_name, model in models.items()
        }
        if onnx_session is not None and not training:
            steps[ONNX_NAME] = onnxruntime_step(onnx_session, pixel_values)
        seconds = time_alternating(steps, args.warmup, args.repeats, synchronize)
        # onnxruntime allocates outside PyTorch, so its memory is not measured.
        peaks = {model_name: None for model_name in steps}
        if not args.no_memory:
            peaks.update({model_name: peak_memory_bytes(steps[model_name], device) for model_name in models})
        rows.append(_summarise(name, batch_size, seconds, peaks))
    return rows


def benchmark_compiled(
    models: dict[str, nn.Module], args: argparse.Namespace, device: torch.device, ignore_index: int
) -> list[dict[str, Any]]:
    """Eager vs torch.compile per model: medians of alternated runs, and compile times (see the docstring)."""
    dynamic = {"auto": None, "true": True, "false": False}[args.dynamic]
    autocast = autocast_for(args.dtype, device)
    synchronize = synchronizer(device)
    import torch._inductor.config as inductor_config

    # Global, as inductor reads it; it applies to graphs compiled without gradients only (inference), and
    # only to those compiled from here on.
    inductor_config.freezing = args.freezing
    rows = []
    for index, (name, batch_size, training) in enumerate(workloads(args)):
        if name == "inference throughput":
            continue  # latency and training show the compiler's effect; batch 8 only adds minutes
        inputs = [
            tuple(
                tensor.to(device)
                for tensor in make_inputs(
                    batch_size, size, args.num_labels, ignore_index, args.seed + 1 + index
                )
            )
            for size in (args.size, args.size + args.new_size_offset)
        ]
        steps, compile_times, errors = {}, {}, {}
        for model_name, model in models.items():
            # Inductor (torch 2.13, CPU) fails on the backward of either SegFormer once sizes are symbolic
            # ("cannot determine truth value of Relational"), from the start or after automatic dynamic's
            # second size; training crops have one size, so the training step is compiled static.
            compiled = torch.compile(model, dynamic=False if training else dynamic, mode=args.compile_mode)
            for kind, network in (("eager", model), ("compiled", compiled)):
                steps[f"{model_name} {kind}"] = (
                    training_step(network, *inputs[0], autocast)
                    if training
                    else inference_step(network, inputs[0][0], autocast)
                )
            graphs_before = _compiled_graphs()
            compile_times[model_name] = {
                "first_call_s": _first_call_seconds(steps[f"{model_name} compiled"], synchronize),
                "new_size_first_call_s": _first_call_seconds(
                    training_step(compiled, *inputs[1], autocast)
                    if training
                    else inference_step(compiled, inputs[1][0], autocast),
                    synchronize,
                ),
                "graphs": _compiled_graphs() - graphs_before,  # 1: the new size reused the first graph
            }
            if not training:
                with torch.inference_mode(), autocast():
                    model.eval()
                    errors[model_name] = relative_l2(
                        compiled(pixel_values=inputs[1][0]).logits, model(pixel_values=inputs[1][0]).logits
                    )
        seconds = time_alternating(steps, args.warmup, args.repeats, synchronize)
        row: dict[str, Any] = {"workload": name, "batch_size": batch_size}
        for model_name in models:
            eager = statistics.median(seconds[f"{model_name} eager"])
            compiled = statistics.median(seconds[f"{model_name} compiled"])
            row[model_name] = {
                "eager_ms": eager * 1e3,
                "compiled_ms": compiled * 1e3,
                "compiled_over_eager": compiled / eager,
                "compiled_logits_relative_l2": errors.get(model_name),
                **compile_times[model_name],
            }
        rows.append(row)
    return rows


def _first_call_seconds(step: Callable[[], None], synchronize: Callable[[], None]) -> float:
    synchronize()
    start = time.perf_counter()
    step()
    synchronize()
    return time.perf_counter() - start


def _compiled_graphs() -> int:
    """Graphs compiled so far in this process (dynamo's own counter)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def format_compile_table(results: dict[str, Any]) -> str:
    header = f"{'variant':<8}{'workload':<20}{'batch':>6}" + "".join(
        f"{model_name[:6] + ' ' + column:>{width}}"
        for model_name in MODEL_NAMES
        for column, width in (
            ("eager ms", 16),
            ("compiled ms", 19),
            ("c/e", 11),
            ("compile s", 17),
            ("new size s", 18),
        )
    )
    lines = [header, "-" * len(header)]
    for variant, result in results.items():
        for row in result["workloads"]:
            line = f"{variant:<8}{row['workload']:<20}{row['batch_size']:>6}"
            for model_name in MODEL_NAMES:
                side = row[model_name]
                line += (
                    f"{side['eager_ms']:>16.1f}{side['compiled_ms']:>19.1f}{side['compiled_over_eager']:>11.3f}"
                    f"{side['first_call_s']:>17.1f}{side['new_size_first_call_s']:>18.1f}"
                )
            lines.append(line)
    return "\n".join(lines)


def _summarise(
    name: str, batch_size: int, seconds: dict[str, list[float]], peaks: dict[str, int | None]
) -> dict[str, Any]:
    row: dict[str, Any] = {"workload": name, "batch_size": batch_size}
    for model_name in seconds:
        median = statistics.median(seconds[model_name])
        row[model_name] = {
            "median_ms": median * 1e3,
            "images_per_second": batch_size / median,
            "runs_ms": [value * 1e3 for value in seconds[model_name]],
            "peak_memory_mib": None if peaks[model_name] is None else peaks[model_name] / 2**20,
        }
    row["time_ratio"] = row["ours"]["median_ms"] / row["transformers"]["median_ms"]
    if ONNX_NAME in row:
        row["onnxruntime_time_ratio"] = row[ONNX_NAME]["median_ms"] / row["transformers"]["median_ms"]
    our_peak, reference_peak = row["ours"]["peak_memory_mib"], row["transformers"]["peak_memory_mib"]
    row["memory_ratio"] = our_peak / reference_peak if our_peak is not None and reference_peak else None
    return row


def environment(device: torch.device) -> dict[str, Any]:
    """What the numbers depend on: hardware, library versions, threads."""
    info: dict[str, Any] = {
        "device": device.type,
        "cpu": _cpu_name(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
    }
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        info.update(
            gpu=properties.name,
            gpu_memory_gib=round(properties.total_memory / 2**30, 1),
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
        )
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def format_table(results: dict[str, Any]) -> str:
    header = (
        f"{'variant':<8}{'workload':<22}{'batch':>6}{'ours ms':>11}{'transf. ms':>12}{'time ratio':>12}"
        f"{'ours img/s':>12}{'transf. img/s':>15}{'ours MiB':>10}{'transf. MiB':>13}{'mem ratio':>11}"
        f"{'ORT ms':>10}{'ORT ratio':>11}"
    )
    lines = [header, "-" * len(header)]
    for variant, result in results.items():
        for row in result["workloads"]:
            ours, reference = row["ours"], row["transformers"]
            lines.append(
                f"{variant:<8}{row['workload']:<22}{row['batch_size']:>6}"
                f"{ours['median_ms']:>11.1f}{reference['median_ms']:>12.1f}{row['time_ratio']:>12.3f}"
                f"{ours['images_per_second']:>12.2f}{reference['images_per_second']:>15.2f}"
                f"{_optional(ours['peak_memory_mib'], '.0f'):>10}"
                f"{_optional(reference['peak_memory_mib'], '.0f'):>13}"
                f"{_optional(row['memory_ratio'], '.3f'):>11}"
                f"{_optional(row.get(ONNX_NAME, {}).get('median_ms'), '.1f'):>10}"
                f"{_optional(row.get('onnxruntime_time_ratio'), '.3f'):>11}"
            )
    return "\n".join(lines)


def _optional(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    use_ieee_float32()
    settings = {key: (str(value) if isinstance(value, Path) else value) for key, value in vars(args).items()}
    info = environment(device)
    print("Environment: " + ", ".join(f"{key}={value}" for key, value in info.items()))
    print("Settings: " + ", ".join(f"{key}={value}" for key, value in settings.items()))

    with tempfile.TemporaryDirectory(prefix="benchmark-onnx-") as onnx_directory:
        return _run(args, device, info, settings, Path(onnx_directory))


def _run(
    args: argparse.Namespace,
    device: torch.device,
    info: dict[str, Any],
    settings: dict[str, Any],
    onnx_directory: Path,
) -> int:
    # Every variant is checked before anything is timed, so a disagreement reports no timing at all.
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    # onnxruntime runs the float32 export: no column to set beside bf16 autocast.
    use_onnx = device.type == "cpu" and not args.no_onnx and args.dtype == "fp32"
    prepared: dict[str, tuple[dict[str, nn.Module], int, Any]] = {}
    agreement: dict[str, dict[str, Any]] = {}
    for variant in args.variants:
        models = build_models(variant, args.num_labels, args.seed)
        ignore_index = models["ours"].config.semantic_loss_ignore_index
        onnx_session = None
        if use_onnx and not args.compile:
            try:
                path = onnx_directory / f"{variant}.onnx"
                onnx_session = export_for_onnxruntime(models["ours"], path, args.onnx_exporter)
            except ImportError as error:
                print(f"No onnxruntime column: {error}", file=sys.stderr)
                use_onnx = False
            except OnnxVerificationError as error:
                print(f"error: the ONNX export of our {variant} disagrees with it: {error}", file=sys.stderr)
                return 1
        models = {name: prepare(model, device, args.channels_last) for name, model in models.items()}
        pixel_values, labels = make_inputs(2, args.size, args.num_labels, ignore_index, seed=args.seed)
        agreement[variant] = check_agreement(
            models,
            pixel_values.to(device).contiguous(memory_format=memory_format),
            labels.to(device),
            onnx_session,
        )
        onnx_note = ""
        if onnx_session is not None:
            onnx_note = f", onnxruntime logits {agreement[variant]['onnxruntime_logits_relative_l2']:.2e}"
        print(
            f"Agreement {variant}: logits relative L2 {agreement[variant]['logits_relative_l2']:.2e}, "
            f"loss relative difference {agreement[variant]['loss_relative_l2']:.2e}{onnx_note} "
            f"(tolerance {TOLERANCE:g})"
        )
        prepared[variant] = (models, ignore_index, onnx_session)
    disagreeing = [variant for variant, result in agreement.items() if not result["agree"]]
    if disagreeing:
        print(
            f"error: ours and transformers' outputs disagree for {', '.join(disagreeing)} (relative L2 above "
            f"{TOLERANCE:g}); refusing to report timings of models that compute different things.",
            file=sys.stderr,
        )
        return 1

    results = {}
    for variant, (models, ignore_index, onnx_session) in prepared.items():
        results[variant] = {
            "agreement": agreement[variant],
            "workloads": (
                benchmark_compiled(models, args, device, ignore_index)
                if args.compile
                else benchmark_variant(models, args, device, ignore_index, onnx_session)
            ),
        }
        print(f"Done: {variant}", flush=True)
    print()
    if args.compile:
        return report_compiled(results, args, info, settings)
    print(format_table(results))
    print("time ratio and mem ratio are ours / transformers' (below 1: ours is faster / smaller).")
    if any(onnx_session is not None for _, _, onnx_session in prepared.values()):
        print(
            f"ORT: onnxruntime (CPU), our model exported by {args.onnx_exporter}; ORT ratio: ORT / transformers'."
        )
    if args.json is not None:
        write_json_atomic(args.json, {"environment": info, "settings": settings, "results": results})
        print(f"Wrote {args.json}")
    return 0


def report_compiled(
    results: dict[str, Any], args: argparse.Namespace, info: dict[str, Any], settings: dict[str, Any]
) -> int:
    """Prints the eager-vs-compiled table; refuses (status 1) when compiled logits differ from eager ones."""
    print(format_compile_table(results))
    print(
        "c/e is compiled / eager time (below 1: compiling helps); compile s is the first call, new size s the "
        f"first call at {args.size + args.new_size_offset}px (dynamic={args.dynamic} for inference, false for "
        "the training step: its new size compiles afresh)."
    )
    tolerance = COMPILE_TOLERANCE[args.dtype]
    wrong = [
        f"{variant} {name} ({row[name]['compiled_logits_relative_l2']:.3g})"
        for variant, result in results.items()
        for row in result["workloads"]
        for name in MODEL_NAMES
        if row[name]["compiled_logits_relative_l2"] is not None
        and not row[name]["compiled_logits_relative_l2"] <= tolerance
    ]
    if wrong:
        print(
            f"error: compiled logits differ from eager ones (relative L2 above {tolerance:g} in {args.dtype}) for "
            + ", ".join(wrong),
            file=sys.stderr,
        )
        return 1
    if args.json is not None:
        write_json_atomic(args.json, {"environment": info, "settings": settings, "results": results})
        print(f"Wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
