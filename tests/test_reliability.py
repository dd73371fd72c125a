"""Reliability (issue #13): bad samples, signals, empty splits, reused and shared output directories,
changed or damaged or planted checkpoints, silent peers, impossible settings, rotated photos.

Each test fails on the code before the training redesign (69969b7) and holds now. Most runs are real
ones through `segformer_hf.training.main` in this process (what `segformer-hf train` runs); one tiny run
on a copy of the demo data with broken files is shared by the tests that only read or resume it.
"""

import contextlib
import dataclasses
import datetime
import json
import logging
import math
import multiprocessing
import os
import pickle
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from conftest import DEMO_DATA, REPO_ROOT, accelerate_launch
from PIL import Image
from safetensors.torch import load_file
from test_training import SMALL_RUN, _wait_for_step

from segformer_hf import conversion, evaluation, prediction
from segformer_hf.arguments import load_config, parse_args
from segformer_hf.checkpointing import (
    STATE_FILE,
    InterruptFlag,
    UnreadableCheckpoint,
    file_sizes,
    list_checkpoints,
)
from segformer_hf.data import (
    SegmentationEvalTransform,
    SegmentationTrainTransform,
    decode_sample,
    load_segmentation_dataset,
    normalize,
)
from segformer_hf.files import load_rgb_image
from segformer_hf.training import (
    check_resumable,
    checkpoint,
    claim_output_dir,
    create_accelerator,
    main,
    optimization_step,
    resume,
    set_up,
    training_batches,
)

pytestmark = pytest.mark.skipif(not DEMO_DATA.is_dir(), reason="bundled demo data missing")

# The demo recipe overwrites its output directory and keeps one checkpoint: these runs say what they want.
RUN = [*SMALL_RUN, "--overwrite_output_dir", "false", "--checkpoints_total_limit", "3", "--eval_steps", "100"]
# Sorted position of the training image that breaks, among the 8 used: with seed 42 it is in the first
# batch, where the zero-initialised biases make the placeholder's encoder tokens exactly zero (the
# pre-redesign code ended that run with NaN weights: "Non-finite loss (nan) at step 2").
BROKEN_TRAIN_IMAGE = 6
BROKEN_VAL_IMAGE = 1


@pytest.fixture(autouse=True)
def _info_logs(caplog):
    caplog.set_level(logging.INFO, logger="segformer_hf")


@pytest.fixture(scope="module")
def broken_data(tmp_path_factory):
    """The demo data with one truncated training image and one truncated validation image."""
    root = tmp_path_factory.mktemp("data") / "camvid-demo"
    shutil.copytree(DEMO_DATA, root)
    for split, position in (("train", BROKEN_TRAIN_IMAGE), ("val", BROKEN_VAL_IMAGE)):
        broken = sorted((root / split / "images").iterdir())[position]
        broken.write_bytes(broken.read_bytes()[:200])
    return root


def _bad_data_args(data_dir: Path, output_dir: Path) -> list[str]:
    return [*RUN, "--data_dir", str(data_dir), "--skip_bad_samples", "true", "--max_train_steps", "4",
            "--eval_steps", "2", "--checkpointing_steps", "2", "--output_dir", str(output_dir)]  # fmt: skip


@pytest.fixture(scope="module")
def trained(broken_data, tmp_path_factory):
    """4 steps with --skip_bad_samples over the broken data: checkpoints at steps 2 and 4, best/, model."""
    output_dir = tmp_path_factory.mktemp("trained") / "run"
    assert main(_bad_data_args(broken_data, output_dir)) == 0
    return output_dir


def _copy_run(output_dir: Path, destination: Path, steps: tuple[int, ...] = (2, 4)) -> Path:
    """The run's log and the named checkpoints in a new output directory (the shared run stays as it is)."""
    (destination / "checkpoints").mkdir(parents=True)
    shutil.copy(output_dir / "train_log.jsonl", destination / "train_log.jsonl")
    for step in steps:
        name = f"step_{step:08d}"
        shutil.copytree(output_dir / "checkpoints" / name, destination / "checkpoints" / name)
    return destination


def _all_finite(weights_file: Path) -> bool:
    return all(torch.isfinite(tensor).all() for tensor in load_file(weights_file).values())


@contextlib.contextmanager
def _deadline(seconds: float):
    """Raises TimeoutError in this (the main) thread if the block runs longer than `seconds`."""

    def expire(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# 1. Bad samples and non-finite values --------------------------------------------------------------------


def test_skip_bad_samples_run_ends_with_finite_weights_everywhere_and_a_sensible_metric(trained):
    results = json.loads((trained / "all_results.json").read_text())
    assert results["train_skipped_samples"] >= 1, "the broken image must have been met (and replaced)"
    assert results["train_skipped_nonfinite_steps"] == 0
    assert results["train_steps"] == 4 and math.isfinite(results["train_loss"])
    weight_files = [trained / "model.safetensors", trained / "best" / "model.safetensors"]
    weight_files += [path / "model.safetensors" for path in list_checkpoints(trained)]
    assert len(weight_files) == 4
    for weights in weight_files:
        assert _all_finite(weights), weights
    assert 0.02 < results["eval_mean_iou"] < 1 and 0 < results["eval_overall_accuracy"] <= 1


def _small_run(tmp_path: Path, *flags: str):
    config = parse_args([*RUN, "--max_train_steps", "4", "--output_dir", str(tmp_path / "run"), *flags])
    return set_up(config)


def _nan_gradients(run):
    """A finite loss with non-finite gradients, as a LayerNorm over an all-zero input produced them."""
    parameter = next(run.model.parameters())
    return parameter.register_hook(lambda grad: torch.full_like(grad, float("nan")))


def test_non_finite_gradients_are_skipped_under_nan_policy_skip(tmp_path):
    run = _small_run(tmp_path, "--nan_policy", "skip")
    batch = next(training_batches(run))
    before = {name: parameter.detach().clone() for name, parameter in run.model.named_parameters()}
    hook = _nan_gradients(run)
    assert optimization_step(run, batch), "the skipped step still counts as a step"
    assert math.isfinite(run.step_loss), "the loss itself was finite: only the gradients tell"
    assert (run.state.global_step, run.state.skipped_nonfinite_steps) == (1, 1)
    for name, parameter in run.model.named_parameters():
        assert torch.equal(parameter, before[name]), f"{name} was updated with non-finite gradients"
    hook.remove()
    assert optimization_step(run, batch) and run.state.skipped_nonfinite_steps == 1
    assert any(not torch.equal(p, before[name]) for name, p in run.model.named_parameters())


def test_a_non_finite_loss_in_one_micro_batch_skips_the_whole_accumulated_update(tmp_path):
    run = _small_run(tmp_path, "--nan_policy", "skip", "--gradient_accumulation_steps", "2")
    batches = training_batches(run)
    poisoned, clean = next(batches), next(batches)
    poisoned["pixel_values"] = poisoned["pixel_values"].clone()
    poisoned["pixel_values"][0, 0, 0, 0] = float("nan")
    before = {name: parameter.detach().clone() for name, parameter in run.model.named_parameters()}
    assert not optimization_step(run, poisoned), "a micro-batch is not a step"
    assert optimization_step(run, clean)
    assert (run.state.global_step, run.state.skipped_nonfinite_steps) == (1, 1)
    for name, parameter in run.model.named_parameters():
        assert torch.equal(parameter, before[name]), f"{name} was updated with a NaN micro-batch in the step"
    # The poisoned gradients were dropped with the update: the next step trains normally.
    assert not optimization_step(run, next(batches)) and optimization_step(run, next(batches))
    assert run.state.skipped_nonfinite_steps == 1 and math.isfinite(run.step_loss)
    assert any(not torch.equal(p, before[name]) for name, p in run.model.named_parameters())


def test_non_finite_gradients_stop_the_run_naming_a_checkpoint_with_finite_weights(tmp_path):
    run = _small_run(tmp_path, "--nan_policy", "stop")
    batches = training_batches(run)
    optimization_step(run, next(batches))
    checkpoint(run)
    hook = _nan_gradients(run)
    with pytest.raises(FloatingPointError, match="Non-finite gradients .* at step 2") as stopped:
        optimization_step(run, next(batches))
    named = Path(re.search(r"The last good checkpoint is (\S+)\. ", str(stopped.value))[1])
    assert named == tmp_path / "run" / "checkpoints" / "step_00000001"
    assert _all_finite(named / "model.safetensors")
    hook.remove()
    # Weights that did turn non-finite are never saved as a checkpoint.
    with torch.no_grad():
        next(run.model.parameters()).fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="no checkpoint is saved"):
        checkpoint(run)
    assert list_checkpoints(tmp_path / "run") == [named]


# 2. SIGTERM to the whole process group -------------------------------------------------------------------


def _launch_command(args: list[str]) -> list[str]:
    return [*accelerate_launch(), "scripts/train.py", *args]


def _live_processes_in_group(pgid: int) -> list[tuple[int, str]]:
    """(pid, command) of the processes of group `pgid` that are still running (zombies excluded)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            text = stat.read_text()
            state, _, group = text[text.rindex(")") + 2 :].split()[:3]
            if int(group) == pgid and state != "Z":
                found.append((int(stat.parent.name), text[text.index("(") + 1 : text.rindex(")")]))
    return found


def _wait_for_group_size(
    pgid: int, size: int, process: subprocess.Popen, timeout: float = 60
) -> list[tuple[int, str]]:
    """The live members of group `pgid` once there are `size` of them (or what is there at the deadline)."""
    deadline = time.time() + timeout
    members = _live_processes_in_group(pgid)
    while len(members) < size and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
        members = _live_processes_in_group(pgid)
    return members


def test_sigterm_to_the_launchers_process_group_saves_a_checkpoint_and_leaves_no_process(tmp_path, caplog):
    """What `timeout`, Slurm and Ctrl-C do: signal every process of the group, DataLoader workers included.

    Before accelerate 1.16 its one-process launcher had no handler: it died at once (-SIGTERM) and the
    trainer, reparented, finished its step, saved a checkpoint and exited with 0. From 1.16 the launcher
    handles the signal: it sends the trainer and its workers a SIGTERM of its own, SIGKILLs what is left 5 s
    later and exits with 128 + 15; the trainer must take that second SIGTERM as the same request (it once
    took it for "stop now" and died without a checkpoint). Either way the workers ignore the signals (before,
    they died first and the trainer crashed without a checkpoint).
    """
    output_dir = tmp_path / "run"
    args = [*RUN, "--dataloader_num_workers", "2", "--max_train_steps", "12", "--checkpointing_steps", "100",
            "--output_dir", str(output_dir)]  # fmt: skip
    launcher = subprocess.Popen(
        _launch_command(args), cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    group = os.getpgid(launcher.pid)
    try:
        _wait_for_step(output_dir, 2, launcher)
        # Each epoch (4 steps here) starts new workers: wait for a moment when they are alive, since a busy
        # machine can delay this check into the gap between two epochs.
        members = _wait_for_group_size(group, 4, launcher)
        assert len(members) >= 4, f"expected launcher, trainer and 2 DataLoader workers, found {members}"
        os.killpg(group, signal.SIGTERM)
        # The trainer and its workers hold the launcher's pipes: they are closed when the last one exits.
        _, stderr = launcher.communicate(timeout=180)
    finally:
        with contextlib.suppress(ProcessLookupError):
            left = _live_processes_in_group(group)
            if left:
                os.killpg(group, signal.SIGKILL)
    assert not left, f"processes left running after SIGTERM: {left}"
    assert launcher.returncode in (-signal.SIGTERM, 128 + signal.SIGTERM), launcher.returncode
    assert "Interrupted by SIGTERM" in stderr, stderr[-3000:]
    assert "Traceback" not in stderr and "DataLoader worker" not in stderr, stderr[-3000:]
    [saved] = list_checkpoints(output_dir)
    step = json.loads((saved / STATE_FILE).read_text())["run_state"]["global_step"]
    assert 2 <= step < 12
    assert main([*args, "--dataloader_num_workers", "0", "--resume_from_checkpoint", "latest"]) == 0
    assert f"Resumed from {saved} at step {step}" in caplog.text
    assert json.loads((output_dir / "all_results.json").read_text())["train_steps"] == 12


def test_a_repeated_sigterm_is_the_same_stop_request_and_a_second_ctrl_c_stops_at_once():
    """Launchers forward the group's signal (accelerate >= 1.16 sends the trainer its own SIGTERM after the
    group's, or after a Ctrl-C): the trainer must keep saving. Only a person pressing Ctrl-C again means now."""
    for first in (signal.SIGTERM, signal.SIGINT):
        with InterruptFlag() as flag:
            os.kill(os.getpid(), first)
            os.kill(os.getpid(), signal.SIGTERM)  # the launcher's own, on top of the group's
            time.sleep(0.05)  # handlers run between bytecodes of the main thread
            assert flag.raised and flag.signal_name == first.name
    # A second Ctrl-C goes to the handler from before the flag: Python's own, as in a terminal (a test
    # process may have been given another, e.g. SIG_IGN by an earlier test's library).
    outer_handler = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt), InterruptFlag() as flag:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
            assert flag.signal_name == "SIGINT"
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers given back
    finally:
        signal.signal(signal.SIGINT, outer_handler)


# A small loader over plain integers: what the data pipeline's workers do with signals, without a model.
_LOADER_SETUP = """
import signal, sys
import datasets
from segformer_hf.data import build_train_dataloader
dataset = datasets.Dataset.from_dict({"value": list(range(8))})
loader = build_train_dataloader(
    dataset, lambda batch: batch, batch_size=2, num_workers=2, seed=0,
    collate_fn=lambda rows: [row["value"] for row in rows],
)
"""


def _start_loader_script(script: str) -> subprocess.Popen:
    """`script` (which starts with `_LOADER_SETUP`) in a new Python process leading its own process group."""
    return subprocess.Popen(
        [sys.executable, "-c", script], cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip


def test_workers_started_while_the_group_is_being_signalled_survive():
    """A SIGTERM that reaches a new worker before its `worker_init_fn` ran must not kill it.

    Each epoch forks new workers; here the whole process group receives a SIGTERM every millisecond while
    40 epochs run. Before, PyTorch's worker handler (installed before `worker_init_fn`) let such a signal
    kill the worker ("DataLoader worker ... is killed by signal: Terminated"), which is how a SIGTERM to a
    training's process group could crash it instead of saving a checkpoint.
    """
    script = (
        _LOADER_SETUP
        + """
received = []
signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
print("ready", flush=True)
for epoch in range(40):
    assert sorted(value for batch in loader for value in batch) == list(range(8))
# Python's finalisation puts the default handler back: ignore the storm from here on, for a clean exit.
signal.signal(signal.SIGTERM, signal.SIG_IGN)
print(f"done, {len(received)} signals received", flush=True)
"""
    )
    process = _start_loader_script(script)
    group = os.getpgid(process.pid)
    try:
        assert process.stdout.readline().strip() == "ready", process.stderr.read()[-3000:]
        while process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(group, signal.SIGTERM)
            time.sleep(0.001)
        stdout, stderr = process.communicate(timeout=60)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signal.SIGKILL)
    assert process.returncode == 0, stderr[-3000:]
    received = int(re.search(r"done, (\d+) signals received", stdout).group(1))
    assert received > 40, f"the storm did not reach the main process: {received} signals"


def test_an_unclosed_loader_does_not_hang_the_interpreters_exit():
    """At exit Python's multiprocessing sends every daemonic child a SIGTERM, then waits for it.

    A worker that ignored every SIGTERM (as workers did, to survive a group's signal) then hung its parent's
    exit for ever whenever a loader was left unclosed, e.g. by an exception escaping the training loop.
    Workers now tell their parent's SIGTERM from anyone else's.
    """
    script = (
        _LOADER_SETUP
        + """
unclosed = iter(loader)
next(unclosed)
print("exiting", flush=True)
"""
    )
    process = _start_loader_script(script)
    group = os.getpgid(process.pid)
    try:
        stdout, stderr = process.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("the interpreter's exit hung waiting for DataLoader workers that ignored its SIGTERM")
    finally:
        left = _live_processes_in_group(group)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signal.SIGKILL)
    assert process.returncode == 0 and "exiting" in stdout, stderr[-3000:]
    assert not left, f"processes left running: {left}"


# 3. No training batch -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--max_train_samples", "1"], "The training split has 1 samples, fewer than one batch of 2"),
        (["--max_train_samples", "0"], "max_train_samples must be >= 1"),
    ],
)
def test_no_training_batch_is_an_error_at_once_not_an_endless_loop(tmp_path, flags, message, caplog, capsys):
    output_dir = tmp_path / "run"
    with _deadline(60):
        code = main([*RUN, "--max_train_steps", "3", *flags, "--output_dir", str(output_dir)])
    assert code == 2
    assert message in caplog.text + capsys.readouterr().err
    assert not (output_dir / "train_log.jsonl").exists()


# 4. overwrite_output_dir ----------------------------------------------------------------------------------


def _logged_steps(output_dir: Path, key: str = "loss") -> list[int]:
    records = [json.loads(line) for line in (output_dir / "train_log.jsonl").read_text().splitlines()]
    return [record["step"] for record in records if key in record]


def test_overwrite_output_dir_starts_clean_and_latest_resumes_the_new_run(tmp_path, caplog):
    output_dir = tmp_path / "run"
    first = [*RUN, "--max_train_steps", "6", "--checkpointing_steps", "3", "--output_dir", str(output_dir)]
    assert main(first) == 0
    assert [path.name for path in list_checkpoints(output_dir)] == ["step_00000003", "step_00000006"]
    (output_dir / "notes.txt").write_text("left by the first run")
    second = [*RUN, "--max_train_steps", "4", "--checkpointing_steps", "2", "--output_dir", str(output_dir)]
    assert main(second) == 1, "a non-empty output_dir without overwrite or resume is refused"
    assert "is not empty" in caplog.text
    assert main([*second, "--overwrite_output_dir", "true"]) == 0
    assert [path.name for path in list_checkpoints(output_dir)] == ["step_00000002", "step_00000004"]
    assert _logged_steps(output_dir) == [1, 2, 3, 4]
    assert _logged_steps(output_dir, "eval_mean_iou") == [4]
    assert not (output_dir / "notes.txt").exists()
    assert sorted(path.name for path in tmp_path.iterdir()) == [".run.lock", "run"], (
        "nothing set aside is left"
    )
    caplog.clear()
    assert main([*second, "--resume_from_checkpoint", "latest"]) == 0
    assert f"Resumed from {output_dir / 'checkpoints' / 'step_00000004'} at step 4" in caplog.text


# 5. Resuming with other settings ---------------------------------------------------------------------------


def test_resuming_with_another_learning_rate_or_batch_size_is_refused_listing_the_differences(
    trained, broken_data, tmp_path, caplog
):
    output_dir = _copy_run(trained, tmp_path / "run")
    changed = ["--learning_rate", "0.5", "--per_device_train_batch_size", "4", "--max_train_steps", "8"]
    code = main([*_bad_data_args(broken_data, output_dir), *changed, "--resume_from_checkpoint", "latest"])
    assert code == 2
    assert "Cannot resume from" in caplog.text
    assert "learning_rate: 0.001 in the checkpoint, 0.5 now" in caplog.text
    assert "per_device_train_batch_size: 2 in the checkpoint, 4 now" in caplog.text
    # The schedule decays over max_train_steps: a longer run is another run, not a continuation.
    assert "max_train_steps: 4 in the checkpoint, 8 now" in caplog.text
    assert "Resumed from" not in caplog.text


def test_where_and_how_a_run_reports_may_change_on_resume():
    saved = load_config(None, {"data_dir": "d", "model_variant": "b0"}).to_dict()
    allowed = {"report_to": "tensorboard", "eval_steps": 7, "checkpointing_steps": 3, "logging_steps": 2,
               "dataloader_num_workers": 0, "max_eval_samples": 2, "output_dir": "elsewhere"}  # fmt: skip
    check_resumable(load_config(None, {**saved, **allowed}), saved, Path("checkpoint"))
    for key, value in {"seed": 1, "crop_size": [32, 32], "gradient_accumulation_steps": 2}.items():
        with pytest.raises(ValueError, match=f"{key}: "):
            check_resumable(load_config(None, {**saved, key: value}), saved, Path("checkpoint"))


# 6. Code planted in a checkpoint never runs ------------------------------------------------------------------


class _Payload:
    """Unpickling this creates `marker`: what an attacker's code would do instead."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').close()",)


@pytest.fixture(scope="module")
def resumable_run(trained, broken_data, tmp_path_factory):
    """A set-up run with the shared run's settings, in a directory the tests fill with checkpoints."""
    output_dir = tmp_path_factory.mktemp("resumable") / "run"
    return set_up(parse_args(_bad_data_args(broken_data, output_dir)))


def _resume_from(run, spec: str) -> None:
    run.config = dataclasses.replace(run.config, resume_from_checkpoint=spec)
    resume(run)


@pytest.mark.parametrize("pickler", ["torch.save", "pickle.dump"])
def test_a_payload_planted_in_any_checkpoint_file_never_runs(trained, resumable_run, tmp_path, pickler):
    """Every file in turn, and files accelerate would pick up if present; the recorded sizes are made to
    match, as an attacker would, so that only how each file is read stands between the payload and a run."""
    source = trained / "checkpoints" / "step_00000004"
    targets = [*sorted(path.name for path in source.iterdir()), "custom_checkpoint_0.pkl", "scheduler.bin",
               "sampler.bin", "pytorch_model.bin"]  # fmt: skip
    assert {"model.safetensors", "optimizer.bin", "random_states_0.pkl", STATE_FILE} <= set(targets)
    pickle.loads(pickle.dumps(_Payload(tmp_path / "works")))
    assert (tmp_path / "works").exists(), "the payload runs when unpickled without restrictions"
    refused = {}
    for target in targets:
        marker = tmp_path / f"ran-{target}"
        planted = tmp_path / target / "step_00000004"
        shutil.copytree(source, planted)
        with open(planted / target, "wb") as file:
            (torch.save if pickler == "torch.save" else pickle.dump)(_Payload(marker), file)
        if target != STATE_FILE:
            state = json.loads((planted / STATE_FILE).read_text())
            state["file_sizes"] = {k: v for k, v in file_sizes(planted).items() if k in state["file_sizes"]}
            (planted / STATE_FILE).write_text(json.dumps(state))
        try:
            _resume_from(resumable_run, str(planted))
        except UnreadableCheckpoint as error:
            refused[target] = str(error)
        assert not marker.exists(), f"the payload in {target} ran"
    assert {"model.safetensors", "optimizer.bin", STATE_FILE, "custom_checkpoint_0.pkl"} <= set(refused)
    assert "Weights only load failed" in refused["optimizer.bin"] or "Unsupported" in refused["optimizer.bin"]
    # The unplanted checkpoint resumes: the refusals above are the payloads', not the set-up's.
    _resume_from(resumable_run, str(source))
    assert resumable_run.state.global_step == 4


# 7. Two trainings in one output directory ---------------------------------------------------------------------


def test_a_second_training_in_the_same_output_dir_fails_at_once(tmp_path, caplog):
    arguments = [*RUN, "--max_train_steps", "2", "--output_dir", str(tmp_path / "run")]
    with claim_output_dir(parse_args(arguments)):  # what a first, running training holds
        started = time.time()
        assert main(arguments) == 1
    assert time.time() - started < 10
    assert f"Another training run is writing to {tmp_path / 'run'}" in caplog.text
    assert not (tmp_path / "run" / "train_log.jsonl").exists()


# 8. A peer that stops answering -------------------------------------------------------------------------------


def _gloo_accelerator(rank: int, port: int, ddp_timeout: int) -> Accelerator:
    """In a forked process: rank `rank` of a 2-process gloo group made by the training's own `create_accelerator`."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # forked: forget the parent's single process
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))  # fmt: skip
    return create_accelerator(
        load_config(None, {"data_dir": "d", "model_variant": "b0", "ddp_timeout": ddp_timeout})
    )


def _run_two_ranks(target: Callable, answers: int) -> list:
    """Runs `target(rank, port, results)` in two forked processes; returns the first `answers` results they put."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    processes = [context.Process(target=target, args=(rank, port, results)) for rank in (0, 1)]
    for process in processes:
        process.start()
    try:
        return [results.get(timeout=90) for _ in range(answers)]
    finally:
        for process in processes:
            process.join(timeout=1)
            process.kill()
            process.join()


def _silent_peer_rank(rank: int, port: int, results) -> None:
    """Rank 1 never joins the collective; rank 0 reports how its all-reduce ended and after how long."""
    accelerator = _gloo_accelerator(rank, port, ddp_timeout=3)
    if rank == 1:
        time.sleep(120)  # stops answering: never joins the collective
        return
    started = time.time()
    try:
        accelerator.reduce(torch.ones(1), reduction="sum")
        results.put(("completed", time.time() - started))
    except RuntimeError as error:
        results.put((str(error), time.time() - started))


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")
def test_ddp_timeout_ends_a_collective_whose_peer_stopped_answering():
    """`ddp_timeout` reaches the process group: a collective waits that long for a silent peer (3 s here,
    not the 30 minutes of the default), then fails with gloo's message (which names no rank)."""
    [(message, waited)] = _run_two_ranks(_silent_peer_rank, answers=1)
    assert "Timed out" in message and "3000ms" in message, message
    assert 2.5 < waited < 30


def _voting_rank(rank: int, port: int, results) -> None:
    """Only rank 0 gets a SIGTERM; then both ask whether any process got one."""
    accelerator = _gloo_accelerator(rank, port, ddp_timeout=60)
    with InterruptFlag() as flag:
        before = flag.raised_on_any_process(accelerator.device)
        if rank == 0:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)  # handlers run between bytecodes of the main thread
        after = flag.raised_on_any_process(accelerator.device)
    results.put((rank, before, flag.raised, after))


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")
def test_a_signal_that_reaches_one_process_stops_every_process_at_the_same_step():
    """Signals may reach the processes of a run at different steps (or one only: `kill` of one rank): the
    Trainer callback's step-end vote tells every process to save and stop. (The training loop's vote rides in
    its step's all-reduce: test_training's SIGTERM to one of two processes.)"""
    answers = sorted(_run_two_ranks(_voting_rank, answers=2))
    # rank, any process before the signal, this process's own flag, any process after the signal
    assert answers == [(0, False, True, True), (1, False, False, True)]


def test_ddp_timeout_is_the_process_group_timeout_accelerate_is_given():
    config = load_config(None, {"data_dir": "d", "model_variant": "b0", "ddp_timeout": 42})
    accelerator = create_accelerator(config)
    assert accelerator.init_handler.timeout == datetime.timedelta(seconds=42)
    with pytest.raises(ValueError, match="ddp_timeout must be > 0"):
        load_config(None, {"data_dir": "d", "model_variant": "b0", "ddp_timeout": 0})


# 9. Settings checked before training --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--eval_stride", "32"], "stride must be two positive sides, got [32]"),
        (["--eval_mode", "slide", "--eval_stride", "32", "32", "32"], "stride must be two positive sides"),
        (["--model_variant", "b7"], "model_variant must be one of b0, b1, b2, b3, b4, b5, got 'b7'"),
        (["--learning_rate", "nan"], "learning_rate must be a finite number > 0, got nan"),
        (["--learning_rate", "inf"], "learning_rate must be a finite number > 0, got inf"),
        (["--max_eval_samples", "0"], "max_eval_samples must be >= 1"),
    ],
)
def test_impossible_settings_exit_2_before_any_work(tmp_path, flags, message, capsys):
    assert main([*RUN, *flags, "--output_dir", str(tmp_path / "run")]) == 2
    error = capsys.readouterr().err
    assert message in error and "Traceback" not in error
    assert not (tmp_path / "run").exists()


def test_push_without_a_token_fails_before_any_training(tmp_path, monkeypatch, caplog):
    import huggingface_hub

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    output_dir = tmp_path / "run"
    code = main([*RUN, "--max_train_steps", "2", "--push_to_hub", "true", "--hub_model_id", "someone/model",
                 "--output_dir", str(output_dir)])  # fmt: skip
    assert code == 2
    assert "no Hugging Face token was found" in caplog.text
    assert not (output_dir / "train_log.jsonl").exists()


# 10. Messages, not tracebacks ----------------------------------------------------------------------------------


def _pairs_copy(tmp_path: Path, name: str) -> Path:
    root = tmp_path / name
    shutil.copytree(DEMO_DATA, root)
    return root


def test_config_that_is_not_yaml_or_not_a_file_exits_2_with_a_message(tmp_path, capsys):
    broken = tmp_path / "broken.yaml"
    broken.write_text("model_variant: b0\ncrop_size: [64, 64\n")
    assert main(["--config", str(broken)]) == 2
    assert "is not valid YAML" in capsys.readouterr().err
    assert main(["--config", str(tmp_path)]) == 2
    assert "is a directory, not a recipe YAML file" in capsys.readouterr().err


def _no_label(root: Path) -> None:
    next((root / "train" / "labels").iterdir()).unlink()


def _empty_validation(root: Path) -> None:
    for path in (*(root / "val" / "images").iterdir(), *(root / "val" / "labels").iterdir()):
        path.unlink()


@pytest.mark.parametrize(
    "damage, message",
    [
        (_no_label, "1 image(s) have no label map of the same stem"),
        (_empty_validation, "Split 'val' of"),
        (shutil.rmtree, "does not exist or is not a directory"),
    ],
)
def test_data_that_cannot_train_exits_2_with_a_message(tmp_path, damage, message, caplog):
    data_dir = _pairs_copy(tmp_path, "data")
    damage(data_dir)
    output_dir = tmp_path / "run"
    assert main([*RUN, "--data_dir", str(data_dir), "--output_dir", str(output_dir)]) == 2
    assert message in caplog.text
    assert not (output_dir / "train_log.jsonl").exists()


def test_output_dir_under_a_file_exits_1_with_a_message(tmp_path, caplog):
    (tmp_path / "file").write_text("not a directory")
    for output_dir in (tmp_path / "file" / "run", tmp_path / "file" / "deeper" / "run"):
        assert main([*RUN, "--output_dir", str(output_dir)]) == 1
        assert f"{tmp_path / 'file'} is a file" in caplog.text


@pytest.mark.parametrize("damaged", ["optimizer.bin", "model.safetensors", "random_states_0.pkl", STATE_FILE])
def test_a_truncated_checkpoint_file_falls_back_to_the_previous_checkpoint(
    trained, resumable_run, tmp_path, damaged, caplog
):
    output_dir = _copy_run(trained, tmp_path / "run")
    newest = output_dir / "checkpoints" / "step_00000004"
    (newest / damaged).write_bytes((newest / damaged).read_bytes()[:100])
    resumable_run.config = dataclasses.replace(resumable_run.config, output_dir=str(output_dir))
    _resume_from(resumable_run, "latest")
    assert resumable_run.state.global_step == 2
    assert f"Resumed from {output_dir / 'checkpoints' / 'step_00000002'} at step 2" in caplog.text
    [warning] = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert warning.startswith(str(newest)), warning
    assert warning.endswith(f"resuming from {output_dir / 'checkpoints' / 'step_00000002'} instead"), warning


def test_a_run_resumed_past_a_truncated_checkpoint_finishes_and_all_damaged_is_a_message(
    trained, broken_data, tmp_path, caplog
):
    output_dir = _copy_run(trained, tmp_path / "run")
    optimizer = output_dir / "checkpoints" / "step_00000004" / "optimizer.bin"
    optimizer.write_bytes(optimizer.read_bytes()[:1000])
    arguments = [*_bad_data_args(broken_data, output_dir), "--resume_from_checkpoint", "latest"]
    assert main(arguments) == 0
    assert "step_00000004 is damaged: optimizer.bin (1000 of" in caplog.text
    assert json.loads((output_dir / "all_results.json").read_text())["train_steps"] == 4
    for step in (2, 4):
        (output_dir / "checkpoints" / f"step_{step:08d}" / "model.safetensors").write_bytes(b"")
    caplog.clear()
    assert main(arguments) == 2
    assert "No checkpoint could be loaded" in caplog.text and "step_00000002 is damaged" in caplog.text


def test_resume_latest_without_a_checkpoint_exits_2_with_a_message(tmp_path, caplog):
    arguments = [*RUN, "--output_dir", str(tmp_path / "run"), "--resume_from_checkpoint", "latest"]
    assert main(arguments) == 2
    assert "--resume_from_checkpoint latest: no complete checkpoint in" in caplog.text


def test_convert_of_a_file_that_is_not_a_checkpoint_exits_2_with_a_message(tmp_path, capsys):
    source = tmp_path / "weights.pth"
    source.write_bytes(b"not a checkpoint")
    assert conversion.main(["--source", str(source), "--output", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert f"cannot convert {source}" in error and "Traceback" not in error
    assert not (tmp_path / "out").exists()


def test_evaluate_output_that_is_a_directory_is_refused_before_the_evaluation(tmp_path, capsys):
    # The model does not even exist: the --output check must come before anything is loaded.
    arguments = ["--model", str(tmp_path / "no-model"), "--data_dir", str(DEMO_DATA), "--split", "val",
                 "--output", str(tmp_path)]  # fmt: skip
    assert evaluation.main(arguments) == 2
    assert f"--output {tmp_path} is a directory" in capsys.readouterr().err


def test_predict_output_that_is_a_file_is_refused(trained, tmp_path, capsys):
    (tmp_path / "out.png").write_bytes(b"")
    image = sorted((DEMO_DATA / "val" / "images").iterdir())[0]
    arguments = [str(image), "--model", str(trained), "--output", str(tmp_path / "out.png")]
    assert prediction.main(arguments) == 2
    assert "is a file; give a directory" in capsys.readouterr().err


# 11. Counting, orientation, leftovers, logs ---------------------------------------------------------------------


def test_eval_samples_counts_only_the_samples_evaluated(trained):
    results = json.loads((trained / "all_results.json").read_text())
    assert results["eval_samples"] == 3, "4 validation samples, one of them unreadable and skipped"
    evaluations = [json.loads(line) for line in (trained / "train_log.jsonl").read_text().splitlines()]
    assert {record["eval_num_samples"] for record in evaluations if "eval_num_samples" in record} == {3}


def _upright_picture(height: int = 48, width: int = 64) -> np.ndarray:
    """A smooth picture with no symmetry (JPEG keeps it close), brighter to the right and to the bottom."""
    rows, columns = np.mgrid[0:height, 0:width]
    return np.stack([columns * 255 // width, rows * 255 // height, 128 + 0 * rows], -1).astype(np.uint8)


@pytest.fixture(scope="module")
def rotated_photo(tmp_path_factory):
    """A camera JPEG stored sideways with EXIF Orientation 6 ("rotate 90 degrees clockwise to view"),
    in a pairs data directory whose label map is drawn on the upright picture."""
    root = tmp_path_factory.mktemp("exif") / "data"
    upright = _upright_picture()
    labels = np.where(np.arange(64) < 32, 0, 3)[None, :].repeat(48, 0).astype(np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6
    for split in ("train", "val"):
        (root / split / "images").mkdir(parents=True)
        (root / split / "labels").mkdir(parents=True)
        # Stored 90 degrees counter-clockwise: the viewer's clockwise turn makes it upright again.
        Image.fromarray(np.rot90(upright).copy()).save(
            root / split / "images" / "photo.jpg", exif=exif, quality=95
        )
        Image.fromarray(labels).save(root / split / "labels" / "photo.png")
    return root / "val" / "images" / "photo.jpg", root, upright


def test_exif_orientation_is_applied_by_training_and_evaluation_decoding_like_transformers(rotated_photo):
    from transformers.image_utils import load_image

    photo, root, upright = rotated_photo
    reference = np.asarray(load_image(str(photo)))  # what transformers' pipeline sees
    assert reference.shape == upright.shape and np.abs(reference.astype(int) - upright).mean() < 4
    np.testing.assert_array_equal(np.asarray(load_rgb_image(photo)), reference)
    label = root / "val" / "labels" / "photo.png"
    image, _ = decode_sample({"bytes": None, "path": str(photo)}, {"bytes": None, "path": str(label)},
                             sample_index=0, sample_id="photo", num_labels=11, ignore_index=11,
                             reduce_labels=False)  # fmt: skip
    np.testing.assert_array_equal(image, reference)
    splits = load_segmentation_dataset(data_dir=root, validation_split="val")
    evaluated = splits["validation"].with_transform(
        SegmentationEvalTransform(img_scale=None, ignore_index=11, num_labels=11)
    )[0]
    np.testing.assert_array_equal(evaluated["pixel_values"].numpy(), normalize(reference))
    crop = splits["train"].with_transform(
        SegmentationTrainTransform(crop_size=(48, 64), img_scale=(64, 48), ratio_range=(1.0, 1.0),
                                   flip_prob=0.0, photometric_distortion=False, ignore_index=11, num_labels=11)
    )[0]  # fmt: skip
    assert not crop["skipped"] and crop["pixel_values"].shape == (3, 48, 64)
    np.testing.assert_allclose(crop["pixel_values"].numpy(), normalize(reference), atol=0.1)


def test_exif_orientation_is_applied_by_predict_and_the_transformers_pipeline_alike(
    rotated_photo, trained, tmp_path
):
    from transformers import pipeline
    from transformers.image_utils import load_image

    photo, _, _ = rotated_photo
    # The upright pixels as transformers decodes them, stored losslessly and without an orientation tag.
    lossless = tmp_path / "upright" / "photo.png"
    lossless.parent.mkdir()
    load_image(str(photo)).save(lossless)
    for source, output in ((photo, tmp_path / "from-jpeg"), (lossless, tmp_path / "from-png")):
        assert prediction.main([str(source), "--model", str(trained), "--output", str(output)]) == 0
    from_jpeg = np.asarray(Image.open(tmp_path / "from-jpeg" / "photo_mask.png"))
    assert from_jpeg.shape == (48, 64)
    np.testing.assert_array_equal(from_jpeg, np.asarray(Image.open(tmp_path / "from-png" / "photo_mask.png")))
    segmenter = pipeline("image-segmentation", model=str(trained), trust_remote_code=True)
    from_pipeline = {segment["label"]: np.asarray(segment["mask"]) for segment in segmenter(str(photo))}
    assert all(mask.shape == (48, 64) for mask in from_pipeline.values())
    from_png = {segment["label"]: np.asarray(segment["mask"]) for segment in segmenter(str(lossless))}
    assert from_pipeline.keys() == from_png.keys()
    for name, mask in from_pipeline.items():
        np.testing.assert_array_equal(mask, from_png[name])


@pytest.fixture(scope="module")
def resumed_after_crash(trained, broken_data, tmp_path_factory):
    """A run killed after logging step 4 but before its checkpoint 4 was complete: the log has steps 1..4
    and the step 2 and step 4 evaluations, checkpoints/ has step 2 and the unfinished `.tmp-step_00000004`."""
    output_dir = _copy_run(trained, tmp_path_factory.mktemp("crashed") / "run", steps=(2,))
    leftover = output_dir / "checkpoints" / ".tmp-step_00000004"
    leftover.mkdir()
    (leftover / "optimizer.bin").write_bytes(b"half")
    assert main([*_bad_data_args(broken_data, output_dir), "--resume_from_checkpoint", "latest"]) == 0
    return output_dir


def test_unfinished_checkpoints_of_a_killed_run_are_removed_on_resume(resumed_after_crash):
    assert not list((resumed_after_crash / "checkpoints").glob(".tmp-*"))
    assert [path.name for path in list_checkpoints(resumed_after_crash)] == ["step_00000002", "step_00000004"]


def test_steps_logged_again_after_a_resume_appear_once(resumed_after_crash):
    assert _logged_steps(resumed_after_crash) == [1, 2, 3, 4]
    assert _logged_steps(resumed_after_crash, "eval_mean_iou") == [2, 4]
