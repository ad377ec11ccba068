"""Benchmark of embedding speed: the default backbone on Fashion-MNIST, and a pretrained backbone on photos.

(a) trains DEFAULT_BACKBONE with the default recipe on the full train split (target: >= 90 % test
    top-1 in <= 5 minutes on a 2-core CPU);
(b) embeds all 70,000 images with `embed_batches` and compares its throughput with the bare
    `model.forward_features` on pre-made float tensors (same batch size and device; target
    ratio >= 0.9). Best of `--repeats` interleaved runs, to damp noise on a shared machine.

    .venv/bin/python bench/embed.py [--quick] [--device cpu] [--batch-size 256]

--photos: throughput of a pretrained backbone (`timm:NAME`) on large JPEGs, the product's photo path
(`timm_models.load_timm` with `--checkpoint`, `ImageReader` + `embed_images`, as the embed job runs it):
read + decode + EXIF orientation + resize/crop/normalise at the model's pretrained config in N decode
worker processes + forward. `--photos-n` JPEGs (quality 90, 3-9 megapixels: crops of Debian's
gnome-backgrounds / ukui-wallpapers, a few stored rotated with an EXIF orientation tag) are written to a
temp folder. Per N of `--workers`: images/s of the whole pipeline, of the bare forward
(`model.features`) on pre-made tensors at the same batch size, and of the decode side alone (the same
DataLoader, no model), in wall time and in CPU time per image (this process and its reaped workers: less
moved by other load on a shared machine); then fastdup (its own venv, `bench/cluster.py` FASTDUP_PYTHON) on
the same folder. `--device cuda` puts the model on a GPU (decode stays on the CPU workers; e.g.
`--workers 1,2,4,8` there).
The weights are a local checkpoint the bench makes from timm's architecture (random init): their values
do not change the speed, and the summary says so. Best of `--repeats` interleaved runs.

    nice -n 10 .venv/bin/python bench/embed.py --photos [--quick] [--model resnet18] [--photos-n 256] \
        [--workers 1,2] [--batch-size 64] [--repeats 2] [--no-fastdup]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

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
# resnet18 (1.8 GFLOPs at 224 px, 512-d): the cheapest of the backbones the Datasets page suggests, so on
# a 2-core CPU the bench shows the decode side rather than only the model.
PHOTO_MODEL = "resnet18"
PHOTO_BATCH = 64          # embed_dataset's batch for a pretrained backbone
PHOTO_MAX_PIXELS = 9_000_000
WALLPAPERS = (Path("/usr/share/backgrounds"), Path("/usr/share/backgrounds/gnome"))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, a smoke run of a few seconds")
    parser.add_argument("--device", default=None, help="cpu | cuda | mps (default: the best available)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="embedding batch size (default 256; --photos: 64, the embed job's for a timm backbone)")
    parser.add_argument("--repeats", type=int, default=2, help="timed embedding runs per method")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice; 1 copes best with a busy shared CPU)")
    photos = parser.add_argument_group("--photos: a pretrained backbone on large JPEGs")
    photos.add_argument("--photos", action="store_true", help="run the photo throughput bench instead")
    photos.add_argument("--model", default=PHOTO_MODEL, help=f"timm architecture (default {PHOTO_MODEL})")
    photos.add_argument("--photos-n", type=int, default=None, help="JPEGs to write (default 256; --quick 8)")
    photos.add_argument("--workers", default="1,2", help="decode worker processes to time, comma-separated")
    photos.add_argument("--no-fastdup", action="store_true", help="skip fastdup")
    args = parser.parse_args()
    if args.batch_size is None:
        args.batch_size = PHOTO_BATCH if args.photos else 256
    return args


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
    if args.photos:
        photos_main(args)
        return
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



# -- --photos: a pretrained backbone on large JPEGs ---------------------------------------------
def wallpapers() -> list[Path]:
    """Debian's wallpapers of at least 2 megapixels (JPEG, PNG, WebP), sorted."""
    found = []
    for folder in WALLPAPERS:
        for path in sorted(folder.glob("*")):
            if path.suffix.lower() in (".jpg", ".jpeg", ".png", ".webp"):
                with Image.open(path) as im:
                    if im.size[0] * im.size[1] >= 2_000_000:
                        found.append(path)
    return found


def write_photos(folder: Path, n: int, seed: int = 0) -> list[Path]:
    """`n` JPEGs (quality 90) in `folder`: random crops (55-100 % of each side) of the wallpapers, scaled
    down to at most PHOTO_MAX_PIXELS, some flipped or brightened; every 8th stored rotated with an EXIF
    orientation tag (6), as a camera writes a portrait photo."""
    sources = wallpapers()
    if not sources:
        raise SystemExit("no wallpapers in /usr/share/backgrounds: apt-get install gnome-backgrounds ukui-wallpapers")
    rng = np.random.default_rng(seed)
    files = []
    for s, source in enumerate(sources):
        count = n // len(sources) + (s < n % len(sources))
        if not count:
            continue
        with Image.open(source) as im:
            base = im.convert("RGB")
        for _ in range(count):
            k = len(files)
            w, h = base.size
            cw, ch = int(w * rng.uniform(0.55, 1.0)), int(h * rng.uniform(0.55, 1.0))
            x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            im = base.crop((x, y, x + cw, y + ch))
            if cw * ch > PHOTO_MAX_PIXELS:
                scale = (PHOTO_MAX_PIXELS / (cw * ch)) ** 0.5
                im = im.resize((int(cw * scale), int(ch * scale)), Image.Resampling.BILINEAR, reducing_gap=2.0)
            if rng.random() < 0.5:
                im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            if rng.random() < 0.3:
                im = im.point(lambda v, g=rng.uniform(0.8, 1.2): min(255, int(v * g)))
            exif = Image.Exif()
            if k % 8 == 7:
                im = im.transpose(Image.Transpose.ROTATE_90)  # stored counter-clockwise: the tag turns it back
                exif[0x0112] = 6
            path = folder / f"photo_{k:04d}.jpg"
            im.save(path, format="JPEG", quality=90, exif=exif)
            files.append(path)
    return files


def make_checkpoint(name: str, folder: Path) -> Path:
    """A state dict of timm architecture `name` (random init, seed 0) saved to `folder`: a local weights
    file for `--checkpoint`, for throughput only (the values of the weights do not change the speed)."""
    import timm

    torch.manual_seed(0)
    path = folder / f"{name}-bench-local.pth"
    torch.save(timm.create_model(name, pretrained=False).state_dict(), path)
    return path


def time_pipeline(model, files: list[Path], batch_size: int, workers: int, device) -> float:
    """Seconds for the embed job's pretrained path: `embed_images` over an `ImageReader` of the files."""
    from core.embed.timm_models import ImageReader, embed_images

    start = time.perf_counter()
    reader = ImageReader(model.transform, files=files, min_side=model.decode_side)  # as the embed job reads
    vectors, failed = embed_images(model, reader, batch_size=batch_size, num_workers=workers, device=device)
    seconds = time.perf_counter() - start
    if failed or not np.isfinite(vectors).all():
        raise SystemExit(f"the pipeline could not read {len(failed)} file(s): {list(failed.items())[:3]}")
    return seconds


def time_reader(transform, files: list[Path], batch_size: int, workers: int, min_side: int | None = None) -> float:
    """Seconds for the decode side alone: the same DataLoader as `embed_images` (workers, batches,
    collate), no model."""
    from core.embed.timm_models import ImageReader, _collate

    loader = torch.utils.data.DataLoader(ImageReader(transform, files=files, min_side=min_side), batch_size=batch_size,
                                         num_workers=workers, collate_fn=_collate)
    start = time.perf_counter()
    for _index, _batch, _bad in loader:
        pass
    return time.perf_counter() - start


@torch.inference_mode()
def time_features(model, batches: list[torch.Tensor], device) -> float:
    """Seconds for `model.features` (what `embed_images` runs per batch, under autocast on CUDA) on
    pre-made transformed batches already on `device`, the features brought back as numpy."""
    start = time.perf_counter()
    for x in batches:
        with autocast(device):
            model.features(x).float().cpu().numpy()
    return time.perf_counter() - start


def clocked(fn, *args) -> tuple[float, float]:
    """(what `fn(*args)` returns: its seconds, CPU seconds of this process and of the children it reaped
    meanwhile: decode workers, fastdup). CPU time moves less than wall time on a busy shared machine."""
    before = os.times()
    seconds = fn(*args)
    after = os.times()
    return seconds, sum(after[:4]) - sum(before[:4])


def decode_breakdown(transform, files: list[Path], min_side: int | None = None) -> dict[str, float]:
    """Milliseconds per image in this process: `open_image` (read, checks, decode, EXIF; a JPEG at the
    reduced scale that keeps `min_side`, as the embed job reads) and the timm eval transform (resize,
    crop, to tensor, normalise) after it; the same at full resolution (the baseline: before the reduced
    decode), interleaved."""
    from core.data.decode import open_image

    times = {"open_ms": 0.0, "transform_ms": 0.0, "full_open_ms": 0.0, "full_transform_ms": 0.0}
    for path in files:
        for prefix, side in (("", min_side), ("full_", None)):
            t0 = time.perf_counter()
            im = open_image(path, side)
            t1 = time.perf_counter()
            transform(im.convert("RGB"))
            t2 = time.perf_counter()
            times[prefix + "open_ms"] += 1000 * (t1 - t0) / len(files)
            times[prefix + "transform_ms"] += 1000 * (t2 - t1) / len(files)
    return times


def run_fastdup_timed(folder: Path) -> dict | str:
    """fastdup on `folder` at its defaults (bench/cluster.py's script, its own venv): seconds of
    `fastdup.run` (decode, its ONNX model's features, nearest neighbours, stats) and of the whole process;
    or why not."""
    from bench.cluster import FASTDUP_PYTHON, FASTDUP_SCRIPT

    if not FASTDUP_PYTHON.exists():
        return (f"{FASTDUP_PYTHON} not found (python3 -m venv /tmp/fastdupvenv &&"
                " /tmp/fastdupvenv/bin/pip install fastdup)")
    with tempfile.TemporaryDirectory() as work:
        start = time.perf_counter()
        proc = subprocess.run([str(FASTDUP_PYTHON), "-c", FASTDUP_SCRIPT, str(folder), work], capture_output=True,
                              check=False, text=True,
                              env={**os.environ, "SENTRY_OPT_OUT": "1", "PYTHONWARNINGS": "ignore"})
        wall = time.perf_counter() - start
    if proc.returncode != 0:
        return f"fastdup failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}"
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"run_s": out["run_s"], "wall_s": wall, "images": len(out["names"])}


def photos_main(args: argparse.Namespace) -> None:
    from core.embed import timm_models

    device = pick_device(args.device)
    n = args.photos_n or (8 if args.quick else 256)
    repeats = 1 if args.quick else args.repeats
    workers = [int(w) for w in args.workers.split(",")]
    load_before, started = os.getloadavg(), time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="redex-bench-photos-") as tmp:
        folder = Path(tmp) / "photos"
        folder.mkdir()
        t0 = time.perf_counter()
        files = write_photos(folder, n)
        megapixels = np.array([np.prod(Image.open(f).size) / 1e6 for f in files])
        mib = sum(f.stat().st_size for f in files) / 2**20
        print(f"[photos] {len(files)} JPEGs, {megapixels.min():.1f}-{megapixels.max():.1f} MP (mean "
              f"{megapixels.mean():.1f}), {mib:.0f} MiB, written in {time.perf_counter() - t0:.0f} s", flush=True)
        checkpoint = make_checkpoint(args.model, Path(tmp))
        timm_models.check_checkpoint(args.model, checkpoint)  # as check_embed_params does before a job
        model = timm_models.load_timm(args.model, checkpoint=checkpoint).to(device)  # as ensure_backbone does
        print(f"[photos] timm:{args.model}, {model.embed_dim}-d, data config {model.data_config}", flush=True)

        reader = timm_models.ImageReader(model.transform, files=files[:args.batch_size])
        one = torch.stack([reader[i][1] for i in range(len(reader))]).to(device)  # speed does not depend on content
        batches = [one[:min(args.batch_size, len(files) - lo)] for lo in range(0, len(files), args.batch_size)]
        breakdown = decode_breakdown(model.transform, files[:min(len(files), 32)], model.decode_side)
        time_features(model, batches[:1], device)  # warm-up
        time_pipeline(model, files[:args.batch_size], args.batch_size, workers[0], device)
        times = {w: {"pipeline": [], "bare": [], "reader": []} for w in workers}
        for r in range(repeats):
            for w in workers:
                times[w]["bare"].append(clocked(time_features, model, batches, device))
                times[w]["pipeline"].append(clocked(time_pipeline, model, files, args.batch_size, w, device))
                times[w]["reader"].append(clocked(time_reader, model.transform, files, args.batch_size, w,
                                                       model.decode_side))
                print(f"[photos] run {r + 1}/{repeats}, {w} worker(s): " + ", ".join(
                    f"{k} {v[-1][0]:.1f} s ({v[-1][1]:.1f} CPU s)" for k, v in times[w].items()), flush=True)
        fastdup = []
        if not args.no_fastdup:
            for r in range(repeats):
                result, cpu = clocked(run_fastdup_timed, folder)
                fastdup.append(dict(result, cpu_s=cpu) if isinstance(result, dict) else result)
                print(f"[photos] fastdup run {r + 1}/{repeats}: {fastdup[-1]}", flush=True)
    load_after = os.getloadavg()
    ips = {w: {k: len(files) / min(s for s, _ in v) for k, v in t.items()} for w, t in times.items()}
    cpu_ms = {w: {k: 1000 * min(c for _, c in v) / len(files) for k, v in t.items()} for w, t in times.items()}
    runs = [f for f in fastdup if isinstance(f, dict)]
    fastdup_ips = len(files) / min(f["run_s"] for f in runs) if runs else None

    print("\n" + "=" * 20 + " bench/embed.py --photos summary " + "=" * 20)
    mode = "QUICK (smoke run, few images: the numbers are not meaningful)" if args.quick else "full"
    print(f"mode            : {mode}")
    print(f"device          : {device} ({cpu_name()}, {torch.get_num_threads()} torch threads, {os.cpu_count()} CPUs),"
          f" torch {torch.__version__}")
    print(f"load average    : {load_before[0]:.2f} at start, {load_after[0]:.2f} at end (shared machine);"
          f" {time.perf_counter() - started:.0f} s in all")
    print(f"images          : {len(files)} JPEGs q90, {megapixels.min():.1f}-{megapixels.max():.1f} MP (mean "
          f"{megapixels.mean():.1f}), every 8th EXIF-rotated")
    print(f"backbone        : timm:{args.model} ({model.embed_dim}-d) at {model.input_size[-1]} px, "
          f"{model.data_config['interpolation']}, crop_pct {model.data_config['crop_pct']}")
    print("weights         : local checkpoint made by the bench (timm architecture, random init), throughput"
          " only; loaded by load_timm(checkpoint=...)")
    print(f"batch           : {args.batch_size}; best of {repeats} interleaved runs")
    reduced = breakdown["open_ms"] + breakdown["transform_ms"]
    full = breakdown["full_open_ms"] + breakdown["full_transform_ms"]
    print(f"one process     : open_image {breakdown['open_ms']:.0f} ms + timm transform {breakdown['transform_ms']:.0f}"
          f" ms per image ({1000 / reduced:.1f} img/s on one core), JPEG decoded at >= {model.decode_side} px;"
          f" at full resolution {breakdown['full_open_ms']:.0f} + {breakdown['full_transform_ms']:.0f} ms"
          f" (reduced / full: {reduced / full:.2f})")
    print(f"{'workers':>7} | {'pipeline img/s':>14} | {'bare fwd img/s':>14} | {'ratio':>5} | {'decode img/s':>12} |"
          f" {'fastdup img/s':>13} | {'vs fastdup':>10}")
    for w, row in ips.items():
        fd = f"{fastdup_ips:13.1f} | {row['pipeline'] / fastdup_ips:10.2f}" if fastdup_ips else f"{'-':>13} | {'-':>10}"
        print(f"{w:>7} | {row['pipeline']:14.1f} | {row['bare']:14.1f} | {row['pipeline'] / row['bare']:5.2f} | "
              f"{row['reader']:12.1f} | {fd}")
    print("CPU ms / image  : (this process + its decode workers; less moved by other load than wall time)")
    for w, row in cpu_ms.items():
        print(f"{w:>7} | pipeline {row['pipeline']:.0f} | bare forward {row['bare']:.0f} | decode {row['reader']:.0f}")
    if runs:
        best = min(runs, key=lambda f: f["run_s"])
        print(f"fastdup         : fastdup.run {best['run_s']:.1f} s on {best['images']} images (decode, its ONNX"
              f" model's 576-d features, neighbours, stats; all CPUs); process {best['wall_s']:.1f} s with import,"
              f" {1000 * min(f['cpu_s'] for f in runs) / len(files):.0f} CPU ms / image")
    elif fastdup:
        print(f"fastdup         : {fastdup[-1]}")
    print("=" * 72)


if __name__ == "__main__":
    main()
