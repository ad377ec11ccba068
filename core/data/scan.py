"""Scanning a registered dataset into the store: resumable chunks, incremental rescans, problem files."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from core import config
from core.data.catalog import DatasetError, get_dataset
from core.data.decode import (
    DEFAULT_WORKING_SIZE,
    GRAY_MODES,
    SMALL_IMAGE_MAX,
    BadImage,
    Decoded,
    decode,
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


def _choose_working_format(root: Path, entries: list[Entry], image_size: int | None) -> tuple[int, int]:
    """Working size and channels from the headers of a sample of images.

    Size: the given one; else the most common size if it is at most SMALL_IMAGE_MAX (so a few odd
    images don't resize the whole dataset); else DEFAULT_WORKING_SIZE. Channels: 1 if every sampled
    image is grayscale, else 3.
    """
    sizes: dict[tuple[int, int], int] = {}
    gray = True
    for e in entries[:: max(1, len(entries) // 200)][:200]:
        try:
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
    """Validate and decode every image of a dataset; commit images, problems and the pixel cache."""
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
    part_dir = config.artifacts_dir("scan", name)
    if ctx:
        ctx.phase("scan images", total=len(entries))
    chunks = []
    for start in range(0, len(entries), CHUNK):
        chunks.append(_scan_chunk(root, entries[start:start + CHUNK], size, channels, old, part_dir))
        if ctx:
            ctx.progress(min(start + CHUNK, len(entries)), len(entries))
    report = _commit_scan(store, ds, entries, chunks, size, channels)
    shutil.rmtree(part_dir, ignore_errors=True)
    return report


def _previous_scan(store: Store, name: str, size: int, channels: int) -> dict:
    """path -> (size_bytes, mtime, decoded fields, pixels) of the last committed scan, if compatible."""
    ds = get_dataset(name, store)
    if not ds["pixels"] or not Path(ds["pixels"]).exists() or (ds["image_size"], ds["channels"]) != (size, channels):
        return {}
    pixels = np.load(ds["pixels"], mmap_mode="r")
    rows = store.query("SELECT path, size_bytes, mtime, image_id, pixel_hash, width, height, mode, row"
                       " FROM images WHERE dataset = ?", [name])
    notes = dict(store.query("SELECT path, reason FROM problems WHERE dataset = ? AND severity = 'converted'",
                             [name]))
    return {r[0]: (r[1], r[2], Decoded(r[3], r[4], pixels[r[8]], r[5], r[6], r[7], notes.get(r[0])))
            for r in rows}


def _scan_chunk(root: Path, entries: list[Entry], size: int, channels: int, old: dict,
                part_dir: Path) -> dict:
    """Decode one chunk (or load it from an earlier, interrupted scan)."""
    stats = [_stat(root / e.path) for e in entries]
    key = hashlib.blake2b(to_json([size, channels, [(e.path, e.label, e.split) for e in entries],
                                   stats]).encode(), digest_size=12).hexdigest()
    part = part_dir / f"chunk-{key}.npz"
    if part.exists():
        with np.load(part, allow_pickle=False) as z:
            return {"meta": json.loads(str(z["meta"])), "pixels": z["pixels"]}
    meta, pixels, reused, decoded = [], [], 0, 0
    for e, st in zip(entries, stats):
        prev = old.get(e.path)
        if st and prev and (prev[0], prev[1]) == st:
            dec, reused = prev[2], reused + 1
        else:
            try:
                dec = decode(_read(root / e.path), size, channels)
                decoded += 1
            except BadImage as exc:
                meta.append({"path": e.path, "bad": str(exc)})
                continue
        meta.append({"path": e.path, "label": e.label, "split": e.split, "image_id": dec.image_id,
                     "pixel_hash": dec.pixel_hash, "width": dec.width, "height": dec.height, "mode": dec.mode,
                     "note": dec.note, "size_bytes": st[0], "mtime": st[1]})
        pixels.append(np.asarray(dec.pixels))
    stacked = np.stack(pixels) if pixels else np.zeros((0, size, size, channels), np.uint8)
    out = {"meta": meta, "pixels": stacked, "reused": reused, "decoded": decoded}
    tmp = part.with_suffix(".tmp.npz")
    np.savez(tmp, meta=np.array(to_json(meta)), pixels=stacked)
    os.replace(tmp, part)
    return out


def _stat(path: Path) -> tuple[int, float] | None:
    try:
        st = path.stat()
        return st.st_size, st.st_mtime
    except OSError:
        return None


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise BadImage("file not found") from None
    except OSError as exc:
        raise BadImage(f"unreadable: {exc.strerror or exc}") from None


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
    pix_path = pix_dir / f"{name}-{size}x{channels}-{digest}.npy"
    tmp = pix_path.with_suffix(".tmp.npy")
    np.save(tmp, pixels)
    os.replace(tmp, pix_path)
    images = pd.DataFrame(good)
    images.insert(0, "dataset", name)
    images.insert(1, "row", np.arange(len(good), dtype=np.int32))
    problems = pd.DataFrame(
        [{"dataset": name, "path": m["path"], "severity": "skipped", "reason": m["bad"], "detail": None}
         for m in meta if "bad" in m]
        + [{"dataset": name, "path": m["path"], "severity": "converted", "reason": m["note"], "detail": None}
           for m in good if m["note"]],
        columns=["dataset", "path", "severity", "reason", "detail"])
    classes = sorted({m["label"] for m in good})
    with store.write() as con:
        old_pix = con.execute("SELECT pixels FROM datasets WHERE name = ?", [name]).fetchone()[0]
        con.execute("DELETE FROM images WHERE dataset = ?", [name])
        con.execute("DELETE FROM problems WHERE dataset = ?", [name])
        con.register("new_images", images)
        con.execute("INSERT INTO images SELECT dataset, row, path, image_id, pixel_hash, label, split, width,"
                    " height, mode, size_bytes, mtime FROM new_images")
        con.register("new_problems", problems)
        con.execute("INSERT INTO problems SELECT * FROM new_problems")
        con.execute("UPDATE datasets SET image_size = ?, channels = ?, classes = ?, pixels = ?,"
                    " scanned_at = now() WHERE name = ?", [size, channels, classes, str(pix_path), name])
    if old_pix and old_pix != str(pix_path):
        Path(old_pix).unlink(missing_ok=True)
    return ScanReport(images=len(good), skipped=len(meta) - len(good),
                      converted=sum(1 for m in good if m["note"]),
                      reused=sum(c.get("reused", 0) for c in chunks),
                      decoded=sum(c.get("decoded", 0) for c in chunks))


@task("scan", heavy=False)
def _scan_task(ctx: JobContext) -> dict:
    report = scan(ctx.dataset, ctx.store, ctx)
    ctx.log(f"{report.images} images, {report.skipped} skipped, {report.converted} converted")
    return report.as_dict()
