"""What the store knows of a dataset: its record, image table, pixel cache, problems."""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from core.store.db import Store, get_store


class DatasetError(ValueError):
    """A user-facing problem with a dataset (missing path, empty, unknown name)."""


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


def class_page_rows(name: str, label: str, offset: int, limit: int, store: Store | None = None) -> list[int]:
    """Pixel-cache rows of `limit` images of class `label` from the `offset`-th, in row order: one page of a
    class without reading the image table (a million rows)."""
    rows = (store or get_store()).query("SELECT row FROM images WHERE dataset = ? AND label = ? ORDER BY row"
                                        " LIMIT ? OFFSET ?", [name, label, limit, offset])
    return [r[0] for r in rows]


def content_count(name: str, store: Store | None = None) -> int:
    """Distinct images (content ids) of the dataset: what an embedding covers."""
    return int((store or get_store()).query("SELECT count(DISTINCT image_id) FROM images WHERE dataset = ?",
                                            [name])[0][0])


def load_pixels(name: str, store: Store | None = None) -> np.ndarray:
    """The dataset's pixel cache, memory-mapped: uint8 [N, S, S, C], row i = images.row i."""
    ds = get_dataset(name, store)
    if not ds["pixels"] or not Path(ds["pixels"]).exists():
        raise DatasetError(f"dataset {name!r} has not been scanned yet (run `redex datasets add` again)")
    return np.load(ds["pixels"], mmap_mode="r")


def has_thumbnails(name: str, store: Store | None = None) -> bool:
    """Whether any image of the dataset has a display thumbnail (small images such as Fashion-MNIST have
    none: their pixel-cache rows are shown)."""
    return bool((store or get_store()).query(
        "SELECT EXISTS (SELECT 1 FROM images i JOIN thumbnails t USING (image_id) WHERE i.dataset = ?)",
        [name])[0][0])


def display_images(name: str, rows, store: Store | None = None) -> list[np.ndarray]:
    """The images at these pixel-cache rows as shown on screen, in that order: uint8 `[H, W, C]`.

    The stored display thumbnail (`core.data.decode.make_thumbnail`: sharp at the pages' thumbnail
    sizes, aspect kept) where there is one; else the pixel-cache row, which then holds the whole image
    (small square images, e.g. Fashion-MNIST), or which comes from a scan made before thumbnails.
    """
    from core.data.decode import read_thumbnail

    store = store or get_store()
    rows = [int(r) for r in rows]
    if not rows:
        return []
    found = dict(store.query("SELECT i.row, t.data FROM images i JOIN thumbnails t USING (image_id)"
                             " WHERE i.dataset = ? AND list_contains(?, i.row)", [name, rows]))
    pixels = load_pixels(name, store) if len(found) < len(set(rows)) else None
    return [read_thumbnail(found[r]) if r in found else np.asarray(pixels[r]) for r in rows]


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
