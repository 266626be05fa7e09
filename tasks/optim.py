"""Optimiser parameter groups and learning-rate schedules shared by every task."""

from __future__ import annotations

import math
from typing import Iterable

from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def param_groups_weight_decay(modules: Iterable[nn.Module], weight_decay: float) -> list[dict]:
    """Split parameters into decayed and non-decayed groups.

    No decay on norms and biases (every parameter with fewer than two dimensions), on parameters
    flagged ``_no_weight_decay`` (the SSM's A_logs and Ds) and on names a module lists in
    ``no_weight_decay()`` (position embeddings, class tokens).
    """
    decay, no_decay = [], []
    for module in modules:
        skip = module.no_weight_decay() if hasattr(module, "no_weight_decay") else set()
        for name, param in module.named_parameters():
            if not param.requires_grad:
                continue
            if param.ndim <= 1 or getattr(param, "_no_weight_decay", False) or name in skip:
                no_decay.append(param)
            else:
                decay.append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def param_groups_layer_decay(backbone: nn.Module, head: nn.Module, weight_decay: float,
                             layer_decay: float) -> list[dict]:
    """Layer-wise learning-rate decay for fine-tuning: block i of n gets ``lr * layer_decay ** (n - i)``.

    Layers are numbered by the backbone's timm ``group_matcher``; the head keeps the full rate. Each
    group carries ``lr_scale``, which the task multiplies into the group's learning rate.
    """
    from timm.optim import param_groups_layer_decay as timm_layer_decay

    groups = timm_layer_decay(backbone, weight_decay=weight_decay, layer_decay=layer_decay,
                              no_weight_decay_list=getattr(backbone, "no_weight_decay", set)())
    return groups + param_groups_weight_decay([head], weight_decay)


def warmup_cosine(optimizer: Optimizer, total_steps: int, warmup_steps: int = 0, warmup_fraction: float = 0.0,
                  min_lr_ratio: float = 0.01) -> LambdaLR:
    """Linear warm-up from ~0 to the base rate, then cosine decay to ``min_lr_ratio`` of it, per step.

    The warm-up length is ``warmup_steps`` or, when that is 0, ``warmup_fraction`` of all steps.
    """
    warmup = warmup_steps or int(warmup_fraction * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, factor)


def warmup_poly(optimizer: Optimizer, total_steps: int, warmup_steps: int = 1500, warmup_start_factor: float = 1e-6,
                power: float = 1.0, min_lr_ratio: float = 0.0) -> LambdaLR:
    """mmseg's ADE20K schedule, per step: linear warm-up from ``warmup_start_factor`` of the base rate to the
    base rate over ``warmup_steps``, then polynomial decay ``(1 - progress) ** power`` to ``min_lr_ratio`` of it.

    Equals mmengine's ``LinearLR(start_factor, end=warmup_steps)`` followed by
    ``PolyLR(eta_min=min_lr_ratio * lr, power, begin=warmup_steps, end=total_steps)``.
    """

    def factor(step: int) -> float:
        if step < warmup_steps:
            return warmup_start_factor + (1 - warmup_start_factor) * step / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * (1 - progress) ** power

    return LambdaLR(optimizer, factor)


def warmup_multistep(optimizer: Optimizer, total_steps: int, milestones: Iterable[float], epochs: int,
                     gamma: float = 0.1, warmup_steps: int = 1000, warmup_start_factor: float = 0.001) -> LambdaLR:
    """mmdet's detection schedule, per step: the rate drops by ``gamma`` at each milestone epoch, multiplied
    during the first ``warmup_steps`` by a linear warm-up from ``warmup_start_factor`` to 1.

    Equals mmengine's ``LinearLR(start_factor, end=warmup_steps)`` chained with
    ``MultiStepLR(milestones, gamma, by_epoch=True)``. Milestones are epochs (of ``epochs`` in all), turned
    into steps with the trainer's step count, so the schedule follows ``max_epochs`` and gradient accumulation.
    """
    if epochs < 1:
        raise ValueError(f"warmup_multistep: epochs must be >= 1 (the trainer's max_epochs), got {epochs}")
    steps_per_epoch = total_steps / epochs
    boundaries = sorted(round(m * steps_per_epoch) for m in milestones)

    def factor(step: int) -> float:
        scale = gamma ** sum(step >= boundary for boundary in boundaries)
        if step < warmup_steps:
            scale *= warmup_start_factor + (1 - warmup_start_factor) * step / warmup_steps
        return scale

    return LambdaLR(optimizer, factor)
