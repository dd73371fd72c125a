"""What lets a run stop and continue: checkpoints written atomically, found again, and signals turned into a
clean stop.

A checkpoint is `output_dir/checkpoints/step_NNNNNNNN/`: Accelerate's model, optimiser and RNG states
(safetensors, and tensors-only files that load with `weights_only=True`) plus `training_state.json` with
the run's own state, the learning-rate schedule as JSON and the size of every other file. Nothing in it is
an unrestricted pickle, so resuming never runs code stored in a checkpoint; a file whose size differs
from the recorded one (a truncated copy, a full disk) makes the checkpoint unreadable, and `latest` then
falls back to the one before it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from .files import write_json_atomic

logger = logging.getLogger(__name__)

CHECKPOINT_PATTERN = re.compile(r"^step_(\d+)$")
STATE_FILE = "training_state.json"


class UnreadableCheckpoint(ValueError):
    """A checkpoint whose files are missing, truncated or do not load."""


@dataclass
class RunState:
    """What a checkpoint must remember beyond model/optimiser/RNG (which Accelerate saves)."""

    global_step: int = 0
    best_mean_iou: float | None = None
    best_step: int | None = None
    skipped_samples: int = 0
    skipped_nonfinite_steps: int = 0
    loss_sum: float = 0.0
    loss_count: int = 0


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints under `output_dir/checkpoints`, oldest first (temporary dirs are ignored)."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m[1]), p) for p in root.iterdir() if p.is_dir() and (m := CHECKPOINT_PATTERN.match(p.name))]
    return [p for _, p in sorted(found) if (p / STATE_FILE).exists()]


def resolve_checkpoint(spec: str, output_dir: str | os.PathLike) -> Path:
    """`latest` -> newest complete checkpoint in the output dir; otherwise a path that must exist."""
    return checkpoints_to_try(spec, output_dir)[0]


def checkpoints_to_try(spec: str, output_dir: str | os.PathLike) -> list[Path]:
    """`latest` -> the complete checkpoints in the output dir, newest first; a path -> that one only."""
    if spec == "latest":
        checkpoints = list_checkpoints(output_dir)
        if not checkpoints:
            raise FileNotFoundError(
                f"--resume_from_checkpoint latest: no complete checkpoint in {output_dir}/checkpoints"
            )
        return checkpoints[::-1]
    path = Path(spec)
    if not (path / STATE_FILE).exists():
        raise FileNotFoundError(f"{spec} is not a complete segformer_hf checkpoint (no {STATE_FILE})")
    return [path]


def load_checkpoint(
    accelerator: Accelerator,
    spec: str,
    output_dir: str | os.PathLike,
    check: Callable[[Path, dict[str, Any]], None],
) -> tuple[Path, dict[str, Any]]:
    """Loads model, optimiser and RNG states into `accelerator` from the checkpoint `spec` names; returns
    it with its JSON payload. `check(checkpoint, payload)` runs before anything is loaded (its errors end
    the resume: a checkpoint of another run is not a damaged one).

    A checkpoint that cannot be read (a missing or truncated file, a state that does not load) is
    reported, and with `latest` the one before it is tried: a damaged last checkpoint costs the steps
    since the previous one, not the run. The checkpoint that does load overwrites whatever a failed one
    had loaded already.

    Raises:
        UnreadableCheckpoint: no candidate could be loaded (each one's reason listed).
    """
    candidates = checkpoints_to_try(spec, output_dir)
    failures = []
    for checkpoint, earlier in zip(candidates, [*candidates[1:], None]):
        try:
            payload = read_checkpoint_payload(checkpoint)
            check(checkpoint, payload)
            _load_state(accelerator, checkpoint)
            return checkpoint, payload
        except UnreadableCheckpoint as error:
            failures.append(str(error))
            if earlier is not None:
                logger.warning("%s; resuming from %s instead", error, earlier)
    raise UnreadableCheckpoint("No checkpoint could be loaded:\n  - " + "\n  - ".join(failures))


def _load_state(accelerator: Accelerator, checkpoint: Path) -> None:
    try:
        accelerator.load_state(str(checkpoint))
    except Exception as error:  # whatever a damaged file makes torch, safetensors or Accelerate raise
        raise UnreadableCheckpoint(
            f"{checkpoint} cannot be loaded: {type(error).__name__}: {error}"
        ) from error


def remove_unfinished_checkpoints(output_dir: str | os.PathLike) -> None:
    """Deletes `.tmp-step_*` directories a killed run left behind (they were never complete)."""
    root = Path(output_dir) / "checkpoints"
    for leftover in root.glob(".tmp-step_*") if root.is_dir() else []:
        logger.info("Removing the unfinished checkpoint %s", leftover)
        shutil.rmtree(leftover, ignore_errors=True)


def save_checkpoint(
    accelerator: Accelerator,
    output_dir: str | os.PathLike,
    step: int,
    state: dict[str, Any],
    limit: int | None,
) -> Path:
    """Saves the full training state atomically: write into a temp dir, then rename.

    A kill at any moment leaves either the previous checkpoints alone or the new one complete.
    """
    root = Path(output_dir) / "checkpoints"
    final = root / f"step_{step:08d}"
    temporary = root / f".tmp-step_{step:08d}"
    if accelerator.is_main_process:
        shutil.rmtree(temporary, ignore_errors=True)
        temporary.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(temporary), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_json_atomic(temporary / STATE_FILE, {**state, "file_sizes": file_sizes(temporary)})
        if final.exists():
            shutil.rmtree(final)
        os.replace(temporary, final)
        if limit is not None:
            for old in list_checkpoints(output_dir)[:-limit]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def checkpoint_payload(
    state: RunState,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    config: dict[str, Any],
    train_data: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The JSON part of a checkpoint: run state, schedule position, the config that made the run, and for a
    streaming run each process's position in the stream (`data.train_loader_state`)."""
    schedule = {key: value for key, value in scheduler.state_dict().items() if key != "lr_lambdas"}
    payload = {"run_state": dataclasses.asdict(state), "scheduler": schedule, "config": config}
    if train_data is not None:
        payload["train_data"] = train_data
    return payload


def file_sizes(directory: Path) -> dict[str, int]:
    """{file name: size in bytes} of what Accelerate wrote: what a complete checkpoint must hold."""
    return {path.name: path.stat().st_size for path in sorted(directory.iterdir()) if path.is_file()}


def read_checkpoint_payload(checkpoint: Path) -> dict[str, Any]:
    """The checkpoint's JSON state, after checking that every file it lists is there with its size.

    Raises:
        UnreadableCheckpoint: the JSON does not parse, or a file is missing or of another size.
    """
    try:
        payload = json.loads((checkpoint / STATE_FILE).read_text())
    except (OSError, ValueError) as error:
        raise UnreadableCheckpoint(f"{checkpoint}: {STATE_FILE} cannot be read: {error}") from None
    found = file_sizes(checkpoint)
    damaged = [
        f"{name} ({found[name] if name in found else 'missing'} of {size} bytes)"
        for name, size in payload.get("file_sizes", {}).items()
        if found.get(name) != size
    ]
    if damaged:
        raise UnreadableCheckpoint(f"{checkpoint} is damaged: {', '.join(damaged)}")
    return payload


def restore_scheduler(scheduler: torch.optim.lr_scheduler.LRScheduler, payload: dict[str, Any]) -> None:
    """Puts the schedule back where the checkpoint left it (stored as JSON, never as a pickle)."""
    scheduler.load_state_dict({**payload["scheduler"], "lr_lambdas": [None] * len(scheduler.lr_lambdas)})


class InterruptFlag:
    """Turns SIGINT/SIGTERM into a flag the loop checks at step boundaries, so the run can save and exit.

    A second SIGINT (Ctrl-C pressed again) stops at once, with the default behaviour. Any other repeat is
    the same stop request again and keeps the flag: a launcher forwards to its trainer the signal the whole
    group already got (accelerate >= 1.16's one-process launcher terminates its child tree on SIGTERM or
    Ctrl-C; torchrun forwards), and orchestrators (Slurm, Kubernetes, `timeout -k`) follow a SIGTERM with a
    SIGKILL, never with a second SIGTERM meaning "now".
    """

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> InterruptFlag:
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal_name is not None and signum == signal.SIGINT:
            signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
            signal.raise_signal(signum)
            return
        self.signal_name = self.signal_name or signal.Signals(signum).name

    @property
    def raised(self) -> bool:
        return self.signal_name is not None

    @property
    def reason(self) -> str:
        """What stopped the run, for the log: this process's signal, or a stop voted for by another process
        (the signal went to one process only, as `kill PID` does)."""
        return self.signal_name or "signal on another process"

    def raised_on_any_process(self, device: torch.device) -> bool:
        """Whether any process got the signal: it may reach them at different steps, and every process
        must save the same step. A collective call: every process of the run makes it at the same point."""
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if not distributed or torch.distributed.get_world_size() == 1:
            return self.raised
        votes = torch.tensor([1.0 if self.raised else 0.0], device=device)
        torch.distributed.all_reduce(votes)
        return bool(votes.item() > 0)
