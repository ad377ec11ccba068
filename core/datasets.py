"""Datasets: register a source, scan it into the store, and serve its pixels.

Sources: an ImageFolder tree (`root/<class>/<image>`, optionally under `train/`, `val/`, `test/`
split folders), a CSV or Parquet manifest (`path,label[,split]`), or the built-in Fashion-MNIST
(written once as PNGs into the cache from the IDX files, keeping its train/test split).

Scanning validates and decodes every image once. Each image gets a content id (hash of its bytes)
and a pixel hash (hash of its decoded pixels); its pixels, resized to the dataset's working size,
go to a pixel cache (.npy) that training and embedding read. Bad files never abort a scan: each
is recorded in `problems` with its reason and left out. Images in odd modes (CMYK, 16-bit,
alpha, palette, 1-bit) are converted, kept, and recorded with the conversion made, so nothing
usable is lost. A rescan reuses every image whose size and mtime did not change, and a scan
killed half-way resumes from its finished chunks.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from core import config
from core.idx import FASHION_MNIST_CLASSES, load_fashion_mnist
from core.jobs import JobContext, task
from core.store import Store, get_store, to_json

FASHION_MNIST = "fashion-mnist"
SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val",
                 "validation": "val", "test": "test", "testing": "test"}
MAX_PIXELS = int(os.environ.get("REDEX_MAX_PIXELS", str(64 * 1024 * 1024)))
SMALL_IMAGE_MAX = 64      # uniform images up to this size keep their native size
DEFAULT_WORKING_SIZE = 64  # otherwise images are resized (short side) and centre-cropped to this
CHUNK = 4096               # images per resumable scan chunk
_GRAY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"}


class DatasetError(ValueError):
    """A user-facing problem with a dataset (missing path, empty, unknown name)."""


@dataclass(frozen=True)
class Entry:
    path: str    # relative to the dataset root
    label: str
    split: str


# -- registration ------------------------------------------------------------------------------
def register(source: str, name: str | None = None, *, image_size: int | None = None,
             limit: int | None = None, store: Store | None = None) -> str:
    """Record a dataset (no scanning yet; `scan` does that). Returns its name.

    `limit` (Fashion-MNIST only) keeps the first `limit` images of each split, for quick looks.
    """
    store = store or get_store()
    if source == FASHION_MNIST:
        fashion_mnist_folder()  # fail now, with the reason, if the data can't be had
        name = name or (FASHION_MNIST if not limit else f"{FASHION_MNIST}-{limit}")
        kind, root = FASHION_MNIST, str(config.cache_dir() / "datasets" / name)
        image_size = 28
    else:
        path = Path(source).expanduser().resolve()
        if not path.exists():
            raise DatasetError(f"no such file or folder: {source}")
        if path.is_dir():
            kind, root = "imagefolder", str(path)
        elif path.suffix.lower() in (".csv", ".parquet", ".pq"):
            kind, root = "manifest", str(path.parent)
        else:
            raise DatasetError(f"{source}: expected an image folder, or a .csv/.parquet manifest")
        name = name or path.stem
        source = str(path)
    _check_name(name)
    options = {"limit": limit, "image_size": image_size}
    with store.write() as con:
        old = con.execute("SELECT kind, source, options FROM datasets WHERE name = ?", [name]).fetchone()
        if old and (old[0], old[1]) != (kind, source):
            raise DatasetError(f"a dataset named {name!r} already exists for {old[1]}; choose another --name")
        if old and json.loads(old[2] or "{}") != options:
            con.execute("UPDATE datasets SET options = ? WHERE name = ?", [to_json(options), name])
        if not old:
            con.execute("INSERT INTO datasets (name, kind, source, root, options) VALUES (?, ?, ?, ?, ?)",
                        [name, kind, source, root, to_json(options)])
    return name


def _has_idx(folder: Path) -> bool:
    return any((folder / f).exists() for f in ("train-images-idx3-ubyte.gz", "train-images-idx3-ubyte"))


def fashion_mnist_folder() -> Path:
    """Folder with the Fashion-MNIST IDX files: REDEX_DATA or Debian's package, else torchvision's
    download (when online) into the cache."""
    folder = config.fashion_mnist_dir()
    downloaded = config.cache_dir() / "downloads" / "FashionMNIST" / "raw"
    for candidate in (folder, downloaded):
        if _has_idx(candidate):
            return candidate
    try:
        from torchvision.datasets import FashionMNIST

        for train in (True, False):
            FashionMNIST(str(config.cache_dir() / "downloads"), train=train, download=True)
    except Exception as exc:  # noqa: BLE001 - any failure means: no data, say how to get it
        raise DatasetError(
            f"Fashion-MNIST not found in {folder}, and torchvision could not download it ({exc}). "
            "Install Debian's package 'dataset-fashion-mnist' (apt-get install dataset-fashion-mnist) "
            "or set REDEX_DATA to the folder holding its IDX files.") from None
    return downloaded


def _check_name(name: str) -> None:
    if not name or not all(c.isalnum() or c in "-_." for c in name):
        raise DatasetError(f"invalid dataset name {name!r}: use letters, digits, '-', '_' or '.'")


def get_dataset(name: str, store: Store | None = None) -> dict:
    store = store or get_store()
    with store.read() as con:
        cur = con.execute("SELECT * FROM datasets WHERE name = ?", [name])
        row = cur.fetchone()
        if row is None:
            known = [r[0] for r in con.execute("SELECT name FROM datasets ORDER BY name").fetchall()]
            raise DatasetError(f"no dataset named {name!r}" + (f"; known: {', '.join(known)}" if known
                                                                else "; add one with `redex datasets add`"))
        ds = dict(zip([d[0] for d in cur.description], row))
    ds["options"] = json.loads(ds["options"] or "{}")
    return ds


def list_datasets(store: Store | None = None):
    store = store or get_store()
    return store.query_df(
        "SELECT d.name, d.kind, d.source, d.image_size, d.channels, d.scanned_at,"
        " (SELECT count(*) FROM images i WHERE i.dataset = d.name) AS images,"
        " (SELECT count(*) FROM problems p WHERE p.dataset = d.name AND p.severity = 'skipped') AS skipped"
        " FROM datasets d ORDER BY d.name")


# -- listing a source --------------------------------------------------------------------------
def list_entries(ds: dict) -> list[Entry]:
    if ds["kind"] == "manifest":
        return _manifest_entries(Path(ds["source"]))
    return _folder_entries(Path(ds["root"]))


def _folder_entries(root: Path) -> list[Entry]:
    """`root/<class>/<file>` or `root/<split>/<class>/<file>` (split folders train/val/test)."""
    tops = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    split_dirs = [p for p in tops if p.name.lower() in SPLIT_ALIASES]
    groups = ([(SPLIT_ALIASES[p.name.lower()], p) for p in split_dirs] if split_dirs and len(split_dirs) == len(tops)
              else [("train", root)])
    entries = []
    for split, base in groups:
        for class_dir in sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith(".")):
            for file in sorted(class_dir.rglob("*")):
                if file.is_file() and not file.name.startswith("."):
                    entries.append(Entry(file.relative_to(root).as_posix(), class_dir.name, split))
    return entries


def _manifest_entries(path: Path) -> list[Entry]:
    import pandas as pd

    df = pd.read_parquet(path) if path.suffix.lower() in (".parquet", ".pq") else pd.read_csv(path)
    missing = {"path", "label"} - set(df.columns)
    if missing:
        raise DatasetError(f"{path}: manifest needs columns path,label[,split]; missing {sorted(missing)}")
    splits = df["split"].astype(str).str.lower() if "split" in df.columns else ["train"] * len(df)
    entries = []
    for p, label, split in zip(df["path"].astype(str), df["label"].astype(str), splits):
        if split not in SPLIT_ALIASES:
            raise DatasetError(f"{path}: unknown split {split!r} for {p} (use train, val or test)")
        entries.append(Entry(p, label, SPLIT_ALIASES[split]))
    return entries


def materialize_fashion_mnist(ds: dict, progress: Callable[[int, int], None] | None = None) -> None:
    """Write Fashion-MNIST's IDX images as PNGs: `<root>/<split>/<class>/<index>.png`. Idempotent."""
    root, limit = Path(ds["root"]), ds["options"].get("limit")
    done_marker = root / ".complete"
    if done_marker.exists():
        return
    for split in ("train", "test"):
        images, labels = load_fashion_mnist(fashion_mnist_folder(), split)
        n = min(len(images), limit) if limit else len(images)
        for cls in FASHION_MNIST_CLASSES:
            (root / split / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            path = root / split / FASHION_MNIST_CLASSES[labels[i]] / f"{i:05d}.png"
            if not path.exists():
                tmp = path.with_suffix(".tmp")
                Image.fromarray(images[i], mode="L").save(tmp, format="PNG")
                os.replace(tmp, path)
            if progress and i % 500 == 0:
                progress(i, n)
    done_marker.touch()


# -- decoding one image ------------------------------------------------------------------------
@dataclass
class Decoded:
    image_id: str
    pixel_hash: str
    pixels: np.ndarray | None   # [S, S, C] uint8 at the working size
    width: int
    height: int
    mode: str
    note: str | None = None     # conversion made, if any


def decode(data: bytes, size: int, channels: int) -> Decoded:
    """Validate and decode one file's bytes. Raises `BadImage` with a user-facing reason."""
    if not data:
        raise BadImage("empty file (0 bytes)")
    image_id = hashlib.blake2b(data, digest_size=16).hexdigest()
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            im = Image.open(io.BytesIO(data))
            mode, (w, h) = im.mode, im.size
            if w * h > MAX_PIXELS:
                raise BadImage(f"decompression bomb: {w}x{h} = {w * h:,} pixels (limit {MAX_PIXELS:,};"
                               " REDEX_MAX_PIXELS raises it)")
            im.load()
        except BadImage:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise BadImage(f"decompression bomb: {exc}") from None
        except UnidentifiedImageError:
            raise BadImage("not an image (format not recognised)") from None
        except (OSError, SyntaxError, ValueError) as exc:
            raise BadImage(f"truncated or corrupt image data: {exc}") from None
    im, note = _normalise_mode(im)
    arr = np.asarray(im)
    pixel_hash = hashlib.blake2b(arr.tobytes() + str(arr.shape).encode(), digest_size=16).hexdigest()
    return Decoded(image_id, pixel_hash, _to_working(im, size, channels), w, h, mode, note)


class BadImage(Exception):
    """A file that cannot be used; the message is the reason shown to the user."""


def _normalise_mode(im: Image.Image) -> tuple[Image.Image, str | None]:
    """8-bit L or RGB. Returns the image and a note describing any conversion."""
    mode = im.mode
    if mode in ("L", "RGB"):
        return im, None
    if mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
        if im.mode == "RGB":
            return im, "palette image converted to RGB"
    if im.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        flat = Image.alpha_composite(background, rgba).convert("RGB")
        return flat, f"{mode} image: transparency flattened onto white"
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(im, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        scaled = np.zeros_like(arr) if hi == lo else (arr - lo) / (hi - lo) * 255.0
        return Image.fromarray(scaled.round().astype(np.uint8), mode="L"), f"{mode} image rescaled to 8-bit"
    if im.mode == "1":
        return im.convert("L"), "1-bit image converted to 8-bit grayscale"
    if im.mode == "CMYK":
        return im.convert("RGB"), "CMYK image converted to RGB"
    return im.convert("RGB"), f"{mode} image converted to RGB"


def _to_working(im: Image.Image, size: int, channels: int) -> np.ndarray:
    """Resize (short side) and centre-crop to size x size, with `channels` channels: [S, S, C]."""
    im = im.convert("L" if channels == 1 else "RGB")
    if im.size != (size, size):
        im = ImageOps.fit(im, (size, size), Image.Resampling.BILINEAR)
    arr = np.asarray(im, dtype=np.uint8)
    return arr[:, :, None] if arr.ndim == 2 else arr


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
                gray &= im.mode in _GRAY_MODES
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


# -- reading a scanned dataset -----------------------------------------------------------------
def images_table(name: str, store: Store | None = None, split: str | None = None):
    """DataFrame of a dataset's images (row, path, image_id, pixel_hash, label, split, ...), by row."""
    store = store or get_store()
    sql = "SELECT * EXCLUDE (dataset) FROM images WHERE dataset = ?"
    params: list = [name]
    if split:
        sql += " AND split = ?"
        params.append(split)
    return store.query_df(sql + " ORDER BY row", params)


def load_pixels(name: str, store: Store | None = None) -> np.ndarray:
    """The dataset's pixel cache, memory-mapped: uint8 [N, S, S, C], row i = images.row i."""
    ds = get_dataset(name, store)
    if not ds["pixels"] or not Path(ds["pixels"]).exists():
        raise DatasetError(f"dataset {name!r} has not been scanned yet (run `redex datasets add` again)")
    return np.load(ds["pixels"], mmap_mode="r")


def problems_table(name: str, store: Store | None = None):
    store = store or get_store()
    return store.query_df("SELECT path, severity, reason FROM problems WHERE dataset = ?"
                          " ORDER BY severity DESC, path", [name])


def class_counts(name: str, store: Store | None = None):
    """DataFrame: label x split counts (wide), with a total column."""
    store = store or get_store()
    df = store.query_df("SELECT label, split, count(*) AS n FROM images WHERE dataset = ? GROUP BY ALL",
                        [name])
    if df.empty:
        return df
    wide = df.pivot_table(index="label", columns="split", values="n", fill_value=0, aggfunc="sum")
    wide["total"] = wide.sum(axis=1)
    return wide.reset_index()


def iter_image_paths(name: str, store: Store | None = None) -> Iterator[tuple[str, Path]]:
    ds = get_dataset(name, store)
    for (path,) in (store or get_store()).query("SELECT path FROM images WHERE dataset = ? ORDER BY row", [name]):
        yield path, Path(ds["root"]) / path
