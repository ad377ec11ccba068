"""Masked autoencoder (He et al., CVPR 2022): a ViT encoder that sees only the visible patches and a
light ViT decoder that predicts every patch, the teacher behind LTRP's pseudo-scores (`core.ltrp.ranker`).

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
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from timm.layers import LayerNorm

from core.device import pick_device
from core.ltrp.vit import (
    PatchGridConfig,
    ViTEncoder,
    num_visible,
    random_visible_idx,
    sincos_pos_embed,
    visible_mask,
    vit_blocks,
    with_cls_row,
)
from core.training.checkpoints import load_model, read_weights, save_model
from core.training.loop import LoopSettings, Progress, ShouldStop, train_on_pixels
from core.training.pixels import as_nhwc, channel_stats, pixels_view

CHECKPOINT_FORMAT = "redex-mae/1"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# Heads of the official MAE models, by embedding width (the checkpoint's shapes cannot tell them).
OFFICIAL_HEADS = {768: 12, 1024: 16, 1280: 16, 512: 16}
OFFICIAL_DECODER_NOTE = (
    "Reconstructions, and so LTRP pseudo-scores, need the MAE decoder. Checkpoints with a decoder: "
    "the official 'visualize' ones (mae_visualize_vit_base.pth / _large.pth / _huge.pth, "
    "https://dl.fbaipublicfiles.com/mae/visualize/), or an MAE trained here (core.ltrp.mae.train_mae). "
    "Encoder-only, unusable here: the official mae_pretrain_vit_*.pth and timm's *.mae models "
    "(e.g. vit_base_patch16_224.mae)."
)


class MAEHasNoDecoder(ValueError):
    """A checkpoint holds an MAE encoder without its decoder."""


@dataclass(frozen=True)
class MAEConfig(PatchGridConfig):
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
    def patch_dim(self) -> int:
        return self.patch_size ** 2 * self.in_chans

    @classmethod
    def for_image(cls, size: int, chans: int) -> MAEConfig:
        """The small CPU default for square `size` px images with `chans` channels (0.44 M parameters).

        Its measured training times and masked MSE on Fashion-MNIST are in docs/benchmarks.md (LTRP).
        """
        if chans not in (1, 3):
            raise ValueError(f"images must have 1 or 3 channels, got {chans}")
        return cls(img_size=size, patch_size=patch_size_for(size), in_chans=chans)


def patch_size_for(size: int) -> int:
    """Patch size for `size` px images: 4 up to 32 px (7x7 or 8x8 patches), 8 up to 64 px, else 16.

    Falls back to the largest divisor of `size` below that (at least 2) when it does not divide.
    """
    preferred = 4 if size <= 32 else 8 if size <= 64 else 16
    for p in range(preferred, 1, -1):
        if size % p == 0:
            return p
    raise ValueError(f"no patch size in 2..{preferred} divides the image size {size}")


class MaskedAutoencoder(ViTEncoder):
    """MAE with the official module names (`patch_embed`, `blocks`, `decoder_blocks`, ...)."""

    def __init__(self, cfg: MAEConfig):
        super().__init__(cfg)
        self.decoder_embed = nn.Linear(cfg.embed_dim, cfg.decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.decoder_embed_dim))
        self.register_buffer("decoder_pos_embed",
                             with_cls_row(sincos_pos_embed(cfg.decoder_embed_dim, cfg.grid)))
        self.decoder_blocks = nn.ModuleList(
            vit_blocks(cfg.decoder_embed_dim, cfg.decoder_heads, cfg.decoder_depth, cfg.mlp_ratio))
        self.decoder_norm = LayerNorm(cfg.decoder_embed_dim)
        self.decoder_pred = nn.Linear(cfg.decoder_embed_dim, cfg.patch_dim)
        self.initialize_weights()
        nn.init.normal_(self.mask_token, std=0.02)

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
    and `should_stop()` as in `core.training.loop`. Returns the model (eval mode) and JSON-able metrics:
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
    fit = train_on_pixels(model, pixels_view(images), loss_fn, settings, device, progress, should_stop)
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
    save_model(path, CHECKPOINT_FORMAT, model, meta or {}, config=model.cfg.to_dict())


def load_mae(path: str | Path) -> tuple[MaskedAutoencoder, dict[str, Any]]:
    """Rebuild a saved MAE (eval mode, CPU) with `torch.load(weights_only=True)`; returns `(model, meta)`."""
    return load_model(path, CHECKPOINT_FORMAT, "MAE",
                      lambda payload: MaskedAutoencoder(MAEConfig.from_dict(payload["config"])))


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
        state = read_weights(checkpoint)
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
