"""A pretrained timm backbone on large photos: the local path against a local Ray cluster (issue 14).

Cuts `--per-class` random 80-100 % crops of each of Debian's wallpapers that `tests/photos.py` uses
(2-9 Mpx; saved as JPEG, quality 90) into a scratch folder, registers and scans it, then embeds it with
`timm:ARCH` (random weights from a local checkpoint: speed only, no download) through `embed_dataset`, the
embed job's own call: here (DataLoader decode workers), twice on a Ray cluster of `--cpus` CPUs started in
this process (CPU tasks decode and resize each file, the model's actor normalises and embeds), and here
again. Each call is timed whole (joining the cluster, planning, actor start included); the load (`uptime`)
before and after each, the ratio Ray / here and the largest difference between the two paths' vectors
are printed.

    .venv/bin/python bench/scale_photos.py [--per-class 32] [--arch resnet18] [--cpus 2]
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def load() -> float:
    return os.getloadavg()[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-class", type=int, default=32, help="crops of each wallpaper")
    parser.add_argument("--arch", default="resnet18", help="a timm architecture")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray cluster")
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="redex-scale-photos-"))
    os.environ["REDEX_CACHE"] = str(base / "cache")
    os.environ["HF_HUB_OFFLINE"] = "1"
    import ray
    import timm
    import torch
    from PIL import Image

    from core.data import scan, sources
    from core.embed import embeddings
    from core.store.db import get_store
    from tests.photos import SOURCES, WALLPAPERS, require_photos

    try:
        require_photos()
        rng = np.random.default_rng(0)
        root, pixels = base / "photos", 0
        for label, rel in SOURCES.items():
            with Image.open(WALLPAPERS / rel) as im:
                src = im.convert("RGB")
            w, h = src.size
            for j in range(args.per_class):
                cw, ch = int(w * rng.uniform(0.8, 1.0)), int(h * rng.uniform(0.8, 1.0))
                x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
                out = root / "train" / label / f"{label}-{j}.jpg"
                out.parent.mkdir(parents=True, exist_ok=True)
                src.crop((x, y, x + cw, y + ch)).save(out, quality=90)
                pixels += cw * ch
        n = args.per_class * len(SOURCES)
        print(f"{n} JPEGs, mean {pixels / n / 1e6:.1f} Mpx", flush=True)
        store = get_store()
        name = sources.register(str(root), "photos", store=store)
        scan.scan(name, store)
        checkpoint = base / "weights.pth"
        torch.save(timm.create_model(args.arch, pretrained=False).state_dict(), checkpoint)
        model, bid = embeddings.ensure_backbone(name, f"timm:{args.arch}", checkpoint=str(checkpoint), store=store)

        def run(label: str) -> tuple[float, np.ndarray]:
            embeddings.EMBEDDINGS.delete(bid, store)
            before, t = load(), time.perf_counter()
            out = embeddings.embed_dataset(name, model, bid, store=store)
            rate = out["embedded"] / (time.perf_counter() - t)
            print(f"{label}: {out['embedded']} images, {rate:.2f} img/s (load {before:.1f} -> {load():.1f})",
                  flush=True)
            return rate, embeddings.load_embeddings(name, bid, store)[1]

        here, local = run("here (DataLoader decode workers)")
        ray.init(num_cpus=args.cpus, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
        os.environ["REDEX_RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
        run(f"Ray, {args.cpus} CPUs, first run")
        on_ray, vectors = run(f"Ray, {args.cpus} CPUs, again")
        del os.environ["REDEX_RAY_ADDRESS"]
        again, _ = run("here again")
        print(f"ratio Ray (again) / here (mean of both): {on_ray / ((here + again) / 2):.2f};"
              f" max |Ray - here| {float(np.abs(vectors - local).max()):.1e}")
    finally:
        if ray.is_initialized():
            ray.shutdown()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
