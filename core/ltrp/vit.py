"""The ViT encoder the MAE and the ranker share (`ViTEncoder`), its building blocks, and patch masks.

Module and buffer names follow the official MAE (`patch_embed`, `cls_token`, `pos_embed`, `blocks`,
`norm`) plus `pixel_mean`/`pixel_std`, so state dicts and official checkpoints load 1:1.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import LayerNorm
from timm.models.vision_transformer import Block, PatchEmbed

from core.training.pixels import PixelStats


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


def vit_blocks(dim: int, heads: int, depth: int, mlp_ratio: float) -> list[Block]:
    """`depth` timm pre-norm ViT blocks with qkv bias (as the official MAE)."""
    return [Block(dim, heads, mlp_ratio, qkv_bias=True) for _ in range(depth)]


def with_cls_row(pos: torch.Tensor) -> torch.Tensor:
    """`[L, D]` -> `[1, 1 + L, D]` with a zero row for the cls token."""
    return torch.cat([torch.zeros(1, pos.shape[1]), pos])[None]


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


class PatchGridConfig:
    """Mixin for the frozen dataclass config of a ViT over square images (`MAEConfig`, `RankerConfig`):
    its patch grid, and the plain dict saved in checkpoints."""

    @property
    def grid(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid ** 2

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        return cls(**data)


class ViTShape(Protocol):
    """What `ViTEncoder` reads from a model's config (`MAEConfig`, `RankerConfig`)."""

    img_size: int
    patch_size: int
    in_chans: int
    embed_dim: int
    depth: int
    heads: int
    mlp_ratio: float


class ViTEncoder(PixelStats, nn.Module):
    """Raw pixels `[B, C, H, W]` -> ViT tokens `[B, 1 + V, D]` (cls first) of all or some patches.

    Fixed sin-cos position embeddings (a buffer) and a learned cls token, timm pre-norm blocks, a
    final norm, and the per-channel pixel mean/std (`PixelStats`). Subclasses add their heads and
    then call `initialize_weights`.
    """

    def __init__(self, cfg: ViTShape):
        super().__init__()
        self.cfg = cfg
        self.register_stats(cfg.in_chans)
        grid = cfg.img_size // cfg.patch_size
        self.patch_embed = PatchEmbed(cfg.img_size, cfg.patch_size, cfg.in_chans, cfg.embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        self.register_buffer("pos_embed", with_cls_row(sincos_pos_embed(cfg.embed_dim, grid)))
        self.blocks = nn.ModuleList(vit_blocks(cfg.embed_dim, cfg.heads, cfg.depth, cfg.mlp_ratio))
        self.norm = LayerNorm(cfg.embed_dim)

    @property
    def device(self) -> torch.device:
        return self.cls_token.device

    def initialize_weights(self) -> None:
        """MAE's initialisation: xavier-uniform linears and patch projection, N(0, 0.02) cls token."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        proj = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(proj.view(proj.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Raw pixels `[B, C', H', W']` (0..255) -> normalised `[B, C, H, W]` at the model's size.

        Grayscale becomes RGB for a 3-channel model; other sizes are resized (bilinear).
        """
        x = fit_input(x.to(self.pixel_mean.dtype), self.cfg.img_size, self.cfg.in_chans)
        return self.scale_pixels(x)

    def encode(self, x: torch.Tensor, visible_idx: torch.Tensor | None = None) -> torch.Tensor:
        """Normalised `[B, C, H, W]` -> tokens `[B, 1 + V, D]` of the patches `visible_idx [B, V]`
        (sorted), or `[B, 1 + L, D]` of all patches without it; cls first, after the final norm."""
        tokens = self.patch_embed(x) + self.pos_embed[:, 1:]
        if visible_idx is not None:
            tokens = tokens.gather(1, visible_idx[..., None].expand(-1, -1, tokens.shape[-1]))
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        tokens = torch.cat([cls, tokens], dim=1)
        for block in self.blocks:
            tokens = block(tokens)
        return self.norm(tokens)
