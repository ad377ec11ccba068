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

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from PIL import Image

from core import config
from core.data.catalog import DatasetError
from core.data.idx import FASHION_MNIST_CLASSES, load_fashion_mnist
from core.store.db import Store, get_store, to_json

FASHION_MNIST = "fashion-mnist"
SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val",
                 "validation": "val", "test": "test", "testing": "test"}


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
