"""The paper's optimisation recipe: AdamW with a 10x decoder learning rate, warm-up, polynomial decay."""

from __future__ import annotations

import torch

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
