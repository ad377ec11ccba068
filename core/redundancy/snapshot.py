"""A memory-mapped snapshot of one clustering, so a page opens at a million images in a blink.

`clusterings.load_clustering` reads every train embedding and every tree from DuckDB (13 s for
1.28 million images on 2 cores) and rebuilds each tree's dendrogram order. A snapshot holds the same
arrays as `.npy` files, in the layout the cut index wants, beside a small JSON head:

    <cache>/artifacts/snapshots/<dataset>/<backbone|linkage>/
        head.json     version (`clusterings.state_version`), labels, per-class sizes and tree meta
        emb.npy       float32 [N, D]  train embeddings, in train-table order (as `Clustering.emb`)
        pos.npy       int64 [N]       each class's positions in the train table, classes one after another
        linkage.npy   float64 [N - C, 4]  the classes' linkage matrices, one after another
        order.npy     int64 [N]       each class's dendrogram leaf order
        gap.npy       int64 [N - C]   each class's gap-to-merge map
        row.npy       int64 [N]       the train table's `row` column (pixel-cache rows)
        index.*.npy   the `CutIndex` arrays (member, local, class_of, rank, height)
        table.parquet the train table (row, path, image_id, label, split), read only when asked

Loading maps the arrays (`np.load(mmap_mode="r")`): no copy and no parse, so the first load costs
what the page then touches. A snapshot is valid for exactly one `state_version`; the cluster job
writes it when it finishes, and a page that finds none (or an older one) writes it after its first
load from the store. It is written into a temporary folder beside the final one and renamed into
place, so a reader never sees half a snapshot. Removing the dataset removes its snapshots.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
from pathlib import Path

import numpy as np
import pandas as pd

from core import config, paths
from core.redundancy import trees
from core.redundancy.index import CutIndex
from core.store import readahead

FORMAT = 1
INDEX_ARRAYS = ("member", "local", "class_of", "rank", "height")
ARRAYS = ("emb", "pos", "linkage", "order", "gap", "row")


def folder(name: str, bid: str, linkage: str) -> Path:
    """Where the snapshot of (dataset, backbone, linkage) lives (checked to stay under the cache)."""
    return paths.safe_join(config.artifacts_dir("snapshots"), name, paths.id_file_name(f"{bid}|{linkage}"),
                           what="snapshot")


def load(name: str, bid: str, linkage: str, version: str):
    """The `Clustering` of the snapshot for `version`, memory-mapped; None when there is none for it.

    Its `table` is read from the Parquet file the first time it is used (the cut needs none of it).
    """
    from core.redundancy.clusterings import Clustering, _rows_of

    where = folder(name, bid, linkage)
    try:
        head = json.loads((where / "head.json").read_text())
        if head.get("format") != FORMAT or head.get("version") != version:
            return None
        a = {k: np.load(where / f"{k}.npy", mmap_mode="r") for k in ARRAYS}
        ix = {k: np.load(where / f"index.{k}.npy", mmap_mode="r") for k in INDEX_ARRAYS}
    except (OSError, ValueError):
        return None  # none yet, or replaced while reading: the caller loads from the store
    readahead.read_ahead(a["emb"])  # the representatives of a class picked first read its rows at random
    classes, start, merge = {}, 0, 0
    labels = np.empty(len(a["row"]), dtype=object)
    for label, n, meta in zip(head["labels"], head["sizes"], head["metas"]):
        tree = trees.ClassTree(np.asarray(a["linkage"][merge:merge + n - 1]), np.asarray(a["order"][start:start + n]),
                               np.asarray(a["gap"][merge:merge + n - 1]), meta)
        pos = np.asarray(a["pos"][start:start + n])
        classes[label] = (tree, _rows_of(a["emb"], pos), pos)
        labels[pos] = label
        start, merge = start + n, merge + n - 1
    sizes = np.asarray(head["sizes"], np.int64)
    index = CutIndex(list(head["labels"]), sizes, np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64),
                     classes=classes, **ix)
    return Clustering(name, bid, linkage, LazyTable(where / "table.parquet", {"row": a["row"], "label": labels}),
                      a["emb"], classes, index)


def save(c, version: str) -> Path:
    """Write the snapshot of clustering `c` for `version`, replacing any older one; returns its folder."""
    final = folder(c.dataset, c.backbone_id, c.linkage)
    final.parent.mkdir(parents=True, exist_ok=True)
    labels = sorted(c.classes)
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("pos", "linkage", "order", "gap")}
    sizes, metas = [], []
    for label in labels:
        tree, _, pos = c.classes[label]
        parts["pos"].append(np.asarray(pos, np.int64))
        parts["linkage"].append(np.asarray(tree.linkage, np.float64).reshape(-1, 4))
        parts["order"].append(np.asarray(tree.order, np.int64))
        parts["gap"].append(np.asarray(tree.gap_merge, np.int64))
        sizes.append(int(tree.n))
        metas.append(tree.meta)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=final.parent))
    try:
        np.save(tmp / "emb.npy", np.asarray(c.emb, np.float32))
        np.save(tmp / "row.npy", np.asarray(c.table.row, np.int64))
        index = c.index if c.index is not None else CutIndex.build(c.classes)
        for key in INDEX_ARRAYS:
            np.save(tmp / f"index.{key}.npy", np.asarray(getattr(index, key)))
        for key, chunks in parts.items():
            empty = np.zeros((0, 4) if key == "linkage" else 0, np.float64 if key == "linkage" else np.int64)
            np.save(tmp / f"{key}.npy", np.concatenate(chunks) if chunks else empty)
        table = c.table.materialize() if isinstance(c.table, LazyTable) else c.table
        table[["row", "path", "image_id", "label", "split"]].to_parquet(tmp / "table.parquet", index=False)
        (tmp / "head.json").write_text(json.dumps(
            {"format": FORMAT, "version": version, "labels": labels, "sizes": sizes, "metas": metas},
            default=str))
        old = final.with_name(f".old-{final.name}-{os.getpid()}-{threading.get_ident()}")
        if final.exists():
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


class LazyTable:
    """The train table of a snapshot, read from its Parquet file on first use (then kept).

    Attribute access and `iloc`/`len` go to the DataFrame, so code written for `Clustering.table`
    works unchanged. The columns in `known` (`row`, `label`: what the page's cut path uses) are
    answered from memory without reading the file.
    """

    def __init__(self, path: Path, known: dict[str, np.ndarray]):
        self._path = path
        self._known = known
        self._frame: pd.DataFrame | None = None
        self._lock = threading.Lock()

    def materialize(self) -> pd.DataFrame:
        with self._lock:
            if self._frame is None:
                self._frame = pd.read_parquet(self._path)
            return self._frame

    def __getattr__(self, attr):
        if attr.startswith("_"):
            raise AttributeError(attr)
        if attr in self._known and self._frame is None:
            return pd.Series(self._known[attr], name=attr, dtype=object if attr == "label" else None, copy=False)
        return getattr(self.materialize(), attr)

    def __getitem__(self, key):
        return self.materialize()[key]

    def __len__(self) -> int:
        return len(self._known["row"])
