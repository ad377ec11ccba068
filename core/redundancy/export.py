"""A subset as a table (CSV/Parquet) or as an image folder of the kept images."""
from __future__ import annotations

import hashlib
import io
import os
import shutil
import tempfile
from pathlib import Path

import pandas as pd

from core import paths
from core.data.catalog import get_dataset
from core.store.db import Store, get_store

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


class ExportError(ValueError):
    """An export that cannot be done as asked; `missing` lists the source files that are gone."""

    def __init__(self, message: str, missing: list[str] | None = None):
        super().__init__(message)
        self.missing = missing or []


def export_imagefolder(name: str, frame: pd.DataFrame, out_dir: str | Path, *, copy: bool = False,
                       skip_missing: bool = False, store: Store | None = None) -> int:
    """The kept images as `<out>/<split>/<label>/<file>` (symlinks, or copies). Returns the count written.

    All or nothing: the tree is written into a temporary folder beside `out_dir`, renamed to it only
    when complete, and removed on any failure, so a failed export never leaves a partial folder.
    Refused (`ExportError`, nothing written): `out_dir` not empty or not a folder, or inside the image
    folder of a registered dataset (its next scan would count the export as new images); source files that
    no longer exist (listed; with `skip_missing` they are left out, and the count returned is that
    of the files written); a label or file name that cannot be a folder or file name (`..`, `/`,
    an absolute path...: every path is built with `paths.safe_join` under the temporary folder).
    """
    store = store or get_store()
    root = Path(get_dataset(name, store)["root"])
    out_dir = Path(out_dir).expanduser().absolute()
    _check_target(out_dir, store)
    kept = frame[frame.kept]
    missing = [path for path in kept.path if not (root / path).is_file()]
    if missing and not skip_missing:
        raise ExportError(f"{len(missing)} of the {len(kept)} source files no longer exist (rescan the dataset, "
                          f"or skip them with --skip-missing): {', '.join(map(paths.shown, missing[:10]))}"
                          f"{', ...' if len(missing) > 10 else ''}", missing)
    gone = set(missing)
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name[:100]}.partial-", dir=out_dir.parent))
    except OSError as exc:
        raise ExportError(f"cannot write in {out_dir.parent}: {exc.strerror or exc}") from None
    written = 0
    try:
        for path, label, split in zip(kept.path, kept.label, kept.split):
            if path in gone:
                continue
            dst = paths.safe_join(tmp, split, label, Path(path).name, what="label or file name")
            if dst.exists() or dst.is_symlink():  # same file name in two source folders
                tag = hashlib.blake2b(path.encode("utf-8", "surrogateescape"), digest_size=4).hexdigest()
                dst = paths.safe_join(dst.parent, f"{dst.stem[:200]}-{tag}{dst.suffix[:40]}")
            dst.parent.mkdir(parents=True, exist_ok=True)
            if copy:
                shutil.copy2(root / path, dst)
            else:
                os.symlink((root / path).resolve(), dst)
            written += 1
        os.rename(tmp, out_dir)  # replaces an empty folder; fails if something was put there meanwhile
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, paths.UnsafePathError):
            raise ExportError(f"cannot export {name!r}, nothing was written: {exc}") from None
        if isinstance(exc, OSError):
            raise ExportError(f"export to {out_dir} failed, nothing was written: {exc}") from None
        raise
    return written


def _check_target(out_dir: Path, store: Store) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f"{out_dir} is a file; give a folder that is empty or does not exist yet")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        raise ExportError(f"{out_dir} exists and is not empty")
    target = out_dir.resolve()
    # A manifest's scan reads only its rows, so only image folders (the demo's too) are protected.
    for ds_name, root in store.query("SELECT name, root FROM datasets WHERE kind <> 'manifest' ORDER BY name"):
        if target == Path(root).resolve() or paths.is_under(target, root):
            raise ExportError(f"{out_dir} is inside the folder of dataset {ds_name!r} ({root}); its next scan "
                              "would count the exported images as new ones: export somewhere else")
