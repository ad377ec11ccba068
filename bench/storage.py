"""What each per-image cache costs, on disk and in memory, measured on real photos, and how fast they are made.

On a photo set built from Debian's wallpapers (`tests/photos.py`: 600-1000 px JPEG/PNG/WebP variants):

(a) scan it into fresh caches, decoding in this process (1 worker) and in `decode_workers()` worker
    processes (best of two interleaved runs each): images/s and their ratio; (a') the CPU time a
    thumbnail adds to decoding a file;
(b) what the scan stores per image: the pixel cache at the working size (the .npy file), the display
    thumbnails (WebP bytes, and what DuckDB takes for them on disk), and, after a one-epoch backbone,
    the embeddings (64 floats); the on-disk DuckDB cost per row is measured on `--rows` synthetic rows
    of the measured sizes, since a few hundred rows are below DuckDB's block granularity;
(c) reading images for LTRP at a pretrained MAE's 224 px from the files (DataLoader workers), against
    reading the working-size pixel cache;
(d) the same figures at 1 million photos.

    .venv/bin/python bench/storage.py [--per-class 20] [--rows 20000]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MILLION = 1_000_000


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-class", type=int, default=20, help="images per class (6 classes)")
    parser.add_argument("--rows", type=int, default=20_000, help="synthetic rows for DuckDB's per-row cost")
    parser.add_argument("--workers", type=int, default=None, help="decode workers (default: decode_workers())")
    return parser.parse_args()


def uptime() -> str:
    return subprocess.run(["uptime"], check=False, capture_output=True, text=True).stdout.strip()


def fresh_store(folder: Path):
    from core.store import db

    os.environ["REDEX_CACHE"] = str(folder)
    db._stores.clear()
    return db.get_store()


def scan_rate(photos: Path, workers: int) -> tuple[float, object, str]:
    """Scan the photo folder into a fresh cache with `workers` decoders: (images/s, store, dataset name)."""
    from core.data import scan, sources

    os.environ["REDEX_DECODE_WORKERS"] = str(workers)
    store = fresh_store(Path(tempfile.mkdtemp(prefix=f"redex-storage-{workers}-")))
    name = sources.register(str(photos), "photos", store=store)
    t = time.perf_counter()
    report = scan.scan(name, store)
    return report.images / (time.perf_counter() - t), store, name


def duckdb_bytes_per_row(table_sql: str, make_rows, rows: int) -> float:
    """On-disk bytes per row of a table in a fresh DuckDB file, after a checkpoint."""
    import duckdb

    path = Path(tempfile.mkdtemp(prefix="redex-duck-")) / "t.duckdb"
    con = duckdb.connect(str(path))
    con.execute(table_sql)
    con.execute("CHECKPOINT")
    empty = path.stat().st_size
    for lo in range(0, rows, 5000):
        con.register("chunk", make_rows(lo, min(rows, lo + 5000)))
        con.execute("INSERT INTO t SELECT * FROM chunk")
        con.unregister("chunk")
    con.execute("CHECKPOINT")
    con.close()
    return (path.stat().st_size - empty) / rows


def main() -> None:
    args = parse_args()
    import pyarrow as pa

    from core.data import catalog
    from core.data.decode import decode_workers
    from core.embed import embeddings
    from core.embed.backbones import DEFAULT_BACKBONE
    from core.ltrp.inputs import ModelImages
    from tests.photos import build_photo_set, missing_sources

    if missing_sources():
        sys.exit("Debian's gnome-backgrounds and ukui-wallpapers are needed (make data)")
    print(f"before: {uptime()}")
    photos = build_photo_set(Path(tempfile.mkdtemp(prefix="redex-photos-")) / "photos", per_class=args.per_class)
    files = [photos.root / f["path"] for f in photos.files]
    n = len(files)
    source_bytes = sum(p.stat().st_size for p in files)
    pixels_src = np.mean([f["size"][0] * f["size"][1] for f in photos.files])
    print(f"photo set: {n} images, {source_bytes / n / 1e3:.0f} KB a file, {pixels_src / 1e3:.0f} kpx an image")

    # (a) scan: 1 worker against decode_workers()
    workers = args.workers or decode_workers()
    serial = parallel = 0.0
    for _ in range(2):  # interleaved, best of two: a shared machine's load comes and goes
        serial = max(serial, scan_rate(photos.root, 1)[0])
        rate, store, name = scan_rate(photos.root, workers)
        parallel = max(parallel, rate)
    print(f"(a) scan: {serial:.1f} images/s with 1 worker, {parallel:.1f} with {workers}: ratio"
          f" {parallel / serial:.2f} (best of 2 each, interleaved; {uptime()})")

    # (a') what the thumbnail adds to decoding one file (CPU time, this process)
    from core.data.decode import decode

    datas = [f.read_bytes() for f in files]
    cost = {}
    for thumb in (False, True):
        t = time.process_time()
        for data in datas:
            decode(data, 64, 3, thumb)
        cost[thumb] = (time.process_time() - t) / n * 1000
    print(f"(a') decode one file: {cost[False]:.1f} ms CPU, {cost[True]:.1f} ms with its thumbnail: ratio"
          f" {cost[True] / cost[False]:.2f}")

    # (b) what is stored per image
    ds = catalog.get_dataset(name, store)
    pix_file = Path(ds["pixels"]).stat().st_size
    thumb_bytes, tw, th = store.query("SELECT avg(octet_length(data)), avg(width), avg(height) FROM thumbnails")[0]
    model, bid = embeddings.ensure_backbone(name, DEFAULT_BACKBONE, epochs=1, store=store)
    embeddings.embed_dataset(name, model, bid, store=store)
    dim = store.query("SELECT len(vec) FROM embeddings LIMIT 1")[0][0]
    thumb_disk = duckdb_bytes_per_row(
        "CREATE TABLE t (image_id VARCHAR PRIMARY KEY, format VARCHAR, width INTEGER, height INTEGER, data BLOB)",
        lambda lo, hi: pa.table({"image_id": [f"{i:032x}" for i in range(lo, hi)], "format": ["WEBP"] * (hi - lo),
                                 "width": [256] * (hi - lo), "height": [171] * (hi - lo),
                                 "data": pa.array([os.urandom(round(thumb_bytes)) for _ in range(lo, hi)], pa.binary())}),
        args.rows)
    rng = np.random.default_rng(0)
    emb_disk = duckdb_bytes_per_row(
        "CREATE TABLE t (backbone_id VARCHAR, image_id VARCHAR, vec FLOAT[], PRIMARY KEY (backbone_id, image_id))",
        lambda lo, hi: pa.table({"backbone_id": ["trained:resnet8s2@photos#0123abcd"] * (hi - lo),
                                 "image_id": [f"{i:032x}" for i in range(lo, hi)],
                                 "vec": pa.array(list(rng.standard_normal((hi - lo, dim)).astype(np.float32)),
                                                 pa.list_(pa.float32()))}),
        args.rows)
    size, chans = ds["image_size"], ds["channels"]
    per_image = {
        f"pixel cache ({size}x{size}x{chans} uint8, .npy, memory-mapped)": (pix_file / n, size * size * chans),
        f"thumbnail (WebP, {tw:.0f}x{th:.0f} px average; DuckDB on disk)": (thumb_disk, 0),
        f"embedding ({dim} float32; DuckDB on disk; in RAM once loaded)": (emb_disk, dim * 4),
    }
    print(f"(b) per image: thumbnail bytes {thumb_bytes:,.0f} (decoded for display: {tw * th * 3 / 1e3:.0f} KB,"
          " only while shown)")
    print(f"    {'cache':70s} {'disk/image':>12s} {'RAM/image':>10s} {'disk @1M':>10s} {'RAM @1M':>9s}")
    for what, (disk, ram) in per_image.items():
        print(f"    {what:70s} {disk:>10,.0f} B {ram:>8,.0f} B {disk * MILLION / 2**30:>7.1f} GiB"
              f" {ram * MILLION / 2**30:>6.2f} GiB")
    print(f"    source files (for scale): {source_bytes / n:,.0f} B a file, {source_bytes / n * MILLION / 2**30:.0f} GiB"
          " at 1M")

    # (c) LTRP inputs at 224 px: the files (DataLoader workers) against the pixel cache
    rows = np.arange(n)
    cached, files_224 = ModelImages(name, size, store), ModelImages(name, 224, store)
    t = time.perf_counter()
    cached.images(rows)
    cache_rate = n / (time.perf_counter() - t)
    t = time.perf_counter()
    at_224 = files_224.images(rows)
    file_rate = n / (time.perf_counter() - t)
    print(f"(c) LTRP inputs: {file_rate:.1f} images/s from the files at 224 px ({workers} workers,"
          f" {at_224.nbytes / n / 1e3:.0f} KB an image in memory), {cache_rate:,.0f} images/s from the pixel cache"
          f" at {size} px: ratio {file_rate / cache_rate:.4f}  ({uptime()})")
    print(f"(d) at 1M photos: scan {MILLION / parallel / 3600:.1f} h with {workers} workers here;"
          f" LTRP inputs at 224 px {MILLION / file_rate / 3600:.1f} h")


if __name__ == "__main__":
    main()
