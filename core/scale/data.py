"""Per-image vectors (embeddings, LTRP score maps) computed by Ray Data on a cluster.

The pipeline over the images still missing a vector (one per content id, as `VectorTable.missing`):

    image list (row, content id, path)      blocks of `BLOCK_ROWS`, from the driver
      -> map_batches(load_pixels)           CPU tasks: the pixel cache's rows where the node sees
                                            the file, else decode and resize each source file
      -> map_batches(ModelWorker)           an actor pool: one actor per GPU (num_gpus=1), or on a
                                            CPU-only cluster CPU actors; the model in batches
      -> iter_batches on the driver         (content ids, vectors), in completion order

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


def load_pixels(batch: dict, source: PixelSource) -> dict:
    """CPU stage: {'row', 'image_id', 'path'} -> {'image_id', 'pixels' uint8 [n, S, S, C]}."""
    return {"image_id": batch["image_id"], "pixels": source.read(batch["row"], batch["path"])}


class ModelWorker:
    """GPU (or CPU) stage: a pool actor holding the model; {'image_id', 'pixels'} -> {'image_id', 'vec'}."""

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
        vec = np.asarray(self.apply(self.model, batch["pixels"], self.batch_size), dtype=np.float32)
        return {"image_id": batch["image_id"], "vec": vec}


def pool_size(cluster: Cluster, workers: int | None = None) -> int:
    """Model actors: `workers` (or `REDEX_RAY_WORKERS`) if given; else one per GPU, or on a CPU-only
    cluster one per CPU but one (left to the loading tasks)."""
    workers = workers or int(os.environ.get("REDEX_RAY_WORKERS") or 0)
    if workers:
        return workers
    if cluster.gpus >= 1:
        return int(cluster.gpus)
    return max(1, int(cluster.cpus) - 1)


def stream_vectors(cluster: Cluster, rows: np.ndarray, ids: np.ndarray, paths: np.ndarray, source: PixelSource,
                   model: Any, apply: Callable, batch_size: int, *, workers: int,
                   ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield (content ids [n], float32 vectors [n, D]) for the given images, as the cluster finishes them.

    `apply(model, pixels uint8 [n, S, S, C], batch_size) -> float [n, D]` must be a module-level function."""
    import pyarrow as pa
    import ray
    import ray.data

    table = pa.table({"row": pa.array(rows, pa.int64()), "image_id": pa.array(list(ids), pa.string()),
                      "path": pa.array([str(p) for p in paths], pa.string())})
    blocks = [table.slice(lo, BLOCK_ROWS) for lo in range(0, len(table), BLOCK_ROWS)]
    gpu = cluster.gpus >= 1
    ds = (ray.data.from_arrow(blocks)
          .map_batches(load_pixels, fn_kwargs={"source": source}, batch_size=None, batch_format="numpy",
                       num_cpus=1)
          .map_batches(ModelWorker, fn_constructor_kwargs={"model": model, "apply": apply,
                                                           "batch_size": batch_size},
                       compute=ray.data.ActorPoolStrategy(size=workers), batch_size=BLOCK_ROWS,
                       batch_format="numpy", num_gpus=1 if gpu else 0, num_cpus=1))
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        yield batch["image_id"], batch["vec"]
