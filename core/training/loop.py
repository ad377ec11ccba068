"""The training loop every model uses: batches, schedule, mixed precision, progress and cancel."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn as nn

from core.device import autocast, needs_grad_scaler
from core.training.optim import adamw, cosine_lr

PROGRESS_INTERVAL_S = 0.25
Progress = Callable[[int, int, dict], None]
ShouldStop = Callable[[], bool]


class TrainingCancelled(Exception):
    """`should_stop()` returned True; the model is left half-trained and in eval mode."""


def batch_indices(n: int, batch: int, total_steps: int, gen: torch.Generator):
    """Yield `(epoch, index tensor [batch])` for `total_steps` steps; a fresh shuffle per epoch."""
    per_epoch = n // batch
    step = 0
    epoch = 0
    while step < total_steps:
        order = torch.randperm(n, generator=gen)
        for i in range(min(per_epoch, total_steps - step)):
            yield epoch, order[i * batch:(i + 1) * batch]
            step += 1
        epoch += 1


class Throttle:
    """True at most once per `interval` seconds (and on the first call)."""

    def __init__(self, interval: float = PROGRESS_INTERVAL_S):
        self.interval = interval
        self.last = -math.inf

    def __call__(self) -> bool:
        now = time.monotonic()
        if now - self.last < self.interval:
            return False
        self.last = now
        return True


@dataclass(frozen=True)
class LoopSettings:
    """Optimisation settings shared by the MAE and ranker training loops."""

    epochs: int
    batch_size: int
    lr: float               # peak learning rate
    weight_decay: float
    warmup_frac: float      # share of the steps spent on the linear warm-up
    seed: int


LossFn = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


def train_loop(model: nn.Module, pixels: torch.Tensor, loss_fn: LossFn, settings: LoopSettings,
               device: torch.device, progress: Progress | None, should_stop: ShouldStop | None) -> dict[str, Any]:
    """AdamW (0.9, 0.95) with warm-up + cosine over uint8 `pixels [N, C, H, W]` (CPU), in place.

    Each epoch visits a fresh shuffle in full batches; `loss_fn(x, gen)` gets a float batch
    `[B, C, H, W]` (0..255) on `device` and the run's generator (for masks). Autocast and loss
    scaling on CUDA. `progress(done, total, info)` is called a few times per second and after each
    epoch (info: epoch, step, lr, and the epoch's mean loss); `should_stop()` True raises
    `TrainingCancelled`. Returns the loss per epoch, steps, seconds and images/s.
    """
    gen = torch.Generator().manual_seed(settings.seed)
    batch = min(settings.batch_size, len(pixels))
    per_epoch = len(pixels) // batch
    total = settings.epochs * per_epoch
    optimizer = adamw(model, settings.lr, settings.weight_decay)
    scaler = torch.amp.GradScaler("cuda", enabled=needs_grad_scaler(device))
    throttle = Throttle()
    curve = []
    model.train()
    start = time.perf_counter()
    for epoch in range(settings.epochs):
        order = torch.randperm(len(pixels), generator=gen)
        loss_sum = torch.zeros((), device=device)
        for i in range(per_epoch):
            step = epoch * per_epoch + i
            lr = cosine_lr(step, total, settings.lr, settings.warmup_frac)
            _poll(throttle, progress, should_stop, step, total, {"epoch": epoch, "step": step, "lr": lr})
            for group in optimizer.param_groups:
                group["lr"] = lr
            x = pixels[order[i * batch:(i + 1) * batch]].to(device).float()
            with autocast(device):
                loss = loss_fn(x, gen)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            loss_sum += loss.detach()
        curve.append(float(loss_sum) / max(per_epoch, 1))
        if progress is not None:
            done = (epoch + 1) * per_epoch
            progress(done, total, {"epoch": epoch, "step": done, "loss": curve[-1]})
    seconds = time.perf_counter() - start
    return {"loss_curve": curve, "train_loss": curve[-1] if curve else None, "steps": total,
            "seconds": seconds, "images_per_s": total * batch / max(seconds, 1e-9)}


def _poll(throttle: Throttle, progress: Progress | None, should_stop: ShouldStop | None,
          done: int, total: int, info: dict) -> None:
    """At most a few times per second: raise `TrainingCancelled` if asked to, else report progress."""
    if not throttle():
        return
    if should_stop is not None and should_stop():
        raise TrainingCancelled(f"training stopped at step {done} of {total}")
    if progress is not None:
        progress(done, total, info)
