"""ViT building blocks shared by the MAE and the ranker, and patch masks."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import Block


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
