"""Per-image vector tables: one vector per (model key, image content id), filled chunk by chunk.

Embeddings (`embeddings`: one per backbone and image) and LTRP score maps (`patch_scores`: one per
ranker and image) are the same thing to the store: a table of `(key, image_id, FLOAT[])` rows. A
`VectorTable` names such a table and does what both need:

- `missing`: the images of a dataset that have no vector for a key yet, one per content id (duplicate
  files share a vector), so unchanged images are never computed twice;
- `compute_and_store`: computes those, `chunk` images at a time, and commits each chunk in its own
  write transaction, so a job killed half-way resumes where it stopped. The computing is a function
  the caller passes in (pixel-cache rows -> vectors) and the storing a separate step (`insert`), so
  the computing can move elsewhere while this process writes: a `ModelCompute` (a model applied to
  pixels in batches, or to each source file read at the model's own size) runs on a Ray cluster when
  the job has a Ray address (`core.scale`), and the vectors come back here to be stored in the same chunks;
- `load`: a dataset's images that have a vector, by row, with the vectors as one numpy array;
- `coverage`, `with_coverage`: how many of a dataset's images each key covers (the model lists show it);
- `delete`: drops a key's vectors (a retrained model made them stale).

Table and column names go into the SQL as identifiers (they cannot be parameters); they come from
code, never from a user, and are checked to be plain identifiers.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from core.store.db import Store

if TYPE_CHECKING:
    from core.jobs import JobContext

Compute = Callable[[np.ndarray], np.ndarray]  # pixel-cache rows [n] -> float vectors [n, D]
LOAD_BATCH = 65_536  # vectors read at a time by `VectorTable.load`


@dataclass(frozen=True)
class ModelCompute:
    """A compute step that is a model applied to a dataset's images, `batch_size` images at a time:
    `apply(model, pixels [n, ...], batch_size) -> float [n, D]`, a module-level function, so the same
    step runs here (called with pixel-cache rows, like any `Compute`) or on a Ray cluster.

    By default the model reads the pixel cache (uint8 [n, S, S, C]), here and on the cluster. A model that
    reads each source file at its own size (a pretrained backbone, a 224-px MAE) gives:
    - `source`: what a cluster's CPU tasks read (`core.scale.data.FileSource`: the file through the same
      reader as here);
    - `here`: its compute step on this machine (rows -> vectors; e.g. decoding in DataLoader workers);
    - `returned(content ids, vectors, reasons) -> vectors`: what the driver does with each part that comes
      back from the cluster before it is stored (reasons: '' for an image read, else why not; its vector
      is NaN): record the unreadable images, or compute them here another way."""
    dataset: str
    model: Any = field(repr=False)
    apply: Callable[[Any, np.ndarray, int], np.ndarray]
    batch_size: int
    pixels: np.ndarray | None = field(repr=False)  # the dataset's pixel cache, memory-mapped
    source: Any = field(default=None, repr=False)
    here: Compute | None = field(default=None, repr=False)
    returned: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray] | None = field(default=None, repr=False)

    def __call__(self, rows: np.ndarray) -> np.ndarray:
        if self.here is not None:
            return self.here(rows)
        return self.apply(self.model, np.asarray(self.pixels[rows]), self.batch_size)


@dataclass(frozen=True)
class Filled:
    """What `compute_and_store` did: vectors computed now, reused (already stored), images in all."""
    computed: int
    reused: int
    total: int


@dataclass(frozen=True)
class VectorTable:
    """A table of one float vector per (`key`, image content id): `table(key, image_id, column FLOAT[])`."""
    table: str
    key: str
    column: str

    def __post_init__(self) -> None:
        for name in (self.table, self.key, self.column):
            if not name.isidentifier():
                raise ValueError(f"not a plain SQL identifier: {name!r}")

    # -- what is missing -----------------------------------------------------------------------
    def missing(self, dataset: str, key: str, store: Store) -> tuple[np.ndarray, np.ndarray]:
        """(pixel-cache rows int64 [n], content ids [n]) of the dataset's images with no vector for
        `key` yet: one per content id (its first row), ascending by row."""
        with store.read() as con:
            found = con.execute(
                f"SELECT min(i.row) AS r, i.image_id FROM images i WHERE i.dataset = ? AND NOT EXISTS ("
                f" SELECT 1 FROM {self.table} v WHERE v.{self.key} = ? AND v.image_id = i.image_id)"
                " GROUP BY i.image_id ORDER BY r", [dataset, key]).fetchnumpy()
        return found["r"].astype(np.int64), found["image_id"]

    # -- filling -------------------------------------------------------------------------------
    def compute_and_store(self, dataset: str, key: str, compute: Compute, store: Store, *, chunk: int,
                          ctx: JobContext | None = None, phase: str, verb: str,
                          note: str | None = None) -> Filled:
        """Compute and store the vectors of every image of `dataset` that has none for `key` yet.

        `compute` gets `chunk` pixel-cache rows at a time and returns their vectors; each chunk is
        committed on its own, so a killed run loses at most one chunk and the next run resumes.
        With `ctx`, starts the job phase `phase` (then logs `note`, if any), counts the stored
        images as done, and reports "<verb> done / total" after every chunk.
        """
        with store.read():  # one snapshot for both counts
            rows, ids = self.missing(dataset, key, store)
            total = store.query("SELECT count(DISTINCT image_id) FROM images WHERE dataset = ?", [dataset])[0][0]
        reused = total - len(rows)
        if ctx:
            ctx.phase(phase, total=total)
            if note:
                ctx.log(note)
            ctx.resume_from(reused)
            if reused:
                ctx.log(f"resuming: {reused:,} of {total:,} images already {verb}")
        done = reused
        for part_ids, vectors in self._computed(dataset, rows, ids, compute, store, chunk, ctx):
            self.insert(key, part_ids, vectors, store)
            done += len(part_ids)
            if ctx:
                ctx.progress(done, total, f"{verb} {done:,} / {total:,}", force=True)
        return Filled(computed=len(rows), reused=int(reused), total=int(total))

    def _computed(self, dataset: str, rows: np.ndarray, ids: np.ndarray, compute: Compute, store: Store,
                  chunk: int, ctx: JobContext | None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(content ids, vectors) of the missing images, `chunk` at a time (the last one smaller)."""
        from core.scale import ray_address

        address = ray_address(ctx.params if ctx else None) if isinstance(compute, ModelCompute) else None
        if address is None or not len(rows):
            for lo in range(0, len(rows), chunk):
                yield ids[lo:lo + chunk], compute(rows[lo:lo + chunk])
            return
        from core.scale.vectors import on_cluster

        yield from on_cluster(address, dataset, rows, ids, compute, store, chunk, ctx)

    def insert(self, key: str, image_ids: Iterable[str], vectors: np.ndarray, store: Store) -> None:
        """Store `vectors` (float [n, D]) of `image_ids` under `key` in one write transaction (Arrow
        bulk insert; a row already there is replaced)."""
        import pyarrow as pa

        image_ids = pa.array(list(image_ids), pa.string())
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or len(vectors) != len(image_ids):
            raise ValueError(f"expected {len(image_ids)} vectors as a 2-d array, got shape {vectors.shape}")
        vec = pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), vectors.shape[1])
        chunk = pa.table({"image_id": image_ids, "vec": vec})
        with store.write() as con:
            con.register("chunk", chunk)
            con.execute(f"INSERT OR REPLACE INTO {self.table} ({self.key}, image_id, {self.column})"
                        " SELECT ?, image_id, vec::FLOAT[] FROM chunk", [key])

    def delete(self, key: str, store: Store) -> None:
        """Drop every vector stored under `key`."""
        store.execute(f"DELETE FROM {self.table} WHERE {self.key} = ?", [key])

    # -- reading -------------------------------------------------------------------------------
    def load(self, dataset: str, key: str, store: Store, *, label: str | None = None,
             image_ids: list[str] | None = None):
        """(images DataFrame: row, path, image_id, label, split; float32 [N, D]) of the dataset's images
        that have a vector for `key`, by row; duplicate files each get their content id's vector.

        `label` or `image_ids` narrow the images. Two queries under one read lock (no write in between):
        the images, then the vectors in the same order, streamed batch by batch into one preallocated
        array, so the whole Arrow result and its flattened copy are never held at once (1.28M 64-d
        vectors: a peak of 2.0 GB before; docs/scale-out.md, "Memory of the driver")."""
        where = (f" FROM images i JOIN {self.table} v ON v.image_id = i.image_id AND v.{self.key} = ?"
                 " WHERE i.dataset = ?")
        params: list = [key, dataset]
        if label is not None:
            where += " AND i.label = ?"
            params.append(label)
        if image_ids is not None:
            where += " AND list_contains(?, i.image_id)"
            params.append(list(image_ids))
        where += " ORDER BY i.row"  # rows are unique in a dataset: both queries list the images in one order
        with store.read() as con:
            table = con.sql("SELECT i.row, i.path, i.image_id, i.label, i.split" + where,
                            params=params).to_arrow_table().to_pandas()
            if len(table) == 0:
                return table, np.zeros((0, 0), np.float32)
            out, at = None, 0
            for batch in con.sql(f"SELECT v.{self.column}" + where, params=params).to_arrow_reader(LOAD_BATCH):
                n = batch.num_rows
                if not n:
                    continue
                flat = batch.column(0).flatten().to_numpy(zero_copy_only=False)
                if out is None:
                    out = np.empty((len(table), len(flat) // n), np.float32)
                out[at:at + n] = flat.reshape(n, -1)
                at += n
        if at != len(table):
            raise RuntimeError(f"{self.table}: {at} vectors for {len(table)} images of {dataset!r} under {key!r}")
        return table, out

    def with_coverage(self, dataset: str, models_sql: str, params: list, store: Store, *, key_column: str,
                      count_column: str):
        """The DataFrame of `models_sql` (one row per model, its key in `key_column`) with a last column
        `count_column`: how many of the dataset's images each model has a vector for (one snapshot)."""
        with store.read():
            models = store.query_df(models_sql, params)
            models[count_column] = self.coverage(dataset, models[key_column], store)
        return models

    def coverage(self, dataset: str, keys: Iterable[str], store: Store) -> np.ndarray:
        """int64 [len(keys)]: how many of the dataset's images (content ids) have a vector, per key."""
        keys = [str(k) for k in keys]
        counts = dict(store.query(
            f"SELECT {self.key}, count(*) FROM {self.table} WHERE list_contains(?, {self.key})"
            "  AND image_id IN (SELECT image_id FROM images WHERE dataset = ?) GROUP BY 1", [keys, dataset]))
        return np.array([counts.get(k, 0) for k in keys], dtype=np.int64)
