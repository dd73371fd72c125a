"""scripts/benchmark.py: its agreement gate, its memory measure and a quick end-to-end run (nothing timed).

The gate is what makes the benchmark's ratios mean anything: it must pass for our model converted from
transformers', and fail, with nothing reported, as soon as either the logits or the loss differ.
"""

import importlib.util
import json
import math

import pytest
import torch
from conftest import REPO_ROOT

SIZE = 64


@pytest.fixture(scope="module")
def benchmark_script():
    spec = importlib.util.spec_from_file_location("benchmark_script", REPO_ROOT / "scripts" / "benchmark.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def restore_float32_flags():
    """The script sets process-wide TF32 flags; later test modules must see the defaults again."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_ieee_float32_leaves_the_flags_torch_export_reads_readable(benchmark_script):
    # torch.export reads torch.backends.cudnn.allow_tf32; torch 2.13 raises on that read once cuDNN's
    # per-operator fp32_precision API has been used, which broke every later ONNX export in the process.
    benchmark_script.use_ieee_float32()
    assert torch.backends.cudnn.allow_tf32 is False
    assert torch.backends.cuda.matmul.allow_tf32 is False
    exported = torch.export.export(torch.nn.Conv2d(3, 4, 3), (torch.randn(1, 3, 8, 8),))
    assert exported.graph_module is not None


@pytest.fixture()
def models(benchmark_script):
    return benchmark_script.build_models("b0", num_labels=19, seed=0)


def _inputs(benchmark_script, models):
    ignore_index = models["ours"].config.semantic_loss_ignore_index
    pixel_values, labels = benchmark_script.make_inputs(2, SIZE, 19, ignore_index, seed=1)
    assert (labels == ignore_index).any() and (labels != ignore_index).any()
    return pixel_values, labels


def test_models_are_transformers_sdpa_segformer_and_ours_with_identical_weights(benchmark_script, models):
    from transformers import SegformerForSemanticSegmentation

    from segformer_hf import SegformerHFForSemanticSegmentation

    ours, reference = models["ours"], models["transformers"]
    assert isinstance(reference, SegformerForSemanticSegmentation)
    assert isinstance(ours, SegformerHFForSemanticSegmentation)
    assert reference.config._attn_implementation == "sdpa"
    # Spot checks through transformers' own module names, independent of our conversion tables.
    reference_block = reference.segformer.stages[1].blocks[0]
    our_layer = ours.segformer.stages[1].layers[0]
    assert torch.equal(our_layer.attention.query.weight, reference_block.attention.q_proj.weight)
    assert torch.equal(
        our_layer.attention.key_value.weight,
        torch.cat([reference_block.attention.k_proj.weight, reference_block.attention.v_proj.weight]),
    )
    assert torch.equal(ours.decode_head.classifier.weight, reference.decode_head.classifier.weight)


def test_agreement_check_passes_for_our_model_converted_from_transformers(benchmark_script, models):
    result = benchmark_script.check_agreement(models, *_inputs(benchmark_script, models))
    assert result["agree"], result
    assert result["logits_relative_l2"] <= benchmark_script.TOLERANCE
    assert result["loss_relative_l2"] <= benchmark_script.TOLERANCE


def test_agreement_check_fails_when_the_logits_differ(benchmark_script, models):
    with torch.no_grad():
        # A 0.1% change in the classifier changes the logits by 1e-3 relative: 100 times the tolerance.
        models["ours"].decode_head.classifier.weight.mul_(1.001)
    result = benchmark_script.check_agreement(models, *_inputs(benchmark_script, models))
    assert not result["agree"]
    assert result["logits_relative_l2"] > benchmark_script.TOLERANCE


def test_agreement_check_fails_when_only_the_loss_differs(benchmark_script, models):
    # Another ignored label leaves the logits untouched and changes which pixels the loss averages.
    models["ours"].config.semantic_loss_ignore_index = 0
    result = benchmark_script.check_agreement(models, *_inputs(benchmark_script, models))
    assert result["logits_relative_l2"] <= benchmark_script.TOLERANCE
    assert result["loss_relative_l2"] > benchmark_script.TOLERANCE
    assert not result["agree"]


def test_agreement_check_holds_onnxruntime_logits_to_the_same_tolerance(benchmark_script, models):
    pixel_values, labels = _inputs(benchmark_script, models)
    with torch.no_grad():
        reference_logits = models["transformers"].eval()(pixel_values=pixel_values).logits.numpy()

    class FakeSession:  # stands in for onnxruntime: returns transformers' logits, shifted by `offset`
        offset = 0.0

        def run(self, output_names, feed):
            assert output_names == ["logits"] and list(feed) == ["pixel_values"]
            return [reference_logits + self.offset]

    session = FakeSession()
    result = benchmark_script.check_agreement(models, pixel_values, labels, session)
    assert result["agree"] and result["onnxruntime_logits_relative_l2"] == 0.0
    session.offset = 1e-3 * float(abs(reference_logits).max())
    result = benchmark_script.check_agreement(models, pixel_values, labels, session)
    assert result["onnxruntime_logits_relative_l2"] > benchmark_script.TOLERANCE
    assert not result["agree"]


def test_relative_l2_is_the_norm_of_the_difference_over_the_reference_norm(benchmark_script):
    assert benchmark_script.relative_l2(torch.tensor([3.0, 4.0]), torch.tensor([0.0, 5.0])) == pytest.approx(
        math.sqrt(9 + 1) / 5
    )
    assert math.isnan(benchmark_script.relative_l2(torch.tensor([float("nan")]), torch.tensor([1.0])))


def test_cpu_peak_memory_is_the_high_water_mark_of_what_the_step_allocates(benchmark_script):
    def step():
        first = torch.empty(1_000_000)  # 4 MB
        second = torch.empty(500_000)  # 2 MB: 6 MB held, the peak
        del first
        third = torch.empty(250_000)  # 1 MB: 3 MB held
        del second, third

    assert benchmark_script.peak_memory_bytes(step, torch.device("cpu")) == 6_000_000


def test_script_refuses_to_report_when_outputs_disagree(benchmark_script, monkeypatch, tmp_path, capsys):
    build_models = benchmark_script.build_models

    def build_disagreeing(variant, num_labels, seed):
        models = build_models(variant, num_labels, seed)
        with torch.no_grad():
            models["ours"].decode_head.classifier.bias.add_(1.0)
        return models

    monkeypatch.setattr(benchmark_script, "build_models", build_disagreeing)
    output = tmp_path / "bench.json"
    arguments = ["--variants", "b0", "--device", "cpu", "--size", str(SIZE), "--repeats", "1"]
    status = benchmark_script.main([*arguments, "--warmup", "0", "--json", str(output)])
    captured = capsys.readouterr()
    assert status == 1
    assert "disagree for b0" in captured.err and "refusing" in captured.err
    assert "time ratio" not in captured.out
    assert not output.exists()


def test_quick_run_prints_the_table_and_writes_every_number_to_json(benchmark_script, tmp_path, capsys):
    output = tmp_path / "bench.json"
    arguments = [
        "--variants",
        "b0",
        "--device",
        "cpu",
        "--size",
        str(SIZE),
        "--repeats",
        "2",
        "--warmup",
        "0",
    ]
    status = benchmark_script.main(
        [*arguments, "--throughput_batch", "2", "--num_labels", "19", "--json", str(output)]
    )
    assert status == 0
    printed = capsys.readouterr().out
    assert f"transformers={__import__('transformers').__version__}" in printed
    assert f"torch_threads={torch.get_num_threads()}" in printed

    report = json.loads(output.read_text())
    assert report["settings"]["size"] == SIZE
    result = report["results"]["b0"]
    assert result["agreement"]["agree"]
    assert result["agreement"]["onnxruntime_logits_relative_l2"] <= benchmark_script.TOLERANCE
    rows = {row["workload"]: row for row in result["workloads"]}
    assert list(rows) == ["inference latency", "inference throughput", "training step"]
    assert [rows[name]["batch_size"] for name in rows] == [1, 2, 2]
    for name, row in rows.items():
        assert f"b0      {name}" in printed
        ours, reference = row["ours"], row["transformers"]
        for side in (ours, reference):
            assert len(side["runs_ms"]) == 2 and all(value > 0 for value in side["runs_ms"])
            assert side["median_ms"] == pytest.approx(sum(side["runs_ms"]) / 2)
            assert side["images_per_second"] == pytest.approx(row["batch_size"] * 1e3 / side["median_ms"])
        assert row["time_ratio"] == pytest.approx(ours["median_ms"] / reference["median_ms"])
        assert row["memory_ratio"] == pytest.approx(ours["peak_memory_mib"] / reference["peak_memory_mib"])
        if name == "training step":
            assert "onnxruntime" not in row and "onnxruntime_time_ratio" not in row
        else:
            onnx_runs = row["onnxruntime"]["runs_ms"]
            assert len(onnx_runs) == 2 and all(value > 0 for value in onnx_runs)
            assert row["onnxruntime_time_ratio"] == pytest.approx(
                row["onnxruntime"]["median_ms"] / reference["median_ms"]
            )
        # Every step at least allocates its logits, (B, 19, SIZE/4, SIZE/4) float32 values.
        logits_mib = row["batch_size"] * 19 * (SIZE // 4) ** 2 * 4 / 2**20
        assert ours["peak_memory_mib"] >= logits_mib and reference["peak_memory_mib"] >= logits_mib


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA options need a GPU")
def test_quick_cuda_run_with_bf16_autocast_and_channels_last(benchmark_script, tmp_path):
    output = tmp_path / "bench.json"
    arguments = [
        "--variants",
        "b0",
        "--device",
        "cuda",
        "--size",
        str(SIZE),
        "--repeats",
        "2",
        "--warmup",
        "1",
    ]
    status = benchmark_script.main([*arguments, "--dtype", "bf16", "--channels_last", "--json", str(output)])
    assert status == 0
    report = json.loads(output.read_text())
    assert report["environment"]["gpu"]
    for row in report["results"]["b0"]["workloads"]:
        assert row["ours"]["peak_memory_mib"] > 0 and row["transformers"]["peak_memory_mib"] > 0


def _record_autocast(benchmark_script, monkeypatch) -> dict[str, list]:
    """Makes build_models hook both models so that each forward call records its autocast dtype."""
    build_models = benchmark_script.build_models
    seen: dict[str, list] = {"ours": [], "transformers": []}

    def build_recording(variant, num_labels, seed):
        models = build_models(variant, num_labels, seed)
        for name, model in models.items():

            def record(module, inputs, name=name):
                enabled = torch.is_autocast_enabled("cpu")
                seen[name].append(torch.get_autocast_dtype("cpu") if enabled else torch.float32)

            model.register_forward_pre_hook(record)
        return models

    monkeypatch.setattr(benchmark_script, "build_models", build_recording)
    return seen


def test_cpu_bf16_run_times_both_models_under_autocast_without_the_onnxruntime_column(
    benchmark_script, monkeypatch, tmp_path
):
    seen = _record_autocast(benchmark_script, monkeypatch)
    output = tmp_path / "bench.json"
    arguments = ["--variants", "b0", "--device", "cpu", "--size", str(SIZE), "--repeats", "1", "--warmup", "0"]  # fmt: skip
    status = benchmark_script.main([*arguments, "--dtype", "bf16", "--no_memory", "--json", str(output)])
    assert status == 0
    # The agreement check runs in float32; every timed run under bf16 autocast.
    assert {name: set(dtypes) for name, dtypes in seen.items()} == {
        "ours": {torch.float32, torch.bfloat16},
        "transformers": {torch.float32, torch.bfloat16},
    }
    report = json.loads(output.read_text())
    assert report["settings"]["dtype"] == "bf16"
    for row in report["results"]["b0"]["workloads"]:
        assert "onnxruntime" not in row and row["ours"]["median_ms"] > 0


def test_compile_run_with_bf16_times_eager_and_compiled_under_autocast(
    benchmark_script, monkeypatch, tmp_path, capsys
):
    # The compiler itself is replaced by the identity (inductor would take minutes): what is checked is
    # that --dtype reaches both the eager and the compiled runs and the compiled-vs-eager check.
    compiled_with = []

    def identity_compile(model, **options):
        compiled_with.append(options)
        return model

    monkeypatch.setattr(benchmark_script.torch, "compile", identity_compile)
    seen = _record_autocast(benchmark_script, monkeypatch)
    output = tmp_path / "compiled.json"
    arguments = ["--variants", "b0", "--device", "cpu", "--size", str(SIZE), "--repeats", "1", "--warmup", "0"]  # fmt: skip
    status = benchmark_script.main(
        [*arguments, "--compile", "--dynamic", "false", "--dtype", "bf16", "--json", str(output)]
    )
    assert status == 0, capsys.readouterr().err
    assert len(compiled_with) == 4  # two models, latency and training workloads
    for name, dtypes in seen.items():
        # The agreement check runs first, in float32; everything after it under bf16 autocast.
        first_bf16 = dtypes.index(torch.bfloat16)
        assert set(dtypes[:first_bf16]) == {torch.float32}, name
        assert set(dtypes[first_bf16:]) == {torch.bfloat16}, name
    report = json.loads(output.read_text())
    assert report["settings"]["dtype"] == "bf16"
    latency, training = report["results"]["b0"]["workloads"]
    assert latency["ours"]["compiled_logits_relative_l2"] == 0.0  # the same model, the same autocast
    assert training["ours"]["compiled_over_eager"] > 0


@pytest.mark.parametrize(("dtype", "status"), [("fp32", 1), ("bf16", 0)])
def test_compiled_logits_gate_allows_autocast_rounding_but_not_float32_drift(
    benchmark_script, capsys, dtype, status
):
    # A relative L2 of 1e-2 between compiled and eager logits is autocast's rounding in bf16 (B0's eager
    # bf16 logits are ~9e-3 from float32 ones), but a real difference in float32.
    side = {"eager_ms": 2.0, "compiled_ms": 1.0, "compiled_over_eager": 0.5, "first_call_s": 1.0}
    side |= {"new_size_first_call_s": 1.0, "graphs": 1, "compiled_logits_relative_l2": 1e-2}
    row = {"workload": "inference latency", "batch_size": 1, "ours": side, "transformers": dict(side)}
    args = benchmark_script.parse_args(["--device", "cpu", "--compile", "--dtype", dtype])
    assert benchmark_script.report_compiled({"b0": {"workloads": [row]}}, args, {}, {}) == status
    if status:
        assert "b0 ours (0.01)" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--dtype", "fp16"], "--dtype fp16 (autocast) is for --device cuda"),
        (["--freezing"], "--freezing is an option of --compile"),
        (
            ["--compile", "--freezing", "--dynamic", "auto"],
            "--freezing fails at a new size with --dynamic auto",
        ),
    ],
)
def test_unsupported_option_combinations_are_refused_with_a_message(
    benchmark_script, capsys, arguments, message
):
    with pytest.raises(SystemExit):
        benchmark_script.parse_args(["--device", "cpu", *arguments])
    assert message in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------
# The model's speed measures compute what they replace. The parity tests run with dropout off and
# BatchNorm statistics at their initial values, so these cases are checked here against definitions.
# ---------------------------------------------------------------------------------------------------------


def test_evaluation_with_frozen_batch_norm_statistics_matches_transformers(benchmark_script, models):
    generator = torch.Generator().manual_seed(7)
    width = models["ours"].decode_head.batch_norm.num_features
    statistics = {
        "running_mean": torch.randn(width, generator=generator),
        "running_var": torch.rand(width, generator=generator) * 3 + 0.05,
        "weight": torch.randn(width, generator=generator),
        "bias": torch.randn(width, generator=generator),
    }
    with torch.no_grad():
        for model in models.values():
            for name, value in statistics.items():
                getattr(model.decode_head.batch_norm, name).copy_(value)
    result = benchmark_script.check_agreement(models, *_inputs(benchmark_script, models))
    assert result["agree"], result


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_cpu_dropout_keeps_each_element_independently_with_probability_1_minus_p(memory_format):
    from segformer_hf.modeling_segformer_hf import SegformerHFSparseDrawDropout

    drop_prob = 0.3
    dropout = SegformerHFSparseDrawDropout(drop_prob).train()
    torch.manual_seed(0)
    hidden = torch.randn(2, 64, 64, 64).contiguous(memory_format=memory_format).requires_grad_()
    output = dropout(hidden)
    kept = output != 0
    # Dropout's definition: every element is either zeroed or scaled by 1 / (1 - p).
    torch.testing.assert_close(output[kept], hidden[kept] / (1 - drop_prob))
    numel = hidden.numel()
    dropped = ~kept
    sigma = (drop_prob * (1 - drop_prob) / numel) ** 0.5
    assert abs(dropped.float().mean().item() - drop_prob) < 5 * sigma
    # Independence: neighbours in memory and in every axis are both dropped with probability p^2.
    flat = (
        dropped.permute(0, 2, 3, 1).reshape(-1) if memory_format == torch.channels_last else dropped.view(-1)
    )
    pairs = [(flat[:-1], flat[1:])] + [
        (dropped.narrow(d, 0, dropped.shape[d] - 1), dropped.narrow(d, 1, dropped.shape[d] - 1))
        for d in range(4)
    ]
    for first, second in pairs:
        both = (first & second).float().mean().item()
        assert abs(both - drop_prob**2) < 5 * (drop_prob**2 * (1 - drop_prob**2) / first.numel()) ** 0.5
    # Each channel drops about p of its elements (no structure along the layout).
    per_channel = dropped.float().mean(dim=(0, 2, 3))
    assert (per_channel - drop_prob).abs().max() < 5 * (drop_prob * (1 - drop_prob) / (numel / 64)) ** 0.5

    gradient = torch.randn_like(output)
    output.backward(gradient)
    torch.testing.assert_close(hidden.grad, torch.where(kept, gradient / (1 - drop_prob), 0.0))
    assert torch.equal(dropout.eval()(hidden), hidden)


def test_cpu_dropout_follows_the_global_seed(benchmark_script):
    from segformer_hf.modeling_segformer_hf import SegformerHFSparseDrawDropout

    dropout = SegformerHFSparseDrawDropout(0.1).train()
    hidden = torch.ones(1, 8, 32, 32)
    torch.manual_seed(3)
    first = dropout(hidden)
    torch.manual_seed(3)
    assert torch.equal(dropout(hidden), first)
    assert not torch.equal(dropout(hidden), first)


@pytest.mark.parametrize(
    "logits_size, labels_size",
    [((33, 29), (131, 117)), ((32, 32), (128, 128))],  # a ratio that is not an integer, and 4
)
def test_upsampled_cross_entropy_equals_autograd_through_interpolate_and_cross_entropy(
    logits_size, labels_size
):
    import torch.nn.functional as F

    from segformer_hf.modeling_segformer_hf import UpsampledCrossEntropy

    generator = torch.Generator().manual_seed(5)
    num_classes, ignore_index = 19, 255
    logits = torch.randn(2, num_classes, *logits_size, dtype=torch.float64, generator=generator)
    labels = torch.randint(0, num_classes, (2, *labels_size), generator=generator)
    labels[torch.rand(2, *labels_size, generator=generator) < 0.2] = ignore_index
    # float64 rows of 19 classes: several of the CPU's 2 MB blocks, so block boundaries are crossed.
    assert labels.numel() * num_classes * 8 > 2 * 2**21

    ours = logits.clone().requires_grad_()
    loss = UpsampledCrossEntropy.apply(ours, labels, ignore_index, True)
    (3.0 * loss).backward()
    reference = logits.clone().requires_grad_()
    upsampled = F.interpolate(reference, size=labels_size, mode="bilinear", align_corners=False)
    expected = F.cross_entropy(upsampled, labels, ignore_index=ignore_index)
    (3.0 * expected).backward()
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(ours.grad, reference.grad, rtol=1e-10, atol=1e-15)
    with torch.no_grad():
        torch.testing.assert_close(UpsampledCrossEntropy.apply(logits, labels, ignore_index, False), expected)


def test_upsampled_cross_entropy_of_an_all_ignored_batch_is_nan_with_zero_gradient_like_torch():
    import torch.nn.functional as F

    from segformer_hf.modeling_segformer_hf import UpsampledCrossEntropy

    logits = torch.randn(1, 4, 5, 5, requires_grad=True)
    reference = logits.detach().clone().requires_grad_()
    labels = torch.full((1, 20, 20), 255)
    loss = UpsampledCrossEntropy.apply(logits, labels, 255, True)
    loss.backward()
    upsampled = F.interpolate(reference, size=(20, 20), mode="bilinear")
    expected = F.cross_entropy(upsampled, labels, ignore_index=255)
    expected.backward()
    assert loss.isnan() and expected.isnan()
    assert torch.equal(reference.grad, torch.zeros_like(logits))
    assert torch.equal(logits.grad, reference.grad)
