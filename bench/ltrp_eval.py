"""Benchmark of LTRP patch ranking on Fashion-MNIST: does keeping the ranker's top patches beat
random patches and a simple baseline, and what do fewer tokens buy?

1. Trains the default MAE (`MAEConfig.for_image`) on `--mae-images` train images and the default
   ranker (`RankerConfig.for_mae`, mask ratio `default_mask_ratio`) on `--ranker-images`, as the
   `ltrp` job does (smaller samples by default, to fit the time budget).
2. For each keep ratio (0.25, 0.5, 0.75) and each patch selection -- `ltrp` (the ranker's top K),
   `random` (K uniform random patches per image, fixed per image), `variance` (the K patches with
   the highest pixel variance) -- trains a small ViT classifier that sees ONLY the kept patches
   (their tokens with their position embeddings, plus CLS) in training and in testing; the same
   budget (images, epochs, recipe, seed) for every run; plus one run on all patches. Reports test
   accuracy, and the classifier's inference throughput at each keep ratio against all patches.
3. Times the ranker (one forward over full images) against computing the MAE pseudo-scores of the
   same images (one encoder + V + 1 decoder passes), as images/s and a ratio.

    .venv/bin/python bench/ltrp_eval.py [--quick] [--threads 1] [--train-images N] [--epochs N] ...

Default size: about 10 minutes on 2 idle CPU cores (see docs/benchmarks.md for a measured run).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core import config
from core.data import idx
from core.device import pick_device
from core.ltrp import ranker as ltrp_ranker
from core.ltrp.mae import MAEConfig, train_mae
from core.ltrp.vit import ViTEncoder
from core.training.optim import OptimSettings, make_optimizer
from core.training.pixels import channel_stats, pixels_view

KEEP_RATIOS = (0.25, 0.5, 0.75)
METHODS = ("ltrp", "random", "variance")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run of about a minute")
    p.add_argument("--mae-images", type=int, default=20_000, help="train images for the MAE")
    p.add_argument("--mae-epochs", type=int, default=2)
    p.add_argument("--ranker-images", type=int, default=10_000, help="train images for the ranker")
    p.add_argument("--ranker-epochs", type=int, default=1)
    p.add_argument("--train-images", type=int, default=10_000, help="train images for each classifier")
    p.add_argument("--test-images", type=int, default=5_000, help="test images for accuracy and timing")
    p.add_argument("--epochs", type=int, default=5, help="epochs of each classifier")
    p.add_argument("--dim", type=int, default=64, help="classifier width")
    p.add_argument("--depth", type=int, default=3, help="classifier blocks")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seeds", type=int, default=1, help="classifier seeds per setting (mean ± std when > 1)")
    p.add_argument("--batch", type=int, default=128, help="classifier batch size")
    p.add_argument("--device", default=None, help="cpu | cuda | mps (default: the best available)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--json", help="also write the results to this JSON file")
    args = p.parse_args()
    if args.quick:
        args.mae_images, args.mae_epochs, args.ranker_images = 2_000, 1, 1_000
        args.train_images, args.test_images, args.epochs = 2_000, 1_000, 1
    return args


# -- the classifier that sees only the kept patches --------------------------------------------
@dataclass(frozen=True)
class KeptPatchConfig:
    """The classifier's ViT (the fields `ViTEncoder` reads)."""

    img_size: int
    patch_size: int
    in_chans: int
    embed_dim: int
    depth: int
    heads: int
    mlp_ratio: float = 4.0


class KeptPatchViT(ViTEncoder):
    """ViT classifier over a subset of patch tokens: `[B, C, H, W]` pixels and `keep [B, K]` -> logits."""

    def __init__(self, img_size: int, patch: int, chans: int, dim: int, depth: int, classes: int,
                 mean: list[float], std: list[float]):
        super().__init__(KeptPatchConfig(img_size, patch, chans, dim, depth, max(1, dim // 32)))
        self.set_stats(mean, std)
        self.head = nn.Linear(dim, classes)
        self.initialize_weights()

    def forward(self, pixels: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        return self.head(self.encode(self.normalize(pixels), keep)[:, 0])


def train_classifier(x: torch.Tensor, y: torch.Tensor, keep: torch.Tensor, args, mean, std, seed: int,
                     lr: float = 2e-3) -> KeptPatchViT:
    """AdamW, 5 % warm-up + cosine, label smoothing 0.1; the same recipe and seed for every selection.

    `x`, `y`, `keep` live on the device the model is trained on (fp32: the same numbers on any device).
    """
    torch.manual_seed(seed)
    model = KeptPatchViT(28, 4, 1, args.dim, args.depth, 10, mean, std).to(x.device)
    optim = OptimSettings("adamw", lr, 0.05, "cosine", 0.05, beta2=0.95)
    opt = make_optimizer(model, optim)
    gen = torch.Generator().manual_seed(seed)
    batch = args.batch
    per_epoch = len(x) // batch
    total = args.epochs * per_epoch
    model.train()
    for epoch in range(args.epochs):
        order = torch.randperm(len(x), generator=gen).to(x.device)
        for i in range(per_epoch):
            for group in opt.param_groups:
                group["lr"] = optim.lr_at(epoch * per_epoch + i, total)
            b = order[i * batch:(i + 1) * batch]
            loss = F.cross_entropy(model(x[b].float(), keep[b]), y[b], label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return model.eval()


@torch.inference_mode()
def accuracy(model: KeptPatchViT, x: torch.Tensor, y: torch.Tensor, keep: torch.Tensor, batch: int = 500) -> float:
    right = 0
    for lo in range(0, len(x), batch):
        right += int((model(x[lo:lo + batch].float(), keep[lo:lo + batch]).argmax(1) == y[lo:lo + batch]).sum())
    return right / len(x)


@torch.inference_mode()
def throughput(fn, n: int, repeats: int = 3) -> float:
    """Images/s of `fn()` over `n` images: the best of `repeats` runs (damps a shared CPU's noise).

    `fn` must end with its results on the host (or synchronise), so that GPU work is timed too.
    """
    fn()  # warm-up
    best = min(_timed(fn) for _ in range(repeats))
    return n / best


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# -- patch selections --------------------------------------------------------------------------
def variance_scores(images: np.ndarray, patch: int = 4) -> np.ndarray:
    """Pixel variance of each patch: `[N, H, W, 1]` uint8 -> float32 `[N, L]` (row-major)."""
    n, h, w, _ = images.shape
    tiles = images[..., 0].reshape(n, h // patch, patch, w // patch, patch).transpose(0, 1, 3, 2, 4)
    return tiles.reshape(n, -1, patch * patch).astype(np.float32).var(-1)


def random_scores(n: int, num_patches: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random((n, num_patches), dtype=np.float32)


def selections(method: str, scores: dict, ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(train keep, test keep) int64 `[N, K]` for one selection method at one keep ratio."""
    return tuple(torch.from_numpy(np.sort(ltrp_ranker.top_k(scores[method][part], ratio), axis=1))
                 for part in ("train", "test"))


# -- the run -----------------------------------------------------------------------------------
def main() -> int:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    start = time.perf_counter()
    folder = config.fashion_mnist_dir()
    x_train, y_train = idx.load_fashion_mnist(folder, "train")
    x_test, y_test = idx.load_fashion_mnist(folder, "test")
    rng = np.random.default_rng(args.seed)
    order = rng.permutation(len(x_train))
    x_train, y_train = x_train[order][..., None], y_train[order]
    x_test, y_test = x_test[:args.test_images, ..., None], y_test[:args.test_images]
    results: dict = {"args": vars(args), "torch_threads": torch.get_num_threads(), "machine": platform.machine(),
                     "cpus": os.cpu_count(), "device": str(device)
                     + (f" ({torch.cuda.get_device_name()})" if device.type == "cuda" else "")}

    # 1. MAE and ranker, as the ltrp job makes them.
    cfg = MAEConfig.for_image(28, 1)
    t = time.perf_counter()
    mae, mae_metrics = train_mae(x_train[:args.mae_images], cfg, epochs=args.mae_epochs, seed=args.seed, device=device)
    results["mae"] = {"seconds": time.perf_counter() - t, "loss": mae_metrics["train_loss"]}
    rcfg = ltrp_ranker.RankerConfig.for_mae(mae)
    t = time.perf_counter()
    ranker, r_metrics = ltrp_ranker.train_ranker(mae, x_train[-args.ranker_images:], rcfg, epochs=args.ranker_epochs,
                                          seed=args.seed, eval_images=x_test[:512], device=device)
    results["ranker"] = {"seconds": time.perf_counter() - t, "spearman_before": r_metrics["agreement_before"]["spearman"],
                         "spearman": r_metrics["agreement"]["spearman"], "mask_ratio": r_metrics["mask_ratio"]}
    print(f"MAE {results['mae']['seconds']:.0f} s, ranker {results['ranker']['seconds']:.0f} s "
          f"(Spearman {results['ranker']['spearman_before']:.2f} -> {results['ranker']['spearman']:.2f})", flush=True)

    # 2. Patch scores of the classifier's images, and the classifiers.
    xs = {"train": x_train[:args.train_images], "test": x_test}
    scores = {"ltrp": {k: ltrp_ranker.score_maps(ranker, v) for k, v in xs.items()},
              "random": {k: random_scores(len(v), 49, args.seed + i) for i, (k, v) in enumerate(xs.items())},
              "variance": {k: variance_scores(v) for k, v in xs.items()}}
    mean, std = channel_stats(xs["train"])
    tx = pixels_view(xs["train"]).contiguous().to(device)
    ty = torch.from_numpy(y_train[:args.train_images]).long().to(device)
    vx, vy = pixels_view(xs["test"]).contiguous().to(device), torch.from_numpy(y_test).long().to(device)
    all_keep = (torch.arange(49).expand(len(tx), -1), torch.arange(49).expand(len(vx), -1))
    runs = [("all", 1.0, all_keep)] + [(m, r, selections(m, scores, r)) for r in KEEP_RATIOS for m in METHODS]
    results["classifiers"] = []
    for method, ratio, (k_train, k_test) in runs:
        k_train, k_test = k_train.to(device), k_test.to(device)
        accs, seconds = [], []
        for seed in range(args.seed, args.seed + args.seeds):
            t = time.perf_counter()
            model = train_classifier(tx, ty, k_train, args, mean, std, seed)
            seconds.append(time.perf_counter() - t)
            accs.append(accuracy(model, vx, vy, k_test))
        speed = throughput(lambda: accuracy(model, vx, vy, k_test), len(vx))
        row = {"method": method, "keep_ratio": ratio, "tokens": int(k_test.shape[1]),
               "test_accuracy": float(np.mean(accs)), "test_accuracy_std": float(np.std(accs, ddof=1)) if len(accs) > 1
               else 0.0, "accuracies": accs, "train_seconds": float(np.mean(seconds)), "images_per_s": speed}
        results["classifiers"].append(row)
        print(f"{method:>8} kr={ratio:.2f} K={row['tokens']:2d}: test acc {row['test_accuracy']:.4f}"
              f" ± {row['test_accuracy_std']:.4f} ({len(accs)} seeds), train {row['train_seconds']:.0f} s,"
              f" inference {speed:,.0f} img/s", flush=True)

    # 3. Ranker (one forward) against the MAE pseudo-scores, same images.
    n = min(2_000, len(x_test))
    gen = torch.Generator()
    rank_speed = throughput(lambda: ltrp_ranker.score_maps(ranker, x_test[:n]), n)
    pseudo_speed = throughput(lambda: [ltrp_ranker.pseudo_scores(mae, x_test[lo:lo + 256], generator=gen.manual_seed(0))[1]
                                       .cpu() for lo in range(0, n, 256)], n, repeats=2)
    results["scoring"] = {"images": n, "ranker_images_per_s": rank_speed, "pseudo_images_per_s": pseudo_speed,
                          "ratio": rank_speed / pseudo_speed}
    results["seconds"] = time.perf_counter() - start
    report(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


def report(results: dict) -> None:
    rows = results["classifiers"]
    full = next(r for r in rows if r["method"] == "all")
    print("\n| keep ratio | tokens | " + " | ".join(f"{m} acc" for m in METHODS)
          + " | img/s (ratio to all patches) |")
    print("|---:|---:|" + "---:|" * len(METHODS) + "---:|")
    for ratio in KEEP_RATIOS:
        at = {r["method"]: r for r in rows if r["keep_ratio"] == ratio}
        speed = np.mean([r["images_per_s"] for r in at.values()])
        print(f"| {ratio:.2f} | {at['ltrp']['tokens']} | "
              + " | ".join(f"{at[m]['test_accuracy']:.2%} ± {at[m]['test_accuracy_std']:.2%}" for m in METHODS)
              + f" | {speed:,.0f} ({speed / full['images_per_s']:.2f}x) |")
    print(f"| 1.00 | 49 | all patches: {full['test_accuracy']:.2%} ± {full['test_accuracy_std']:.2%} | | |"
          f" {full['images_per_s']:,.0f} (1.00x) |")
    print(f"device: {results['device']}")
    s = results["scoring"]
    print(f"\nranker {s['ranker_images_per_s']:,.0f} img/s vs MAE pseudo-scores {s['pseudo_images_per_s']:,.0f} img/s:"
          f" {s['ratio']:.1f}x over {s['images']} images; total {results['seconds']:.0f} s")


if __name__ == "__main__":
    sys.exit(main())
