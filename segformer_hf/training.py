"""The training run, told top to bottom: set up -> steps (update, then log / evaluate / checkpoint / stop) ->
finish (final evaluation, saved model, model card, push).

`train(config)` is the whole story on one screen; each step is a function of its own that a test can
call. Arguments live in `arguments`, data loaders in `data`, the optimiser in `optimization`,
checkpoints and signals in `checkpointing`, evaluation in `evaluation`. `scripts/train.py` and
`segformer-hf train` call `main`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import fcntl
import gc
import itertools
import json
import logging
import netrc
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import (
    DataLoaderConfiguration,
    InitProcessGroupKwargs,
    ProjectConfiguration,
    gather_object,
    set_seed,
)
from huggingface_hub import get_token
from PIL import Image
from tqdm.auto import tqdm

from . import data as seg_data
from .arguments import EvaluationArguments, RunArguments, TrainingConfig, parse_args
from .augmentation import DeviceAugmentation
from .checkpointing import (
    InterruptFlag,
    RunState,
    checkpoint_payload,
    list_checkpoints,
    load_checkpoint,
    remove_unfinished_checkpoints,
    restore_scheduler,
    save_checkpoint,
)
from .configuration_segformer_hf import SegformerHFConfig
from .conversion import from_reference
from .evaluation import evaluate_model, format_metrics_table, same_size_groups
from .files import nan_to_none, write_atomic, write_json_atomic
from .hub import push_to_hub, write_model_card
from .inference import imagenet_normalization, predict_whole, warn_if_bf16_is_emulated
from .metrics import create_metric
from .modeling_segformer_hf import SegformerHFForSemanticSegmentation
from .optimization import build_optimizer, build_scheduler, build_weight_average
from .visualization import resolve_palette, stack_panels, validation_panel

logger = logging.getLogger(__name__)


@dataclass
class Run:
    """Everything a training run holds while it runs; the steps below read and update it."""

    config: TrainingConfig
    accelerator: Accelerator
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    train_loader: Any
    train_transform: seg_data.SegmentationTrainTransform
    eval_loader: Any
    id2label: dict[int, str]
    num_train_samples: int | None  # None: a stream
    state: RunState = field(default_factory=RunState)
    epoch: int = 0
    start_step: int = 0
    started: float = field(default_factory=time.time)
    interrupted_by: str | None = None
    step_loss: float = 0.0
    progress: Any = None
    device_augmentation: DeviceAugmentation | None = None  # augment_device cuda: finishes each batch
    weight_average: torch.nn.Module | None = None  # ema_decay: the AveragedModel updated after each step
    losses_finite: torch.Tensor | None = None  # whether this step's micro-batch losses so far were finite
    stop_voted: bool = False  # the step's vote: some process had SIGINT/SIGTERM by its backward pass

    @property
    def output_dir(self) -> Path:
        return Path(self.config.output_dir)

    @property
    def finished(self) -> bool:
        return self.state.global_step >= self.config.max_train_steps


def train(config: TrainingConfig) -> dict[str, Any]:
    """Runs training end to end; returns the final results (also written to all_results.json)."""
    with claim_output_dir(config):
        run = set_up(config)
        # `closing`: whatever ends the loop (a break, an exception), the epoch's DataLoader workers are shut
        # down here, not left for the interpreter's exit.
        with InterruptFlag() as interrupt, contextlib.closing(training_batches(run)) as batches:
            for batch in batches:
                if optimization_step(run, batch, interrupt):
                    end_of_step(run, interrupt)
                if run.finished or run.interrupted_by:
                    break
        run.progress.close()
        if run.interrupted_by:
            return stop_interrupted(run)
        return finish(run)


# Set up ---------------------------------------------------------------------------------------------------


def set_up(
    config: TrainingConfig,
    model_builder: Callable[[TrainingConfig, dict[int, str], list[float] | None], torch.nn.Module]
    | None = None,
) -> Run:
    """Accelerator, data, model, optimiser and schedule, and the resumed state if asked for.

    `model_builder(config, id2label, class_weights)` replaces `build_model`, e.g. to train transformers' own Segformer
    with this loop (`scripts/benchmark_training.py`).
    """
    check_push_settings(config)
    accelerator = create_accelerator(config)
    log_distribution(accelerator)
    set_seed(config.seed)
    with accelerator.main_process_first():  # only the main process fills the datasets cache
        train_dataset, eval_dataset, id2label = seg_data.load_training_data(config)
    if config.metric_backend == "evaluate":
        # Fail now, not after hours of training, if evaluate's script cannot be loaded.
        create_metric("evaluate", num_labels=len(id2label), ignore_index=config.ignore_index)
    train_loader, train_transform = seg_data.train_dataloader_for(
        config,
        train_dataset,
        id2label,
        accelerator.num_processes,
        accelerator.process_index,
        accelerator.device,
    )
    eval_loader = seg_data.eval_dataloader_for(
        config, eval_dataset, len(id2label), accelerator.num_processes, accelerator.process_index
    )
    class_weights = seg_data.class_weights_for(config, train_dataset, len(id2label))
    model = (model_builder or build_model)(config, id2label, class_weights)
    lay_out_weights_as_gradients(model)
    # Copied before compiling: the average is evaluated eagerly, and a copy of a compiled module would
    # still call the original's compiled forward.
    weight_average = build_weight_average(model, config, accelerator.device)
    if config.torch_compile:
        # In place (nn.Module.compile), not a wrapper: parameter names, and so checkpoints and saved
        # models, stay without an `_orig_mod.` prefix.
        model.compile(backend=config.torch_compile_backend, mode=config.torch_compile_mode)
    optimizer = build_optimizer(model, config)
    scheduler = build_scheduler(optimizer, config)
    model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    run = Run(
        config, accelerator, model, optimizer, scheduler, train_loader, train_transform, eval_loader, id2label,
        num_train_samples=seg_data.num_samples(train_dataset), weight_average=weight_average,
    )  # fmt: skip
    if weight_average is not None:
        accelerator.register_for_checkpointing(weight_average)  # resumed with the rest of the state
    if config.augment_device != "cpu":
        if accelerator.device.type != config.augment_device:
            raise ValueError(
                f"augment_device {config.augment_device} but training runs on {accelerator.device}"
            )
        run.device_augmentation = DeviceAugmentation(config.crop_size, config.ignore_index)
    if config.resume_from_checkpoint:
        resume(run)
    write_run_config(run)
    accelerator.init_trackers(config.project_name, config={k: str(v) for k, v in config.to_dict().items()})
    logger.info(
        "Training %s (%.1fM parameters) on %s, %d validation samples, %d steps",
        config.init_from or config.model_variant,
        sum(p.numel() for p in model.parameters()) / 1e6,
        "a stream"
        if run.num_train_samples is None
        else f"{run.num_train_samples} samples ({steps_per_epoch(run)} steps/epoch)",
        len(eval_dataset),
        config.max_train_steps,
    )
    run.progress = tqdm(
        total=config.max_train_steps,
        initial=run.state.global_step,
        disable=not accelerator.is_local_main_process,
        desc="train",
        dynamic_ncols=True,
    )
    return run


def check_push_settings(config: TrainingConfig) -> None:
    """A push at the end needs a Hub token: find out now, not after hours of training."""
    if config.push_to_hub and get_token() is None:
        raise ValueError(
            "push_to_hub is set but no Hugging Face token was found: run `hf auth login` or set HF_TOKEN first"
        )


def create_accelerator(config: TrainingConfig) -> Accelerator:
    """An Accelerator that really distributes on CPU-only machines too (`cpu=True` makes it use gloo)."""
    trackers = [name for name in config.report_to.split(",") if name != "none"]
    if "wandb" in trackers:
        ensure_wandb_does_not_prompt()
    return Accelerator(
        cpu=not torch.cuda.is_available(),
        mixed_precision=config.mixed_precision,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        log_with=trackers or None,
        project_config=ProjectConfiguration(
            project_dir=config.output_dir, logging_dir=str(Path(config.output_dir) / "logs")
        ),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        step_scheduler_with_optimizer=False,
        # A peer that stops answering ends the run after this long instead of hanging it for good.
        kwargs_handlers=[InitProcessGroupKwargs(timeout=datetime.timedelta(seconds=config.ddp_timeout))],
    )


def log_distribution(accelerator: Accelerator) -> None:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    if not accelerator.is_main_process:
        logging.getLogger("segformer_hf").setLevel(logging.WARNING)
    logger.info(
        "Distributed: %s, world size %d, process %d, device %s, mixed precision %s",
        accelerator.distributed_type,
        accelerator.num_processes,
        accelerator.process_index,
        accelerator.device,
        accelerator.mixed_precision,
    )
    if accelerator.mixed_precision == "bf16":
        warn_if_bf16_is_emulated(accelerator.device, "pass --mixed_precision no")


def ensure_wandb_does_not_prompt() -> None:
    """Without W&B credentials, run W&B offline (logs kept locally for `wandb sync`) instead of prompting."""
    if os.environ.get("WANDB_MODE") or os.environ.get("WANDB_API_KEY"):
        return
    try:
        has_login = netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        has_login = False
    if not has_login:
        os.environ["WANDB_MODE"] = "offline"
        logger.warning("No W&B credentials found: W&B runs offline (sync later with `wandb sync`).")


def build_model(
    config: TrainingConfig, id2label: dict[int, str], class_weights: list[float] | None = None
) -> SegformerHFForSemanticSegmentation:
    """The model to train: a variant from scratch, or the `init_from` weights (whose variant must agree)."""
    label_fields = {
        "num_labels": len(id2label),
        "id2label": dict(id2label),
        "label2id": {name: index for index, name in id2label.items()},
        "semantic_loss_ignore_index": config.ignore_index,
        "drop_path_rate": config.drop_path_rate,
        "classifier_dropout_prob": config.classifier_dropout_prob,
        "class_weights": class_weights,
        "use_ohem": config.use_ohem,
        # A recipe's OHEM settings stay unused when a run switches OHEM off (`--use_ohem false`).
        "ohem_thresh": config.ohem_thresh if config.use_ohem else None,
        "ohem_min_kept": config.ohem_min_kept,
        "dice_weight": config.dice_weight,
        # The data set's class colours, so that masks drawn from the saved model use them.
        "palette": seg_data.resolve_palette(
            len(id2label),
            id2label_file=config.id2label_file,
            data_dir=None if config.id2label else config.data_dir,
        ),
    }
    if config.init_from is None:
        return SegformerHFForSemanticSegmentation(
            SegformerHFConfig.from_variant(config.model_variant, **label_fields)
        )
    model = from_reference(
        config.init_from, ignore_mismatched_sizes=config.ignore_mismatched_sizes, **label_fields
    )
    loaded_variant = getattr(model.config, "variant", None)
    if config.model_variant and loaded_variant and loaded_variant != config.model_variant:
        raise ValueError(
            f"model_variant is {config.model_variant} but init_from {config.init_from} is a MiT-{loaded_variant}: "
            "set model_variant to match, or leave it out (init_from decides the architecture)"
        )
    return model


def lay_out_weights_as_gradients(model: torch.nn.Module) -> None:
    """Gives every convolution weight the channels-last strides its gradient comes out with.

    The feature maps are channels-last, so oneDNN and cuDNN return channels-last weight gradients. For
    a weight with a size-1 dimension (depthwise 3x3, 1x1 classifier) the strides differ from the
    weight's only in that dimension: autograd keeps such a gradient as is, and DDP then copies it into
    its bucket element by element and warns "Grad strides do not match bucket view strides". For the
    others (patch embeddings, sequence reduction) autograd copies every gradient into the weight's
    layout each step. Weights laid out like their gradients need neither copy; the values are the same.
    """
    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d):
            weight = module.weight
            relaid = torch.empty(
                weight.shape, dtype=weight.dtype, device=weight.device, memory_format=torch.channels_last
            )
            with torch.no_grad():
                relaid.copy_(weight)
            module.weight = torch.nn.Parameter(relaid, requires_grad=weight.requires_grad)


def resume(run: Run) -> None:
    """Restores model, optimiser, RNG and schedule from a checkpoint made with the same recipe (with
    `latest`, the newest one that loads: a damaged one is reported and skipped)."""
    checkpoint, payload = load_checkpoint(
        run.accelerator,
        run.config.resume_from_checkpoint,
        run.output_dir,
        check=lambda path, saved: check_resumable(run.config, saved.get("config", {}), path),
    )
    restore_scheduler(run.scheduler, payload)
    run.state = RunState(**payload["run_state"])
    run.start_step = run.state.global_step
    # A stream continues from each process's saved position; a map-style loader's follows from the step.
    run.epoch = seg_data.restore_train_loader_state(
        run.train_loader,
        payload.get("train_data"),
        run.accelerator.process_index,
        run.accelerator.num_processes,
    )
    if run.epoch is None:
        run.epoch = run.state.global_step // steps_per_epoch(run)
    if run.accelerator.is_main_process:
        forget_logged_steps_after(run.output_dir / "train_log.jsonl", run.state.global_step)
    logger.info("Resumed from %s at step %d", checkpoint, run.state.global_step)


# Arguments a resumed run may change: where and how it reports, not what it computes.
RESUMABLE_CHANGES = {
    *(config_field.name for config_field in dataclasses.fields(RunArguments)),
    *(config_field.name for config_field in dataclasses.fields(EvaluationArguments)),
    "dataloader_num_workers",
    "max_eval_samples",
}


def check_resumable(config: TrainingConfig, saved: dict[str, Any], checkpoint: Path) -> None:
    """A checkpoint continues the run that made it: refuse settings that would silently change that run."""
    current = config.to_dict()
    changed = [
        f"{key}: {saved[key]!r} in the checkpoint, {current[key]!r} now"
        for key in sorted(saved)
        if key in current
        and key not in RESUMABLE_CHANGES
        and _normalised(saved[key]) != _normalised(current[key])
    ]
    if changed:
        raise ValueError(
            f"Cannot resume from {checkpoint} with other settings than the run that made it:\n  - "
            + "\n  - ".join(changed)
            + "\nResume with the original settings, or start a new run in another output_dir."
        )


def _normalised(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def forget_logged_steps_after(log_path: Path, step: int) -> None:
    """Drops log lines of steps after `step`: the resumed run logs them again, once."""
    if not log_path.exists():
        return
    kept = [line for line in log_path.read_text().splitlines() if json.loads(line).get("step", 0) <= step]
    write_atomic(log_path, lambda path: path.write_text("".join(f"{line}\n" for line in kept)))


def write_run_config(run: Run) -> None:
    if run.accelerator.is_main_process:
        run.output_dir.mkdir(parents=True, exist_ok=True)
        text = yaml.safe_dump(run.config.to_dict(), sort_keys=False)
        write_atomic(run.output_dir / "train_config.yaml", lambda path: path.write_text(text))


def steps_per_epoch(run: Run) -> int:
    return max(len(run.train_loader) // run.config.gradient_accumulation_steps, 1)


# The output directory -------------------------------------------------------------------------------------


class OutputDirInUse(RuntimeError):
    """Another training run holds the output directory."""


@contextlib.contextmanager
def claim_output_dir(config: TrainingConfig) -> Iterator[None]:
    """Holds a lock on the output directory for the whole run and prepares it: a fresh start, a resume, or
    (with overwrite_output_dir) the old run moved aside first. Never mixes two runs in one directory.

    The lock file sits beside the directory (`.NAME.lock`), so that it outlives an overwrite.
    """
    output_dir = Path(config.output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise FileExistsError(f"output_dir {output_dir} is a file, not a directory")
    for ancestor in output_dir.absolute().parents:
        if ancestor.exists():
            if not ancestor.is_dir():
                raise FileExistsError(f"output_dir {output_dir} cannot be made: {ancestor} is a file")
            break
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    lock_path = output_dir.parent / f".{output_dir.name}.lock"
    is_main = int(os.environ.get("RANK", "0")) == 0
    with open(lock_path, "a") as lock_file:
        if is_main:
            try:
                fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise OutputDirInUse(
                    f"Another training run is writing to {output_dir} (it holds {lock_path}). "
                    "Wait for it to finish, or choose another --output_dir."
                ) from None
            prepare_output_dir(config)
        yield


def prepare_output_dir(config: TrainingConfig) -> None:
    output_dir = Path(config.output_dir)
    if not output_dir.exists() or not any(output_dir.iterdir()):
        return
    if config.resume_from_checkpoint:
        remove_unfinished_checkpoints(output_dir)
        return
    if not config.overwrite_output_dir:
        raise FileExistsError(
            f"Output directory {output_dir} is not empty. Use --resume_from_checkpoint latest to continue that "
            "run, --overwrite_output_dir true to replace it, or another --output_dir."
        )
    # Moved aside in one rename, then deleted: the directory is never a mix of the old and the new run.
    aside = output_dir.with_name(f".{output_dir.name}.replaced-{os.getpid()}")
    os.replace(output_dir, aside)
    shutil.rmtree(aside, ignore_errors=True)
    logger.info("overwrite_output_dir: the previous run in %s was removed", output_dir)


# One optimisation step ------------------------------------------------------------------------------------


def training_batches(run: Run) -> Iterator[dict[str, Any]]:
    """Batches epoch after epoch; a resumed run continues mid-epoch with exactly the batches it had left."""
    config = run.config
    while not run.finished:
        run.train_loader.set_epoch(run.epoch)
        # Augmentation draws depend on (seed, epoch, sample index) only: resumed runs see the same crops.
        run.train_transform.set_epoch(run.epoch)
        # A stream resumes from its restored position; a map-style loader skips the batches already done.
        done = 0
        if not seg_data.is_streaming_loader(run.train_loader):
            done = (
                run.state.global_step - run.epoch * steps_per_epoch(run)
            ) * config.gradient_accumulation_steps
        loader = run.accelerator.skip_first_batches(run.train_loader, done) if done else run.train_loader
        run.model.train()
        for batch in loader:
            yield batch if run.device_augmentation is None else run.device_augmentation(batch)
        run.epoch += 1


def optimization_step(run: Run, batch: dict[str, Any], interrupt: InterruptFlag | None = None) -> bool:
    """Forward, backward and (on the last micro-batch) the update, under the NaN policy.

    Every process computes its backward pass, even for a non-finite loss (they all take part in the
    gradient all-reduce); then they decide together, in one collective per step, whether to update and
    whether to stop for a signal (`agreed_step_outcome`). On a GPU that is also the step's one
    synchronisation with the host.
    Returns whether an optimisation step was completed (False for a gradient-accumulation micro-step).
    `interrupt`: the run's signal flag; None where nothing stops on a signal (benchmarks, tests).
    """
    accelerator, state = run.accelerator, run.state
    state.skipped_samples += int(batch.get("num_skipped", 0))
    with accelerator.accumulate(run.model):
        loss = run.model(pixel_values=batch["pixel_values"], labels=batch["labels"]).loss
        accelerator.backward(loss)
        finite = torch.isfinite(loss.detach()).all()
        run.losses_finite = finite if run.losses_finite is None else run.losses_finite & finite
        if not accelerator.sync_gradients:
            return False
        outcome = agreed_step_outcome(
            run, loss, run.losses_finite, interrupt is not None and interrupt.raised
        )
        run.step_loss, run.stop_voted = outcome.loss, outcome.stop
        run.losses_finite = None
        problem = None
        if not outcome.losses_finite:
            problem = f"Non-finite loss ({run.step_loss})"
        elif not outcome.gradients_finite:  # a finite loss can still have non-finite gradients
            problem = f"Non-finite gradients (loss {run.step_loss:.4g})"
        if problem is None:
            run.optimizer.step()
            if run.weight_average is not None and not accelerator.optimizer_step_was_skipped:
                # (fp16's gradient scaler skips steps with inf gradients by itself)
                run.weight_average.update_parameters(accelerator.unwrap_model(run.model))
        else:
            handle_nonfinite(run, problem)
        run.scheduler.step()
        run.optimizer.zero_grad()
    state.global_step += 1
    if problem is None:
        state.loss_sum += run.step_loss
        state.loss_count += 1
    return True


class StepOutcome(NamedTuple):
    """What every process of the run decides together after a step's backward pass."""

    loss: float  # the last micro-batch's loss, averaged over processes
    losses_finite: bool  # every process's losses of this step were finite
    gradients_finite: bool  # the (all-reduced) gradients are finite
    stop: bool  # some process got SIGINT/SIGTERM: every one saves this step and stops


def agreed_step_outcome(
    run: Run, loss: torch.Tensor, losses_finite: torch.Tensor, interrupted: bool
) -> StepOutcome:
    """The step's decisions, in one collective; clips the gradients to max_grad_norm.

    All processes must take the same decisions: one that skipped an update the others made would train
    other weights from then on, and one that stopped alone would leave the others waiting in the next
    step's all-reduce. A signal may reach the processes at different steps, or one process only (`kill`
    of one rank), so each one's flag is a vote.
    """
    parameters = [p for p in run.model.parameters() if p.grad is not None]
    if run.config.max_grad_norm:
        norm = run.accelerator.clip_grad_norm_(parameters, run.config.max_grad_norm)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in parameters])
    device = run.accelerator.device
    votes = torch.stack(
        [
            loss.detach().float().reshape(()).to(device),
            (~losses_finite).float().reshape(()).to(device),
            (~torch.isfinite(norm)).float().reshape(()).to(device),
            # a fill kernel, not a copy from the host: no synchronisation before the reduce
            torch.full((), float(interrupted), device=device),
        ]
    )
    if run.accelerator.num_processes > 1:
        votes = run.accelerator.reduce(votes, reduction="sum")
    loss_sum, nonfinite_losses, nonfinite_gradients, interrupted_processes = votes.tolist()
    return StepOutcome(
        loss=loss_sum / run.accelerator.num_processes,
        losses_finite=nonfinite_losses == 0,
        gradients_finite=nonfinite_gradients == 0,
        stop=interrupted_processes > 0,
    )


def all_processes_agree(accelerator: Accelerator, holds: torch.Tensor) -> bool:
    """Whether `holds` is true on every process (all processes must take the same decision)."""
    votes = holds.float().reshape(1).to(accelerator.device)
    return bool(accelerator.reduce(votes, reduction="sum").item() == accelerator.num_processes)


def handle_nonfinite(run: Run, problem: str) -> None:
    """nan_policy stop: end the run naming the last good checkpoint; skip: drop this update and count it."""
    step = run.state.global_step + 1
    if run.config.nan_policy == "stop":
        kept = list_checkpoints(run.output_dir)
        raise FloatingPointError(
            f"{problem} at step {step}; stopping. "
            + (f"The last good checkpoint is {kept[-1]}. " if kept else "No checkpoint yet. ")
            + "Lower the learning rate, use bf16 instead of fp16, or set nan_policy: skip."
        )
    # The update is skipped, but the step still counts: the schedule and the run's end stay as planned.
    logger.warning("%s at step %d: update skipped", problem, step)
    run.state.skipped_nonfinite_steps += 1


# After each step: log, evaluate, checkpoint, stop ---------------------------------------------------------


def end_of_step(run: Run, interrupt: InterruptFlag) -> None:
    """Log, evaluate and checkpoint when due; on a signal, checkpoint and end the run.

    With several processes the step's vote decides: a signal that arrives after it (during an evaluation,
    say) is acted on at the next step's vote, one step later, so that every process saves the same step.
    A single process has no one to agree with and acts on its flag as it stands now.
    """
    config, step = run.config, run.state.global_step
    log_step(run)
    if step % config.eval_steps == 0 and not run.finished:
        evaluate(run)
        run.model.train()
    checkpoint_due = step % config.checkpointing_steps == 0 or run.finished
    if checkpoint_due:
        checkpoint(run)
    if run.stop_voted or (run.accelerator.num_processes == 1 and interrupt.raised):
        run.interrupted_by = interrupt.reason
        if not checkpoint_due:
            checkpoint(run)


def log_step(run: Run) -> None:
    learning_rate = run.scheduler.get_last_lr()[0]
    run.progress.update(1)
    run.progress.set_postfix(loss=f"{run.step_loss:.4f}", lr=f"{learning_rate:.2e}")
    append_log(run, {"step": run.state.global_step, "loss": run.step_loss})
    if run.state.global_step % run.config.logging_steps == 0:
        run.accelerator.log(
            {"train/loss": run.step_loss, "train/lr": learning_rate, "train/epoch": run.epoch},
            step=run.state.global_step,
        )


def append_log(run: Run, record: dict[str, Any]) -> None:
    if run.accelerator.is_main_process:
        with open(run.output_dir / "train_log.jsonl", "a") as log_file:
            log_file.write(json.dumps(nan_to_none(record)) + "\n")


def model_to_keep(run: Run) -> torch.nn.Module:
    """The weights that validation scores and that `best/` and the output directory hold: their moving
    average with ema_decay, else the trained weights themselves."""
    if run.weight_average is not None:
        return run.weight_average.module
    return run.accelerator.unwrap_model(run.model)


def validation_metrics(run: Run) -> dict[str, Any]:
    """Mean IoU of the kept weights on the validation split, with the run's inference protocol."""
    # The trained model runs under the accelerator's mixed precision by itself; its average is a plain copy.
    precision = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(run.accelerator.mixed_precision)
    return evaluate_model(
        model_to_keep(run),
        run.eval_loader,
        len(run.id2label),
        run.config.ignore_index,
        run.config.inference_protocol(),
        accelerator=run.accelerator,
        metric_backend=run.config.metric_backend,
        autocast_dtype=precision if run.weight_average is not None else None,
    )


def evaluate(run: Run) -> dict[str, Any]:
    """Validation mean IoU now: logged, tracked, and the best model so far kept in `best/`."""
    config, state, accelerator = run.config, run.state, run.accelerator
    metrics = validation_metrics(run)
    append_log(run, {"step": state.global_step, **{f"eval_{k}": v for k, v in metrics.items()}})
    scalars = {f"eval/{k}": v for k, v in metrics.items() if not isinstance(v, list)}
    per_class = {f"eval/iou_{run.id2label[i]}": v for i, v in enumerate(metrics["per_category_iou"])}
    accelerator.log({**scalars, **per_class}, step=state.global_step)
    logger.info(
        "step %d: mean IoU %.4f, mean accuracy %.4f, overall accuracy %.4f%s",
        state.global_step,
        metrics["mean_iou"],
        metrics["mean_accuracy"],
        metrics["overall_accuracy"],
        " (averaged weights)" if run.weight_average is not None else "",
    )
    if accelerator.is_main_process and (
        state.best_mean_iou is None or metrics["mean_iou"] > state.best_mean_iou
    ):
        # `best/` is what users ship: like a checkpoint, it never holds non-finite weights.
        if bool(weights_are_finite(model_to_keep(run))):
            state.best_mean_iou, state.best_step = float(metrics["mean_iou"]), state.global_step
            save_model_files(model_to_keep(run), run.output_dir / "best", config)
        else:
            logger.warning("Non-finite weights at step %d: best/ is not replaced", state.global_step)
    log_validation_images(run)
    return metrics


def checkpoint(run: Run) -> None:
    """Saves a resumable checkpoint, unless the weights are not finite (such a checkpoint is never "good")."""
    if not all_processes_agree(run.accelerator, weights_are_finite(run.model)):
        raise FloatingPointError(
            f"The weights hold non-finite values at step {run.state.global_step}: no checkpoint is saved. "
            "Lower the learning rate, or set nan_policy: skip."
        )
    stream_position = seg_data.train_loader_state(run.train_loader)
    positions = None if stream_position is None else gather_object([stream_position])
    payload = checkpoint_payload(run.state, run.scheduler, run.config.to_dict(), train_data=positions)
    path = save_checkpoint(
        run.accelerator, run.output_dir, run.state.global_step, payload, run.config.checkpoints_total_limit
    )
    logger.info("Saved checkpoint %s", path)


def weights_are_finite(model: torch.nn.Module) -> torch.Tensor:
    return torch.stack([torch.isfinite(p).all() for p in model.parameters()]).all()


def log_validation_images(run: Run) -> None:
    """Sends a few validation images to the trackers as [image | ground truth | prediction] panels.

    Only the main process logs, from its own validation shard.
    """
    accelerator, count = run.accelerator, run.config.num_log_images
    if count <= 0 or not accelerator.trackers or not accelerator.is_main_process:
        return
    network = model_to_keep(run)
    palette = resolve_palette(len(run.id2label), config=network.config)
    panels = [
        validation_panel(rgb, truth, prediction, palette)
        for rgb, truth, prediction in itertools.islice(validation_examples(network, run.eval_loader), count)
    ]
    if not panels:
        return
    for tracker in accelerator.trackers:
        # TensorBoard needs to be told the layout of the stacked (N, H, W, 3) array; W&B takes images as they are.
        extra = {"dataformats": "NHWC"} if tracker.name == "tensorboard" else {}
        tracker.log_images(
            {"validation/image_truth_prediction": stack_panels(panels)}, step=run.state.global_step, **extra
        )


def validation_examples(network: torch.nn.Module, eval_loader: Any) -> Iterator[tuple[Any, Any, Any]]:
    """Yields (RGB image (H, W, 3) uint8, label (H, W), prediction (H, W)) at each label's resolution."""
    mean, std = (torch.tensor(values).view(3, 1, 1) for values in imagenet_normalization())
    for batch in eval_loader:
        for pixel_values, labels in same_size_groups(batch):
            predictions = predict_whole(network, pixel_values, tuple(labels.shape[-2:])).argmax(1).cpu()
            for image, label, prediction in zip(pixel_values, labels, predictions):
                height, width = label.shape
                # (3, h, w) normalised -> (h, w, 3) uint8 -> resized to the label's (H, W)
                rgb = ((image.float().cpu() * std + mean).clamp(0, 1) * 255).byte().permute(1, 2, 0).numpy()
                rgb = np.asarray(Image.fromarray(rgb).resize((width, height), Image.BILINEAR))
                yield rgb, label.long().numpy(), prediction.numpy()


# Finish ---------------------------------------------------------------------------------------------------


def end_training(run: Run) -> None:
    """Ends the trackers and the process group, after freeing the distributed wrapper of the model.

    DDP's gradient reducer holds a reference to the process group and is freed with the GIL held. Had it
    the last one (accelerate's `end_training` drops the others), the gloo group's destructor would wait for
    its worker threads with the GIL held, while a worker freeing a finished collective's tensors waits for
    the GIL: the process hangs at exit (seen in a 2-process run, torch 2.13; pytorch/pytorch#56297). Freed
    first, the group goes last, through its own binding, which releases the GIL.
    """
    run.model = run.accelerator.unwrap_model(run.model)
    run.accelerator.free_memory()
    gc.collect()  # the wrapper's reference cycles, so that the reducer is gone now
    run.accelerator.end_training()


def stop_interrupted(run: Run) -> dict[str, Any]:
    end_training(run)
    logger.warning(
        "Interrupted by %s at step %d: checkpoint saved. Continue with --resume_from_checkpoint latest",
        run.interrupted_by,
        run.state.global_step,
    )
    return {"interrupted": run.interrupted_by, "train_steps": run.state.global_step}


def finish(run: Run) -> dict[str, Any]:
    """Final evaluation, then the output directory: model, results, card; then the push if asked for."""
    accelerator, config, state = run.accelerator, run.config, run.state
    metrics = evaluate(run)
    runtime = time.time() - run.started
    results = {
        **{f"eval_{key}": metrics[key] for key in EVAL_RESULT_KEYS},
        "eval_samples": metrics["num_samples"],
        "train_loss": state.loss_sum / max(state.loss_count, 1),
        "train_steps": state.global_step,
        "train_runtime": runtime,
        "train_steps_per_second": (state.global_step - run.start_step) / runtime if runtime > 0 else 0.0,
        "train_samples": run.num_train_samples,
        "train_skipped_samples": state.skipped_samples,
        "train_skipped_nonfinite_steps": state.skipped_nonfinite_steps,
        "best_eval_mean_iou": state.best_mean_iou,
        "best_step": state.best_step,
        "world_size": accelerator.num_processes,
    }
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_model_files(model_to_keep(run), run.output_dir, config)
        write_json_atomic(run.output_dir / "all_results.json", results)
        write_model_card(run.output_dir)
        print_summary(results, run.id2label)
    end_training(run)
    if config.push_to_hub and accelerator.is_main_process:
        url = push_to_hub(
            run.output_dir, config.hub_model_id, private=config.hub_private_repo, format=config.hub_format
        )
        logger.info("Pushed to %s", url)
    return results


EVAL_RESULT_KEYS = (
    "mean_iou",
    "mean_accuracy",
    "overall_accuracy",
    "per_category_iou",
    "per_category_accuracy",
)


def save_model_files(model: torch.nn.Module, directory: str | os.PathLike, config: TrainingConfig) -> None:
    """Writes the model (safetensors + remote code + config) and its image processor (with the evaluation
    protocol), file by file atomically."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    staging = directory / ".tmp-save"
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging, safe_serialization=True)
    # The protocol the model was validated with travels with it: every later caller predicts the same way.
    config.inference_protocol().image_processor(do_reduce_labels=config.reduce_labels).save_pretrained(
        staging
    )
    for item in staging.iterdir():
        os.replace(item, directory / item.name)
    staging.rmdir()


def print_summary(results: dict[str, Any], id2label: dict[int, str]) -> None:
    header = [
        "",
        "Training summary",
        f"  steps             {results['train_steps']}",
        f"  runtime           {results['train_runtime']:.1f} s",
        f"  train loss (mean) {results['train_loss']:.4f}",
    ]
    metrics = {key: results[f"eval_{key}"] for key in EVAL_RESULT_KEYS}
    table = format_metrics_table(metrics, id2label, title=f"Validation ({results['eval_samples']} samples)")
    print("\n".join(header) + "\n" + table, flush=True)


# The command line -----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """`segformer-hf train`. Exit 0 when done or interrupted (its checkpoint is saved); 2 for arguments that
    cannot work; 1 for a run stopped by bad data, non-finite values or an output directory in use, with the
    reason (not a traceback) as the last line."""
    try:
        config = parse_args(argv)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        train(config)
    except (seg_data.BadSampleError, FloatingPointError, FileExistsError, OutputDirInUse) as error:
        logger.error("%s", error)
        return 1
    except (ValueError, FileNotFoundError) as error:
        logger.error("%s", error)
        return 2
    return 0
