"""Per-image vectors (embeddings, LTRP score maps) computed by Ray Data on a cluster.

The pipeline over the images still missing a vector (one per content id, as `VectorTable.missing`):

    image list (row, content id, path)      blocks of `BLOCK_ROWS` (`FILE_BLOCK_ROWS` from source
                                            files at a model's own size), from the driver
      -> map_batches(load_inputs)           CPU tasks, `source.load`: a `PixelSource` gives the pixel
                                            cache's rows where the node sees the file, else decodes and
                                            resizes each source file as the scan does; a `FileSource`
                                            reads each source file at the model's own resolution as the
                                            local reader does (a pretrained backbone, a 224-px MAE),
                                            an unreadable one as zeros with its reason in 'error'
      -> map_batches(ModelWorker)           an actor pool: one actor per GPU (num_gpus=1), or on a
                                            CPU-only cluster CPU actors; the model in batches
      -> iter_batches on the driver         (content ids, vectors, reasons), in completion order

The driver (the job process) stores what comes back chunk by chunk; it stays the store's only writer.
A worker that dies is replaced by Ray and its batch run again (Ray Data restarts pool actors and
retries their tasks); a driver that dies loses at most the chunk it had not committed.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from core.scale.cluster import Cluster

if TYPE_CHECKING:
    from core.store.db import Store

BLOCK_ROWS = 1024  # images per block of the image list (a unit of CPU work and of retry)
FILE_BLOCK_ROWS = 64  # ... when each file of a block is decoded at a model's own size (0.02-0.3 s a photo)


@dataclass(frozen=True)
class PixelSource:
    """Where a worker gets an image's working-format pixels: the pixel cache file (uint8 [N, S, S, C])
    if its node sees it with that shape, else the source file `root / path`, decoded and resized as the
    scan does (`core.data.decode.decode`), so both give the same pixels."""
    cache: str | None
    rows: int
    root: str
    size: int
    channels: int
    use_cache: bool = True

    def cached(self) -> np.ndarray | None:
        if not (self.use_cache and self.cache and os.path.exists(self.cache)):
            return None
        try:
            pixels = np.load(self.cache, mmap_mode="r")
        except (OSError, ValueError):
            return None
        return pixels if pixels.shape == (self.rows, self.size, self.size, self.channels) else None


    def read(self, rows: np.ndarray, paths: np.ndarray) -> np.ndarray:
        """uint8 [n, S, S, C] of the images at pixel-cache `rows` (source files `paths`, relative to root)."""
        cache = self.cached()
        if cache is not None:
            return np.asarray(cache[np.asarray(rows, np.int64)])
        from core.data.decode import decode, read_file

        root = Path(self.root)
        if not len(paths):
            return np.zeros((0, self.size, self.size, self.channels), np.uint8)
        return np.stack([decode(read_file(root / str(p)), self.size, self.channels).pixels for p in paths])

    def load(self, batch: dict) -> dict:
        """CPU stage: {'row', 'image_id', 'path'} -> {'image_id', 'pixels' uint8 [n, S, S, C]}."""
        return {"image_id": batch["image_id"], "pixels": self.read(batch["row"], batch["path"])}


@dataclass(frozen=True)
class FileSource:
    """Where a worker gets a model's input at the model's own resolution (a pretrained backbone's, a
    224-px MAE's): `reader.file(root / path, content id)` for each source file, the function the local
    reader calls, or, with `pixels` (a dataset with no file of its own per image: Fashion-MNIST),
    `reader.array(pixel-cache row)`. Either returns an array of `shape` and `dtype` (uint8 [H, W, C]: the
    pixels before the model's tensor step) or raises `BadImage` with the reason; that image comes back as
    zeros with its reason in 'error', and the driver decides what to do (`ModelCompute.returned`)."""
    root: str
    reader: Any
    shape: tuple[int, ...]
    dtype: str = "uint8"
    pixels: PixelSource | None = None

    def load(self, batch: dict) -> dict:
        """{'row', 'image_id', 'path'} -> {'image_id', 'pixels' [n, *shape], 'error' str [n] ('' if read)}."""
        from core.data.decode import BadImage

        n = len(batch["image_id"])
        out = np.zeros((n, *self.shape), self.dtype)
        errors = [""] * n
        arrays = self.pixels.read(batch["row"], batch["path"]) if self.pixels is not None else None
        for j, (path, image_id) in enumerate(zip(batch["path"], batch["image_id"])):
            try:
                out[j] = (self.reader.array(arrays[j]) if arrays is not None
                          else self.reader.file(Path(self.root) / str(path), str(image_id)))
            except BadImage as exc:
                errors[j] = str(exc) or "cannot be read"
        return {"image_id": batch["image_id"], "pixels": out, "error": np.array(errors, dtype=str)}


def pixel_source(dataset: str, store: Store) -> PixelSource:
    """Where workers read the dataset's pixels: its pixel cache, else its source files
    (`REDEX_RAY_PIXELS=files` forces the files, e.g. when the cache folder is not shared)."""
    from core.data.catalog import get_dataset

    ds = get_dataset(dataset, store)
    rows = store.query("SELECT count(*) FROM images WHERE dataset = ?", [dataset])[0][0]
    return PixelSource(ds["pixels"], int(rows), str(ds["root"] or ""), int(ds["image_size"]), int(ds["channels"]),
                       use_cache=os.environ.get("REDEX_RAY_PIXELS", "cache") != "files")


def paths_by_row(dataset: str, store: Store) -> np.ndarray:
    """object [N]: each pixel-cache row's source path (relative to the dataset's root)."""
    with store.read() as con:
        listed = con.execute("SELECT row, path FROM images WHERE dataset = ?", [dataset]).fetchnumpy()
    by_row = np.empty(int(listed["row"].max()) + 1 if len(listed["row"]) else 0, dtype=object)
    by_row[listed["row"]] = listed["path"]
    return by_row


def load_inputs(batch: dict, source: PixelSource | FileSource) -> dict:
    """CPU stage: {'row', 'image_id', 'path'} -> {'image_id', 'pixels', ['error']} (`source.load`)."""
    return source.load(batch)


class ModelWorker:
    """GPU (or CPU) stage: a pool actor holding the model; {'image_id', 'pixels', ['error']} ->
    {'image_id', 'vec', ['error']}. An image with an error is not run: its vector is NaN."""

    def __init__(self, model: Any, apply: Callable, batch_size: int):
        import torch

        from core.scale.cluster import torch_threads

        torch.set_num_threads(torch_threads())
        if torch.cuda.is_available():  # Ray shows an actor only the GPU it was given
            model = model.to("cuda")
        self.model, self.apply, self.batch_size = model, apply, batch_size
        pid_file = os.environ.get("REDEX_RAY_PID_FILE")  # tests: where a test finds a worker to kill
        if pid_file:
            with open(pid_file, "a") as f:
                f.write(f"{os.getpid()}\n")

    def __call__(self, batch: dict) -> dict:
        if "error" not in batch:
            vec = np.asarray(self.apply(self.model, batch["pixels"], self.batch_size), dtype=np.float32)
            return {"image_id": batch["image_id"], "vec": vec}
        ok = batch["error"] == ""
        pixels = batch["pixels"]
        got = np.asarray(self.apply(self.model, pixels[ok] if ok.any() else pixels[:1], self.batch_size),
                         dtype=np.float32)  # none read: one image of zeros, for the vectors' length
        vec = np.full((len(ok), got.shape[1]), np.nan, np.float32)
        if ok.any():
            vec[ok] = got
        return {"image_id": batch["image_id"], "vec": vec, "error": batch["error"]}


def pool_size(cluster: Cluster, workers: int | None = None) -> int:
    """Model actors: `workers` (or `REDEX_RAY_WORKERS`) if given; else one per GPU, or on a CPU-only
    cluster one per CPU but one (left to the loading tasks)."""
    workers = workers or int(os.environ.get("REDEX_RAY_WORKERS") or 0)
    if workers:
        return workers
    if cluster.gpus >= 1:
        return int(cluster.gpus)
    return max(1, int(cluster.cpus) - 1)


def stream_vectors(cluster: Cluster, rows: np.ndarray, ids: np.ndarray, paths: np.ndarray,
                   source: PixelSource | FileSource, model: Any, apply: Callable, batch_size: int, *, workers: int,
                   ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray | None]]:
    """Yield (content ids [n], float32 vectors [n, D], reasons str [n] or None) for the given images, as the
    cluster finishes them: with a `FileSource`, each image's reason ('' if read; the vector of an image not
    read is NaN); with a `PixelSource`, None.

    `apply(model, pixels [n, ...], batch_size) -> float [n, D]` must be a module-level function."""
    import pyarrow as pa
    import ray
    import ray.data

    table = pa.table({"row": pa.array(rows, pa.int64()), "image_id": pa.array(list(ids), pa.string()),
                      "path": pa.array([str(p) for p in paths], pa.string())})
    block = BLOCK_ROWS if isinstance(source, PixelSource) else min(BLOCK_ROWS, FILE_BLOCK_ROWS)
    blocks = [table.slice(lo, block) for lo in range(0, len(table), block)]
    gpu = cluster.gpus >= 1
    ds = (ray.data.from_arrow(blocks)
          .map_batches(load_inputs, fn_kwargs={"source": source}, batch_size=None, batch_format="numpy",
                       num_cpus=1)
          .map_batches(ModelWorker, fn_constructor_kwargs={"model": model, "apply": apply,
                                                           "batch_size": batch_size},
                       compute=ray.data.ActorPoolStrategy(size=workers), batch_size=block,
                       batch_format="numpy", num_gpus=1 if gpu else 0, num_cpus=1))
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        yield batch["image_id"], batch["vec"], batch.get("error")
