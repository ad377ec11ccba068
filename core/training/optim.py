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


class Optimizer:
    """The part of `torch.optim.Optimizer` the training loop uses: `param_groups` (each with its `lr`, which the
    loop sets every step, and `weight_decay`), `zero_grad`, `step`. Ours, not torch's, for one reason: every
    `torch.optim` optimiser imports `torch._dynamo` on first use (`torch._disable_dynamo`), 1.7-4 s of CPU in
    each job process that trains (measured at load 1-4; a sweep starts one process per run). Same update
    rules as torch's, to float tolerance (tests/test_optim.py compares them step by step)."""

    def __init__(self, groups: list[dict], **defaults):
        self.param_groups = [{**defaults, **g, "params": [p for p in g["params"]]} for g in groups]
        self.state: dict[torch.Tensor, dict] = {}

    def zero_grad(self, set_to_none: bool = True) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if set_to_none:
                    p.grad = None
                elif p.grad is not None:
                    p.grad.zero_()

    @torch.no_grad()
    def step(self) -> None:
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                self._update(group, params, [p.grad for p in params])

    def _update(self, group: dict, params: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
        raise NotImplementedError


class NesterovSGD(Optimizer):
    """`torch.optim.SGD(momentum=m, nesterov=True, weight_decay=wd)`: g = grad + wd p; b = m b + g (b = g at
    the first step); p -= lr (g + m b)."""

    def _update(self, group: dict, params: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
        if group["weight_decay"]:
            grads = torch._foreach_add(grads, params, alpha=group["weight_decay"])
        seen = [p in self.state for p in params]  # a dict keyed by tensor: by identity
        old = [self.state[p]["momentum_buffer"] for p, s in zip(params, seen) if s]
        if old:
            torch._foreach_mul_(old, group["momentum"])
            torch._foreach_add_(old, [g for g, s in zip(grads, seen) if s])
        for p, g, s in zip(params, grads, seen):
            if not s:
                self.state[p] = {"momentum_buffer": g.detach().clone()}
        bufs = [self.state[p]["momentum_buffer"] for p in params]
        update = torch._foreach_add(grads, bufs, alpha=group["momentum"])
        torch._foreach_add_(params, update, alpha=-group["lr"])


class AdamW(Optimizer):
    """`torch.optim.AdamW(betas=(b1, b2), eps=1e-8, weight_decay=wd)`: p *= 1 - lr wd; m = b1 m + (1 - b1) g;
    v = b2 v + (1 - b2) g^2; p -= lr m / (1 - b1^t) / (sqrt(v / (1 - b2^t)) + eps)."""

    def _update(self, group: dict, params: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
        b1, b2 = group["betas"]
        for p in params:
            if p not in self.state:
                self.state[p] = {"step": 0, "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
        m = [self.state[p]["exp_avg"] for p in params]
        v = [self.state[p]["exp_avg_sq"] for p in params]
        t = self.state[params[0]]["step"] + 1
        for p in params:
            self.state[p]["step"] = t
        if group["weight_decay"]:
            torch._foreach_mul_(params, 1 - group["lr"] * group["weight_decay"])
        torch._foreach_lerp_(m, grads, 1 - b1)
        torch._foreach_mul_(v, b2)
        torch._foreach_addcmul_(v, grads, grads, value=1 - b2)
        denom = torch._foreach_sqrt(v)
        torch._foreach_div_(denom, math.sqrt(1 - b2 ** t))
        torch._foreach_add_(denom, group["eps"])
        torch._foreach_addcdiv_(params, m, denom, value=-group["lr"] / (1 - b1 ** t))


def make_optimizer(model: nn.Module, settings: OptimSettings) -> Optimizer:
    """SGD (Nesterov) or AdamW over the trainable parameters; weight decay on those with ndim > 1
    (weights, kernels, tokens), not on biases and norm parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim > 1], "weight_decay": settings.weight_decay},
              {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]
    if settings.optimizer == "sgd":
        return NesterovSGD(groups, lr=settings.lr, momentum=settings.momentum)
    return AdamW(groups, lr=settings.lr, betas=(settings.momentum, settings.beta2), eps=1e-8)
