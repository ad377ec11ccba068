"""Supervised training of an image classifier on in-memory uint8 arrays.

One loop for every model and every data subset: the whole training set is one uint8 tensor
(on the device when it fits), batches are indexed from it, augmented as a batch on the device
and converted to float there. No per-image Python work, no DataLoader.

Models take raw pixel values (uint8 or float in 0..255, `[N, C, H, W]`) and normalise inside:
wrap any network in `Normalized`, whose per-channel mean/std buffers `train_classifier` fits to
the training images, so a saved model needs nothing else to embed or classify raw pixels.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from core.device import autocast, pick_device
from core.training.loop import Progress, ShouldStop, Step, train_loop
from core.training.optim import OptimSettings
from core.training.pixels import (
    PixelStats,
    as_nhwc,
    channel_stats,
    pixels_tensor,
    pixels_view,
    to_batch,
)
from core.training.recipe import Recipe


class Normalized(PixelStats, nn.Module):
    """Raw pixels `[N, C, H, W]` (0..255) -> `(x / 255 - mean) / std` per channel -> `net`.

    `net` must offer `forward_features(x) -> [N, D]`, `forward(x) -> [N, classes]` and `embed_dim`.
    """

    STATS = ("mean", "std")

    def __init__(self, net: nn.Module, in_chans: int):
        super().__init__()
        self.net = net
        self.register_stats(in_chans)

    @property
    def embed_dim(self) -> int:
        return self.net.embed_dim

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """`[N, C, H, W]` uint8/float 0..255 -> float, zero mean and unit std per channel."""
        return self.scale_pixels(x.to(self.mean.dtype))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.forward_features(self.normalize(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalize(x))


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
    step: Callable[..., Step] | None = None,
    sums: tuple[str, ...] = ("loss", "acc"),
) -> dict[str, Any]:
    """Train `model` in place on uint8 `images [N, H, W, C]` with int64 `labels [N]`.

    Fits the model's normalisation to `images` first. `progress(done, total, info)` is called
    a few times per second (info: epoch, step, loss, acc, lr) and at the end of each epoch;
    `should_stop()` is polled as often, and True raises `TrainingCancelled` (`core.training.loop`).
    Returns JSON-able metrics: train_loss/train_acc (last epoch, augmented data), test_top1,
    test_loss, per_class (test accuracy per class, None where absent), seconds, images_per_s.

    `step(model, images, labels, recipe, device)` makes the loop's step (default: cross-entropy on
    augmented images); `sums` names the running sums it returns, each reported as `train_<name>`.
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
    fit = _fit(model, images, labels, recipe, device, progress, should_stop, step or _classifier_step, sums)
    metrics = {**fit, "device": str(device), "recipe": recipe.to_dict()}
    if eval_images is not None and eval_labels is not None:
        result = evaluate(model, eval_images, eval_labels, device=device)
        metrics.update(test_top1=result["top1"], test_loss=result["loss"], per_class=result["per_class"])
    else:
        metrics.update(test_top1=None, test_loss=None, per_class=None)
    return metrics


def _fit(model, images, labels, recipe, device, progress, should_stop, step, sums) -> dict[str, Any]:
    """`train_loop` with `step`; returns its sums of the last epoch (`train_<name>`) and the speed."""
    batch = recipe.batch_for(len(images))
    fit = train_loop(model, step(model, images, labels, recipe, device), sums,
                     optim_settings(recipe), n=len(images), batch=batch, total=recipe.total_steps(len(images)),
                     seed=recipe.seed, device=device, progress=progress, should_stop=should_stop)
    last = fit["curve"][-1]
    return {
        **{f"train_{name}": last[name] for name in sums},
        "steps": fit["steps"],
        "epochs": fit["steps"] * batch / len(images),
        "seconds": fit["seconds"],
        "images_per_s": fit["images_per_s"],
    }


def optim_settings(recipe: Recipe) -> OptimSettings:
    """The recipe's optimiser with the one-cycle schedule; AdamW's beta1 is the recipe's momentum."""
    return OptimSettings(recipe.optimizer, recipe.lr, recipe.weight_decay, "one_cycle", recipe.warmup_frac,
                         momentum=recipe.momentum)


def _classifier_step(model, images, labels, recipe, device) -> Step:
    """The loop's step: cross-entropy with label smoothing on a batch of the training set, which
    stays on the device when it fits; sums are (loss sum, correct, batch size)."""
    pixels = pixels_tensor(images, device)
    targets = torch.from_numpy(np.array(labels)).to(device)

    def step(idx: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        x = pixels[idx.to(pixels.device)].to(device, non_blocking=True)
        if recipe.augmentation == "flip_crop":
            x = flip_crop(x, recipe.crop_padding, gen)
        y = targets[idx.to(device)]
        logits = model(to_batch(x, device))
        loss = F.cross_entropy(logits, y, label_smoothing=recipe.label_smoothing)
        correct = (logits.argmax(1) == y).sum()
        count = torch.tensor(float(len(y)), device=device)
        return loss, torch.stack([loss.detach().float() * len(y), correct.float(), count])

    return step


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
