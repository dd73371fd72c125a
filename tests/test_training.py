"""Training: config handling, the paper's optimisation recipe, and the real `accelerate launch` command."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import DEMO_DATA, REPO_ROOT, accelerate_launch
from safetensors.torch import load_file

from segformer_hf import SegformerHFConfig, SegformerHFForSemanticSegmentation
from segformer_hf.arguments import TrainingConfig, load_config, parse_args
from segformer_hf.checkpointing import list_checkpoints
from segformer_hf.optimization import build_optimizer, learning_rate_factor

# A tiny but real run on the bundled data: few samples, small crops, few steps.
SMALL_RUN = [
    "--max_train_samples", "8",
    "--max_eval_samples", "4",
    "--crop_size", "64", "64",
    "--img_scale", "120", "90",
    "--per_device_train_batch_size", "2",
    "--per_device_eval_batch_size", "2",
    "--dataloader_num_workers", "0",
    "--warmup_steps", "2",
    "--logging_steps", "1",
    "--report_to", "none",
]  # fmt: skip


def _launch(
    args: list[str], num_processes: int = 1, timeout: int = 300, script: str = "scripts/train.py", **popen
) -> subprocess.CompletedProcess:
    command = [*accelerate_launch(num_processes), script, *args]
    return subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout, **popen)


def _losses(output_dir: Path) -> dict[int, float]:
    """Per-step losses from the run log; a resumed run re-logs steps after its checkpoint, the last one wins."""
    losses = {}
    for line in (output_dir / "train_log.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            losses[record["step"]] = record["loss"]
    return losses


# Config ---------------------------------------------------------------------------------------------


def test_unknown_config_keys_are_errors_not_ignored(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model_variant: b0\ndata_dir: x\nlearning_rat: 0.1\n")
    with pytest.raises(ValueError, match="learning_rat"):
        load_config(recipe)
    with pytest.raises(ValueError, match="learning_rat"):
        parse_args(["--config", str(recipe)])
    recipe.write_text("model_variant: b0\ndata_dir: x\n")
    with pytest.raises(SystemExit):
        parse_args(["--config", str(recipe), "--not_a_key", "1"])


@pytest.mark.parametrize(
    "override, message",
    [
        ({"max_train_steps": 0}, "max_train_steps"),
        ({"crop_size": [0, 64]}, "crop_size"),
        ({"ratio_range": [2.0, 0.5]}, "ratio_range"),
        ({"eval_mode": "slide", "eval_stride": [600, 600], "crop_size": [512, 512]}, "eval_stride"),
        ({"mixed_precision": "fp8"}, "mixed_precision"),
        ({"learning_rate": "fast"}, "learning_rate"),
        ({"ema_decay": 1.0}, "ema_decay"),
    ],
)
def test_impossible_values_are_rejected_before_any_work(override, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, {"data_dir": "somewhere", "model_variant": "b0", **override})


def test_a_warm_up_longer_than_a_short_run_is_shortened_with_a_warning(caplog):
    config = load_config(
        None, {"data_dir": "somewhere", "model_variant": "b0", "warmup_steps": 1500, "max_train_steps": 12}
    )
    assert config.warmup_steps == 11
    assert "warm-up shortened to 11 steps" in caplog.text


@pytest.mark.parametrize("has_bf16", [False, True])
def test_bf16_on_a_cpu_without_bf16_instructions_is_warned_about(monkeypatch, caplog, has_bf16):
    from types import SimpleNamespace

    from segformer_hf import inference, training

    monkeypatch.setattr(inference.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: has_bf16, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    accelerator = SimpleNamespace(
        distributed_type="NO",
        num_processes=1,
        process_index=0,
        is_main_process=True,
        device=torch.device("cpu"),
        mixed_precision="bf16",
    )
    with caplog.at_level("WARNING", logger="segformer_hf.inference"):
        training.log_distribution(accelerator)
    warned = "without bf16 instructions" in caplog.text
    assert warned is not has_bf16
    # On other architectures nothing is claimed either way.
    monkeypatch.setattr(inference.platform, "machine", lambda: "aarch64")
    assert inference.cpu_lacks_bf16() is False


def test_bf16_training_on_the_cpu_runs_the_model_under_autocast_and_keeps_float32_weights(tmp_path):
    """What `camvid-b0-scratch` relies on: accelerate's bf16 autocast is really on for a CPU run."""
    from accelerate.state import AcceleratorState

    from segformer_hf import training

    AcceleratorState._reset_state(reset_partial_state=True)  # the suite's earlier Accelerators were float32
    try:
        config = parse_args(
            [*SMALL_RUN, "--max_train_steps", "2", "--mixed_precision", "bf16",
             "--output_dir", str(tmp_path / "run")]
        )  # fmt: skip
        run = training.set_up(config)
        # accelerate puts autocast around the model's forward: the classifier's output shows what ran.
        classifier_dtypes = []
        run.accelerator.unwrap_model(run.model).decode_head.classifier.register_forward_hook(
            lambda module, inputs, output: classifier_dtypes.append(output.dtype)
        )
        before = [parameter.detach().clone() for parameter in run.model.parameters()]
        batches = training.training_batches(run)
        for _ in range(2):
            assert training.optimization_step(run, next(batches))
        batches.close()
        assert classifier_dtypes == [torch.bfloat16, torch.bfloat16]
        assert math.isfinite(run.step_loss) and run.state.skipped_nonfinite_steps == 0
        after = list(run.model.parameters())
        assert all(parameter.dtype == torch.float32 for parameter in after)
        assert any(not torch.equal(old, new) for old, new in zip(before, after))
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


def test_command_line_overrides_every_key_with_yaml_values():
    config = parse_args(
        [
            "--max_train_steps",
            "20",
            "--warmup_steps",
            "5",
            "--crop_size",
            "256",
            "128",
            "--init_from",
            "null",
            "--report_to",
            "none",
        ]  # fmt: skip
    )
    assert config.max_train_steps == 20 and config.warmup_steps == 5
    assert config.crop_size == [256, 128]
    assert config.init_from is None
    # Without --config the demo recipe is used.
    assert Path(config.data_dir) == DEMO_DATA


# Optimisation recipe ---------------------------------------------------------------------------------


def test_evaluate_backend_offline_fails_before_training_and_names_the_streaming_backend(tmp_path):
    """Run as the user runs it: scripts/ holds an evaluate.py that must not hide the evaluate library."""
    result = subprocess.run(
        [sys.executable, "scripts/train.py", *SMALL_RUN, "--max_train_steps", "3", "--metric_backend", "evaluate",
         "--output_dir", str(tmp_path / "run")],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert result.returncode != 0
    assert "metric_backend: streaming" in result.stderr and "not the evaluate library" not in result.stderr
    assert not (tmp_path / "run" / "train_log.jsonl").exists(), "no training step may run first"


def test_schedule_is_linear_warmup_then_polynomial_decay():
    config = TrainingConfig(
        data_dir="x", warmup_steps=10, max_train_steps=100, warmup_ratio=1e-6, poly_power=1.0
    )
    # Written from the definition: poly decay (1 - t/T)^p, times a linear ramp from warmup_ratio during warm-up.
    for step in (0, 5, 10, 50, 99, 100):
        decay = (1 - step / 100) ** 1.0
        ramp = 1e-6 + (1 - 1e-6) * step / 10 if step < 10 else 1.0
        assert learning_rate_factor(step, config) == pytest.approx(decay * ramp)
    assert learning_rate_factor(0, config) == pytest.approx(1e-6)


def test_optimizer_groups_head_at_ten_times_lr_and_no_decay_on_norms_and_biases():
    model = SegformerHFForSemanticSegmentation(SegformerHFConfig.from_variant("b0", num_labels=3))
    config = TrainingConfig(data_dir="x", learning_rate=6e-5, weight_decay=0.01)
    optimizer = build_optimizer(model, config)
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    for name, parameter in model.named_parameters():
        group = group_of[id(parameter)]
        is_head = name.startswith("decode_head.")
        assert group["lr"] == pytest.approx(6e-4 if is_head else 6e-5), name
        is_norm_or_bias = name.endswith(".bias") or "norm" in name
        assert group["weight_decay"] == (0.0 if is_norm_or_bias else 0.01), name
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))


# The real command -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    """One short real run through `accelerate launch scripts/train.py`, shared by the output checks."""
    output_dir = tmp_path_factory.mktemp("run") / "out"
    result = _launch(
        [*SMALL_RUN, "--max_train_steps", "4", "--eval_steps", "2", "--output_dir", str(output_dir)]
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return output_dir, result


def test_short_run_writes_every_output_file(short_run):
    output_dir, result = short_run
    for name in (
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
        "modeling_segformer_hf.py",
        "configuration_segformer_hf.py",
        "all_results.json",
        "train_config.yaml",
        "README.md",
    ):
        assert (output_dir / name).is_file(), name
    results = json.loads((output_dir / "all_results.json").read_text())
    for key in (
        "eval_mean_iou",
        "eval_mean_accuracy",
        "eval_overall_accuracy",
        "eval_per_category_iou",
        "train_loss",
    ):
        assert key in results
    assert results["train_steps"] == 4 and results["world_size"] == 1
    assert len(results["eval_per_category_iou"]) == 11
    config = json.loads((output_dir / "config.json").read_text())
    assert config["id2label"]["3"] == "Road" and "auto_map" in config
    assert "world size 1" in result.stderr
    assert "mean IoU" in result.stdout


def test_short_run_loads_back_automodel_style_in_a_fresh_process(short_run):
    output_dir, _ = short_run
    code = (
        "import sys, torch;"
        "from transformers import AutoModelForSemanticSegmentation;"
        f"m = AutoModelForSemanticSegmentation.from_pretrained({str(output_dir)!r}, trust_remote_code=True).eval();"
        "out = m(torch.zeros(1, 3, 64, 64));"
        "assert out.logits.shape == (1, 11, 16, 16), out.logits.shape;"
        "assert 'segformer_hf' not in sys.modules;"
        "print('ok')"
    )
    env = {**os.environ, "PYTHONPATH": ""}
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=output_dir, capture_output=True, text=True, timeout=120, env=env
    )
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]


@pytest.mark.skipif(not DEMO_DATA.is_dir(), reason="bundled demo data missing")
def test_a_handful_of_images_is_overfitted(tmp_path):
    """No augmentation, 4 images, 60 steps: the loss must fall far and mean IoU must rise."""
    output_dir = tmp_path / "overfit"
    result = _launch(
        [
            *SMALL_RUN,
            "--max_train_samples",
            "4",
            "--max_eval_samples",
            "4",
            "--validation_split",
            "train",
            "--ratio_range",
            "1.0",
            "1.0",
            "--img_scale",
            "96",
            "72",
            "--crop_size",
            "72",
            "96",
            "--flip_prob",
            "0.0",
            "--photometric_distortion",
            "false",
            "--drop_path_rate",
            "0.0",
            "--classifier_dropout_prob",
            "0.0",
            "--learning_rate",
            "2e-3",
            "--warmup_steps",
            "5",
            "--max_train_steps",
            "60",
            "--eval_steps",
            "5",
            "--output_dir",
            str(output_dir),
        ]  # fmt: skip
    )
    assert result.returncode == 0, result.stderr[-4000:]
    losses = _losses(output_dir)
    first = sum(losses[s] for s in range(1, 4)) / 3
    last = sum(losses[s] for s in range(58, 61)) / 3
    assert last < 0.35 * first, (first, last)
    evaluations = [json.loads(line) for line in (output_dir / "train_log.jsonl").read_text().splitlines()]
    ious = [record["eval_mean_iou"] for record in evaluations if "eval_mean_iou" in record]
    assert ious[-1] > ious[0] + 0.15, ious


def test_resume_after_stop_reproduces_the_uninterrupted_losses(tmp_path):
    common = [*SMALL_RUN, "--max_train_steps", "8", "--eval_steps", "100", "--checkpointing_steps", "4"]
    full = tmp_path / "full"
    assert _launch([*common, "--output_dir", str(full)]).returncode == 0
    # The same run stopped for real by SIGTERM (the schedule depends on max_train_steps, so a shorter run
    # would not do): it saves a checkpoint at the next step boundary and exits cleanly. It runs without the
    # launcher (which does not forward signals), so it is given the launcher's one OpenMP thread: another
    # thread count sums in another order and changes the losses in the 4th digit.
    stopped = tmp_path / "stopped"
    process = subprocess.Popen(
        [
            sys.executable,
            "scripts/train.py",
            *common,
            "--output_dir",
            str(stopped),
        ],  # fmt: skip
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    # Stopped in the second epoch (4 steps each): resuming mid-epoch is the harder case.
    _wait_for_step(stopped, 5, process)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr[-3000:]
    assert "Interrupted by SIGTERM" in stderr
    assert list_checkpoints(stopped), "the interrupted run must leave a checkpoint"
    resumed = _launch([*common, "--output_dir", str(stopped), "--resume_from_checkpoint", "latest"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected, got = _losses(full), _losses(stopped)
    assert sorted(got) == list(range(1, 9))
    for step in range(1, 9):
        assert got[step] == pytest.approx(expected[step], rel=1e-6, abs=1e-7), (
            step,
            got[step],
            expected[step],
        )


def test_resume_mid_epoch_reproduces_the_uninterrupted_losses(tmp_path):
    """Deterministic twin of the SIGTERM test: resume from the full run's own checkpoint at step 5 (of 4-step epochs)."""
    common = [*SMALL_RUN, "--max_train_steps", "8", "--eval_steps", "100", "--checkpointing_steps", "5",
              "--checkpoints_total_limit", "3"]  # fmt: skip
    full = tmp_path / "full"
    assert _launch([*common, "--output_dir", str(full)]).returncode == 0
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / "step_00000005", resumed / "checkpoints" / "step_00000005")
    result = _launch([*common, "--output_dir", str(resumed), "--resume_from_checkpoint", "latest"])
    assert result.returncode == 0, result.stderr[-3000:]
    expected, got = _losses(full), _losses(resumed)
    assert sorted(got) == [6, 7, 8]
    for step in (6, 7, 8):
        assert got[step] == pytest.approx(expected[step], rel=1e-6, abs=1e-7), (
            step,
            got[step],
            expected[step],
        )


def test_ema_run_keeps_the_moving_average_of_the_weights_and_resumes_it(tmp_path):
    """With ema_decay the saved model is the average of the weights each step left (recomputed here from the
    definition out of every step's checkpoint), and a run resumed mid-way ends with the same average."""
    decay = 0.3  # reached at the third update: both the warm-up and the plain decay are checked
    common = [*SMALL_RUN, "--max_train_steps", "6", "--eval_steps", "3", "--checkpointing_steps", "1",
              "--checkpoints_total_limit", "10", "--ema_decay", str(decay)]  # fmt: skip
    full = tmp_path / "full"
    result = _launch([*common, "--output_dir", str(full)])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "(averaged weights)" in result.stderr
    steps = [load_file(path / "model.safetensors") for path in list_checkpoints(full)]
    assert len(steps) == 6
    expected = dict(steps[0])
    for updates, weights in enumerate(steps[1:], start=1):
        step_decay = min(decay, (1 + updates) / (10 + updates))
        for name, value in weights.items():
            if value.is_floating_point():
                expected[name] = step_decay * expected[name] + (1 - step_decay) * value
            else:
                expected[name] = value
    saved = load_file(full / "model.safetensors")
    assert saved.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(saved[name], value, rtol=1e-5, atol=1e-6, msg=name)
    # The average is not the last weights: what is checked above is not a copy.
    assert not torch.allclose(
        saved["decode_head.classifier.weight"], steps[-1]["decode_head.classifier.weight"]
    )

    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / "step_00000003", resumed / "checkpoints" / "step_00000003")
    result = _launch([*common, "--output_dir", str(resumed), "--resume_from_checkpoint", "latest"])
    assert result.returncode == 0, result.stderr[-3000:]
    resumed_weights = load_file(resumed / "model.safetensors")
    for name, value in saved.items():
        torch.testing.assert_close(resumed_weights[name], value, rtol=1e-6, atol=1e-7, msg=name)


def test_kill_9_leaves_the_last_checkpoint_intact_and_resume_latest_continues(tmp_path):
    output_dir = tmp_path / "killed"
    args = [*SMALL_RUN, "--max_train_steps", "40", "--eval_steps", "100", "--checkpointing_steps", "2"]
    process = subprocess.Popen(
        [sys.executable, "scripts/train.py", *args, "--output_dir", str(output_dir)],
        cwd=REPO_ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    _wait_for_step(output_dir, 5, process)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    checkpoints = list_checkpoints(output_dir)
    assert checkpoints, "a complete checkpoint must survive kill -9"
    last = checkpoints[-1]
    state = json.loads((last / "training_state.json").read_text())
    assert state["run_state"]["global_step"] >= 2
    resumed = _launch([*args, "--output_dir", str(output_dir), "--resume_from_checkpoint", "latest"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Resumed from {last}" in resumed.stderr
    results = json.loads((output_dir / "all_results.json").read_text())
    assert results["train_steps"] == 40


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    # An absurd learning rate makes the first update blow the weights up: step 2's loss is NaN.
    args = [*SMALL_RUN, "--max_train_steps", "6", "--warmup_steps", "0", "--checkpointing_steps", "1",
            "--eval_steps", "100", "--max_grad_norm", "null", "--learning_rate", "1e25"]  # fmt: skip
    stopped = subprocess.run(
        [sys.executable, "scripts/train.py", *args, "--output_dir", str(tmp_path / "stop")],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert stopped.returncode == 1
    assert "Non-finite loss (nan) at step 2" in stopped.stderr and "Traceback" not in stopped.stderr
    checkpoints = list_checkpoints(tmp_path / "stop")
    assert [c.name for c in checkpoints] == ["step_00000001"]
    assert f"The last good checkpoint is {checkpoints[-1]}" in stopped.stderr

    skipped = subprocess.run(
        [sys.executable, "scripts/train.py", *args, "--nan_policy", "skip", "--output_dir", str(tmp_path / "skip")],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert skipped.returncode == 0, skipped.stderr[-3000:]
    results = json.loads((tmp_path / "skip" / "all_results.json").read_text())
    assert results["train_skipped_nonfinite_steps"] >= 1 and results["train_steps"] == 6


def test_sigint_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    output_dir = tmp_path / "interrupted"
    args = [*SMALL_RUN, "--max_train_steps", "40", "--eval_steps", "100", "--checkpointing_steps", "100"]
    process = subprocess.Popen(
        [sys.executable, "scripts/train.py", *args, "--output_dir", str(output_dir)],
        cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    _wait_for_step(output_dir, 2, process)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr[-3000:]
    assert "Interrupted by SIGINT" in stderr
    [checkpoint] = list_checkpoints(output_dir)
    state = json.loads((checkpoint / "training_state.json").read_text())
    assert 2 <= state["run_state"]["global_step"] < 40


def test_push_to_hub_at_the_end_of_training_sends_the_run_in_one_commit(tmp_path, monkeypatch):
    """`--push_to_hub` goes through huggingface_hub, intercepted here (no network)."""
    from test_hub import HubRecorder

    from segformer_hf.training import main

    monkeypatch.setenv("HF_TOKEN", "hf_token_for_tests")
    recorder = HubRecorder(tmp_path / "hub")
    recorder.install(monkeypatch)
    output_dir = tmp_path / "run"
    arguments = [*SMALL_RUN, "--max_train_steps", "3", "--eval_steps", "100", "--output_dir", str(output_dir),
                 "--push_to_hub", "--hub_model_id", "someone/segformer-b0-test"]  # fmt: skip
    assert main(arguments) == 0
    commit = recorder.only_commit
    assert commit["repo_id"] == "someone/segformer-b0-test"
    sent = {path.name for path in commit["folder"].iterdir()}
    assert {"model.safetensors", "config.json", "modeling_segformer_hf.py", "configuration_segformer_hf.py",
            "preprocessor_config.json", "README.md", "all_results.json", "train_config.yaml"} <= sent  # fmt: skip
    for name in ("model.safetensors", "all_results.json"):
        assert (commit["folder"] / name).read_bytes() == (output_dir / name).read_bytes(), name
    # The uploaded card's usage snippet names the repository rather than the local directory.
    assert "someone/segformer-b0-test" in (commit["folder"] / "README.md").read_text()


def test_wandb_without_credentials_runs_offline_instead_of_prompting(tmp_path):
    environment = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    environment.update(HOME=str(tmp_path), WANDB_DIR=str(tmp_path), NETRC=str(tmp_path / "no-netrc"))
    result = subprocess.run(
        [sys.executable, "scripts/train.py", *SMALL_RUN, "--max_train_steps", "3", "--eval_steps", "2",
         "--report_to", "wandb", "--output_dir", str(tmp_path / "run")],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=240, env=environment, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "W&B runs offline" in result.stderr
    assert list((tmp_path / "wandb").glob("offline-run-*")), "W&B kept no offline run to sync"


def _wait_for_step(output_dir: Path, step: int, process: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    log = output_dir / "train_log.jsonl"
    while time.time() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"training exited early with {process.returncode}")
        if log.exists() and any(
            json.loads(line).get("step", 0) >= step for line in log.read_text().splitlines()
        ):
            return
        time.sleep(0.2)
    process.kill()
    raise AssertionError(f"step {step} not reached in {timeout} s")


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")
def test_two_process_run_frees_the_ddp_wrapper_before_destroying_the_process_group(tmp_path):
    """DDP's reducer is freed holding the GIL; with the last reference to the gloo group it would join the
    group's worker threads holding it, and hang at exit when one of them needs the GIL (seen in CI)."""
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import gc, sys\n"
        "import torch\n"
        "from accelerate import Accelerator\n"
        "from segformer_hf import training\n"
        "end_training = Accelerator.end_training\n"
        "def probed(self):\n"
        "    alive = sum(isinstance(o, torch.nn.parallel.DistributedDataParallel) for o in gc.get_objects())\n"
        "    print(f'DDP wrappers alive: {alive}', file=sys.stderr, flush=True)\n"
        "    return end_training(self)\n"
        "Accelerator.end_training = probed\n"
        "sys.exit(training.main(sys.argv[1:]))\n"
    )
    args = [
        *SMALL_RUN,
        "--max_train_steps",
        "2",
        "--eval_steps",
        "100",
        "--output_dir",
        str(tmp_path / "run"),
    ]
    result = _launch(args, num_processes=2, script=str(probe), timeout=180)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "world size 2" in result.stderr
    assert result.stderr.count("DDP wrappers alive: 0") == 2, result.stderr[-4000:]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")
def test_a_sigterm_to_one_of_two_processes_stops_both_at_the_same_step_with_one_checkpoint(tmp_path):
    """`kill` of one rank: the step's vote carries its flag to the other, which would otherwise wait in the
    next all-reduce until ddp_timeout (20 s here) and fail."""
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import os, signal, sys\n"
        "from segformer_hf import training\n"
        "optimization_step = training.optimization_step\n"
        "def probed(run, batch, interrupt=None):\n"
        "    if run.accelerator.process_index == 1 and run.state.global_step == 2:\n"
        "        os.kill(os.getpid(), signal.SIGTERM)  # before step 3's vote\n"
        "    return optimization_step(run, batch, interrupt)\n"
        "training.optimization_step = probed\n"
        "sys.exit(training.main(sys.argv[1:]))\n"
    )
    output_dir = tmp_path / "run"
    args = [*SMALL_RUN, "--max_train_steps", "40", "--eval_steps", "100", "--checkpointing_steps", "100",
            "--ddp_timeout", "20", "--output_dir", str(output_dir)]  # fmt: skip
    result = _launch(args, num_processes=2, script=str(probe), timeout=180)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "Interrupted by signal on another process at step 3" in result.stderr, result.stderr[-4000:]
    [checkpoint] = list_checkpoints(output_dir)
    assert json.loads((checkpoint / "training_state.json").read_text())["run_state"]["global_step"] == 3


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")
def test_two_process_cpu_run_is_really_distributed_and_matches_one_process_metrics(tmp_path):
    output_dir = tmp_path / "ddp"
    result = _launch(
        [
            *SMALL_RUN,
            "--max_train_steps",
            "3",
            "--eval_steps",
            "100",
            "--max_eval_samples",
            "5",
            "--output_dir",
            str(output_dir),
        ],
        num_processes=2,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "world size 2" in result.stderr
    results = json.loads((output_dir / "all_results.json").read_text())
    assert results["world_size"] == 2
    # Evaluate the same saved model in one process, with the same evaluation code path.
    from segformer_hf.evaluation import evaluate_saved_model

    single = evaluate_saved_model(output_dir, overrides=[*SMALL_RUN, "--max_eval_samples", "5"])
    assert single["mean_iou"] == pytest.approx(results["eval_mean_iou"], abs=1e-6)
    assert single["overall_accuracy"] == pytest.approx(results["eval_overall_accuracy"], abs=1e-6)
    for ours, reference in zip(single["per_category_iou"], results["eval_per_category_iou"]):
        assert (ours is None or math.isnan(ours)) == (reference is None or math.isnan(reference))
