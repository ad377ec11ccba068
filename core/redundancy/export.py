"""A subset as a table (CSV/Parquet) or as an image folder of the kept images."""
from __future__ import annotations

import hashlib
import io
import os
import shutil
from pathlib import Path

import pandas as pd

from core.data.catalog import get_dataset
from core.store.db import Store

EXPORT_COLUMNS = ["path", "label", "split", "group", "kept"]


def export_rows(frame: pd.DataFrame, which: str = "all") -> pd.DataFrame:
    """The rows to export. which: all | kept | removed."""
    rows = {"all": frame, "kept": frame[frame.kept], "removed": frame[~frame.kept]}[which]
    return rows[EXPORT_COLUMNS]


def export_bytes(frame: pd.DataFrame, which: str = "all", fmt: str = "csv") -> bytes:
    """The subset table as CSV or Parquet bytes (for a download button)."""
    buf = io.BytesIO()
    rows = export_rows(frame, which)
    if fmt == "csv":
        rows.to_csv(buf, index=False)
    elif fmt == "parquet":
        rows.to_parquet(buf, index=False)
    else:
        raise ValueError(f"format must be csv or parquet, got {fmt!r}")
    return buf.getvalue()


def export_table(frame: pd.DataFrame, out: str | Path, *, which: str = "all") -> Path:
    """Write the subset table as CSV or Parquet, by the file's extension."""
    out = Path(out)
    fmt = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}.get(out.suffix.lower())
    if fmt is None:
        raise ValueError(f"{out}: use a .csv or .parquet file name")
    out.write_bytes(export_bytes(frame, which, fmt))
    return out


def export_imagefolder(name: str, frame: pd.DataFrame, out_dir: str | Path, *, copy: bool = False,
                       store: Store | None = None) -> int:
    """The kept images as `<out>/<split>/<label>/<file>` (symlinks, or copies). Returns the count."""
    root = Path(get_dataset(name, store)["root"])
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ValueError(f"{out_dir} exists and is not empty")
    kept = frame[frame.kept]
    for path, label, split in zip(kept.path, kept.label, kept.split):
        src = (root / path).resolve()
        dst = out_dir / split / label / Path(path).name
        if dst.exists() or dst.is_symlink():  # same file name in two source folders
            dst = dst.with_name(f"{dst.stem}-{hashlib.blake2b(path.encode(), digest_size=4).hexdigest()}{dst.suffix}")
        dst.parent.mkdir(parents=True, exist_ok=True)
        if copy:
            shutil.copy2(src, dst)
        else:
            os.symlink(src, dst)
    return len(kept)
