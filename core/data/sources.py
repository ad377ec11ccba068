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

import itertools
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from PIL import Image

from core import config, jobs, paths
from core.wording import plural
from core.data.catalog import DatasetError, get_dataset
from core.data.decode import BadImage, check_file
from core.data.idx import FASHION_MNIST_CLASSES, load_fashion_mnist
from core.store.db import Store, get_store, to_json

FASHION_MNIST = "fashion-mnist"
SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val",
                 "validation": "val", "test": "test", "testing": "test"}
SAMPLE_FILES = 50          # files opened (header only) to tell a folder of images from anything else
SAMPLE_PER_FOLDER = 20     # candidates taken from each class folder for that sample
SAMPLE_FOLDERS = 200       # class folders holding files looked at for it (empty ones pass over)


@dataclass(frozen=True)
class Entry:
    path: str    # relative to the dataset root (a manifest's: as written)
    label: str
    split: str
    problem: str | None = None   # found while listing (not UTF-8, a link out of the root...): skipped


# -- registration ------------------------------------------------------------------------------
MAX_WORKING_SIZE = 1024  # px: the pixel cache holds N x S x S x C bytes; larger sizes serve no consumer


def register(source: str, name: str | None = None, *, image_size: int | None = None,
             limit: int | None = None, store: Store | None = None) -> str:
    """Record a dataset (no scanning yet; `scan` does that). Returns its name.

    The name must follow `paths.NAME_RULE` (default: made from the folder or manifest name). A
    folder or manifest is refused at once, before any dataset is recorded, if a quick sample of
    its files holds no image. `limit` (Fashion-MNIST only) keeps the first `limit` images of each
    split, for quick looks.
    """
    store = store or get_store()
    if image_size is not None and not 0 < image_size <= MAX_WORKING_SIZE:
        raise DatasetError(f"the working size must be 1 to {MAX_WORKING_SIZE:,} pixels, got {image_size}")
    if source == FASHION_MNIST:
        name = paths.check_dataset_name(name or (FASHION_MNIST if not limit else f"{FASHION_MNIST}-{limit}"))
        fashion_mnist_folder()  # fail now, with the reason, if the data can't be had
        kind, root = FASHION_MNIST, str(paths.safe_join(config.cache_dir() / "datasets", name))
        image_size = 28
    else:
        path = Path(source).expanduser().resolve()
        if not path.exists():
            raise DatasetError(f"no such file or folder: {paths.shown(source)}")
        if paths.utf8_problem(str(path)):  # the store keeps paths as UTF-8 text
            raise DatasetError(f"{paths.shown(path)}: its path is not valid UTF-8 (shown with its bytes escaped);"
                               " rename it, or the folder above it, and add it again; nothing was registered")
        if path.is_dir():
            kind, root = "imagefolder", str(path)
        elif path.suffix.lower() in (".csv", ".parquet", ".pq"):
            kind, root = "manifest", str(path.parent)
        else:
            raise DatasetError(f"{source}: expected an image folder, or a .csv/.parquet manifest")
        name = paths.check_dataset_name(name if name is not None else paths.default_dataset_name(path.stem))
        source = str(path)
        check_has_images({"kind": kind, "source": source, "root": root})
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


def check_has_images(ds: dict) -> None:
    """Refuse, with the reason, a source that holds no image: no usable file at all (an empty folder,
    only hidden files, class folders that are all empty, a manifest whose rows are all unusable), or
    a sample of its files of which none is an image (e.g. /etc, a manifest whose files are all gone).

    Up to `SAMPLE_FILES` files are opened, header only (files with an image extension first), from
    up to `SAMPLE_PER_FOLDER` per class folder of the first `SAMPLE_FOLDERS` class folders that hold
    any (empty class folders are passed over, however many), or spread over a manifest's rows.
    """
    root, source = Path(ds["root"]), paths.shown(ds["source"])
    if ds["kind"] == "manifest":
        rows = _manifest_entries(Path(ds["source"]))
        entries = [e for e in rows if not e.problem]
        if not entries:
            raise DatasetError(f"{source}: {_no_usable_rows(rows)}; write one row per image (path,label[,split];"
                               f" relative paths are read from {paths.shown(root)}); nothing was registered")
        candidates = entries[:: max(1, len(entries) // (SAMPLE_FILES * 4))]
    else:
        candidates, unusable, class_dirs = _folder_sample(root)
        if not candidates:
            raise DatasetError(f"{source}: {_no_files_in_folder(root, class_dirs, unusable)}; put the images in"
                               " one folder per class (<folder>/<class>/<image>, optionally under train/, val/,"
                               " test/) or register a .csv/.parquet manifest; nothing was registered")
    extensions = Image.registered_extensions()
    candidates.sort(key=lambda e: Path(e.path).suffix.lower() not in extensions)  # stable: images first
    reasons: dict[str, int] = {}
    for e in candidates[:SAMPLE_FILES]:
        try:
            check_file(root / e.path)
            with Image.open(root / e.path):
                return
        except BadImage as exc:
            reason = str(exc)
        except Exception:  # noqa: BLE001 - any failure to read a header means: not an image
            reason = "not an image"
        reasons[reason] = reasons.get(reason, 0) + 1
    tried = min(len(candidates), SAMPLE_FILES)
    if ds["kind"] == "manifest":
        where, fix = "rows of the manifest", f"check its path column (relative paths are read from {paths.shown(root)})"
    else:
        where, fix = "files in its class folders (<root>/<class>/<image>)", "point at a folder of images"
    raise DatasetError(f"{source}: no image among {tried} sampled {where} ({_counted(reasons)}); {fix};"
                       " nothing was registered")


def _folder_sample(root: Path) -> tuple[list[Entry], dict[str, int], int]:
    """For `check_has_images`: (usable files sampled from the class folders, reasons of the unusable
    entries met, how many class folders were looked at)."""
    candidates: list[Entry] = []
    unusable: dict[str, int] = {}
    class_dirs = with_files = 0
    for files in _folder_walk(root):
        usable = 0
        for e in itertools.islice(files, SAMPLE_PER_FOLDER * 10):  # problem entries count, up to a bound
            if e.problem:
                unusable[e.problem] = unusable.get(e.problem, 0) + 1
                continue
            candidates.append(e)
            usable += 1
            if usable == SAMPLE_PER_FOLDER:
                break
        class_dirs += 1
        with_files += bool(usable)
        if with_files == SAMPLE_FOLDERS:
            break
    return candidates, unusable, class_dirs


def _no_files_in_folder(root: Path, class_dirs: int, unusable: dict[str, int]) -> str:
    """What `check_has_images` found in a folder with no usable file in its class folders, as a phrase."""
    try:
        entries = list(os.scandir(root))
    except OSError:
        entries = []
    hidden = sum(e.name.startswith(".") for e in entries)
    loose = sum(not e.name.startswith(".") and not e.is_dir() for e in entries)
    extra = ([f"{plural(loose, 'file')} {'lies' if loose == 1 else 'lie'} directly in it, outside any class folder"] if loose else []) + (
        [f"{hidden} hidden entr{'y' if hidden == 1 else 'ies'} (names starting with '.') are left out"]
        if hidden else [])
    if not class_dirs:
        found = "the folder is empty" if not entries else "it has no class folder"
    else:
        held = f"its {plural(class_dirs, 'class folder')} {'holds' if class_dirs == 1 else 'hold'}"
        found = f"{held} no usable file ({_counted(unusable)})" if unusable else f"{held} no files"
    return "; ".join([found] + extra)


def _no_usable_rows(rows: list[Entry]) -> str:
    if not rows:
        return "the manifest has a header but no rows"
    reasons: dict[str, int] = {}
    for e in rows:
        reasons[e.problem] = reasons.get(e.problem, 0) + 1
    return f"none of its {plural(len(rows), 'row')} names a usable file ({_counted(reasons)})"


def _counted(reasons: dict[str, int]) -> str:
    """'3 file not found, 1 not an image': reasons with their counts, the most frequent first."""
    return ", ".join(f"{n} {r}" for r, n in sorted(reasons.items(), key=lambda kv: -kv[1]))


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


# -- listing a source --------------------------------------------------------------------------
def list_entries(ds: dict) -> list[Entry]:
    """Every file of the source, in a stable order; those that can't be used carry their `problem`."""
    if ds["kind"] == "manifest":
        return _manifest_entries(Path(ds["source"]))
    return [e for files in _folder_walk(Path(ds["root"])) for e in files]


def _folder_walk(root: Path) -> Iterator[Iterator[Entry]]:
    """Per class folder, its files: `root/<class>/...` or `root/<split>/<class>/...` (split folders
    train/val/test). Files and folders whose name starts with a dot are left out. Symlinks are
    followed only while they stay inside `root` (`paths.safe_join`); a dangling one, one out of the
    root and a linked subfolder become problem entries, as do names that are not UTF-8."""
    try:
        tops = _subdirs(root)
    except OSError as exc:
        raise DatasetError(f"{root}: cannot list the folder ({exc.strerror or exc})") from None
    split_dirs = [p for p in tops if p.name.lower() in SPLIT_ALIASES]
    groups = ([(SPLIT_ALIASES[p.name.lower()], p) for p in split_dirs] if split_dirs and len(split_dirs) == len(tops)
              else [("train", root)])
    for split, base in groups:
        try:
            class_dirs = _subdirs(base) if base != root else tops
        except OSError as exc:
            yield iter([_problem(root, base, "", split, f"unreadable folder: {exc.strerror or exc}")])
            continue
        for class_dir in class_dirs:
            linked = class_dir.is_symlink() or base.is_symlink()
            yield _class_files(root, class_dir, class_dir.name, split, linked)


def _subdirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _class_files(root: Path, folder: Path, label: str, split: str, linked: bool) -> Iterator[Entry]:
    """The files under one class folder, depth first in name order (the order of a sorted rglob)."""
    try:
        names = sorted(os.listdir(folder))
    except OSError as exc:
        yield _problem(root, folder, label, split, f"unreadable folder: {exc.strerror or exc}")
        return
    for name in names:
        path = folder / name
        if name.startswith("."):
            continue
        if path.is_symlink() or linked:
            problem = _link_problem(root, path)
            if problem:
                yield _problem(root, path, label, split, problem)
                continue
            if path.is_symlink() and path.is_dir():
                yield _problem(root, path, label, split, "symlinked folder inside the dataset folder: not followed")
                continue
        if path.is_dir():
            yield from _class_files(root, path, label, split, linked)
            continue
        rel = path.relative_to(root).as_posix()
        problem = paths.utf8_problem(rel)
        yield _problem(root, path, label, split, problem) if problem else Entry(rel, label, split)


def _link_problem(root: Path, path: Path) -> str | None:
    if not path.exists():
        return "dangling symlink (its target does not exist)"
    try:
        paths.safe_join(root, path.relative_to(root).as_posix(), subdirs=True)
    except paths.UnsafePathError:
        return "links outside the dataset folder: skipped"
    return None


def _problem(root: Path, path: Path, label: str, split: str, reason: str) -> Entry:
    return Entry(paths.shown(path.relative_to(root).as_posix()), paths.shown(label), split, reason)


def _manifest_entries(path: Path) -> list[Entry]:
    """Rows of a CSV/Parquet manifest, labels as written (`01` and `1` are two classes).

    Rows that cannot be used become problem entries: an empty path or label, a NUL in a path, and
    rows repeating an earlier row's path (dropped; one entry per such path counts them).
    """
    df = _read_manifest(path)
    missing = {"path", "label"} - set(df.columns)
    if missing:
        raise DatasetError(f"{path}: manifest needs columns path,label[,split]; missing {sorted(missing)}")
    splits = [_text(v).lower() for v in df["split"]] if "split" in df.columns else ["train"] * len(df)
    entries, first_row, repeats = [], {}, {}
    for i, (p, label, split) in enumerate(zip(map(_text, df["path"]), map(_text, df["label"]), splits), start=1):
        if split not in SPLIT_ALIASES:
            raise DatasetError(f"{path}: unknown split {split!r} for {paths.shown(p)} (use train, val or test)")
        split = SPLIT_ALIASES[split]
        problem = ("empty path" if not p.strip() else "invalid path: contains a NUL byte" if "\x00" in p
                   else "empty label" if not label.strip() else None)
        if problem:
            entries.append(Entry(paths.shown(p) if p.strip() else f"(row {i})", paths.shown(label), split, problem))
        elif p in first_row:
            repeats.setdefault(p, []).append((i, label))
        else:
            first_row[p] = (i, label)
            entries.append(Entry(p, label, split))
    for p, rows in repeats.items():
        first, label = first_row[p]
        others = sorted({lab for _, lab in rows if lab != label})
        reason = (f"{plural(len(rows), 'duplicate row')} dropped (rows {', '.join(str(r) for r, _ in rows[:10])}"
                  f"{', ...' if len(rows) > 10 else ''}); the first, row {first}, is kept with label {label!r}")
        if others:
            reason += f"; dropped rows gave other labels: {', '.join(map(repr, others[:5]))}"
        entries.append(Entry(f"{paths.shown(p)} (duplicate rows)", label, "train", reason))
    return entries


def _read_manifest(path: Path):
    """The manifest as a DataFrame, CSV cells as strings exactly as written; a clear error otherwise."""
    import pandas as pd

    try:
        size = paths.regular_file(path, "manifest").st_size
    except paths.UnsafePathError as exc:
        raise DatasetError(str(exc)) from None
    if size == 0:
        raise DatasetError(f"{path}: the manifest is empty (0 bytes); expected a header path,label[,split]"
                           " and one row per image")
    try:
        if path.suffix.lower() in (".parquet", ".pq"):
            return pd.read_parquet(path)
        return pd.read_csv(path, dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError:
        raise DatasetError(f"{path}: the manifest is empty; expected a header path,label[,split]") from None
    except UnicodeDecodeError:
        raise DatasetError(f"{path}: the manifest is not UTF-8 text") from None
    except Exception as exc:  # noqa: BLE001 - pandas/pyarrow parser errors have many types
        raise DatasetError(f"{path}: cannot read the manifest: {exc}") from None


def _text(value) -> str:
    """A manifest cell as text: missing (None/NaN, from Parquet) is empty."""
    if value is None or (isinstance(value, float) and value != value):
        return ""
    return str(value)


def materialize_fashion_mnist(ds: dict, progress: Callable[[int, int], None] | None = None) -> None:
    """Write Fashion-MNIST's IDX images as PNGs: `<root>/<split>/<class>/<index>.png`. Idempotent."""
    paths.safe_join(config.cache_dir() / "datasets", ds["name"])  # a name from before the rule is refused
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


# -- removing a dataset ------------------------------------------------------------------------
def remove_dataset(name: str, store: Store | None = None) -> dict:
    """Delete a dataset and everything derived from it; never its source files.

    Removed: its rows in every table with a `dataset` column (images, problems, projections, trees,
    train_runs, sweeps, finished jobs and their events and logs, ...), the backbones and LTRP models
    trained on it with their embeddings, score maps and checkpoint files, the embeddings of shared
    (pretrained) backbones for images no other dataset has, its pixel cache, its scan chunks and,
    for the Fashion-MNIST demo, its PNG folder under the cache. Only files under the cache are
    deleted. Refused while a job of the dataset is queued or running. Returns what was removed:
    row counts by table, and the files and folders deleted.
    """
    store = store or get_store()
    ds = get_dataset(name, store)
    active = [j for j in jobs.list_jobs(store, dataset=name, limit=1_000_000) if j["status"] in jobs.ACTIVE]
    if active:
        ids = ", ".join(str(j["id"]) for j in active)
        raise DatasetError(f"dataset {name!r} has {plural(len(active), 'job')} queued or running ({ids}); "
                           "cancel them first (`redex cancel ID`)")
    removed: dict = {"tables": {}, "files": []}
    with store.write() as con:
        def delete(table: str, where: str, params: list) -> None:
            n = con.execute(f"SELECT count(*) FROM {table} WHERE {where}", params).fetchone()[0]
            if n:
                con.execute(f"DELETE FROM {table} WHERE {where}", params)
                key = table.strip('"')
                removed["tables"][key] = removed["tables"].get(key, 0) + n

        files = [r[0] for r in con.execute(
            "SELECT checkpoint FROM backbones WHERE dataset = ? AND checkpoint IS NOT NULL"
            " UNION ALL SELECT checkpoint FROM ltrp_models WHERE dataset = ?"
            " UNION ALL SELECT log_path FROM jobs WHERE dataset = ? AND log_path IS NOT NULL",
            [name, name, name]).fetchall()]
        files.append(ds["pixels"])
        own_backbones = "SELECT backbone_id FROM backbones WHERE dataset = ?"
        delete("embeddings", f"backbone_id IN ({own_backbones})", [name])
        delete("embeddings", "backbone_id IN (SELECT backbone_id FROM backbones WHERE dataset IS NULL)"
               " AND image_id IN (SELECT image_id FROM images WHERE dataset = ?)"
               " AND image_id NOT IN (SELECT image_id FROM images WHERE dataset <> ?)", [name, name])
        delete("patch_scores", "ranker_id IN (SELECT model_id FROM ltrp_models WHERE dataset = ?)", [name])
        delete("job_events", "job_id IN (SELECT id FROM jobs WHERE dataset = ?)", [name])
        keyed = [r[0] for r in con.execute(  # every table keyed by dataset, those of later migrations too
            "SELECT table_name FROM information_schema.columns WHERE column_name = 'dataset'"
            " AND table_schema = current_schema() ORDER BY table_name").fetchall()]
        for table in keyed:
            delete(f'"{table}"', "dataset = ?", [name])
        delete("datasets", "name = ?", [name])
        # thumbnails are keyed by content id (shared by identical files across datasets): those of
        # images no dataset has any more
        delete("thumbnails", "image_id NOT IN (SELECT image_id FROM images)", [])
    cache = config.cache_dir()
    for file in files:
        if file and paths.is_under(file, cache) and Path(file).is_file():
            Path(file).unlink()
            removed["files"].append(str(file))
    folders = [config.artifacts_dir("scan"), config.artifacts_dir("snapshots")] \
        + ([cache / "datasets"] if ds["kind"] == FASHION_MNIST else [])
    for parent in folders:
        try:
            folder = paths.safe_join(parent, name, what="dataset name")
        except paths.UnsafePathError:
            continue  # a name from before the rule (such as '..') has no folder of its own
        if folder.is_dir() and not folder.is_symlink():
            shutil.rmtree(folder)
            removed["files"].append(str(folder))
    return removed
