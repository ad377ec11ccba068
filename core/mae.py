"""Masked autoencoder (He et al., CVPR 2022): a ViT encoder that sees only the visible patches and a
light ViT decoder that predicts every patch, the teacher behind LTRP's pseudo-scores (`core.ltrp`).

The module layout and parameter names follow the official `models_mae.MaskedAutoencoderViT`
(facebookresearch/mae), built from timm's `PatchEmbed` and `Block`, so an official checkpoint loads
almost 1:1 (`load_official_mae`). Differences: the fixed sin-cos position embeddings are buffers,
and two more buffers hold the per-channel pixel mean/std, so the model takes raw pixels.

Pixel spaces. Inputs are raw pixels `[B, C, H, W]` in 0..255; `normalize` maps them to
`(x / 255 - mean) / std` per channel (mean/std fitted on the training images, or ImageNet's for an
official checkpoint). The decoder predicts patches `[B, L, p * p * C]` (patch-major, then pixel
row, pixel column, channel) in that normalised space, or, with `norm_pix_loss`, in per-patch
standardised units (each target patch minus its mean, over its std), as MAE's `norm_pix_loss`.
`reconstruct` turns predictions back into uint8 images.

Masks are index sets: `visible_idx [B, V]` holds the (sorted) patch positions the encoder sees;
every other position is masked. Decoder sequences are `[cls, patch 0, ..., patch L-1]`.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import LayerNorm
from timm.models.vision_transformer import Block, PatchEmbed

from core.device import autocast, needs_grad_scaler, pick_device
from core.training import (
    Progress, ShouldStop, TrainingCancelled, _Throttle, as_nhwc, channel_stats, pixels_view,
)

CHECKPOINT_FORMAT = "redex-mae/1"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Heads of the official MAE models, by embedding width (the checkpoint's shapes cannot tell them).
OFFICIAL_HEADS = {768: 12, 1024: 16, 1280: 16, 512: 16}
OFFICIAL_DECODER_NOTE = (
    "Reconstructions, and so LTRP pseudo-scores, need the MAE decoder. Checkpoints with a decoder: "
    "the official 'visualize' ones (mae_visualize_vit_base.pth / _large.pth / _huge.pth, "
    "https://dl.fbaipublicfiles.com/mae/visualize/), or an MAE trained here (core.mae.train_mae). "
    "Encoder-only, unusable here: the official mae_pretrain_vit_*.pth and timm's *.mae models "
    "(e.g. vit_base_patch16_224.mae)."
)


class MAEHasNoDecoder(ValueError):
    """A checkpoint holds an MAE encoder without its decoder."""


@dataclass(frozen=True)
class MAEConfig:
    """Architecture of a masked autoencoder (saved in its checkpoint)."""

    img_size: int = 28
    patch_size: int = 4
    in_chans: int = 1
    embed_dim: int = 96
    depth: int = 3
    heads: int = 3
    decoder_embed_dim: int = 64
    decoder_depth: int = 2
    decoder_heads: int = 4
    mask_ratio: float = 0.75         # training mask ratio (MAE's default)
    norm_pix_loss: bool = False      # targets: per-patch standardised pixels (MAE's norm_pix_loss)
    mlp_ratio: float = 4.0

    def __post_init__(self) -> None:
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")
        if self.embed_dim % 4 or self.decoder_embed_dim % 4:
            raise ValueError("2-D sin-cos position embeddings need widths divisible by 4")
        if self.embed_dim % self.heads or self.decoder_embed_dim % self.decoder_heads:
            raise ValueError("embedding widths must be multiples of their head counts")
        if not 0.0 < self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must lie in (0, 1), got {self.mask_ratio}")

    @property
    def grid(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid ** 2

    @property
    def patch_dim(self) -> int:
        return self.patch_size ** 2 * self.in_chans

    @classmethod
    def for_image(cls, size: int, chans: int) -> MAEConfig:
        """The small CPU default for square `size` px images with `chans` channels (0.44 M parameters).

        On Fashion-MNIST, `train_mae`'s defaults (2 epochs of the 60k training images) take 114 s on
        2 idle CPU cores and reach a masked MSE of 0.24 (normalised pixels) on the test images.
        """
        if chans not in (1, 3):
            raise ValueError(f"images must have 1 or 3 channels, got {chans}")
        return cls(img_size=size, patch_size=patch_size_for(size), in_chans=chans)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MAEConfig:
        return cls(**data)


def patch_size_for(size: int) -> int:
    """Patch size for `size` px images: 4 up to 32 px (7x7 or 8x8 patches), 8 up to 64 px, else 16.

    Falls back to the largest divisor of `size` below that (at least 2) when it does not divide.
    """
    preferred = 4 if size <= 32 else 8 if size <= 64 else 16
    for p in range(preferred, 1, -1):
        if size % p == 0:
            return p
    raise ValueError(f"no patch size in 2..{preferred} divides the image size {size}")


def num_visible(num_patches: int, mask_ratio: float) -> int:
    """Visible patches under `mask_ratio`, MAE's `int(L * (1 - ratio))` (at least 1)."""
    return max(1, int(num_patches * (1.0 - mask_ratio) + 1e-6))


def sincos_pos_embed(dim: int, grid: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position embeddings `[grid * grid, dim]`, rows in patch (row-major) order.

    First half encodes the column, second half the row, as the official MAE's `get_2d_sincos_pos_embed`.
    """
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    rows, cols = torch.meshgrid(torch.arange(grid, dtype=torch.float64),
                                torch.arange(grid, dtype=torch.float64), indexing="ij")

    def encode(pos: torch.Tensor) -> torch.Tensor:
        angles = pos.reshape(-1, 1) * omega  # [G * G, dim / 4]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([encode(cols), encode(rows)], dim=1).float()


def random_visible_idx(batch: int, num_patches: int, visible: int, generator: torch.Generator) -> torch.Tensor:
    """A fresh uniform random mask per row: sorted visible patch indices, int64 `[B, V]` (CPU)."""
    noise = torch.rand(batch, num_patches, generator=generator)
    return noise.argsort(dim=1)[:, :visible].sort(dim=1).values


def visible_mask(visible_idx: torch.Tensor, num_patches: int) -> torch.Tensor:
    """`[B, V]` indices -> bool `[B, L]`, True at visible patches."""
    mask = torch.zeros(visible_idx.shape[0], num_patches, dtype=torch.bool, device=visible_idx.device)
    return mask.scatter_(1, visible_idx, True)


def isolation_attn_mask(blocked: torch.Tensor) -> torch.Tensor:
    """bool `[M, S]` (True = token to remove) -> SDPA mask `[M, 1, S, S]` (True = may attend).

    A blocked token's row and column are closed: no token attends to it and it attends to nothing
    else (only to itself, which keeps its softmax defined). Its value therefore cannot reach any other
    position in any block. The official LTRP code instead zeroes the blocked row; the outputs at every
    other position are identical either way.
    """
    open_ = ~blocked
    allowed = open_[:, :, None] & open_[:, None, :]
    allowed |= torch.eye(blocked.shape[1], dtype=torch.bool, device=blocked.device)
    return allowed[:, None]


class MaskedAutoencoder(nn.Module):
    """MAE with the official module names (`patch_embed`, `blocks`, `decoder_blocks`, ...)."""

    def __init__(self, cfg: MAEConfig):
        super().__init__()
        self.cfg = cfg
        self.register_buffer("pixel_mean", torch.zeros(1, cfg.in_chans, 1, 1))
        self.register_buffer("pixel_std", torch.ones(1, cfg.in_chans, 1, 1))
        self.patch_embed = PatchEmbed(cfg.img_size, cfg.patch_size, cfg.in_chans, cfg.embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        self.register_buffer("pos_embed", with_cls_row(sincos_pos_embed(cfg.embed_dim, cfg.grid)))
        self.blocks = nn.ModuleList(vit_blocks(cfg.embed_dim, cfg.heads, cfg.depth, cfg.mlp_ratio))
        self.norm = LayerNorm(cfg.embed_dim)
        self.decoder_embed = nn.Linear(cfg.embed_dim, cfg.decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.decoder_embed_dim))
        self.register_buffer("decoder_pos_embed",
                             with_cls_row(sincos_pos_embed(cfg.decoder_embed_dim, cfg.grid)))
        self.decoder_blocks = nn.ModuleList(
            vit_blocks(cfg.decoder_embed_dim, cfg.decoder_heads, cfg.decoder_depth, cfg.mlp_ratio))
        self.decoder_norm = LayerNorm(cfg.decoder_embed_dim)
        self.decoder_pred = nn.Linear(cfg.decoder_embed_dim, cfg.patch_dim)
        init_vit_weights(self)
        nn.init.normal_(self.mask_token, std=0.02)

    @property
    def device(self) -> torch.device:
        return self.cls_token.device

    def set_stats(self, mean: list[float], std: list[float]) -> None:
        """Per-channel pixel mean/std in 0..1 units."""
        self.pixel_mean.copy_(torch.tensor(mean).view_as(self.pixel_mean))
        self.pixel_std.copy_(torch.tensor(std).view_as(self.pixel_std))

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Raw pixels `[B, C', H', W']` (0..255) -> normalised `[B, C, H, W]` at the model's size.

        Grayscale becomes RGB for a 3-channel model; other sizes are resized (bilinear).
        """
        x = fit_input(x.to(self.pixel_mean.dtype), self.cfg.img_size, self.cfg.in_chans)
        return (x / 255.0 - self.pixel_mean) / self.pixel_std

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """`[B, C, H, W]` -> `[B, L, p * p * C]`."""
        b, c = imgs.shape[:2]
        p, g = self.cfg.patch_size, self.cfg.grid
        x = imgs.reshape(b, c, g, p, g, p)
        return torch.einsum("nchpwq->nhwpqc", x).reshape(b, g * g, p * p * c)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """`[B, L, p * p * C]` -> `[B, C, H, W]`."""
        p, g, c = self.cfg.patch_size, self.cfg.grid, self.cfg.in_chans
        x = x.reshape(x.shape[0], g, g, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, g * p, g * p)

    def targets(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised images `[B, C, H, W]` -> the decoder's targets `[B, L, P]`."""
        target = self.patchify(x)
        if self.cfg.norm_pix_loss:
            mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
            target = (target - mean) / (var + 1e-6) ** 0.5
        return target

    def encode(self, x: torch.Tensor, visible_idx: torch.Tensor) -> torch.Tensor:
        """Normalised `[B, C, H, W]` and `visible_idx [B, V]` -> latent `[B, 1 + V, D]` (cls first)."""
        tokens = self.patch_embed(x) + self.pos_embed[:, 1:]
        tokens = tokens.gather(1, visible_idx[..., None].expand(-1, -1, tokens.shape[-1]))
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        tokens = torch.cat([cls, tokens], dim=1)
        for block in self.blocks:
            tokens = block(tokens)
        return self.norm(tokens)

    def decoder_tokens(self, latent: torch.Tensor, visible_idx: torch.Tensor) -> torch.Tensor:
        """Latent `[B, 1 + V, D]` -> decoder input `[B, 1 + L, Dd]`: mask tokens where not visible."""
        x = self.decoder_embed(latent)
        b, dd = x.shape[0], x.shape[-1]
        full = self.mask_token.to(x.dtype).expand(b, self.cfg.num_patches, dd)
        full = full.scatter(1, visible_idx[..., None].expand(-1, -1, dd), x[:, 1:])
        return torch.cat([x[:, :1], full], dim=1) + self.decoder_pos_embed

    def decode_tokens(self, tokens: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Decoder input `[M, 1 + L, Dd]` -> predicted patches `[M, L, P]`.

        `attn_mask` (bool `[M, 1, 1 + L, 1 + L]`, True = may attend) applies in every decoder block.
        """
        for block in self.decoder_blocks:
            tokens = block(tokens, attn_mask=attn_mask)
        return self.decoder_pred(self.decoder_norm(tokens))[:, 1:]

    def predict(self, x: torch.Tensor, visible_idx: torch.Tensor) -> torch.Tensor:
        """Normalised `[B, C, H, W]` and `visible_idx [B, V]` -> predicted patches `[B, L, P]`."""
        latent = self.encode(x, visible_idx)
        return self.decode_tokens(self.decoder_tokens(latent, visible_idx))

    def forward(self, pixels: torch.Tensor, visible_idx: torch.Tensor) -> torch.Tensor:
        """Raw pixels `[B, C, H, W]` (0..255) and `visible_idx [B, V]` -> predicted patches `[B, L, P]`."""
        return self.predict(self.normalize(pixels), visible_idx)

    def loss(self, pixels: torch.Tensor, visible_idx: torch.Tensor) -> torch.Tensor:
        """Raw pixels `[B, C, H, W]` -> mean squared error over the masked patches (MAE's loss)."""
        x = self.normalize(pixels)
        pred = self.predict(x, visible_idx).float()
        per_patch = (pred - self.targets(x)).pow(2).mean(-1)  # [B, L]
        masked = ~visible_mask(visible_idx, self.cfg.num_patches)
        return (per_patch * masked).sum() / masked.sum()


def vit_blocks(dim: int, heads: int, depth: int, mlp_ratio: float) -> list[Block]:
    """`depth` timm pre-norm ViT blocks with qkv bias (as the official MAE)."""
    return [Block(dim, heads, mlp_ratio, qkv_bias=True) for _ in range(depth)]


def with_cls_row(pos: torch.Tensor) -> torch.Tensor:
    """`[L, D]` -> `[1, 1 + L, D]` with a zero row for the cls token."""
    return torch.cat([torch.zeros(1, pos.shape[1]), pos])[None]


def init_vit_weights(model: nn.Module) -> None:
    """MAE's initialisation: xavier-uniform linears and patch projection, N(0, 0.02) cls token."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    proj = model.patch_embed.proj.weight
    nn.init.xavier_uniform_(proj.view(proj.shape[0], -1))
    nn.init.normal_(model.cls_token, std=0.02)


def fit_input(x: torch.Tensor, size: int, chans: int) -> torch.Tensor:
    """Float pixels `[B, C, H, W]` -> `[B, chans, size, size]` (gray -> RGB, bilinear resize)."""
    if x.shape[1] != chans:
        if x.shape[1] != 1:
            raise ValueError(f"a {chans}-channel model cannot take {x.shape[1]}-channel images")
        x = x.expand(-1, chans, -1, -1)
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                          antialias=x.shape[-1] > size).clamp(0.0, 255.0)
    return x


def cosine_lr(step: int, total: int, peak: float, warmup_frac: float) -> float:
    """Linear warm-up over `warmup_frac` of the steps, then cosine decay to 0."""
    warmup = max(1, round(warmup_frac * total))
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1.0 + math.cos(math.pi * progress))


def adamw(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW (0.9, 0.95); weight decay on weights and tokens, not on biases and norms (as MAE)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim > 1], "weight_decay": weight_decay},
              {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))


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
    throttle = _Throttle()
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


def _poll(throttle: _Throttle, progress: Progress | None, should_stop: ShouldStop | None,
          done: int, total: int, info: dict) -> None:
    """At most a few times per second: raise `TrainingCancelled` if asked to, else report progress."""
    if not throttle():
        return
    if should_stop is not None and should_stop():
        raise TrainingCancelled(f"training stopped at step {done} of {total}")
    if progress is not None:
        progress(done, total, info)


def train_mae(
    images: np.ndarray,
    config: MAEConfig,
    *,
    epochs: int = 2,
    batch_size: int = 128,
    lr: float = 2e-3,
    seed: int = 0,
    progress: Progress | None = None,
    should_stop: ShouldStop | None = None,
    device: torch.device | str | None = None,
) -> tuple[MaskedAutoencoder, dict[str, Any]]:
    """Self-supervised MAE training on uint8 `images [N, H, W, C]` (the dataset's train split).

    AdamW (0.9, 0.95, weight decay 0.05), 5 % linear warm-up then cosine decay, a fresh random mask
    (`config.mask_ratio`) per image per step, mixed precision on CUDA. `progress(done, total, info)`
    and `should_stop()` as in `core.training`. Returns the model (eval mode) and JSON-able metrics:
    loss per epoch (masked-patch MSE, normalised pixels), seconds, images/s.
    """
    images = as_nhwc(images)
    device = torch.device(device) if device is not None else pick_device()
    torch.manual_seed(seed)
    model = MaskedAutoencoder(config)
    model.set_stats(*channel_stats(images))
    model.to(device)
    visible = num_visible(config.num_patches, config.mask_ratio)

    def loss_fn(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        return model.loss(x, random_visible_idx(len(x), config.num_patches, visible, gen).to(device))

    settings = LoopSettings(epochs, batch_size, lr, weight_decay=0.05, warmup_frac=0.05, seed=seed)
    try:
        fit = train_loop(model, pixels_view(images), loss_fn, settings, device, progress, should_stop)
    finally:
        model.eval()
    return model, {**fit, "device": str(device), "config": config.to_dict(), "recipe": dataclasses.asdict(settings)}


@torch.inference_mode()
def evaluate_mae(model: MaskedAutoencoder, images: np.ndarray, *, mask_ratio: float | None = None,
                 seed: int = 0, batch_size: int = 512) -> float:
    """Mean masked-patch MSE (the training loss) on uint8 `images [N, H, W, C]`, fixed seeded masks."""
    pixels = pixels_view(images)
    gen = torch.Generator().manual_seed(seed)
    visible = num_visible(model.cfg.num_patches, mask_ratio if mask_ratio is not None else model.cfg.mask_ratio)
    model.eval()
    total = 0.0
    for lo in range(0, len(pixels), batch_size):
        x = pixels[lo:lo + batch_size].to(model.device).float()
        idx = random_visible_idx(len(x), model.cfg.num_patches, visible, gen).to(model.device)
        total += float(model.loss(x, idx)) * len(x)
    return total / len(pixels)


@torch.inference_mode()
def reconstruct(model: MaskedAutoencoder, images: np.ndarray, keep_idx: np.ndarray,
                batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """The MAE's reconstruction of each image from only its kept patches.

    `images` uint8 `[N, H, W, C]`, `keep_idx` int `[N, K]` patch indices (row-major). Returns uint8
    `(pasted, raw)`, both `[N, S, S, C]` at the model's size: `raw` is the prediction of every
    patch; `pasted` shows the kept patches from the original and predictions elsewhere (MAE's
    visualisation). With `norm_pix_loss` a prediction is in per-patch standardised units: it is
    shown with the original patch's mean and std (as MAE's figures do for such models).
    """
    pixels = pixels_view(images)
    keep = torch.as_tensor(np.asarray(keep_idx), dtype=torch.int64)
    if keep.ndim != 2 or len(keep) != len(pixels):
        raise ValueError(f"keep_idx must be [N, K] for {len(pixels)} images, got {tuple(keep.shape)}")
    model.eval()
    pasted, raw = [], []
    for lo in range(0, len(pixels), batch_size):
        x = pixels[lo:lo + batch_size].to(model.device).float()
        shown, pred = _reconstruct_batch(model, x, keep[lo:lo + batch_size].to(model.device))
        pasted.append(shown)
        raw.append(pred)
    return np.concatenate(pasted), np.concatenate(raw)


def _reconstruct_batch(model: MaskedAutoencoder, x: torch.Tensor, keep: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Raw pixels `[B, C, H, W]`, `keep [B, K]` -> uint8 `(pasted, raw)` `[B, S, S, C]`."""
    normed = model.normalize(x)
    pred = model.predict(normed, keep).float()  # [B, L, P]
    if model.cfg.norm_pix_loss:
        truth = model.patchify(normed)
        pred = pred * (truth.var(-1, keepdim=True) + 1e-6) ** 0.5 + truth.mean(-1, keepdim=True)
    shown = torch.where(visible_mask(keep, model.cfg.num_patches)[..., None], model.patchify(normed), pred)
    return tuple(_to_uint8(model, model.unpatchify(p)) for p in (shown, pred))


def _to_uint8(model: MaskedAutoencoder, x: torch.Tensor) -> np.ndarray:
    """Normalised `[B, C, H, W]` -> uint8 `[B, H, W, C]`."""
    pixels = (x * model.pixel_std + model.pixel_mean) * 255.0
    return pixels.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def save_mae(model: MaskedAutoencoder, path: str | Path, meta: dict[str, Any] | None = None) -> None:
    """Write config, weights (incl. pixel stats) and JSON-able `meta` to `path`, atomically."""
    save_payload(path, {"format": CHECKPOINT_FORMAT, "config": model.cfg.to_dict(), "meta": meta or {},
                        "state_dict": cpu_state(model)})


def load_mae(path: str | Path) -> tuple[MaskedAutoencoder, dict[str, Any]]:
    """Rebuild a saved MAE (eval mode, CPU) with `torch.load(weights_only=True)`; returns `(model, meta)`."""
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not a redex MAE checkpoint ({CHECKPOINT_FORMAT})")
    model = MaskedAutoencoder(MAEConfig.from_dict(payload["config"]))
    model.load_state_dict(payload["state_dict"])
    return model.eval(), payload["meta"]


def cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict as contiguous CPU tensors."""
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


def save_payload(path: str | Path, payload: dict[str, Any]) -> None:
    """`torch.save` a checkpoint dict (with a JSON-able 'meta') via a temporary file and a rename."""
    json.dumps(payload["meta"])  # fail now, not at load time, on non-plain metadata
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load_official_mae(
    checkpoint: str | Path | dict[str, torch.Tensor],
    *,
    norm_pix_loss: bool = False,
    heads: int | None = None,
    decoder_heads: int | None = None,
) -> MaskedAutoencoder:
    """An MAE from a checkpoint in the official `models_mae` layout (path or state dict).

    The architecture is read from the tensor shapes; head counts, which shapes cannot tell, come
    from the official models (`OFFICIAL_HEADS`, else 64-wide heads) unless given. Pixel stats are
    ImageNet's, as the official models expect. `norm_pix_loss` says how the checkpoint was trained
    (the official 'visualize' checkpoints: False). Raises `MAEHasNoDecoder` for an encoder-only one.
    """
    state = _official_state(checkpoint)
    cfg = _official_config(state, norm_pix_loss, heads, decoder_heads)
    model = MaskedAutoencoder(cfg)
    model.set_stats(list(IMAGENET_MEAN), list(IMAGENET_STD))
    state = {**state, "pixel_mean": model.pixel_mean, "pixel_std": model.pixel_std}
    model.load_state_dict(state)
    return model.eval()


def _official_state(checkpoint: str | Path | dict) -> dict[str, torch.Tensor]:
    """Unwrap `{'model': ...}` and DDP's `module.` prefix; check that a decoder is present."""
    state = checkpoint
    if not isinstance(state, dict):
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    if isinstance(state.get("model"), dict):
        state = state["model"]
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if "patch_embed.proj.weight" not in state or "pos_embed" not in state:
        raise ValueError("not an MAE checkpoint in the official models_mae layout "
                         "(no patch_embed.proj.weight / pos_embed)")
    if "decoder_pred.weight" not in state:
        raise MAEHasNoDecoder(f"this checkpoint holds only the MAE encoder. {OFFICIAL_DECODER_NOTE}")
    return state


def _official_config(state: dict[str, torch.Tensor], norm_pix_loss: bool,
                     heads: int | None, decoder_heads: int | None) -> MAEConfig:
    """`MAEConfig` from official tensor shapes."""
    embed_dim, in_chans, patch, _ = state["patch_embed.proj.weight"].shape
    grid = math.isqrt(state["pos_embed"].shape[1] - 1)
    decoder_dim = state["decoder_embed.weight"].shape[0]
    mlp_ratio = state["blocks.0.mlp.fc1.weight"].shape[0] / embed_dim
    return MAEConfig(
        img_size=grid * patch, patch_size=patch, in_chans=in_chans,
        embed_dim=embed_dim, depth=_count_blocks(state, "blocks."),
        heads=heads or OFFICIAL_HEADS.get(embed_dim, max(1, embed_dim // 64)),
        decoder_embed_dim=decoder_dim, decoder_depth=_count_blocks(state, "decoder_blocks."),
        decoder_heads=decoder_heads or OFFICIAL_HEADS.get(decoder_dim, max(1, decoder_dim // 64)),
        norm_pix_loss=norm_pix_loss, mlp_ratio=mlp_ratio,
    )


def _count_blocks(state: dict[str, torch.Tensor], prefix: str) -> int:
    return len({k[len(prefix):].split(".")[0] for k in state if k.startswith(prefix)})
