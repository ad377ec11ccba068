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

from core import config, paths
from core.data.catalog import DatasetError, get_dataset
from core.data.decode import (
    DEFAULT_WORKING_SIZE,
    GRAY_MODES,
    SMALL_IMAGE_MAX,
    BadImage,
    Decoded,
    check_file,
    decode,
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
    part_dir = paths.safe_join(config.artifacts_dir("scan"), name, what="dataset name")
    part_dir.mkdir(exist_ok=True)
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
    stats = [None if e.problem else _stat(root / e.path) for e in entries]
    key = hashlib.blake2b(to_json([size, channels, [(e.path, e.label, e.split, e.problem) for e in entries],
                                   stats]).encode(), digest_size=12).hexdigest()
    part = part_dir / f"chunk-{key}.npz"
    if part.exists():
        with np.load(part, allow_pickle=False) as z:
            return {"meta": json.loads(str(z["meta"])), "pixels": z["pixels"]}
    meta, pixels, reused, decoded = [], [], 0, 0
    for e, st in zip(entries, stats):
        if e.problem:  # found while listing the source: never read
            meta.append({"path": e.path, "bad": e.problem})
            continue
        prev = old.get(e.path)
        if st and prev and (prev[0], prev[1]) == st:
            dec, reused = prev[2], reused + 1
        else:
            try:
                dec = decode(read_file(root / e.path), size, channels)
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
        con.execute("DELETE FROM images WHERE dataset = ?", [name])
        con.execute("DELETE FROM problems WHERE dataset = ?", [name])
        con.register("new_images", images)
        con.execute("INSERT INTO images SELECT dataset, row, path, image_id, pixel_hash, label, split, width,"
                    " height, mode, size_bytes, mtime FROM new_images")
        con.register("new_problems", problems)
        con.execute("INSERT INTO problems SELECT * FROM new_problems")
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
