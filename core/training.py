"""Supervised training of an image classifier on in-memory uint8 arrays.

One loop for every model and every data subset: the whole training set is one uint8 tensor
(on the device when it fits), batches are indexed from it, augmented as a batch on the device
and converted to float there. No per-image Python work, no DataLoader.

Models take raw pixel values (uint8 or float in 0..255, `[N, C, H, W]`) and normalise inside:
wrap any network in `Normalized`, whose per-channel mean/std buffers `train_classifier` fits to
the training images, so a saved model needs nothing else to embed or classify raw pixels.
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from core.device import autocast, needs_grad_scaler, pick_device

# Registered name of the default architecture in `core.backbones` (kept here so that a recipe
# needs no model import; `core.backbones.DEFAULT_BACKBONE` is built from it).
DEFAULT_ARCH = "resnet8s2"

OPTIMIZERS = ("sgd", "adamw")
AUGMENTATIONS = ("none", "flip_crop")
BUDGETS = ("epochs", "steps")
PROGRESS_INTERVAL_S = 0.25
# Keep the training array on an accelerator only while it takes less than this share of free memory.
DEVICE_DATA_SHARE = 0.5

Progress = Callable[[int, int, dict], None]
ShouldStop = Callable[[], bool]


class TrainingCancelled(Exception):
    """`should_stop()` returned True; the model is left half-trained and in eval mode."""


@dataclass(frozen=True)
class Recipe:
    """Everything that decides a training run; saved beside its results (`to_dict`)."""

    arch: str = DEFAULT_ARCH        # registered architecture name (provenance; see core.backbones)
    epochs: int = 10
    batch_size: int = 256
    lr: float = 0.1                 # peak learning rate of the one-cycle schedule
    optimizer: str = "sgd"          # 'sgd' (Nesterov momentum) | 'adamw'
    momentum: float = 0.9           # SGD momentum, AdamW beta1
    weight_decay: float = 5e-4      # on weights only, not on biases and norm parameters
    label_smoothing: float = 0.1
    augmentation: str = "none"      # 'none' | 'flip_crop' (random h-flip + random crop)
    crop_padding: int = 2           # pixels of zero padding around the random crop
    warmup_frac: float = 0.2        # share of the steps spent on the linear warm-up
    seed: int = 0
    budget: str = "epochs"          # 'epochs' | 'steps' (equal compute for subsets)
    steps: int | None = None        # total optimisation steps when budget == 'steps'

    def __post_init__(self) -> None:
        _check_choice("optimizer", self.optimizer, OPTIMIZERS)
        _check_choice("augmentation", self.augmentation, AUGMENTATIONS)
        _check_choice("budget", self.budget, BUDGETS)
        if self.budget == "steps" and not (self.steps and self.steps > 0):
            raise ValueError("budget='steps' needs steps > 0")
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError("epochs, batch_size and lr must be positive")
        if not 0.0 <= self.warmup_frac < 1.0:
            raise ValueError("warmup_frac must lie in [0, 1)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Recipe:
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown recipe fields: {sorted(unknown)}")
        return cls(**data)

    def batch_for(self, n_train: int) -> int:
        """Batch size used on `n_train` images (never larger than the set)."""
        return min(self.batch_size, n_train)

    def total_steps(self, n_train: int) -> int:
        """Optimisation steps of the run; each epoch drops its last incomplete batch."""
        if self.budget == "steps":
            return int(self.steps)
        return self.epochs * (n_train // self.batch_for(n_train))


def default_recipe(image_size: int = 28, arch: str = DEFAULT_ARCH) -> Recipe:
    """The recipe tuned for 28-32 px images on a CPU budget (bench/embed.py has the evidence).

    Fashion-MNIST, resnet8s2, 10 epochs: 91.1-91.4 % test top-1. No augmentation: a 10-epoch
    run underfits, and flip+crop (pad 2) cost 1.3 points, flip alone 0.6; switch
    'flip_crop' on for longer runs (its padding scales with `image_size`).
    """
    return Recipe(arch=arch, epochs=10, augmentation="none", crop_padding=max(1, round(image_size / 14)))


def _check_choice(field: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{field}={value!r}; choose one of {', '.join(choices)}")


class Normalized(nn.Module):
    """Raw pixels `[N, C, H, W]` (0..255) -> `(x / 255 - mean) / std` per channel -> `net`.

    `net` must offer `forward_features(x) -> [N, D]`, `forward(x) -> [N, classes]` and `embed_dim`.
    """

    def __init__(self, net: nn.Module, in_chans: int):
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.zeros(1, in_chans, 1, 1))
        self.register_buffer("std", torch.ones(1, in_chans, 1, 1))

    @property
    def embed_dim(self) -> int:
        return self.net.embed_dim

    def set_stats(self, mean: list[float], std: list[float]) -> None:
        """Per-channel mean/std of pixel values scaled to 0..1."""
        self.mean.copy_(torch.tensor(mean).view_as(self.mean))
        self.std.copy_(torch.tensor(std).view_as(self.std))

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """`[N, C, H, W]` uint8/float 0..255 -> float, zero mean and unit std per channel."""
        return (x.to(self.mean.dtype) / 255.0 - self.mean) / self.std

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.forward_features(self.normalize(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalize(x))


def as_nhwc(images: np.ndarray) -> np.ndarray:
    """Check a uint8 image array; `[N, H, W]` (grayscale) becomes `[N, H, W, 1]`."""
    if images.dtype != np.uint8:
        raise TypeError(f"images must be uint8, got {images.dtype}")
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4:
        raise ValueError(f"images must be [N, H, W, C] (or [N, H, W]), got shape {images.shape}")
    return images


def channel_stats(images: np.ndarray, chunk: int = 8192) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of `[N, H, W, C]` uint8 pixels, in 0..1 units (float64 sums)."""
    images = as_nhwc(images)
    total = np.zeros(images.shape[-1])
    squares = np.zeros(images.shape[-1])
    for start in range(0, len(images), chunk):
        block = images[start:start + chunk].reshape(-1, images.shape[-1]).astype(np.float64) / 255.0
        total += block.sum(0)
        squares += np.square(block).sum(0)
    count = images[..., 0].size
    mean = total / count
    std = np.sqrt(np.maximum(squares / count - mean ** 2, 0.0))
    return mean.tolist(), np.maximum(std, 1e-3).tolist()


def pixels_view(images: np.ndarray) -> torch.Tensor:
    """uint8 `[N, H, W, C]` -> CPU uint8 tensor `[N, C, H, W]`, a channels-last view.

    Copies only arrays torch cannot share (read-only, e.g. parsed from bytes, or strided).
    """
    images = as_nhwc(images)
    if not images.flags.writeable or not images.flags.c_contiguous:
        images = np.array(images, order="C")
    return torch.from_numpy(images).permute(0, 3, 1, 2)


def pixels_tensor(images: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8 `[N, H, W, C]` -> uint8 tensor `[N, C, H, W]`, on `device` when it fits there."""
    data = pixels_view(images)
    if device.type == "cuda" and data.numel() > DEVICE_DATA_SHARE * torch.cuda.mem_get_info(device)[0]:
        return data.pin_memory()
    return data.to(device)


def to_batch(pixels: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 `[B, C, H, W]` -> float32 0..255 on `device`, channels-last (fast convolutions)."""
    x = pixels.to(device, non_blocking=True).float()
    return x.contiguous(memory_format=torch.channels_last)


def flip_crop(x: torch.Tensor, padding: int, gen: torch.Generator) -> torch.Tensor:
    """Random horizontal flip and random `padding`-px shift (zero fill) of a batch `[B, C, H, W]`."""
    b, c, h, w = x.shape
    flip = (torch.rand(b, generator=gen) < 0.5).to(x.device)
    x = torch.where(flip.view(b, 1, 1, 1), x.flip(3), x)
    if padding == 0:
        return x
    dy = torch.randint(0, 2 * padding + 1, (b, 1), generator=gen).to(x.device)
    dx = torch.randint(0, 2 * padding + 1, (b, 1), generator=gen).to(x.device)
    rows = dy + torch.arange(h, device=x.device)  # [B, H]
    cols = dx + torch.arange(w, device=x.device)  # [B, W]
    padded = F.pad(x, (padding,) * 4)  # [B, C, H + 2p, W + 2p]
    x = padded.gather(2, rows.view(b, 1, h, 1).expand(b, c, h, w + 2 * padding))
    return x.gather(3, cols.view(b, 1, 1, w).expand(b, c, h, w))


def lr_at(step: int, total: int, peak: float, warmup_frac: float) -> float:
    """One-cycle schedule: linear warm-up to `peak` over `warmup_frac` of the steps, then linear to 0."""
    warmup = max(1, round(warmup_frac * total))
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * max(0.0, (total - step) / max(1, total - warmup))


def make_optimizer(model: nn.Module, recipe: Recipe) -> torch.optim.Optimizer:
    """SGD (Nesterov) or AdamW; weight decay on weight matrices/kernels only."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": recipe.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=recipe.lr, momentum=recipe.momentum, nesterov=True)
    return torch.optim.AdamW(groups, lr=recipe.lr, betas=(recipe.momentum, 0.999))


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


class _Throttle:
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


def train_classifier(
    model: Normalized,
    images: np.ndarray,
    labels: np.ndarray,
    recipe: Recipe,
    *,
    eval_images: np.ndarray | None = None,
    eval_labels: np.ndarray | None = None,
    device: torch.device | str | None = None,
    progress: Progress | None = None,
    should_stop: ShouldStop | None = None,
) -> dict[str, Any]:
    """Train `model` in place on uint8 `images [N, H, W, C]` with int64 `labels [N]`.

    Fits the model's normalisation to `images` first. `progress(done, total, info)` is called
    a few times per second (info: epoch, step, loss, acc, lr) and once at the end;
    `should_stop()` is polled as often, and True raises `TrainingCancelled`.
    Returns JSON-able metrics: train_loss/train_acc (last epoch, augmented data), test_top1,
    test_loss, per_class (test accuracy per class, None where absent), seconds, images_per_s.
    """
    if not isinstance(model, Normalized):
        raise TypeError("train_classifier needs a Normalized model (wrap the network: Normalized(net, in_chans))")
    images = as_nhwc(images)
    labels = np.asarray(labels, dtype=np.int64)
    if len(images) != len(labels) or len(images) == 0:
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    device = torch.device(device) if device is not None else pick_device()
    torch.manual_seed(recipe.seed)  # any global-RNG use inside the model (dropout, drop-path)
    model.set_stats(*channel_stats(images))
    model.to(device)
    try:
        fit = _fit(model, images, labels, recipe, device, progress, should_stop)
    finally:
        model.eval()
    metrics = {**fit, "device": str(device), "recipe": recipe.to_dict()}
    if eval_images is not None and eval_labels is not None:
        result = evaluate(model, eval_images, eval_labels, device=device)
        metrics.update(test_top1=result["top1"], test_loss=result["loss"], per_class=result["per_class"])
    else:
        metrics.update(test_top1=None, test_loss=None, per_class=None)
    return metrics


def _fit(model, images, labels, recipe, device, progress, should_stop) -> dict[str, Any]:
    """The optimisation loop; returns loss/accuracy of the last epoch and the speed."""
    gen = torch.Generator().manual_seed(recipe.seed)
    pixels = pixels_tensor(images, device)
    targets = torch.from_numpy(np.array(labels)).to(device)
    batch = recipe.batch_for(len(images))
    total = recipe.total_steps(len(images))
    optimizer = make_optimizer(model, recipe)
    scaler = torch.amp.GradScaler("cuda", enabled=needs_grad_scaler(device))
    throttle = _Throttle()
    sums = torch.zeros(3, device=device)  # loss sum, correct, count of the current epoch
    last_epoch = 0
    model.train()
    start = time.perf_counter()
    for step, (epoch, idx) in enumerate(batch_indices(len(images), batch, total, gen)):
        if epoch != last_epoch:
            sums.zero_()
            last_epoch = epoch
        if throttle():
            _report(progress, should_stop, step, total, epoch, sums, optimizer)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, total, recipe.lr, recipe.warmup_frac)
        x = pixels[idx.to(pixels.device)].to(device, non_blocking=True)
        if recipe.augmentation == "flip_crop":
            x = flip_crop(x, recipe.crop_padding, gen)
        sums += _step(model, optimizer, scaler, to_batch(x, device), targets[idx.to(device)],
                      recipe.label_smoothing, device)
    seconds = time.perf_counter() - start
    _report(progress, None, total, total, last_epoch, sums, optimizer)
    loss_sum, correct, count = sums.tolist()
    return {
        "train_loss": loss_sum / max(count, 1),
        "train_acc": correct / max(count, 1),
        "steps": total,
        "epochs": total * batch / len(images),
        "seconds": seconds,
        "images_per_s": total * batch / max(seconds, 1e-9),
    }


def _step(model, optimizer, scaler, x, y, label_smoothing, device) -> torch.Tensor:
    """One optimisation step on `x [B, C, H, W]`, `y [B]`; returns (loss sum, correct, B) on device."""
    with autocast(device):
        logits = model(x)
        loss = F.cross_entropy(logits, y, label_smoothing=label_smoothing)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    correct = (logits.argmax(1) == y).sum()
    return torch.stack([loss.detach().float() * len(y), correct.float(), torch.tensor(float(len(y)), device=device)])


def _report(progress, should_stop, done, total, epoch, sums, optimizer) -> None:
    """Poll `should_stop` and call `progress` with running figures of the current epoch."""
    if should_stop is not None and should_stop():
        raise TrainingCancelled(f"training stopped at step {done} of {total}")
    if progress is None:
        return
    loss_sum, correct, count = sums.tolist()
    info = {
        "epoch": epoch,
        "step": done,
        "loss": loss_sum / count if count else None,
        "acc": correct / count if count else None,
        "lr": optimizer.param_groups[0]["lr"],
    }
    progress(done, total, info)


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    images: np.ndarray,
    labels: np.ndarray,
    device: torch.device | str | None = None,
    batch_size: int = 1024,
) -> dict[str, Any]:
    """Top-1 accuracy, mean cross-entropy and per-class accuracy (None for absent classes).

    `images [N, H, W, C]` uint8, `labels [N]` int64; the model is put in eval mode.
    """
    pixels = pixels_view(images)
    labels = torch.from_numpy(np.array(labels, dtype=np.int64))
    device = torch.device(device) if device is not None else pick_device()
    model.to(device).eval()
    loss_sum = 0.0
    predictions = []
    for start in range(0, len(pixels), batch_size):
        x = to_batch(pixels[start:start + batch_size], device)
        y = labels[start:start + batch_size].to(device)
        with autocast(device):
            logits = model(x).float()
        loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
        predictions.append(logits.argmax(1).cpu())
    return _accuracy_report(torch.cat(predictions), labels, loss_sum, num_classes=logits.shape[1])


def _accuracy_report(pred: torch.Tensor, labels: torch.Tensor, loss_sum: float, num_classes: int) -> dict[str, Any]:
    """`pred [N]`, `labels [N]` -> top1, mean loss and per-class accuracy list."""
    hit = (pred == labels).double()
    count = torch.bincount(labels, minlength=num_classes).double()
    correct = torch.bincount(labels, weights=hit, minlength=num_classes)
    per_class = [None if n == 0 else float(c / n) for c, n in zip(correct.tolist(), count.tolist())]
    return {"top1": float(hit.mean()), "loss": loss_sum / len(labels), "per_class": per_class, "n": len(labels)}
