"""The `ltrp` job's steps on the full Fashion-MNIST, through the store, and the precision of pseudo-scores.

1. Times what `redex ltrp train` runs (`core.ltrp.models`, `core.ltrp.scoring`): the MAE (2 epochs on the train split), the
   ranker (1 epoch on 20,000 images), and scoring every image into the store; then the ranker's
   throughput (one forward) against the MAE pseudo-scores on the same 10,000 test images, as a ratio.
2. On CUDA, the pseudo-scores computed under bf16 autocast against fp32 (the same masks): Spearman,
   Kendall and top-1 agreement. This is why `core.ltrp.ranker.pseudo_scores` always runs in fp32.

    REDEX_CACHE=/tmp/ltrp-bench .venv/bin/python bench/ltrp_job.py      # minutes on a GPU
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.data import catalog, scan, sources
from core.ltrp import models, scoring
from core.ltrp import ranker as ltrp_ranker
from core.ltrp.vit import num_visible, random_visible_idx
from core.store.db import get_store


def timed(label: str, fn):
    start = time.perf_counter()
    out = fn()
    print(f"{label}: {time.perf_counter() - start:.1f} s", flush=True)
    return out


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def speed(fn, n: int) -> float:
    """Images/s of `fn()` over `n` images, the better of two runs after a warm-up."""
    fn()
    best = float("inf")
    for _ in range(2):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return n / best


def precision(mae, images: np.ndarray) -> None:
    """Pseudo-scores under bf16 autocast against fp32, the same masks (CUDA only)."""
    x = torch.from_numpy(np.array(images)).permute(0, 3, 1, 2).float().cuda()
    num_patches = mae.cfg.num_patches
    visible_idx = random_visible_idx(len(x), num_patches, num_visible(num_patches, 0.75),
                                     torch.Generator().manual_seed(0)).cuda()

    @torch.no_grad()
    def scores(bf16: bool) -> torch.Tensor:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            latent = mae.encode(mae.normalize(x), visible_idx)
            return ltrp_ranker.ablation_scores(ltrp_ranker.decode_ablations(mae, latent, visible_idx).float(), visible_idx)

    exact, half = scores(False), scores(True)
    print(f"pseudo-scores bf16 vs fp32 on {len(x)} images: Spearman {float(ltrp_ranker.spearman(exact, half).mean()):.4f},"
          f" Kendall {float(ltrp_ranker.kendall(exact, half).mean()):.4f}, same top patch"
          f" {float((exact.argmax(1) == half.argmax(1)).float().mean()):.1%}; median score"
          f" {float(exact.median()):.4f}, median |difference| {float((exact - half).abs().median()):.5f}")


def main() -> None:
    store = get_store()
    name = sources.register("fashion-mnist", store=store)
    if not len(catalog.images_table(name, store)):
        timed("scan 70,000 images", lambda: scan.scan(name, store))
    settings = models.LtrpSettings()
    mae, mae_id, _ = timed("MAE (trained, or reused from the cache)",
                           lambda: models.ensure_mae(name, settings, retrain=True, store=store))
    _, rid = timed("ranker", lambda: models.ensure_ranker(name, mae, mae_id, settings, retrain=True, store=store))
    result = timed("score every image into the store", lambda: scoring.score_dataset(name, rid, store=store))
    print(f"scored {result['scored']:,} images")
    ranker = models.load_ranker_model(rid, store).to(mae.device)
    test = np.asarray(catalog.load_pixels(name, store)[catalog.images_table(name, store, split="test").row[:10_000]])
    gen = torch.Generator()
    rank = speed(lambda: ltrp_ranker.score_maps(ranker, test, batch_size=1024), len(test))
    pseudo = speed(lambda: [ltrp_ranker.pseudo_scores(mae, test[lo:lo + 1024], generator=gen.manual_seed(0))[1].cpu()
                            for lo in range(0, len(test), 1024)], len(test))
    device = f"{mae.device}" + (f" ({torch.cuda.get_device_name()})" if mae.device.type == "cuda" else "")
    print(f"on {device}: ranker {rank:,.0f} img/s vs MAE pseudo-scores {pseudo:,.0f} img/s: {rank / pseudo:.1f}x")
    if mae.device.type == "cuda":
        precision(mae, test[:2048])


if __name__ == "__main__":
    main()
