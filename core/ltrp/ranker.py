"""LTRP, Learning to Rank Patches (Luo et al., CVPR 2024): see docs/methods.md, section 2.

1. Pseudo-scores from a frozen MAE (`pseudo_scores`): a fresh random mask per image; the visible
   patches are encoded once; the decoder runs once with every visible token (the anchor) and once
   per visible token i with token i isolated by an attention mask in every decoder block. The score
   of i is the mean L1 difference between the anchor and that reconstruction over the MASKED
   patches, in the MAE's output space. All V + 1 decodings of a batch are one batched decoder call.
2. A ranker (`Ranker`, a small ViT trained from scratch) learns those rankings with ListMLE, seeing
   only the visible patches of each mask (asymmetric), and scores all patches of a full image in one
   forward pass at inference (`score_maps`); `top_k` keeps the best `round(kr * L)`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from core.device import autocast, full_precision, pick_device
from core.ltrp.mae import MaskedAutoencoder
from core.ltrp.vit import (
    PatchGridConfig,
    ViTEncoder,
    isolation_attn_mask,
    num_visible,
    random_visible_idx,
    visible_mask,
)
from core.training.checkpoints import load_model, save_model
from core.training.loop import LoopSettings, Progress, ShouldStop, train_on_pixels
from core.training.pixels import as_nhwc, pixels_view

CHECKPOINT_FORMAT = "redex-ltrp-ranker/1"
PAPER_MASK_RATIO = 0.9  # the paper's ratio: 19 of 196 patches visible (ViT-B/16 at 224 px)


# Default for grids of at most 64 patches (28-64 px images); see `default_mask_ratio` for the evidence.
SMALL_GRID_MASK_RATIO = 0.75
HEADS = ("global", "token")


# Decoder elements (sequences x tokens x width) per batched decoder call in `pseudo_scores`.
MAX_DECODER_ELEMENTS = 2 ** 25


def default_mask_ratio(num_patches: int) -> float:
    """The paper's 0.9 for grids of more than 64 patches, `SMALL_GRID_MASK_RATIO` (0.75) otherwise.

    Why not 0.9 on small grids: with 49 patches (28 px images, 4 px patches) 0.9 leaves 4 visible
    patches, so each pseudo-label is a 4-item list, and the MAE (trained at 0.75) is asked to
    reconstruct far outside its training regime (default MAE on Fashion-MNIST: masked MSE 0.24 at
    0.75, 0.48 at 0.9). Measured on Fashion-MNIST with the default MAE and rankers trained for 100
    steps of 128 images (a ViT trained and tested on only the top 25 % of patches, 2 seeds):
    test accuracy 76.1 % at 0.9, 76.7 % at 0.75, 77.0 % at 0.5 (random patches 66.7 %); the
    ranking at 0.9 was the worst on every other measure too (MAE reconstruction from the top 25 %,
    accuracy of a classifier trained on random patches). At equal compute (0.9 is 2.6x cheaper per
    step) 0.9 reached 76.4 %: the gap is small, but no measurement favoured 0.9. 0.5 costs twice
    0.75's decoder passes (25 vs 13 per image) for +0.3 points. 0.75 is also the MAE's own ratio.
    """
    return PAPER_MASK_RATIO if num_patches > 64 else SMALL_GRID_MASK_RATIO


# ---------------------------------------------------------------------------------------------
# Pseudo-scores


@torch.no_grad()
def pseudo_scores(mae: MaskedAutoencoder, images: np.ndarray | torch.Tensor, *,
                  mask_ratio: float | None = None,
                  generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """LTRP's pseudo-scores of the visible patches under a fresh random mask per image.

    `images`: uint8 numpy `[B, H, W, C]` or a tensor `[B, C, H, W]` of raw pixels (0..255).
    `mask_ratio`: default `default_mask_ratio(L)`, the paper's 0.9 on grids above 64 patches.
    Returns `(visible_idx, scores)`, both `[B, V]` on the MAE's device: sorted visible patch
    indices and the score of each (higher = more informative).
    """
    x = _pixel_batch(images, mae.device)
    num_patches = mae.cfg.num_patches
    mask_ratio = mask_ratio if mask_ratio is not None else default_mask_ratio(num_patches)
    visible = num_visible(num_patches, mask_ratio)
    if visible < 2:
        raise ValueError(f"mask_ratio {mask_ratio} leaves {visible} of {num_patches} patches visible; need 2")
    visible_idx = random_visible_idx(len(x), num_patches, visible, generator).to(mae.device)
    # Full precision, also on CUDA: a score is a small difference of two reconstructions (median
    # 0.02 in normalised pixels on Fashion-MNIST), and bf16 autocast reorders pairs of them (Kendall
    # 0.98 against fp32 on an H100; the top patch differs in 1.4 % of the images: bench/ltrp_job.py).
    # The MAE is small; exact targets are worth the slower decoder. (The ranker's training step
    # calls this inside its own autocast region, hence an explicit off switch.)
    with full_precision(mae.device):
        latent = mae.encode(mae.normalize(x), visible_idx)
        preds = decode_ablations(mae, latent, visible_idx)
    return visible_idx, ablation_scores(preds.float(), visible_idx)


def decode_ablations(mae: MaskedAutoencoder, latent: torch.Tensor, visible_idx: torch.Tensor) -> torch.Tensor:
    """Latent `[B, 1 + V, D]` -> predictions `[B, V + 1, L, P]`.

    Row j < V: token of visible patch `visible_idx[:, j]` isolated in every decoder block; row V:
    the anchor (nothing isolated). Chunks of images keep each decoder call under
    `MAX_DECODER_ELEMENTS`; within a chunk all V + 1 decodings are one batched call.
    """
    tokens = mae.decoder_tokens(latent, visible_idx)  # [B, S, Dd], S = 1 + L
    b, s, dd = tokens.shape
    v = visible_idx.shape[1]
    blocked = torch.zeros(b, v + 1, s, dtype=torch.bool, device=tokens.device)
    blocked[:, :v].scatter_(2, (visible_idx + 1)[..., None], True)  # +1: the cls token comes first
    per_chunk = max(1, MAX_DECODER_ELEMENTS // ((v + 1) * s * dd))
    out = []
    for lo in range(0, b, per_chunk):
        chunk = tokens[lo:lo + per_chunk]
        n = len(chunk)
        seqs = chunk[:, None].expand(n, v + 1, s, dd).reshape(n * (v + 1), s, dd)
        mask = isolation_attn_mask(blocked[lo:lo + per_chunk].reshape(n * (v + 1), s))
        out.append(mae.decode_tokens(seqs, mask).reshape(n, v + 1, s - 1, -1))
    return torch.cat(out)


def ablation_scores(preds: torch.Tensor, visible_idx: torch.Tensor) -> torch.Tensor:
    """`[B, V + 1, L, P]` (anchor last) -> `[B, V]`: mean |anchor - ablated| over the masked patches."""
    diff = (preds[:, :-1] - preds[:, -1:]).abs().mean(-1)  # [B, V, L]
    masked = (~visible_mask(visible_idx, preds.shape[2])).to(diff.dtype)  # [B, L]
    return (diff * masked[:, None]).sum(-1) / masked.sum(-1, keepdim=True)


def _pixel_batch(images: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 numpy `[B, H, W, C]` or tensor `[B, C, H, W]` -> float `[B, C, H, W]` (0..255) on `device`."""
    if isinstance(images, np.ndarray):
        images = pixels_view(images)
    return images.to(device).float()


# ---------------------------------------------------------------------------------------------
# Loss and agreement


def list_mle(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """ListMLE without temperature: `pred`, `target` `[B, V]` -> scalar.

    Items sorted by `target`, descending; loss = sum_i [logsumexp(pred[i:]) - pred[i]], batch mean.
    """
    order = target.argsort(dim=1, descending=True)
    ranked = pred.gather(1, order).float()
    tail_lse = ranked.flip(1).logcumsumexp(dim=1).flip(1)  # [B, V]: logsumexp of ranked[:, i:]
    return (tail_lse - ranked).sum(1).mean()


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise Spearman rank correlation of `[B, V]` tensors -> `[B]` (no tie correction)."""
    ra, rb = _ranks(a), _ranks(b)
    ra, rb = ra - ra.mean(1, keepdim=True), rb - rb.mean(1, keepdim=True)
    return (ra * rb).sum(1) / (ra.norm(dim=1) * rb.norm(dim=1)).clamp_min(1e-12)


def kendall(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise Kendall tau-a of `[B, V]` tensors -> `[B]`."""
    da = (a[:, :, None] - a[:, None, :]).sign()
    db = (b[:, :, None] - b[:, None, :]).sign()
    v = a.shape[1]
    return (da * db).sum((1, 2)) / (v * (v - 1))


def _ranks(x: torch.Tensor) -> torch.Tensor:
    return x.argsort(dim=1).argsort(dim=1).float()


# ---------------------------------------------------------------------------------------------
# Ranker


@dataclass(frozen=True)
class RankerConfig(PatchGridConfig):
    """A small ViT that scores patch positions (saved in its checkpoint).

    `head`: 'global' maps the cls token to L scores, one per patch position, as the official code
    (its score ViT has `num_classes = L`); 'token' scores each patch token with a shared linear
    layer. Measured on Fashion-MNIST (mask ratio 0.75, 100 steps): 'token' agrees better with the
    pseudo-scores (Spearman 0.81 vs 0.66 on held-out masks), 'global' selects slightly better
    patches (a ViT trained on the top 25 %: 77.2 % vs 76.7 % test accuracy, 2 seeds).
    """

    img_size: int = 28
    patch_size: int = 4
    in_chans: int = 1
    embed_dim: int = 128
    depth: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    head: str = "global"

    def __post_init__(self) -> None:
        if self.head not in HEADS:
            raise ValueError(f"head={self.head!r}; choose one of {', '.join(HEADS)}")
        if self.img_size % self.patch_size or self.embed_dim % 4 or self.embed_dim % self.heads:
            raise ValueError("need img_size % patch_size == 0 and embed_dim divisible by 4 and by heads")

    @classmethod
    def for_mae(cls, mae: MaskedAutoencoder, **overrides: Any) -> RankerConfig:
        """The default ranker for `mae`'s patch grid (same image size, patch size and channels)."""
        c = mae.cfg
        return cls(img_size=c.img_size, patch_size=c.patch_size, in_chans=c.in_chans, **overrides)


class Ranker(ViTEncoder):
    """Raw pixels `[B, C, H, W]` -> one score per patch position (sin-cos positions, cls token)."""

    def __init__(self, cfg: RankerConfig):
        super().__init__(cfg)
        self.head = nn.Linear(cfg.embed_dim, 1 if cfg.head == "token" else cfg.num_patches)
        self.initialize_weights()

    def forward(self, pixels: torch.Tensor, visible_idx: torch.Tensor | None = None) -> torch.Tensor:
        """Raw pixels `[B, C, H, W]` -> scores `[B, L]`, or `[B, V]` of the patches `visible_idx [B, V]`.

        With `visible_idx` only those patches enter the transformer (asymmetric training input).
        """
        tokens = self.encode(self.normalize(pixels), visible_idx)
        if self.cfg.head == "token":
            return self.head(tokens[:, 1:]).squeeze(-1)
        scores = self.head(tokens[:, 0])  # [B, L]
        return scores if visible_idx is None else scores.gather(1, visible_idx)


def train_ranker(
    mae: MaskedAutoencoder,
    images: np.ndarray,
    config: RankerConfig,
    *,
    epochs: int = 1,
    batch_size: int = 128,
    lr: float = 1e-3,
    mask_ratio: float | None = None,
    seed: int = 0,
    eval_images: np.ndarray | None = None,
    progress: Progress | None = None,
    should_stop: ShouldStop | None = None,
    device: torch.device | str | None = None,
) -> tuple[Ranker, dict[str, Any]]:
    """Train a ranker on uint8 `images [N, H, W, C]` against the frozen `mae`'s pseudo-scores.

    Each step draws fresh masks (`mask_ratio`, default `default_mask_ratio`), computes the
    pseudo-scores, and fits the ranker's scores of the visible patches (it sees only those) with
    ListMLE. AdamW (0.9, 0.95), weight decay 0.06, 10 % warm-up then cosine decay. Metrics include
    the agreement (Spearman, Kendall) between ranker scores and pseudo-scores on held-out masks of
    `eval_images` (default: the first 512 training images), before and after training. The MAE is
    moved to `device` and frozen. Measured times and agreement on Fashion-MNIST: docs/benchmarks.md (LTRP).
    """
    images = as_nhwc(images)
    device = torch.device(device) if device is not None else pick_device()
    mask_ratio = mask_ratio if mask_ratio is not None else default_mask_ratio(mae.cfg.num_patches)
    eval_images = as_nhwc(eval_images) if eval_images is not None else images[:512]
    _check_grid(mae, config)
    torch.manual_seed(seed)
    ranker = Ranker(config)
    ranker.copy_stats(mae)
    mae.to(device).eval().requires_grad_(False)
    ranker.to(device)

    def loss_fn(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        visible_idx, target = pseudo_scores(mae, x, mask_ratio=mask_ratio, generator=gen)
        return list_mle(ranker(x, visible_idx), target)

    settings = LoopSettings(epochs, batch_size, lr, weight_decay=0.06, warmup_frac=0.1, seed=seed)
    before = ranking_agreement(ranker, mae, eval_images, mask_ratio=mask_ratio)
    fit = train_on_pixels(ranker, pixels_view(images), loss_fn, settings, device, progress, should_stop)
    after = ranking_agreement(ranker, mae, eval_images, mask_ratio=mask_ratio)
    return ranker, {**fit, "agreement_before": before, "agreement": after, "mask_ratio": mask_ratio,
                    "device": str(device), "config": config.to_dict(), "recipe": dataclasses.asdict(settings)}


def _check_grid(mae: MaskedAutoencoder, config: RankerConfig) -> None:
    if (config.img_size, config.patch_size) != (mae.cfg.img_size, mae.cfg.patch_size):
        raise ValueError(f"ranker grid {config.img_size}/{config.patch_size} differs from the MAE's "
                         f"{mae.cfg.img_size}/{mae.cfg.patch_size}; use RankerConfig.for_mae(mae)")


@torch.no_grad()
def ranking_agreement(ranker: Ranker, mae: MaskedAutoencoder, images: np.ndarray, *,
                      mask_ratio: float, seed: int = 12345, batch_size: int = 256) -> dict[str, float]:
    """Mean row-wise Spearman and Kendall between the ranker's scores of the visible patches and the
    pseudo-scores, under fixed seeded masks (`seed` differs from training's) on uint8 `images`."""
    pixels = pixels_view(images)
    gen = torch.Generator().manual_seed(seed)
    was_training = ranker.training
    ranker.eval()
    rho, tau = [], []
    for lo in range(0, len(pixels), batch_size):
        x = pixels[lo:lo + batch_size].to(ranker.device).float()
        visible_idx, target = pseudo_scores(mae, x, mask_ratio=mask_ratio, generator=gen)
        pred = ranker(x, visible_idx).float()
        rho.append(spearman(pred, target))
        tau.append(kendall(pred, target))
    ranker.train(was_training)
    return {"spearman": float(torch.cat(rho).mean()), "kendall": float(torch.cat(tau).mean())}


# ---------------------------------------------------------------------------------------------
# Inference


@torch.inference_mode()
def score_maps(ranker: Ranker, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Scores of all patches of each full image, one forward pass per batch: float32 `[N, L]`."""
    pixels = pixels_view(images)
    ranker.eval()
    out = []
    for lo in range(0, len(pixels), batch_size):
        x = pixels[lo:lo + batch_size].to(ranker.device).float()
        with autocast(ranker.device):
            out.append(ranker(x).float().cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, ranker.cfg.num_patches), np.float32)


def keep_count(num_patches: int, keep_ratio: float) -> int:
    """K = round(kr * L), at least 1 and at most L."""
    if not 0.0 < keep_ratio <= 1.0:
        raise ValueError(f"keep_ratio must lie in (0, 1], got {keep_ratio}")
    return min(num_patches, max(1, round(keep_ratio * num_patches)))


def top_k(scores: np.ndarray, keep_ratio: float) -> np.ndarray:
    """Indices of the `round(kr * L)` highest scores (at least 1), highest first: int64 `[K]` or `[N, K]`.

    Ties go to the lower patch index.
    """
    scores = np.asarray(scores)
    k = keep_count(scores.shape[-1], keep_ratio)
    return np.argsort(-scores, axis=-1, kind="stable")[..., :k].astype(np.int64)


def score_map_image(scores: np.ndarray, grid: int | tuple[int, int]) -> np.ndarray:
    """Scores `[L]` in patch (row-major) order -> float32 heat map `[gh, gw]`."""
    gh, gw = (grid, grid) if isinstance(grid, int) else grid
    return np.asarray(scores, dtype=np.float32).reshape(gh, gw)


def save_ranker(ranker: Ranker, path: str | Path, meta: dict[str, Any] | None = None) -> None:
    """Write config, weights (incl. pixel stats) and JSON-able `meta` to `path`, atomically."""
    save_model(path, CHECKPOINT_FORMAT, ranker, meta or {}, config=ranker.cfg.to_dict())


def load_ranker(path: str | Path) -> tuple[Ranker, dict[str, Any]]:
    """Rebuild a saved ranker (eval mode, CPU) with `torch.load(weights_only=True)`; returns `(ranker, meta)`."""
    return load_model(path, CHECKPOINT_FORMAT, "LTRP ranker",
                      lambda payload: Ranker(RankerConfig.from_dict(payload["config"])))
