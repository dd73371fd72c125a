"""ONNX export of a SegFormer with dynamic batch, height and width, checked with onnxruntime before it counts.

    python scripts/export_onnx.py --model outputs/demo --output segformer.onnx
    python scripts/export_onnx.py --model outputs/demo --output segformer-fp16.onnx --dtype fp16

The graph takes `pixel_values` (batch, 3, height, width), normalised as for the PyTorch model, and returns
`logits` (batch, num_labels, ceil(height / 4), ceil(width / 4)); batch, height and width are free. An
exporter can succeed and still write a graph that is wrong, or right only at the size it was traced at
(each traced `Reshape` whose target became a constant), so the file only reaches `output` after
onnxruntime has reproduced the PyTorch logits at sizes other than the traced one.

onnx, onnxruntime and onnxscript are optional dependencies (`pip install onnx onnxruntime onnxscript`, or `pip install ".[onnx]"` from a checkout): they are
imported when an export runs, never when segformer_hf is imported.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import os
import sys
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .modeling_segformer_hf import SegformerHFForSemanticSegmentation

EXPORTERS = ("dynamo", "torchscript")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
# Largest accepted |onnxruntime - PyTorch float32| over the logits, relative to max(1, max |logit|):
# float32 graphs differ only by operation order; float16 ones round every activation to 11 bits.
TOLERANCES = {"fp32": 1e-4, "fp16": 5e-2}
INPUT_NAME = "pixel_values"
OUTPUT_NAME = "logits"
# The traced example is batch 2 (torch.export specialises dimensions of size 0 or 1); verification runs at
# other, odd-sized inputs, so a size frozen into the graph at trace time cannot pass.
TRACE_SIZE = (2, 128, 128)
VERIFY_BATCH = 2
VERIFY_SIZES = ((96, 160), (131, 97))
INSTALL_HINT = (
    'pip install onnx onnxruntime onnxscript (or pip install ".[onnx]" from a checkout of segformer_hf)'
)


class OnnxVerificationError(RuntimeError):
    """The exported graph's logits differ from PyTorch's (the file is not written)."""


@dataclass
class SizeCheck:
    """One verification run: onnxruntime against PyTorch at one input size."""

    batch_size: int
    height: int
    width: int
    max_abs_difference: float
    tolerance: float

    def __str__(self) -> str:
        return (
            f"batch {self.batch_size} at {self.height}x{self.width}: max abs difference "
            f"{self.max_abs_difference:.2e} (tolerance {self.tolerance:.1e})"
        )


@dataclass
class ExportReport:
    """What was written and how it was checked (`checks` is empty when verification was skipped)."""

    path: Path
    exporter: str
    opset: int
    dtype: str
    checks: list[SizeCheck] = field(default_factory=list)


def export_onnx(
    model_or_path: nn.Module | str | os.PathLike,
    output: str | os.PathLike,
    *,
    opset: int | None = None,
    dtype: str = "fp32",
    exporter: str = "dynamo",
    verify: bool = True,
    verify_sizes: Sequence[tuple[int, int]] = VERIFY_SIZES,
    verify_batch: int = VERIFY_BATCH,
) -> ExportReport:
    """Writes `model_or_path` as one self-contained ONNX file at `output`, atomically, and verifies it.

    `model_or_path` is a segmentation model (any module whose `forward(pixel_values=..., return_dict=False)`
    returns the logits first), or a directory or Hub repo id loaded with
    `SegformerHFForSemanticSegmentation.from_pretrained` (the Hub only when online). `dtype="fp16"` exports
    a float16 copy; the model itself is left as it was. `opset=None` takes the exporter's default.

    With `verify`, onnxruntime (CPU) must reproduce the float32 PyTorch logits at each of `verify_sizes`
    with batch `verify_batch`, within `TOLERANCES[dtype]`; otherwise `OnnxVerificationError` names the
    size and the difference, and nothing is written at `output`.
    """
    if exporter not in EXPORTERS:
        raise ValueError(f"exporter must be one of {', '.join(EXPORTERS)}, got {exporter!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    onnx = _require_onnx(exporter)
    model = load_model(model_or_path)
    reference = _on_cpu(model, torch.float32)
    exported = _on_cpu(reference, DTYPES[dtype])
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    # Exporters may write the weights to a side file; everything is made in a private directory beside
    # `output` (same file system, so the final rename is atomic) and vanishes with it on any failure.
    with tempfile.TemporaryDirectory(prefix=f".{output.name}.", dir=output.parent) as scratch:
        path = Path(scratch) / "model.onnx"
        _export_graph(exported, path, exporter=exporter, opset=opset, dtype=DTYPES[dtype])
        _make_self_contained(onnx, path)
        checks = []
        if verify:
            try:
                checks = verify_onnx(
                    path, reference, sizes=verify_sizes, batch_size=verify_batch, tolerance=TOLERANCES[dtype]
                )
            except OnnxVerificationError as error:
                raise OnnxVerificationError(f"{output} not written: {error}") from error
        opset_used = _default_opset(onnx, path)
        os.replace(path, output)
    return ExportReport(path=output, exporter=exporter, opset=opset_used, dtype=dtype, checks=checks)


def load_model(model_or_path: nn.Module | str | os.PathLike) -> nn.Module:
    """The model itself, or a segformer_hf checkpoint loaded from a directory or Hub repo id."""
    if isinstance(model_or_path, nn.Module):
        return model_or_path
    if Path(model_or_path).exists() and not Path(model_or_path).is_dir():
        raise ValueError(f"{model_or_path} is a file; expected a saved model directory or a Hub repo id")
    return SegformerHFForSemanticSegmentation.from_pretrained(str(model_or_path))


def verify_onnx(
    path: str | os.PathLike,
    model: nn.Module,
    *,
    sizes: Sequence[tuple[int, int]] = VERIFY_SIZES,
    batch_size: int = VERIFY_BATCH,
    tolerance: float = TOLERANCES["fp32"],
    seed: int = 0,
) -> list[SizeCheck]:
    """Runs the ONNX file in onnxruntime (CPU) and the PyTorch `model` on the same random pixels.

    Raises `OnnxVerificationError` at the first size whose logits differ in shape, or by more than
    `tolerance * max(1, max |logit|)`; returns one `SizeCheck` per size otherwise.
    """
    session = onnxruntime_session(path)
    input_dtype = _numpy_dtype(session.get_inputs()[0].type)
    generator = torch.Generator().manual_seed(seed)
    checks = []
    for height, width in sizes:
        pixel_values = torch.randn(batch_size, 3, height, width, generator=generator)
        where = f"batch {batch_size} at {height}x{width}"
        try:
            (onnx_logits,) = session.run(
                [OUTPUT_NAME], {INPUT_NAME: pixel_values.numpy().astype(input_dtype)}
            )
        except Exception as error:  # onnxruntime raises its own exception types, one per status code
            raise OnnxVerificationError(f"onnxruntime failed ({where}): {error}") from error
        onnx_logits = torch.from_numpy(onnx_logits).float()
        expected = _pytorch_logits(model, pixel_values)
        if onnx_logits.shape != expected.shape:
            raise OnnxVerificationError(
                f"onnxruntime logits have shape {tuple(onnx_logits.shape)}, PyTorch's "
                f"{tuple(expected.shape)} ({where})"
            )
        difference = float((onnx_logits - expected).abs().max())
        allowed = tolerance * max(1.0, float(expected.abs().max()))
        # `not <=` also catches NaN.
        if not difference <= allowed:
            raise OnnxVerificationError(
                f"onnxruntime and PyTorch logits disagree ({where}): max abs difference "
                f"{difference:.3e} > tolerance {allowed:.3e}"
            )
        checks.append(SizeCheck(batch_size, height, width, difference, allowed))
    return checks


# Exporting -------------------------------------------------------------------------------------------------


class _LogitsOnly(nn.Module):
    """The model as the graph sees it: pixel values in, logits out (no loss, no output dataclass)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values, return_dict=False)[0]


def _export_graph(
    model: nn.Module, path: Path, *, exporter: str, opset: int | None, dtype: torch.dtype
) -> None:
    """Traces `model` (evaluation mode) into an ONNX file at `path` with dynamic batch, height and width."""
    batch_size, height, width = TRACE_SIZE
    example = torch.randn(batch_size, 3, height, width, dtype=dtype)
    wrapper = _LogitsOnly(model)
    was_training = model.training
    # The exporters restore the wrapper's previous mode afterwards, so it must be eval before as well.
    wrapper.eval()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # The tracer notes that the decoder's "is this stage smaller than the finest?" tests are
            # recorded once; the answer only changes for inputs of at most 4 pixels, where upsampling to
            # the same size is the identity anyway.
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            if exporter == "dynamo":
                torch.onnx.export(
                    wrapper,
                    (example,),
                    str(path),
                    dynamo=True,
                    input_names=[INPUT_NAME],
                    output_names=[OUTPUT_NAME],
                    opset_version=opset,
                    # Names, not `Dim("batch")`: a name is `Dim.DYNAMIC` (torch.export works out the valid
                    # range) that also names the axis in the graph. A named Dim demands every size from 2 up,
                    # which the decoder's size comparisons refuse, sending the exporter through slow retries.
                    dynamic_shapes={INPUT_NAME: {0: "batch", 2: "height", 3: "width"}},
                    external_data=False,
                    verbose=False,
                )
            else:
                torch.onnx.export(
                    wrapper,
                    (example,),
                    str(path),
                    dynamo=False,
                    input_names=[INPUT_NAME],
                    output_names=[OUTPUT_NAME],
                    opset_version=opset,
                    dynamic_axes={
                        INPUT_NAME: {0: "batch", 2: "height", 3: "width"},
                        OUTPUT_NAME: {0: "batch", 2: "logits_height", 3: "logits_width"},
                    },
                )
    finally:
        model.train(was_training)


def _make_self_contained(onnx, path: Path) -> None:
    """Folds any external weight files back into `path`, so that the one file can be moved and shared."""
    proto = onnx.load(str(path), load_external_data=False)
    if any(onnx.external_data_helper.uses_external_data(tensor) for tensor in proto.graph.initializer):
        onnx.save_model(onnx.load(str(path)), str(path), save_as_external_data=False)
    onnx.checker.check_model(str(path))


def _default_opset(onnx, path: Path) -> int:
    proto = onnx.load(str(path), load_external_data=False)
    return next(entry.version for entry in proto.opset_import if entry.domain in ("", "ai.onnx"))


def _on_cpu(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """`model` itself when already on the CPU in `dtype`, else a converted copy (the caller's is untouched)."""
    parameter = next(model.parameters(), None)
    if parameter is None or (parameter.device.type == "cpu" and parameter.dtype == dtype):
        return model
    return copy.deepcopy(model).to(device="cpu", dtype=dtype)


# Running -------------------------------------------------------------------------------------------------


def _pytorch_logits(model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            return model(pixel_values=pixel_values, return_dict=False)[0].float()
    finally:
        model.train(was_training)


def onnxruntime_session(path: str | os.PathLike, threads: int | None = None):
    """An onnxruntime CPU session for the file; `threads` intra-op threads (default: onnxruntime's choice)."""
    onnxruntime = _import_optional("onnxruntime")
    options = onnxruntime.SessionOptions()
    # Silent: onnxruntime warns, for example, that it cannot pre-compute float16 products on the CPU, and
    # its errors reach the caller as exceptions anyway.
    options.log_severity_level = 4
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _numpy_dtype(onnx_type: str) -> str:
    return {"tensor(float)": "float32", "tensor(float16)": "float16"}[onnx_type]


def _require_onnx(exporter: str):
    """The `onnx` module, after checking that everything the export and its verification need is installed."""
    needed = ["onnx", "onnxruntime"] + (["onnxscript"] if exporter == "dynamo" else [])
    for name in needed:
        _import_optional(name)
    return importlib.import_module("onnx")


def _import_optional(name: str):
    try:
        return importlib.import_module(name)
    except ImportError as error:
        raise ImportError(f"ONNX export needs the {name} package: {INSTALL_HINT}") from error


# Command line --------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="export_onnx.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, help="saved model directory or Hub repo id")
    parser.add_argument("--output", required=True, type=Path, help="the .onnx file to write")
    parser.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="weights and activations")
    parser.add_argument(
        "--exporter",
        choices=EXPORTERS,
        default="dynamo",
        help="dynamo: torch.export-based (default); torchscript: the legacy tracer",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        report = export_onnx(
            args.model, args.output, opset=args.opset, dtype=args.dtype, exporter=args.exporter
        )
    except (ImportError, OnnxVerificationError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(
        f"Wrote {report.path} ({report.exporter} exporter, opset {report.opset}, {report.dtype}): "
        f"{INPUT_NAME} (batch, 3, height, width) -> {OUTPUT_NAME} (batch, num_labels, ceil(height/4), "
        "ceil(width/4))"
    )
    for check in report.checks:
        print(f"Verified with onnxruntime against PyTorch, {check}")
    return 0


__all__ = [
    "ExportReport",
    "OnnxVerificationError",
    "SizeCheck",
    "export_onnx",
    "load_model",
    "onnxruntime_session",
    "verify_onnx",
]
