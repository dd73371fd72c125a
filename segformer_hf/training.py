"""Training configuration, optimisation recipe, checkpoints and the training loop.

`scripts/train.py` is a thin shell around `main()`: everything a run does lives here so tests can reach
it. The story of a run: parse and check the config -> Accelerator -> data -> model -> optimiser and
schedule -> loop (evaluation, checkpoints, interruption handling) -> save the output directory -> push.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import re
import shutil
import signal
import sys
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from .inference import _nan_to_none, write_atomic, write_json_atomic

logger = logging.getLogger("segformer_hf.training")

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"
CHECKPOINT_PATTERN = re.compile(r"^step_(\d+)$")


@dataclass
class TrainingConfig:
    """Every key a recipe YAML may set; each one can be overridden on the command line as `--key value`."""

    # Model
    model_variant: str = "b0"
    init_from: str | None = None
    ignore_mismatched_sizes: bool = False
    drop_path_rate: float = 0.1
    classifier_dropout_prob: float = 0.1
    # Data
    dataset_name: str | None = None
    dataset_config_name: str | None = None
    data_dir: str | None = None
    data_format: str = "auto"
    train_split: str = "train"
    validation_split: str = "validation"
    image_column: str = "image"
    label_column: str = "label"
    validation_fraction: float = 0.1
    id2label: dict[int, str] | None = None
    id2label_file: str | None = None
    ignore_index: int = 255
    reduce_labels: bool = False
    skip_bad_samples: bool = False
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    num_workers: int = 2
    # Augmentation (the paper's pipeline) and evaluation preprocessing
    img_scale: list[int] = field(default_factory=lambda: [2048, 512])
    ratio_range: list[float] = field(default_factory=lambda: [0.5, 2.0])
    crop_size: list[int] = field(default_factory=lambda: [512, 512])
    cat_max_ratio: float = 0.75
    flip_prob: float = 0.5
    photometric_distortion: bool = True
    eval_img_scale: list[int] | None = None
    eval_mode: str = "whole"
    eval_stride: list[int] | None = None
    # Optimisation (AdamW, 10x head learning rate, linear warm-up then polynomial decay)
    learning_rate: float = 6e-5
    head_lr_multiplier: float = 10.0
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    warmup_steps: int = 1500
    warmup_ratio: float = 1e-6
    poly_power: float = 1.0
    min_lr_ratio: float = 0.0
    max_train_steps: int = 160000
    per_device_train_batch_size: int = 2
    per_device_eval_batch_size: int = 1
    gradient_accumulation_steps: int = 1
    max_grad_norm: float | None = None
    mixed_precision: str = "no"
    seed: int = 42
    nan_policy: str = "stop"
    # Evaluation, checkpoints, logging
    eval_steps: int = 16000
    metric_backend: str = "streaming"
    checkpointing_steps: int = 16000
    checkpoints_total_limit: int | None = 2
    resume_from_checkpoint: str | None = None
    output_dir: str = "outputs/run"
    overwrite_output_dir: bool = False
    report_to: str = "none"
    project_name: str = "segformer_hf"
    logging_steps: int = 10
    num_log_images: int = 4
    # Sharing
    push_to_hub: bool = False
    hub_model_id: str | None = None
    hub_private: bool = False
    hub_format: str = "segformer_hf"

    def validate(self) -> None:
        """Rejects impossible settings before any work starts, naming the key and the problem."""
        problems = []

        def need(condition: bool, message: str) -> None:
            if not condition:
                problems.append(message)

        need(self.max_train_steps > 0, f"max_train_steps must be > 0, got {self.max_train_steps}")
        need(self.per_device_train_batch_size > 0, "per_device_train_batch_size must be > 0")
        need(self.per_device_eval_batch_size > 0, "per_device_eval_batch_size must be > 0")
        need(self.gradient_accumulation_steps > 0, "gradient_accumulation_steps must be > 0")
        need(self.eval_steps > 0, f"eval_steps must be > 0, got {self.eval_steps}")
        need(self.checkpointing_steps > 0, f"checkpointing_steps must be > 0, got {self.checkpointing_steps}")
        need(self.logging_steps > 0, "logging_steps must be > 0")
        need(self.learning_rate > 0, f"learning_rate must be > 0, got {self.learning_rate}")
        need(
            0 <= self.warmup_steps < self.max_train_steps,
            f"warmup_steps ({self.warmup_steps}) must be in [0, max_train_steps ({self.max_train_steps})): "
            "shorten the warm-up (--warmup_steps) for a short run",
        )
        need(
            len(self.crop_size) == 2 and min(self.crop_size) > 0,
            f"crop_size must be [h, w] > 0: {self.crop_size}",
        )
        need(
            len(self.img_scale) == 2 and min(self.img_scale) > 0,
            f"img_scale must be [long, short] > 0: {self.img_scale}",
        )
        need(
            len(self.ratio_range) == 2 and 0 < self.ratio_range[0] <= self.ratio_range[1],
            f"ratio_range must be [low, high] with 0 < low <= high: {self.ratio_range}",
        )
        need(0 < self.cat_max_ratio <= 1, f"cat_max_ratio must be in (0, 1]: {self.cat_max_ratio}")
        need(0 <= self.flip_prob <= 1, f"flip_prob must be in [0, 1]: {self.flip_prob}")
        need(self.eval_mode in ("whole", "slide"), f"eval_mode must be whole or slide: {self.eval_mode}")
        if self.eval_mode == "slide":
            stride = self.eval_stride or self.crop_size
            need(
                all(0 < s <= c for s, c in zip(stride, self.crop_size)),
                f"eval_stride {stride} must be positive and no larger than crop_size {self.crop_size}",
            )
        need(
            self.mixed_precision in ("no", "fp16", "bf16"),
            f"mixed_precision must be no|fp16|bf16: {self.mixed_precision}",
        )
        need(self.nan_policy in ("stop", "skip"), f"nan_policy must be stop|skip: {self.nan_policy}")
        need(self.metric_backend in ("streaming", "evaluate"), "metric_backend must be streaming|evaluate")
        need(
            self.hub_format in ("segformer_hf", "transformers"),
            "hub_format must be segformer_hf|transformers",
        )
        need(
            set(self.report_to.split(",")) <= {"none", "wandb", "tensorboard"},
            f"report_to must be none, wandb, tensorboard or a comma list: {self.report_to}",
        )
        need(self.dataset_name is not None or self.data_dir is not None, "set dataset_name or data_dir")
        need(not (self.push_to_hub and not self.hub_model_id), "push_to_hub needs hub_model_id (USER/NAME)")
        need(
            self.checkpoints_total_limit is None or self.checkpoints_total_limit >= 1,
            "checkpoints_total_limit must be >= 1 or null",
        )
        if problems:
            raise ValueError("Invalid training config:\n  - " + "\n  - ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _parse_value(text: str) -> Any:
    """Command-line values are YAML scalars or flow lists (`--crop_size [256,256]`, `--init_from null`).

    YAML 1.1 reads `2e-3` (no dot) as a string; on the command line everybody means the number.
    """
    value = yaml.safe_load(text)
    if isinstance(value, str) and re.fullmatch(r"[-+]?\d+(\.\d*)?[eE][-+]?\d+", value):
        return float(value)
    return value


def load_config(path: str | os.PathLike | None, overrides: dict[str, Any] | None = None) -> TrainingConfig:
    """Reads a recipe YAML, applies overrides, and validates. Unknown keys are errors, never ignored."""
    values: dict[str, Any] = {}
    if path is not None:
        with open(path) as handle:
            values = yaml.safe_load(handle) or {}
        if not isinstance(values, dict):
            raise ValueError(f"{path}: a training config must be a mapping of keys to values")
    values.update(overrides or {})
    known = {f.name for f in dataclasses.fields(TrainingConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(
            f"Unknown training config keys {unknown} (in {path or 'overrides'}); valid keys: {', '.join(sorted(known))}"
        )
    hints = typing.get_type_hints(TrainingConfig)
    for key, value in values.items():
        _check_type(key, value, hints[key])
    config = TrainingConfig(**values)
    if config.id2label is not None:
        config.id2label = {int(k): str(v) for k, v in config.id2label.items()}
    config.validate()
    return config


def _check_type(key: str, value: Any, hint: Any) -> None:
    if value is None:
        if type(None) not in typing.get_args(hint):
            raise ValueError(f"Config key {key!r} cannot be null")
        return
    options = [h for h in typing.get_args(hint) if h is not type(None)] if typing.get_origin(hint) else [hint]
    if typing.get_origin(hint) in (list, dict):
        options = [hint]
    for option in options:
        base = typing.get_origin(option) or option
        if base is float and isinstance(value, int | float) and not isinstance(value, bool):
            return
        if base is int and isinstance(value, int) and not isinstance(value, bool):
            return
        if base in (str, bool, list, dict) and isinstance(value, base):
            return
        if base is typing.Union:
            return
    raise ValueError(f"Config key {key!r} expects {hint}, got {value!r}")


def parse_args(argv: list[str] | None = None) -> TrainingConfig:
    """`--config FILE` plus one `--key value` flag per TrainingConfig field (argparse rejects unknown flags)."""
    parser = argparse.ArgumentParser(
        description="Train SegFormer with Accelerate. Every config key can be given as --key value.",
    )
    parser.add_argument("--config", default=None, help=f"recipe YAML (default: {DEFAULT_CONFIG})")
    hints = typing.get_type_hints(TrainingConfig)
    for config_field in dataclasses.fields(TrainingConfig):
        # A bare boolean flag such as `--push_to_hub` reads as true.
        is_flag = hints[config_field.name] is bool
        parser.add_argument(
            f"--{config_field.name}",
            type=_parse_value,
            default=argparse.SUPPRESS,
            **({"nargs": "?", "const": True} if is_flag else {}),
        )
    arguments = vars(parser.parse_args(argv))
    config_path = arguments.pop("config") or DEFAULT_CONFIG
    return load_config(config_path, arguments)


def build_optimizer(model: torch.nn.Module, config: TrainingConfig) -> torch.optim.AdamW:
    """AdamW with the paper's parameter groups: decode head at `head_lr_multiplier` x the learning rate,
    and no weight decay on norms and biases (every 1-D parameter)."""
    groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        is_head = name.startswith("decode_head.") or name.startswith("classifier.")
        decays = parameter.ndim > 1
        groups.setdefault((is_head, decays), []).append(parameter)
    param_groups = [
        {
            "params": params,
            "lr": config.learning_rate * (config.head_lr_multiplier if is_head else 1.0),
            "weight_decay": config.weight_decay if decays else 0.0,
        }
        for (is_head, decays), params in sorted(groups.items())
    ]
    return torch.optim.AdamW(
        param_groups,
        lr=config.learning_rate,
        betas=(config.adam_beta1, config.adam_beta2),
        eps=config.adam_epsilon,
    )


def learning_rate_factor(step: int, config: TrainingConfig) -> float:
    """Multiplier of each group's base learning rate at optimiser step `step`.

    Polynomial decay from 1 to `min_lr_ratio` over `max_train_steps`, multiplied during the first
    `warmup_steps` by a linear ramp from `warmup_ratio` to 1 (mmseg's poly schedule with linear warm-up).
    """
    progress = min(step, config.max_train_steps) / config.max_train_steps
    decay = (1.0 - config.min_lr_ratio) * (1.0 - progress) ** config.poly_power + config.min_lr_ratio
    if step < config.warmup_steps:
        ramp = config.warmup_ratio + (1.0 - config.warmup_ratio) * step / config.warmup_steps
        return decay * ramp
    return decay


def build_scheduler(
    optimizer: torch.optim.Optimizer, config: TrainingConfig
) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: learning_rate_factor(step, config))


# Checkpoints ------------------------------------------------------------------------------------


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints under `output_dir/checkpoints`, oldest first (temporary dirs are ignored)."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m[1]), p) for p in root.iterdir() if p.is_dir() and (m := CHECKPOINT_PATTERN.match(p.name))]
    return [p for _, p in sorted(found) if (p / "training_state.json").exists()]


def resolve_checkpoint(spec: str, output_dir: str | os.PathLike) -> Path:
    """`latest` -> newest complete checkpoint in the output dir; otherwise a path that must exist."""
    if spec == "latest":
        checkpoints = list_checkpoints(output_dir)
        if not checkpoints:
            raise FileNotFoundError(
                f"--resume_from_checkpoint latest: no complete checkpoint in {output_dir}/checkpoints"
            )
        return checkpoints[-1]
    path = Path(spec)
    if not (path / "training_state.json").exists():
        raise FileNotFoundError(f"{spec} is not a complete segformer_hf checkpoint (no training_state.json)")
    return path


def save_checkpoint(
    accelerator, output_dir: str | os.PathLike, step: int, state: dict, limit: int | None
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
        write_json_atomic(temporary / "training_state.json", state)
        if final.exists():
            shutil.rmtree(final)
        os.replace(temporary, final)
        if limit is not None:
            for old in list_checkpoints(output_dir)[:-limit]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


class InterruptFlag:
    """Turns SIGINT/SIGTERM into a flag the loop checks at step boundaries, so the run can save and exit.

    A second signal restores the default handler behaviour (immediate stop).
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
        if self.signal_name is not None:
            signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
            signal.raise_signal(signum)
            return
        self.signal_name = signal.Signals(signum).name

    @property
    def raised(self) -> bool:
        return self.signal_name is not None


# The run --------------------------------------------------------------------------------------------


def create_accelerator(config: TrainingConfig):
    """An Accelerator that really distributes on CPU-only machines too (`cpu=True` makes it use gloo)."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration

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
    )


def ensure_wandb_does_not_prompt() -> None:
    """Without W&B credentials, run W&B offline (logs kept locally for `wandb sync`) instead of prompting."""
    if os.environ.get("WANDB_MODE") or os.environ.get("WANDB_API_KEY"):
        return
    import netrc

    try:
        has_login = netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        has_login = False
    if not has_login:
        os.environ["WANDB_MODE"] = "offline"
        logger.warning("No W&B credentials found: W&B runs offline (sync later with `wandb sync`).")


def build_model(config: TrainingConfig, id2label: dict[int, str]):
    """The model to train: a published variant from scratch, or any `from_reference` source."""
    from .configuration_segformer_hf import SegformerHFConfig
    from .conversion import from_reference
    from .modeling_segformer_hf import SegformerHFForSemanticSegmentation

    label_fields = {
        "num_labels": len(id2label),
        "id2label": dict(id2label),
        "label2id": {name: index for index, name in id2label.items()},
        "semantic_loss_ignore_index": config.ignore_index,
        "drop_path_rate": config.drop_path_rate,
        "classifier_dropout_prob": config.classifier_dropout_prob,
    }
    if config.init_from is None:
        return SegformerHFForSemanticSegmentation(
            SegformerHFConfig.from_variant(config.model_variant, **label_fields)
        )
    return from_reference(
        config.init_from, ignore_mismatched_sizes=config.ignore_mismatched_sizes, **label_fields
    )


def losses_are_finite(accelerator, loss: torch.Tensor) -> bool:
    """Whether the loss is finite on every process (all processes must take the same decision)."""
    finite = torch.isfinite(loss.detach()).float().reshape(1)
    return bool(accelerator.reduce(finite, reduction="sum").item() == accelerator.num_processes)


def any_process_interrupted(accelerator, flag: InterruptFlag) -> bool:
    """Signals may reach processes at different steps; agree so every process saves the same step."""
    raised = torch.tensor([1.0 if flag.raised else 0.0], device=accelerator.device)
    if accelerator.num_processes > 1:
        raised = accelerator.reduce(raised, reduction="sum")
    return bool(raised.item() > 0)


@dataclass
class RunState:
    """What a checkpoint must remember beyond model/optimiser/scheduler/RNG (which Accelerate saves)."""

    global_step: int = 0
    best_mean_iou: float | None = None
    best_step: int | None = None
    skipped_samples: int = 0
    skipped_nonfinite_steps: int = 0
    loss_sum: float = 0.0
    loss_count: int = 0


def train(config: TrainingConfig) -> dict[str, Any]:
    """Runs training end to end and returns the final results (also written to all_results.json)."""
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    from .hub import push_to_hub, write_model_card

    output_dir = Path(config.output_dir)
    _check_output_dir(config)
    accelerator = create_accelerator(config)
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
    set_seed(config.seed)

    # Data (the main process first, so that only it fills the datasets cache)
    with accelerator.main_process_first():
        train_dataset, eval_dataset, id2label = load_datasets(config)
    if config.metric_backend == "evaluate":
        from .metrics import create_metric

        # Fail now, not after hours of training, if evaluate's script cannot be loaded.
        create_metric("evaluate", num_labels=len(id2label), ignore_index=config.ignore_index)
    train_loader, eval_loader, train_transform = build_dataloaders(
        config, accelerator, train_dataset, eval_dataset, len(id2label)
    )

    # Model, optimiser, schedule
    model = build_model(config, id2label)
    optimizer = build_optimizer(model, config)
    scheduler = build_scheduler(optimizer, config)
    model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    accelerator.register_for_checkpointing(scheduler)
    state = RunState()
    if config.resume_from_checkpoint:
        checkpoint = resolve_checkpoint(config.resume_from_checkpoint, output_dir)
        accelerator.load_state(str(checkpoint))
        state = RunState(**json.loads((checkpoint / "training_state.json").read_text())["run_state"])
        logger.info("Resumed from %s at step %d", checkpoint, state.global_step)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        train_config_text = yaml.safe_dump(config.to_dict(), sort_keys=False)
        write_atomic(output_dir / "train_config.yaml", lambda path: path.write_text(train_config_text))
    accelerator.init_trackers(config.project_name, config={k: str(v) for k, v in config.to_dict().items()})

    steps_per_epoch = max(len(train_loader) // config.gradient_accumulation_steps, 1)
    logger.info(
        "Training %s (%.1fM parameters) on %d samples (%d steps/epoch), %d validation samples, %d steps",
        config.model_variant if config.init_from is None else config.init_from,
        sum(p.numel() for p in model.parameters()) / 1e6,
        len(train_dataset),
        steps_per_epoch,
        len(eval_dataset),
        config.max_train_steps,
    )
    progress = tqdm(
        total=config.max_train_steps,
        initial=state.global_step,
        disable=not accelerator.is_local_main_process,
        desc="train",
        dynamic_ncols=True,
    )
    started = time.time()
    start_step = state.global_step
    results: dict[str, Any] = {}
    interrupted_by: str | None = None
    log_path = output_dir / "train_log.jsonl"

    def checkpoint_now() -> None:
        payload = {"run_state": dataclasses.asdict(state), "config": config.to_dict()}
        path = save_checkpoint(
            accelerator, output_dir, state.global_step, payload, config.checkpoints_total_limit
        )
        logger.info("Saved checkpoint %s", path)

    def evaluate_now() -> dict[str, Any]:
        metrics = evaluate_during_training(accelerator, model, eval_loader, config, len(id2label))
        if accelerator.is_main_process:
            record = {"step": state.global_step, **{f"eval_{k}": v for k, v in metrics.items()}}
            with open(log_path, "a") as log_file:
                log_file.write(json.dumps(_nan_to_none(record)) + "\n")
        accelerator.log(
            {f"eval/{k}": v for k, v in metrics.items() if not isinstance(v, list)}, step=state.global_step
        )
        accelerator.log(
            {f"eval/iou_{id2label[i]}": v for i, v in enumerate(metrics["per_category_iou"])},
            step=state.global_step,
        )
        if accelerator.is_main_process:
            logger.info(
                "step %d: mean IoU %.4f, mean accuracy %.4f, overall accuracy %.4f",
                state.global_step,
                metrics["mean_iou"],
                metrics["mean_accuracy"],
                metrics["overall_accuracy"],
            )
            if state.best_mean_iou is None or metrics["mean_iou"] > state.best_mean_iou:
                state.best_mean_iou, state.best_step = float(metrics["mean_iou"]), state.global_step
                save_model_files(accelerator.unwrap_model(model), output_dir / "best", config)
        log_validation_images(accelerator, model, eval_loader, config, id2label, state.global_step)
        return metrics

    with InterruptFlag() as interrupt:
        epoch = state.global_step // steps_per_epoch
        while state.global_step < config.max_train_steps and interrupted_by is None:
            train_loader.set_epoch(epoch)
            # Augmentation draws depend on (seed, epoch, sample index) only: resumed runs see the same crops.
            train_transform.set_epoch(epoch)
            batches_done = (state.global_step - epoch * steps_per_epoch) * config.gradient_accumulation_steps
            loader = (
                accelerator.skip_first_batches(train_loader, batches_done) if batches_done else train_loader
            )
            model.train()
            for batch in loader:
                state.skipped_samples += int(batch.get("num_skipped", 0))
                with accelerator.accumulate(model):
                    outputs = model(pixel_values=batch["pixel_values"], labels=batch["labels"])
                    loss = outputs.loss
                    if not (batch["labels"] != config.ignore_index).any():
                        # Every pixel ignored (placeholders of skipped samples, or a crop of only "other"):
                        # cross-entropy is 0/0 there. A zero loss that still touches every parameter keeps
                        # the processes of a distributed run in step.
                        loss = outputs.logits.sum() * 0.0
                    finite = losses_are_finite(accelerator, loss)
                    if finite:
                        accelerator.backward(loss)
                        if accelerator.sync_gradients and config.max_grad_norm:
                            accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
                        optimizer.step()
                    elif config.nan_policy == "stop":
                        kept = list_checkpoints(output_dir)
                        raise FloatingPointError(
                            f"Non-finite loss ({loss.item()}) at step {state.global_step + 1}; stopping. "
                            + (f"The last good checkpoint is {kept[-1]}. " if kept else "No checkpoint yet. ")
                            + "Lower the learning rate, use bf16 instead of fp16, or set nan_policy: skip."
                        )
                    else:
                        # The update is skipped, but the step still counts: the schedule and the run's end
                        # stay where they were planned (every process decided alike, see losses_are_finite).
                        logger.warning("Non-finite loss at step %d: update skipped", state.global_step + 1)
                        state.skipped_nonfinite_steps += 1
                    if accelerator.sync_gradients:
                        scheduler.step()
                    optimizer.zero_grad()
                if not accelerator.sync_gradients:
                    continue
                state.global_step += 1
                step_loss = accelerator.reduce(loss.detach().float().reshape(1), reduction="mean").item()
                if finite:
                    state.loss_sum += step_loss
                    state.loss_count += 1
                progress.update(1)
                progress.set_postfix(loss=f"{step_loss:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
                if accelerator.is_main_process:
                    with open(log_path, "a") as log_file:
                        log_file.write(json.dumps({"step": state.global_step, "loss": step_loss}) + "\n")
                if state.global_step % config.logging_steps == 0:
                    accelerator.log(
                        {
                            "train/loss": step_loss,
                            "train/lr": scheduler.get_last_lr()[0],
                            "train/epoch": epoch,
                        },
                        step=state.global_step,
                    )
                finished = state.global_step >= config.max_train_steps
                if state.global_step % config.eval_steps == 0 and not finished:
                    evaluate_now()
                    model.train()
                if state.global_step % config.checkpointing_steps == 0 or finished:
                    checkpoint_now()
                if any_process_interrupted(accelerator, interrupt):
                    interrupted_by = interrupt.signal_name or "signal on another process"
                    if state.global_step % config.checkpointing_steps != 0 and not finished:
                        checkpoint_now()
                    break
                if finished:
                    break
            epoch += 1
    progress.close()

    if interrupted_by is not None:
        accelerator.end_training()
        logger.warning(
            "Interrupted by %s at step %d: checkpoint saved. Continue with --resume_from_checkpoint latest",
            interrupted_by,
            state.global_step,
        )
        return {"interrupted": interrupted_by, "train_steps": state.global_step}

    metrics = evaluate_now()
    runtime = time.time() - started
    steps_run = state.global_step - start_step
    results = {
        "eval_mean_iou": metrics["mean_iou"],
        "eval_mean_accuracy": metrics["mean_accuracy"],
        "eval_overall_accuracy": metrics["overall_accuracy"],
        "eval_per_category_iou": metrics["per_category_iou"],
        "eval_per_category_accuracy": metrics["per_category_accuracy"],
        "eval_samples": len(eval_dataset),
        "train_loss": state.loss_sum / max(state.loss_count, 1),
        "train_steps": state.global_step,
        "train_runtime": runtime,
        "train_steps_per_second": steps_run / runtime if runtime > 0 else 0.0,
        "train_samples": len(train_dataset),
        "train_skipped_samples": state.skipped_samples,
        "train_skipped_nonfinite_steps": state.skipped_nonfinite_steps,
        "best_eval_mean_iou": state.best_mean_iou,
        "best_step": state.best_step,
        "world_size": accelerator.num_processes,
    }
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_model_files(accelerator.unwrap_model(model), output_dir, config)
        write_json_atomic(output_dir / "all_results.json", results)
        write_model_card(output_dir)
        print_summary(results, id2label)
    accelerator.end_training()
    if config.push_to_hub and accelerator.is_main_process:
        url = push_to_hub(
            output_dir, config.hub_model_id, private=config.hub_private, format=config.hub_format
        )
        logger.info("Pushed to %s", url)
    return results


def _check_output_dir(config: TrainingConfig) -> None:
    """Refuse to mix a new run into an old one unless asked: nothing already written is lost by accident."""
    output_dir = Path(config.output_dir)
    if config.resume_from_checkpoint or config.overwrite_output_dir or not output_dir.exists():
        return
    if any(output_dir.iterdir()):
        raise FileExistsError(
            f"Output directory {output_dir} is not empty. Use --resume_from_checkpoint latest to continue that run, "
            "--overwrite_output_dir true to train into it anyway, or another --output_dir."
        )


def save_model_files(model, directory: str | os.PathLike, config: TrainingConfig) -> None:
    """Writes the model (safetensors + remote code + config) and its image processor, file by file atomically."""
    from transformers import SegformerImageProcessor

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    staging = directory / ".tmp-save"
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging, safe_serialization=True)
    image_processor = SegformerImageProcessor(
        size={"height": config.crop_size[0], "width": config.crop_size[1]},
        do_reduce_labels=config.reduce_labels,
    )
    image_processor.save_pretrained(staging)
    for item in staging.iterdir():
        os.replace(item, directory / item.name)
    staging.rmdir()


def print_summary(results: dict[str, Any], id2label: dict[int, str]) -> None:
    lines = [
        "",
        "Training summary",
        f"  steps             {results['train_steps']}",
        f"  runtime           {results['train_runtime']:.1f} s",
        f"  train loss (mean) {results['train_loss']:.4f}",
        f"  mean IoU          {results['eval_mean_iou']:.4f}",
        f"  mean accuracy     {results['eval_mean_accuracy']:.4f}",
        f"  overall accuracy  {results['eval_overall_accuracy']:.4f}",
        "  per-class IoU:",
    ]
    for index, iou in enumerate(results["eval_per_category_iou"]):
        value = "   n/a" if iou is None or (isinstance(iou, float) and math.isnan(iou)) else f"{iou:6.4f}"
        lines.append(f"    {id2label.get(index, str(index)):<20} {value}")
    print("\n".join(lines), flush=True)


def main(argv: list[str] | None = None) -> int:
    """`scripts/train.py`. Exit 0 when done or interrupted (its checkpoint is saved); 2 for a bad config;
    1 for a run stopped by bad data, a non-finite loss or an output directory in use, with the reason
    (not a traceback) as the last line."""
    from .data import BadSampleError

    try:
        config = parse_args(argv)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        train(config)
    except (BadSampleError, FloatingPointError, FileExistsError) as error:
        logger.error("%s", error)
        return 1
    return 0


def load_datasets(config: TrainingConfig):
    """(train dataset, validation dataset, id2label) as the config describes them, sample caps applied."""
    from . import data as seg_data

    splits = seg_data.load_segmentation_dataset(
        dataset_name=config.dataset_name,
        dataset_config_name=config.dataset_config_name,
        data_dir=config.data_dir,
        data_format=config.data_format,
        train_split=config.train_split,
        validation_split=config.validation_split,
        image_column=config.image_column,
        label_column=config.label_column,
        validation_fraction=config.validation_fraction,
        seed=config.seed,
    )
    id2label = seg_data.resolve_id2label(
        id2label=config.id2label,
        id2label_file=config.id2label_file,
        dataset=splits["train"],
        data_dir=config.data_dir,
    )
    train_dataset, eval_dataset = splits["train"], splits["validation"]
    if config.max_train_samples is not None:
        train_dataset = train_dataset.select(range(min(config.max_train_samples, len(train_dataset))))
    if config.max_eval_samples is not None:
        eval_dataset = eval_dataset.select(range(min(config.max_eval_samples, len(eval_dataset))))
    return train_dataset, eval_dataset, id2label


def evaluate_during_training(accelerator, model, eval_loader, config: TrainingConfig, num_labels: int):
    """Mean IoU of the current weights: each process evaluates its own validation shard, statistics summed.

    Returns evaluate's mean_iou dict with the per-class arrays as lists (ready for JSON and trackers).
    """
    from .inference import evaluate_model

    if accelerator is not None:
        share_batchnorm_statistics(accelerator, model)
    slide = config.eval_mode == "slide"
    results = evaluate_model(
        model,
        eval_loader,
        num_labels,
        config.ignore_index,
        accelerator=accelerator,
        mode=config.eval_mode,
        crop_size=tuple(config.crop_size) if slide else None,
        stride=tuple(config.eval_stride or config.crop_size) if slide else None,
        metric_backend=config.metric_backend,
    )
    return {key: value.tolist() if hasattr(value, "tolist") else value for key, value in results.items()}


def share_batchnorm_statistics(accelerator, model) -> None:
    """Gives every process the main process's BatchNorm running statistics (what the saved model holds).

    Without SyncBatchNorm each process updates its running mean/variance from its own batches, so after
    the last step they differ; DDP only re-broadcasts them at the next forward. Evaluating each shard
    with other statistics would make an N-process evaluation disagree with the saved model's.
    """
    if accelerator.num_processes == 1:
        return
    for module in accelerator.unwrap_model(model).modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            for buffer in module.buffers():
                torch.distributed.broadcast(buffer.data, src=0)


def evaluate_saved_model(output_dir: str | os.PathLike, overrides: list[str] | None = None) -> dict[str, Any]:
    """Evaluates a finished run's saved model in this one process, with the run's own validation settings.

    `overrides` are command-line style flags (`["--max_eval_samples", "5"]`) applied on top of the run's
    train_config.yaml. This is the single-process twin of the evaluation at the end of `train`.
    """
    from .modeling_segformer_hf import SegformerHFForSemanticSegmentation

    config = parse_args(["--config", str(Path(output_dir) / "train_config.yaml"), *(overrides or [])])
    _, eval_dataset, id2label = load_datasets(config)
    model = SegformerHFForSemanticSegmentation.from_pretrained(output_dir)
    eval_loader = build_eval_dataloader(config, eval_dataset, len(id2label))
    return evaluate_during_training(None, model, eval_loader, config, len(id2label))


def log_validation_images(
    accelerator, model, eval_loader, config: TrainingConfig, id2label, step: int
) -> None:
    """Sends a few validation images to the trackers as [image | ground truth | prediction] panels.

    Ignored label pixels are drawn black. Only the main process logs, from its own validation shard.
    """
    if config.num_log_images <= 0 or not accelerator.trackers or not accelerator.is_main_process:
        return
    import itertools

    import numpy as np
    from PIL import Image

    from .inference import default_palette

    # One extra colour, black, for ignored pixels.
    palette = np.concatenate([default_palette(len(id2label)), np.zeros((1, 3), dtype=np.uint8)])
    network = accelerator.unwrap_model(model)
    panels: list[np.ndarray] = []
    for rgb, truth, prediction in itertools.islice(
        _validation_predictions(network, eval_loader), config.num_log_images
    ):
        truth[(truth < 0) | (truth >= len(id2label))] = len(id2label)
        panel = np.concatenate([rgb, palette[truth], palette[prediction]], axis=1)
        if panels and panel.shape != panels[0].shape:
            panel = np.asarray(Image.fromarray(panel).resize(panels[0].shape[1::-1], Image.NEAREST))
        panels.append(panel)
    if not panels:
        return
    for tracker in accelerator.trackers:
        # TensorBoard needs to be told the layout of the stacked (N, H, W, 3) array; W&B takes images as they are.
        extra = {"dataformats": "NHWC"} if tracker.name == "tensorboard" else {}
        tracker.log_images({"validation/image_truth_prediction": np.stack(panels)}, step=step, **extra)


def _validation_predictions(network, eval_loader):
    """Yields (RGB image (H, W, 3) uint8, label (H, W), prediction (H, W)) at each label's resolution."""
    import numpy as np
    from PIL import Image

    from .inference import _same_size_groups, imagenet_normalization, predict_whole

    mean, std = (torch.tensor(values).view(3, 1, 1) for values in imagenet_normalization())
    for batch in eval_loader:
        for pixel_values, labels in _same_size_groups(batch):
            predictions = predict_whole(network, pixel_values, tuple(labels.shape[-2:])).argmax(1).cpu()
            for image, label, prediction in zip(pixel_values, labels, predictions):
                height, width = label.shape
                # (3, h, w) normalised -> (h, w, 3) uint8 -> resized to the label's (H, W)
                rgb = ((image.float().cpu() * std + mean).clamp(0, 1) * 255).byte().permute(1, 2, 0).numpy()
                rgb = np.asarray(Image.fromarray(rgb).resize((width, height), Image.BILINEAR))
                yield rgb, label.long().numpy().copy(), prediction.numpy()


def build_dataloaders(config: TrainingConfig, accelerator, train_dataset, eval_dataset, num_labels: int):
    """Lazy transforms (`with_transform`) in DataLoader workers; the validation set is sharded by process.

    Validation is sharded with `datasets`' own `shard` instead of Accelerate's sampler so that no
    process evaluates padding duplicates: the streaming confusion matrices are then summed exactly.
    """
    from torch.utils.data import DataLoader

    from . import data as seg_data

    train_transform = seg_data.SegmentationTrainTransform(
        crop_size=tuple(config.crop_size),
        img_scale=tuple(config.img_scale),
        ratio_range=tuple(config.ratio_range),
        cat_max_ratio=config.cat_max_ratio,
        flip_prob=config.flip_prob,
        photometric_distortion=config.photometric_distortion,
        ignore_index=config.ignore_index,
        reduce_labels=config.reduce_labels,
        num_labels=num_labels,
        seed=config.seed,
        skip_bad_samples=config.skip_bad_samples,
    )
    train_loader = DataLoader(
        train_dataset.with_transform(train_transform),
        batch_size=config.per_device_train_batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=config.num_workers,
        collate_fn=seg_data.train_collate_fn,
        persistent_workers=False,
        # Its own generator: otherwise every new iterator draws its worker seed from the global RNG, and a run
        # resumed mid-epoch (one extra iterator) would drop out differently from the uninterrupted run.
        generator=torch.Generator().manual_seed(config.seed),
    )
    if accelerator.num_processes > 1:
        eval_dataset = eval_dataset.shard(
            num_shards=accelerator.num_processes, index=accelerator.process_index, contiguous=True
        )
    eval_loader = build_eval_dataloader(config, eval_dataset, num_labels)
    return train_loader, eval_loader, train_transform


def build_eval_dataloader(config: TrainingConfig, eval_dataset, num_labels: int):
    """Validation batches: images resized for the network, labels kept at their original resolution."""
    from torch.utils.data import DataLoader

    from . import data as seg_data

    eval_transform = seg_data.SegmentationEvalTransform(
        img_scale=tuple(config.eval_img_scale or config.img_scale),
        ignore_index=config.ignore_index,
        reduce_labels=config.reduce_labels,
        num_labels=num_labels,
        skip_bad_samples=config.skip_bad_samples,
    )
    return DataLoader(
        eval_dataset.with_transform(eval_transform),
        batch_size=config.per_device_eval_batch_size,
        shuffle=False,
        num_workers=config.num_workers,
        collate_fn=seg_data.eval_collate_fn,
    )
