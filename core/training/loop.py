"""The training loop every model uses: batches, schedule, mixed precision, progress and cancel.

A run supplies one `Step`: given the indices of a batch into its training set and the run's
generator, it returns the batch's loss and a 1-D tensor of sums (one per named figure, then the
count they are means over). `train_loop` does the rest: a fresh shuffle per epoch, the optimiser
and its learning-rate schedule (`core.training.optim`), autocast and loss scaling on CUDA, progress
and `should_stop` polls a few times per second, the figures of each epoch, and the speed.
The classifiers (`core.training.classifier`) and the MAE and ranker (`train_on_pixels`) use it.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn as nn

from core.device import autocast, needs_grad_scaler
from core.training.optim import OptimSettings, make_optimizer

PROGRESS_INTERVAL_S = 0.25
Progress = Callable[[int, int, dict], None]
ShouldStop = Callable[[], bool]
# `(batch indices [B] (CPU int64), generator) -> (loss, sums [K + 1])`; runs inside autocast.
Step = Callable[[torch.Tensor, torch.Generator], tuple[torch.Tensor, torch.Tensor]]


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


def train_loop(model: nn.Module, step: Step, figures: tuple[str, ...], optim: OptimSettings, *,
               n: int, batch: int, total: int, seed: int, device: torch.device,
               progress: Progress | None = None, should_stop: ShouldStop | None = None) -> dict[str, Any]:
    """Train `model` in place for `total` steps of `batch` of the `n` training items.

    Each epoch visits a fresh shuffle (`batch_indices`, from a generator seeded with `seed`, which
    `step` gets too). `step`'s sums are summed per epoch; `figures` names all but the last (the
    count), and each figure is reported as its mean (sum / count). `progress(done, total, info)` is
    called a few times per second (info: epoch, step, the running figures of the epoch, lr) and
    at the end of each epoch (its figures); `should_stop()`, polled as often, True raises
    `TrainingCancelled`. The model ends in eval mode, also when cancelled. Returns the figures of
    each epoch (`curve`), steps, seconds and images/s.
    """
    gen = torch.Generator().manual_seed(seed)
    optimizer = make_optimizer(model, optim)
    scaler = torch.amp.GradScaler("cuda", enabled=needs_grad_scaler(device))
    throttle = Throttle()
    per_epoch = n // batch
    sums = torch.zeros(len(figures) + 1, device=device)
    curve = []
    model.train()
    start = time.perf_counter()
    try:
        for done, (epoch, idx) in enumerate(batch_indices(n, batch, total, gen)):
            lr = optim.lr_at(done, total)
            if throttle():
                _poll(progress, should_stop, done, total,
                      {"epoch": epoch, "step": done, **_means(figures, sums), "lr": lr})
            for group in optimizer.param_groups:
                group["lr"] = lr
            with autocast(device):
                loss, batch_sums = step(idx, gen)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            sums += batch_sums
            if (done + 1) % per_epoch == 0 or done + 1 == total:
                curve.append(_means(figures, sums))
                sums.zero_()
                if progress is not None:
                    progress(done + 1, total, {"epoch": epoch, "step": done + 1, **curve[-1], "lr": lr})
    finally:
        model.eval()
    seconds = time.perf_counter() - start
    return {"curve": curve, "steps": total, "seconds": seconds, "images_per_s": total * batch / max(seconds, 1e-9)}


def _means(figures: tuple[str, ...], sums: torch.Tensor) -> dict[str, float | None]:
    """`sums [K + 1]` (K figure sums, then their count) -> `{figure: mean}`, None before any batch."""
    *values, count = sums.tolist()
    return {name: value / count if count else None for name, value in zip(figures, values)}


def _poll(progress: Progress | None, should_stop: ShouldStop | None, done: int, total: int, info: dict) -> None:
    """Raise `TrainingCancelled` if asked to, else report progress."""
    if should_stop is not None and should_stop():
        raise TrainingCancelled(f"training stopped at step {done} of {total}")
    if progress is not None:
        progress(done, total, info)


@dataclass(frozen=True)
class LoopSettings:
    """A `train_on_pixels` run (the MAE and the ranker); saved beside the model as its recipe."""

    epochs: int
    batch_size: int
    lr: float               # peak learning rate
    weight_decay: float
    warmup_frac: float      # share of the steps spent on the linear warm-up
    seed: int

    def optim(self) -> OptimSettings:
        """AdamW (0.9, 0.95), linear warm-up then cosine decay (as MAE)."""
        return OptimSettings("adamw", self.lr, self.weight_decay, "cosine", self.warmup_frac, beta2=0.95)


LossFn = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


def train_on_pixels(model: nn.Module, pixels: torch.Tensor, loss_fn: LossFn, settings: LoopSettings,
                    device: torch.device, progress: Progress | None,
                    should_stop: ShouldStop | None) -> dict[str, Any]:
    """`train_loop` over uint8 `pixels [N, C, H, W]` (CPU) for a model whose loss needs no labels.

    `loss_fn(x, gen)` gets a float batch `[B, C, H, W]` (0..255) on `device` and the run's generator
    (for masks). Progress and cancel as `train_loop` (figure: loss). Returns the mean loss per
    epoch (`loss_curve`), the last one, steps, seconds and images/s.
    """
    batch = min(settings.batch_size, len(pixels))

    def step(idx: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        loss = loss_fn(pixels[idx].to(device).float(), gen)
        return loss, torch.stack([loss.detach(), torch.ones((), device=device)])

    fit = train_loop(model, step, ("loss",), settings.optim(), n=len(pixels), batch=batch,
                     total=settings.epochs * (len(pixels) // batch), seed=settings.seed, device=device,
                     progress=progress, should_stop=should_stop)
    curve = [epoch["loss"] for epoch in fit.pop("curve")]
    return {"loss_curve": curve, "train_loss": curve[-1] if curve else None, **fit}
