"""The paper's optimisation recipe: AdamW with a 10x decoder learning rate, warm-up, polynomial decay; and
the optional exponential moving average of the weights."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.optim.swa_utils import AveragedModel

from .arguments import TrainingConfig


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
    `warmup_steps` by a linear ramp from `warmup_start_factor` to 1 (mmseg's poly schedule with linear
    warm-up).
    """
    progress = min(step, config.max_train_steps) / config.max_train_steps
    decay = (1.0 - config.min_lr_ratio) * (1.0 - progress) ** config.poly_power + config.min_lr_ratio
    if step < config.warmup_steps:
        ramp = config.warmup_start_factor + (1.0 - config.warmup_start_factor) * step / config.warmup_steps
        return decay * ramp
    return decay


def build_scheduler(
    optimizer: torch.optim.Optimizer, config: TrainingConfig
) -> torch.optim.lr_scheduler.LambdaLR:
    """The schedule as a LambdaLR; its state (a step count) is saved as JSON with the checkpoint."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: learning_rate_factor(step, config))


def build_weight_average(
    model: torch.nn.Module, config: TrainingConfig, device: torch.device
) -> AveragedModel | None:
    """An exponential moving average of `model`'s weights and buffers (None without `ema_decay`).

    Its BatchNorm statistics are averaged too, so that they belong to the averaged weights rather than to
    the last step's. The copy never needs gradients; `update_parameters(model)` after each update.
    """
    if config.ema_decay is None:
        return None
    average = AveragedModel(model, device=device, multi_avg_fn=ema_update(config.ema_decay), use_buffers=True)
    return average.requires_grad_(False)


def ema_decay_at(update: int, decay: float) -> float:
    """The decay used when the average already holds `update` updates: at most `decay`, and less at first
    ((1 + n) / (10 + n)), so that the average forgets the random initialisation within tens of steps instead
    of a thousand (the warm-up of TensorFlow's ExponentialMovingAverage)."""
    return min(decay, (1.0 + update) / (10.0 + update))


def ema_update(decay: float) -> Callable[[list[torch.Tensor], list[torch.Tensor], torch.Tensor], None]:
    """`AveragedModel`'s multi_avg_fn: average <- d * average + (1 - d) * current, d = `ema_decay_at`.

    Integer buffers (BatchNorm's batch counter) cannot be averaged: they take the current value.
    """

    @torch.no_grad()
    def update(averages: list[torch.Tensor], currents: list[torch.Tensor], updates: torch.Tensor) -> None:
        if torch.is_floating_point(averages[0]):
            torch._foreach_lerp_(averages, currents, 1.0 - ema_decay_at(int(updates), decay))
        else:
            torch._foreach_copy_(averages, currents)

    return update
