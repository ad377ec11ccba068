"""Benchmark of the default backbone on Fashion-MNIST: training time/accuracy and embedding speed.

(a) trains DEFAULT_BACKBONE with the default recipe on the full train split (target: >= 90 % test
    top-1 in <= 5 minutes on a 2-core CPU);
(b) embeds all 70,000 images with `embed_batches` and compares its throughput with the bare
    `model.forward_features` on pre-made float tensors (same batch size and device; target
    ratio >= 0.9). Best of `--repeats` interleaved runs, to damp noise on a shared machine.

    .venv/bin/python bench/embed.py [--quick] [--device cpu] [--batch-size 256]
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core import config
from core.data import idx
from core.device import autocast, pick_device
from core.embed import backbones
from core.training import pixels as training_pixels
from core.training import recipe as training_recipe

TRAIN_TARGET_S = 300.0
ACCURACY_TARGET = 0.90
RATIO_TARGET = 0.9


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, a smoke run of a few seconds")
    parser.add_argument("--device", default=None, help="cpu | cuda | mps (default: the best available)")
    parser.add_argument("--batch-size", type=int, default=256, help="embedding batch size")
    parser.add_argument("--repeats", type=int, default=2, help="timed embedding runs per method")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice; 1 copes best with a busy shared CPU)")
    return parser.parse_args()


def load_data(quick: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Fashion-MNIST train/test as `[N, 28, 28, 1]` uint8 and int64 labels (slices when quick)."""
    folder = config.fashion_mnist_dir()
    x_train, y_train = idx.load_fashion_mnist(folder, "train")
    x_test, y_test = idx.load_fashion_mnist(folder, "test")
    if quick:
        x_train, y_train, x_test, y_test = x_train[:2000], y_train[:2000], x_test[:1000], y_test[:1000]
    return x_train[..., None], y_train, x_test[..., None], y_test


def train(x_train, y_train, x_test, y_test, device, quick: bool):
    """Train the default backbone; returns the model, its metrics and the wall time of the call."""
    spec = backbones.parse_spec(backbones.DEFAULT_BACKBONE)
    recipe = training_recipe.default_recipe(x_train.shape[1], arch=spec.name)
    if quick:
        recipe = dataclasses.replace(recipe, epochs=1)
    print(f"[train] {spec} on {len(x_train)} images, recipe {recipe.to_dict()}", flush=True)
    last = [0.0]

    def progress(done: int, total: int, info: dict) -> None:
        if time.monotonic() - last[0] >= 15 or done == total:
            last[0] = time.monotonic()
            loss = "-" if info["loss"] is None else f"{info['loss']:.3f}"
            print(f"[train] step {done}/{total} epoch {info['epoch']} loss {loss}", flush=True)

    start = time.perf_counter()
    model, metrics = backbones.train_backbone(spec, x_train, y_train, 10, recipe=recipe, eval_images=x_test,
                                              eval_labels=y_test, progress=progress, device=device)
    return model, metrics, time.perf_counter() - start


def time_embed_batches(model, images, batch_size, device) -> float:
    """Seconds to embed `images` with `embed_batches`, writing into one output array as a caller would."""
    out = np.empty((len(images), model.embed_dim), np.float32)
    start = time.perf_counter()
    for lo, hi, feats in backbones.embed_batches(model, images, batch_size=batch_size, device=device):
        out[lo:hi] = feats
    return time.perf_counter() - start


@torch.inference_mode()
def time_bare_forward(model, batches: list[torch.Tensor], device) -> float:
    """Seconds for `model.forward_features` over pre-made float batches already on `device`."""
    start = time.perf_counter()
    for x in batches:
        with autocast(device):
            model.forward_features(x)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def embed_speed(model, images, batch_size, device, repeats) -> tuple[float, float]:
    """Best-of-`repeats` images/s of `embed_batches` and of the bare forward (interleaved runs)."""
    pixels = training_pixels.pixels_view(images)
    batches = [training_pixels.to_batch(pixels[lo:lo + batch_size], device) for lo in range(0, len(images), batch_size)]
    model.to(device).eval()
    time_bare_forward(model, batches[:2], device)  # warm-up
    embed_s, bare_s = [], []
    for _ in range(repeats):
        bare_s.append(time_bare_forward(model, batches, device))
        embed_s.append(time_embed_batches(model, images, batch_size, device))
    return len(images) / min(embed_s), len(images) / min(bare_s)


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo where there is one."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    load_before = os.getloadavg()
    x_train, y_train, x_test, y_test = load_data(args.quick)
    model, metrics, train_wall = train(x_train, y_train, x_test, y_test, device, args.quick)
    images = np.concatenate([x_train, x_test])
    print(f"[embed] {len(images)} images, batch {args.batch_size}, {args.repeats} runs each", flush=True)
    embed_ips, bare_ips = embed_speed(model, images, args.batch_size, device, args.repeats)
    ratio = embed_ips / bare_ips
    load_after = os.getloadavg()
    recipe = metrics["recipe"]
    print("\n" + "=" * 24 + " bench/embed.py summary " + "=" * 24)
    print(f"mode            : {'QUICK (smoke run, targets not meaningful)' if args.quick else 'full'}")
    print(f"device          : {device} ({cpu_name()}, "
          f"{torch.get_num_threads()} torch threads, {os.cpu_count()} CPUs), torch {torch.__version__}")
    print(f"load average    : {load_before[0]:.2f} at start, {load_after[0]:.2f} at end (shared machine)")
    print(f"backbone        : {backbones.DEFAULT_BACKBONE} ({model.embed_dim}-d embedding)")
    print(f"recipe          : {recipe['epochs']} epochs, batch {recipe['batch_size']}, {recipe['optimizer']} "
          f"lr {recipe['lr']}, wd {recipe['weight_decay']}, ls {recipe['label_smoothing']}, "
          f"aug {recipe['augmentation']} (pad {recipe['crop_padding']}), seed {recipe['seed']}")
    print(f"train           : {len(x_train)} images, {metrics['seconds']:.1f} s in the loop "
          f"({metrics['images_per_s']:.0f} img/s), {train_wall:.1f} s wall incl. stats + test eval "
          f"[target <= {TRAIN_TARGET_S:.0f} s: {verdict(train_wall <= TRAIN_TARGET_S)}]")
    print(f"test top-1      : {metrics['test_top1']:.4f} on {len(x_test)} images, loss {metrics['test_loss']:.4f} "
          f"[target >= {ACCURACY_TARGET:.2f}: {verdict(metrics['test_top1'] >= ACCURACY_TARGET)}]")
    print(f"embed_batches   : {embed_ips:,.0f} img/s over {len(images)} images (batch {args.batch_size})")
    print(f"bare forward    : {bare_ips:,.0f} img/s (forward_features on pre-made float tensors)")
    print(f"ratio           : {ratio:.3f} [target >= {RATIO_TARGET}: {verdict(ratio >= RATIO_TARGET)}]")
    print("=" * 72)


if __name__ == "__main__":
    main()
