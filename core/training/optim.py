"""The optimiser factory and the learning-rate schedules every training loop uses."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from core.training.recipe import OPTIMIZERS


def one_cycle_lr(step: int, total: int, peak: float, warmup_frac: float) -> float:
    """Linear warm-up to `peak` over `warmup_frac` of the steps, then linear decay to 0."""
    warmup = max(1, round(warmup_frac * total))
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * max(0.0, (total - step) / max(1, total - warmup))


def cosine_lr(step: int, total: int, peak: float, warmup_frac: float) -> float:
    """Linear warm-up to `peak` over `warmup_frac` of the steps, then cosine decay to 0."""
    warmup = max(1, round(warmup_frac * total))
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1.0 + math.cos(math.pi * progress))


# Learning-rate schedules by name: `(step, total, peak, warmup_frac) -> lr`.
SCHEDULES = {"one_cycle": one_cycle_lr, "cosine": cosine_lr}


@dataclass(frozen=True)
class OptimSettings:
    """Optimiser and learning-rate schedule of a run."""

    optimizer: str            # 'sgd' (Nesterov momentum) | 'adamw'
    lr: float                 # peak learning rate
    weight_decay: float       # on weight matrices and kernels only (ndim > 1)
    schedule: str             # a key of SCHEDULES
    warmup_frac: float        # share of the steps spent on the linear warm-up
    momentum: float = 0.9     # SGD momentum, AdamW beta1
    beta2: float = 0.999      # AdamW beta2

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS or self.schedule not in SCHEDULES:
            raise ValueError(f"optimizer {self.optimizer!r} / schedule {self.schedule!r}; choose from "
                             f"{', '.join(OPTIMIZERS)} / {', '.join(SCHEDULES)}")

    def lr_at(self, step: int, total: int) -> float:
        """The learning rate of step `step` (0-based) of `total`."""
        return SCHEDULES[self.schedule](step, total, self.lr, self.warmup_frac)


def make_optimizer(model: nn.Module, settings: OptimSettings) -> torch.optim.Optimizer:
    """SGD (Nesterov) or AdamW over the trainable parameters; weight decay on those with ndim > 1
    (weights, kernels, tokens), not on biases and norm parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim > 1], "weight_decay": settings.weight_decay},
              {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]
    if settings.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=settings.lr, momentum=settings.momentum, nesterov=True)
    return torch.optim.AdamW(groups, lr=settings.lr, betas=(settings.momentum, settings.beta2))
