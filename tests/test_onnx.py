"""segformer_hf.onnx_export: graphs that hold at every batch, size and dtype, or are never written.

Each exporter's file is run by onnxruntime at sizes and batches other than the traced one (odd sizes
included, where a frozen reshape or a rounding slip shows) and compared with the PyTorch model it came
from. A tiny four-stage model keeps every export to seconds (the dynamo exporter's dominates the file).
"""

import runpy
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from conftest import REPO_ROOT

from segformer_hf import SegformerHFConfig, SegformerHFForSemanticSegmentation, export_onnx, onnx_export
from segformer_hf.modeling_segformer_hf import SegformerHFStage
from segformer_hf.onnx_export import EXPORTERS, TRACE_SIZE, VERIFY_SIZES, OnnxVerificationError

# Batch 1 and 2, each at two sizes that differ from the traced one (odd sides included).
ROUND_TRIP_SHAPES = [(1, 64, 96), (2, 64, 96), (1, 97, 131), (2, 97, 131)]


def _tiny_config() -> SegformerHFConfig:
    """Two stages of B0's shape (patch kernels 7 then 3, keys reduced 8x then not), one block each.

    Every kind of layer and reshape of the full model appears, a stage feeding the next and the decoder
    upsampling a coarser stage included; two stages instead of four halve the dynamo exporter's time.
    """
    return SegformerHFConfig(
        num_labels=3,
        depths=[1, 1],
        hidden_sizes=[16, 32],
        num_attention_heads=[1, 2],
        sr_ratios=[8, 1],
        patch_sizes=[7, 3],
        strides=[4, 2],
        mlp_ratios=[4, 4],
        decoder_hidden_size=32,
    )


def _tiny_model() -> SegformerHFForSemanticSegmentation:
    torch.manual_seed(0)
    model = SegformerHFForSemanticSegmentation(_tiny_config())
    # Non-trivial BatchNorm statistics, so that their folding into the decoder is part of what is checked.
    with torch.no_grad():
        norm = model.decode_head.batch_norm
        norm.running_mean.normal_()
        norm.running_var.uniform_(0.5, 2.0)
    return model


def _pytorch_logits(model: torch.nn.Module, pixel_values: torch.Tensor) -> np.ndarray:
    was_training = model.training
    model.eval()
    with torch.no_grad():
        logits = model(pixel_values=pixel_values).logits
    model.train(was_training)
    return logits.numpy()


def _pixels(batch: int, height: int, width: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))


def _run(path, pixel_values: np.ndarray) -> np.ndarray:
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"pixel_values": pixel_values})[0]


@pytest.fixture(scope="module")
def model():
    return _tiny_model()


@pytest.fixture(scope="module", params=EXPORTERS)
def exported(request, model, tmp_path_factory):
    """(exporter, directory, report) of an fp32 export, made from a model left in training mode."""
    directory = tmp_path_factory.mktemp(request.param)
    model.train()
    report = export_onnx(model, directory / "model.onnx", exporter=request.param)
    assert model.training, "export must leave the model in the mode it found it in"
    return request.param, directory, report


def test_exported_graph_matches_pytorch_at_other_batches_and_sizes(exported, model):
    _, directory, _ = exported
    for batch, height, width in ROUND_TRIP_SHAPES:
        assert (height, width) != TRACE_SIZE[1:]
        pixel_values = _pixels(batch, height, width)
        expected = _pytorch_logits(model, pixel_values)
        actual = _run(directory / "model.onnx", pixel_values.numpy())
        assert actual.shape == expected.shape == (batch, 3, -(-height // 4), -(-width // 4))
        np.testing.assert_allclose(actual, expected, atol=1e-4, rtol=1e-4)


def test_graph_has_named_dynamic_axes_and_is_one_self_contained_file(exported):
    exporter, directory, report = exported
    assert [path.name for path in directory.iterdir()] == ["model.onnx"]
    proto = onnx.load(str(directory / "model.onnx"), load_external_data=False)
    assert not any(onnx.external_data_helper.uses_external_data(t) for t in proto.graph.initializer)
    (graph_input,), (graph_output,) = proto.graph.input, proto.graph.output
    assert graph_input.name == "pixel_values" and graph_output.name == "logits"
    dims = [dim.dim_param or dim.dim_value for dim in graph_input.type.tensor_type.shape.dim]
    assert dims == ["batch", 3, "height", "width"]
    output_dims = graph_output.type.tensor_type.shape.dim
    assert output_dims[0].dim_param == "batch" and output_dims[1].dim_value == 3
    assert all(dim.dim_param for dim in output_dims[2:])
    assert report.exporter == exporter and report.dtype == "fp32"
    assert report.opset == next(entry.version for entry in proto.opset_import if entry.domain == "")


def test_report_lists_each_verified_size_within_tolerance(exported):
    _, _, report = exported
    assert [(c.batch_size, c.height, c.width) for c in report.checks] == [(2, h, w) for h, w in VERIFY_SIZES]
    assert all(0 <= check.max_abs_difference <= check.tolerance for check in report.checks)


def test_fp16_export_runs_in_float16_close_to_the_float32_model(model, tmp_path):
    report = export_onnx(model, tmp_path / "model-fp16.onnx", dtype="fp16", exporter="torchscript")
    assert report.dtype == "fp16" and len(report.checks) == 2
    # The caller's model is exported from a copy: it stays float32.
    assert all(parameter.dtype == torch.float32 for parameter in model.parameters())
    pixel_values = _pixels(2, 97, 131)
    actual = _run(tmp_path / "model-fp16.onnx", pixel_values.numpy().astype(np.float16))
    assert actual.dtype == np.float16
    expected = _pytorch_logits(model, pixel_values)
    assert actual.shape == expected.shape
    # float16 keeps 11 significant bits: about 1e-3 relative per operation.
    np.testing.assert_allclose(actual.astype(np.float32), expected, atol=2e-2 * np.abs(expected).max())


def test_script_exports_a_saved_model_end_to_end(tmp_path, monkeypatch, capsys):
    model = _tiny_model()
    model.save_pretrained(tmp_path / "saved")
    output = tmp_path / "exported" / "segformer.onnx"
    arguments = ["--model", str(tmp_path / "saved"), "--output", str(output), "--exporter", "torchscript"]
    monkeypatch.setattr(sys, "argv", ["export_onnx.py", *arguments])
    with pytest.raises(SystemExit) as exited:
        runpy.run_path(str(REPO_ROOT / "scripts" / "export_onnx.py"), run_name="__main__")
    assert exited.value.code == 0
    printed = capsys.readouterr().out
    assert f"Wrote {output}" in printed and "torchscript exporter" in printed
    for height, width in VERIFY_SIZES:
        assert f"batch 2 at {height}x{width}: max abs difference" in printed
    pixel_values = _pixels(1, 97, 131)
    reloaded = SegformerHFForSemanticSegmentation.from_pretrained(tmp_path / "saved")
    np.testing.assert_allclose(
        _run(output, pixel_values.numpy()), _pytorch_logits(reloaded, pixel_values), atol=1e-4, rtol=1e-4
    )


def test_failed_verification_raises_with_the_size_and_writes_nothing(model, tmp_path, monkeypatch):
    pytorch_logits = onnx_export._pytorch_logits
    monkeypatch.setattr(onnx_export, "_pytorch_logits", lambda *args: pytorch_logits(*args) + 0.01)
    with pytest.raises(OnnxVerificationError, match=r"\(batch 2 at 96x160\): max abs difference 1\.0\d*e-02"):
        export_onnx(model, tmp_path / "model.onnx", exporter="torchscript")
    assert list(tmp_path.iterdir()) == []


def test_verification_catches_a_graph_frozen_at_the_traced_size(model, tmp_path, monkeypatch):
    """The bug the verification is for: a stage ending in `unflatten` made the TorchScript exporter
    freeze the next stage's reshapes at the traced size."""

    def stage_ending_in_unflatten(self, features):
        tokens, height, width = self.patch_embeddings(features)
        for layer in self.layers:
            tokens = layer(tokens, height, width)
        return self.layer_norm(tokens).unflatten(1, (height, width)).permute(0, 3, 1, 2)

    monkeypatch.setattr(SegformerHFStage, "forward", stage_ending_in_unflatten)
    existing = tmp_path / "model.onnx"
    existing.write_bytes(b"an earlier export")
    with pytest.raises(OnnxVerificationError, match=r"not written: onnxruntime failed \(batch 2 at 96x160\)"):
        export_onnx(model, existing, exporter="torchscript")
    assert existing.read_bytes() == b"an earlier export"
    assert list(tmp_path.iterdir()) == [existing]


def test_missing_onnxruntime_names_what_to_install(model, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # makes `import onnxruntime` raise ImportError
    # segformer_hf is not on PyPI: the hint names packages that are, and the extra of a checkout.
    with pytest.raises(
        ImportError,
        match=r"onnxruntime package: pip install onnx onnxruntime onnxscript \(or pip install \"\.\[onnx\]\" from a checkout",
    ):
        export_onnx(model, tmp_path / "model.onnx", exporter="torchscript")
    assert list(tmp_path.iterdir()) == []


def test_importing_segformer_hf_imports_no_onnx_package():
    code = (
        "import sys, segformer_hf; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'onnx', 'onnxruntime', 'onnxscript', 'onnx_ir'}))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT, check=True
    )
    assert result.stdout.strip() == "[]"
