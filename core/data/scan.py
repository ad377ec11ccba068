"""Scanning a registered dataset into the store: resumable chunks, incremental rescans, problem files,
display thumbnails; files decoded in worker processes."""
from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
import sys
from collections.abc import Callable
from concurrent.futures import Executor, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from core import config, paths
from core.data.catalog import DatasetError, get_dataset
from core.data.decode import (
    DEFAULT_WORKING_SIZE,
    GRAY_MODES,
    SMALL_IMAGE_MAX,
    THUMB_FORMAT,
    BadImage,
    Decoded,
    check_file,
    decode,
    decode_files,
    decode_workers,
    ignore_stop_signals,
    needs_thumbnail,
    read_file,
)
from core.data.sources import (
    FASHION_MNIST,
    Entry,
    list_entries,
    materialize_fashion_mnist,
)
from core.jobs import JobContext, task
from core.store.db import Store, get_store, to_json

CHUNK = 4096               # images per resumable scan chunk
PARALLEL_MIN = 24          # a chunk decodes in worker processes when it has at least this many files to decode
CHUNK_FORMAT = "thumbs-1"  # part of a finished chunk's key: chunks of an older scan format are not resumed


def _choose_working_format(root: Path, entries: list[Entry], image_size: int | None) -> tuple[int, int]:
    """Working size and channels from the headers of a sample of images.

    Size: the given one; else the most common size if it is at most SMALL_IMAGE_MAX (so a few odd
    images don't resize the whole dataset); else DEFAULT_WORKING_SIZE. Channels: 1 if every sampled
    image is grayscale, else 3.
    """
    sizes: dict[tuple[int, int], int] = {}
    gray = True
    usable = [e for e in entries if not e.problem]
    for e in usable[:: max(1, len(usable) // 200)][:200]:
        try:
            check_file(root / e.path)  # no FIFO, device or huge file is opened
            with Image.open(root / e.path) as im:
                sizes[im.size] = sizes.get(im.size, 0) + 1
                gray &= im.mode in GRAY_MODES
        except Exception:  # noqa: BLE001 - bad files are reported by the scan itself
            continue
    common = max(sizes, key=sizes.get) if sizes else None
    if image_size:
        size = image_size
    elif common and max(common) <= SMALL_IMAGE_MAX:
        size = max(common)
    else:
        size = DEFAULT_WORKING_SIZE
    return size, 1 if gray and sizes else 3


# -- scanning ----------------------------------------------------------------------------------
@dataclass
class ScanReport:
    images: int
    skipped: int
    converted: int
    reused: int    # unchanged since the last scan (size and mtime): not decoded again
    decoded: int   # decoded in this run (chunks finished by an interrupted run count in neither)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def scan(name: str, store: Store | None = None, ctx: JobContext | None = None) -> ScanReport:
    """Validate and decode every image of a dataset; commit images, problems, thumbnails and the pixel cache."""
    store = store or get_store()
    ds = get_dataset(name, store)
    if ds["kind"] == FASHION_MNIST:
        if ctx:
            ctx.phase("write Fashion-MNIST PNGs")
        materialize_fashion_mnist(ds, (lambda d, t: ctx.progress(d, t)) if ctx else None)
    root = Path(ds["root"])
    entries = list_entries(ds)
    if not entries:
        raise DatasetError(f"dataset {name!r} has no images: expected {root}/<class>/<image> "
                           "(optionally under train/, val/, test/), or a manifest with rows")
    size, channels = _choose_working_format(root, entries, ds["options"].get("image_size") or ds["image_size"])
    old = _previous_scan(store, name, size, channels)
    part_dir = paths.safe_join(config.artifacts_dir("scan"), name, what="dataset name")
    part_dir.mkdir(exist_ok=True)
    if ctx:
        ctx.phase("scan images", total=len(entries))
    chunks, decoders = [], _Decoders()
    try:
        for start in range(0, len(entries), CHUNK):
            tick = (lambda done, start=start: ctx.progress(start + done, len(entries))) if ctx else None
            chunks.append(_scan_chunk(root, entries[start:start + CHUNK], size, channels, old, part_dir,
                                      store, decoders, tick))
            if ctx:
                ctx.progress(min(start + CHUNK, len(entries)), len(entries))
    finally:
        decoders.close()
    report = _commit_scan(store, ds, entries, chunks, size, channels)
    shutil.rmtree(part_dir, ignore_errors=True)
    return report


def _previous_scan(store: Store, name: str, size: int, channels: int) -> dict:
    """path -> (size_bytes, mtime, decoded fields, pixels, has a thumbnail) of the last committed scan,
    if compatible."""
    ds = get_dataset(name, store)
    if not ds["pixels"] or not Path(ds["pixels"]).exists() or (ds["image_size"], ds["channels"]) != (size, channels):
        return {}
    pixels = np.load(ds["pixels"], mmap_mode="r")
    rows = store.query("SELECT i.path, i.size_bytes, i.mtime, i.image_id, i.pixel_hash, i.width, i.height, i.mode,"
                       " i.row, t.image_id IS NOT NULL FROM images i LEFT JOIN thumbnails t USING (image_id)"
                       " WHERE i.dataset = ?", [name])
    notes = dict(store.query("SELECT path, reason FROM problems WHERE dataset = ? AND severity = 'converted'",
                             [name]))
    return {r[0]: (r[1], r[2], Decoded(r[3], r[4], pixels[r[8]], r[5], r[6], r[7], notes.get(r[0])), r[9])
            for r in rows}


def _scan_chunk(root: Path, entries: list[Entry], size: int, channels: int, old: dict, part_dir: Path,
                store: Store, decoders: _Decoders, tick: Callable[[int], None] | None = None) -> dict:
    """Decode one chunk (or load it from an earlier, interrupted scan); its new thumbnails go to the store.

    A file unchanged since the last scan (same size and mtime) is reused without decoding, unless it needs
    a thumbnail the store lacks (a cache from before thumbnails): then it is decoded again to make one.
    """
    stats = [None if e.problem else _stat(root / e.path) for e in entries]
    key = hashlib.blake2b(to_json([CHUNK_FORMAT, size, channels, [(e.path, e.label, e.split, e.problem)
                                                                  for e in entries], stats]).encode(),
                          digest_size=12).hexdigest()
    part = part_dir / f"chunk-{key}.npz"
    if part.exists():
        with np.load(part, allow_pickle=False) as z:
            return {"meta": json.loads(str(z["meta"])), "pixels": z["pixels"]}
    done: dict[int, Decoded | str] = {}
    todo = []
    for i, (e, st) in enumerate(zip(entries, stats)):
        if e.problem:  # found while listing the source: never read
            done[i] = e.problem
            continue
        prev = old.get(e.path)
        if st and prev and (prev[0], prev[1]) == st and (prev[3] or not needs_thumbnail(prev[2].width,
                                                                                        prev[2].height, size)):
            done[i] = prev[2]
        else:
            todo.append(i)
    reused = len(done) - sum(1 for e in entries if e.problem)
    for i, dec in zip(todo, decoders.map([root / entries[i].path for i in todo], size, channels, tick)):
        done[i] = dec
    meta, pixels, thumbs = [], [], []
    for i, (e, st) in enumerate(zip(entries, stats)):
        dec = done[i]
        if isinstance(dec, str):
            meta.append({"path": e.path, "bad": dec})
            continue
        meta.append({"path": e.path, "label": e.label, "split": e.split, "image_id": dec.image_id,
                     "pixel_hash": dec.pixel_hash, "width": dec.width, "height": dec.height, "mode": dec.mode,
                     "note": dec.note, "size_bytes": st[0], "mtime": st[1]})
        pixels.append(np.asarray(dec.pixels))
        if dec.thumbnail is not None:
            thumbs.append((dec.image_id, dec.thumbnail))
    _store_thumbnails(store, thumbs)
    stacked = np.stack(pixels) if pixels else np.zeros((0, size, size, channels), np.uint8)
    out = {"meta": meta, "pixels": stacked, "reused": reused, "decoded": len(todo)}
    tmp = part.with_suffix(".tmp.npz")
    np.savez(tmp, meta=np.array(to_json(meta)), pixels=stacked)
    os.replace(tmp, part)
    return out


def _decode_file(path: Path, size: int, channels: int) -> Decoded | str:
    """One file decoded at the working size with its thumbnail, or the reason it cannot be used."""
    try:
        return decode(read_file(path), size, channels, True)  # positional: tests wrap `decode`
    except BadImage as exc:
        return str(exc)


class _Decoders:
    """Decodes a chunk's files: in this process for a few, else in worker processes (`decode_workers()`),
    started once per scan when first needed. Workers ignore SIGTERM: a cancelled job stops at its next
    progress report, and the pool goes with it."""

    def __init__(self) -> None:
        self.workers = decode_workers()
        self.pool: Executor | None = None

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)

    def map(self, paths: list[Path], size: int, channels: int,
            tick: Callable[[int], None] | None) -> list[Decoded | str]:
        if self.workers < 2 or len(paths) < PARALLEL_MIN:
            out = []
            for p in paths:
                out.append(_decode_file(p, size, channels))
                if tick and len(out) % 64 == 0:
                    tick(len(out))
            return out
        if self.pool is None:
            # fork on Linux: workers start at once, without importing anything (as torch's DataLoader does)
            mp = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
            self.pool = ProcessPoolExecutor(self.workers, mp_context=mp, initializer=ignore_stop_signals)
        batch = max(1, min(16, len(paths) // (4 * self.workers)))  # small tasks: a cancel waits for little
        batches = [paths[i:i + batch] for i in range(0, len(paths), batch)]
        out = []
        for results in self.pool.map(decode_files, batches, [size] * len(batches), [channels] * len(batches)):
            out.extend(results)
            if tick:
                tick(len(out))
        return out


def _store_thumbnails(store: Store, thumbs: list) -> None:
    """Insert (content id, `Thumbnail`) pairs; a content id that has one already keeps it."""
    if not thumbs:
        return
    import pyarrow as pa

    table = pa.table({"image_id": pa.array([i for i, _ in thumbs], pa.string()),
                      "format": pa.array([THUMB_FORMAT] * len(thumbs), pa.string()),
                      "width": pa.array([t.width for _, t in thumbs], pa.int32()),
                      "height": pa.array([t.height for _, t in thumbs], pa.int32()),
                      "data": pa.array([t.data for _, t in thumbs], pa.binary())})
    with store.write() as con:
        con.register("new_thumbnails", table)
        con.execute("INSERT OR IGNORE INTO thumbnails SELECT * FROM new_thumbnails")


def _stat(path: Path) -> tuple[int, float] | None:
    try:
        st = path.stat()
        return st.st_size, st.st_mtime
    except (OSError, ValueError):  # ValueError: a NUL in a manifest's path
        return None


def _commit_scan(store: Store, ds: dict, entries: list[Entry], chunks: list[dict], size: int,
                 channels: int) -> ScanReport:
    import pandas as pd

    name = ds["name"]
    meta = [m for c in chunks for m in c["meta"]]
    good = [m for m in meta if "bad" not in m]
    if not good:
        raise DatasetError(f"dataset {name!r}: none of its {len(entries)} files is a usable image")
    pixels = np.concatenate([c["pixels"] for c in chunks])
    pix_dir = config.artifacts_dir("pixels")
    digest = hashlib.blake2b("".join(m["image_id"] for m in good).encode(), digest_size=8).hexdigest()
    pix_path = paths.safe_join(pix_dir, f"{name}-{size}x{channels}-{digest}.npy", what="dataset name")
    tmp = pix_path.with_suffix(".tmp.npy")
    np.save(tmp, pixels)
    os.replace(tmp, pix_path)
    images = pd.DataFrame(good)
    images.insert(0, "dataset", name)
    images.insert(1, "row", np.arange(len(good), dtype=np.int32))
    problems = _problem_rows(name, [(m["path"], "skipped", m["bad"]) for m in meta if "bad" in m]
                             + [(m["path"], "converted", m["note"]) for m in good if m["note"]])
    classes = sorted({m["label"] for m in good})
    with store.write() as con:
        old_pix = con.execute("SELECT pixels FROM datasets WHERE name = ?", [name]).fetchone()[0]
        con.execute("CREATE TEMP TABLE old_ids AS SELECT DISTINCT image_id FROM images WHERE dataset = ?", [name])
        con.execute("DELETE FROM images WHERE dataset = ?", [name])
        con.execute("DELETE FROM problems WHERE dataset = ?", [name])
        con.register("new_images", images)
        con.execute("INSERT INTO images SELECT dataset, row, path, image_id, pixel_hash, label, split, width,"
                    " height, mode, size_bytes, mtime FROM new_images")
        con.register("new_problems", problems)
        con.execute("INSERT INTO problems SELECT * FROM new_problems")
        # Thumbnails of the files this dataset no longer has, unless another dataset has them too.
        con.execute("DELETE FROM thumbnails WHERE image_id IN (SELECT image_id FROM old_ids)"
                    " AND image_id NOT IN (SELECT image_id FROM images)")
        con.execute("DROP TABLE old_ids")
        con.execute("UPDATE datasets SET image_size = ?, channels = ?, classes = ?, pixels = ?,"
                    " scanned_at = now() WHERE name = ?", [size, channels, classes, str(pix_path), name])
    if old_pix and old_pix != str(pix_path) and paths.is_under(old_pix, pix_dir):
        Path(old_pix).unlink(missing_ok=True)
    return ScanReport(images=len(good), skipped=len(meta) - len(good),
                      converted=sum(1 for m in good if m["note"]),
                      reused=sum(c.get("reused", 0) for c in chunks),
                      decoded=sum(c.get("decoded", 0) for c in chunks))


def _problem_rows(name: str, rows: list[tuple[str, str, str]]):
    """The problems table's rows, one per path (two problems of one path are joined: never a key clash)."""
    import pandas as pd

    by_path: dict[str, tuple[str, str]] = {}
    for path, severity, reason in rows:
        if path in by_path:
            old_severity, old_reason = by_path[path]
            severity = "skipped" if "skipped" in (severity, old_severity) else severity
            reason = f"{old_reason}; {reason}"
        by_path[path] = (severity, reason)
    return pd.DataFrame([{"dataset": name, "path": p, "severity": s, "reason": r, "detail": None}
                         for p, (s, r) in by_path.items()],
                        columns=["dataset", "path", "severity", "reason", "detail"])


@task("scan", heavy=False)
def _scan_task(ctx: JobContext) -> dict:
    report = scan(ctx.dataset, ctx.store, ctx)
    ctx.log(f"{report.images} images, {report.skipped} skipped, {report.converted} converted")
    return report.as_dict()
