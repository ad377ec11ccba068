"""The images an LTRP model sees, at its own resolution.

An MAE trained here works at the dataset's working size, so it reads the pixel cache. A pretrained
MAE (an official checkpoint: 224 px, 16-px patches) reads the source files again at its size
(`core.data.decode.load_square`: upright, short side resized, centre crop, bicubic), never the
working-size cache upsampled: on photos that would be a 64-px image blown up to 224 px. The files are
decoded in `torch.utils.data.DataLoader` worker processes (`core.data.decode.decode_workers`).

A file that is gone, unreadable or changed since the scan (other bytes than its content id) is read
from the pixel cache instead (resized to the model's size) and counted, so a score never belongs to
other content than its id, and one bad file stops nothing.

On a Ray cluster (`ModelImages.file_source`) the CPU tasks read the files the same way (`SquareReader`:
`load_square`); a file they cannot use comes back with its reason, and the driver reads that image from
its pixel cache (`ModelImages.from_cache`) and scores it itself.
"""
from __future__ import annotations

import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from core import config
from core.data.catalog import get_dataset, load_pixels
from core.data.decode import BadImage, decode_workers, load_square
from core.store.db import Store, get_store

LOADER_BATCH = 16       # images per DataLoader batch
PARALLEL_MIN = 32       # fewer images than this are decoded in this process
IN_MEMORY_BYTES = 1 << 30  # a ranker's training images beyond this go to a memory-mapped scratch file


@dataclass(frozen=True)
class SquareReader:
    """A model's input read from a source file at `size` px as here (`load_square`: upright, short side
    resized, centre crop, bicubic; `BadImage` for a file gone or changed since the scan): what a Ray
    cluster's CPU task calls (`core.scale.data.FileSource`)."""
    size: int
    channels: int

    def file(self, path: Path, image_id: str) -> np.ndarray:
        return load_square(path, self.size, self.channels, image_id)


def reads_sources(ds: dict, size: int) -> bool:
    """Whether a model of input size `size` reads the source files (not the pixel cache) of dataset `ds`."""
    return int(size) != int(ds["image_size"])


@dataclass
class ModelImages:
    """A dataset's images at `size` x `size` px, by pixel-cache row: `images(rows)` -> uint8 `[n, S, S, C]`.

    `fallbacks` counts the images read from the pixel cache because their file could not be used.
    `check`: called between batches of decoded files (a job's `check_cancelled`)."""
    name: str
    size: int
    store: Store = field(default_factory=get_store, repr=False)
    check: Callable[[], None] | None = field(default=None, repr=False)
    fallbacks: int = 0

    def __post_init__(self) -> None:
        ds = get_dataset(self.name, self.store)
        self.channels = int(ds["channels"])
        self.sources = reads_sources(ds, self.size)
        self.pixels = load_pixels(self.name, self.store)
        self.root = Path(ds["root"])

    def _files(self, rows: np.ndarray) -> list[tuple[Path, str]]:
        """(file, content id) of each pixel-cache row, in order."""
        found = {r: (p, i) for r, p, i in self.store.query(
            "SELECT row, path, image_id FROM images WHERE dataset = ? AND list_contains(?, row)",
            [self.name, [int(r) for r in rows]])}
        return [(self.root / found[int(r)][0], found[int(r)][1]) for r in rows]

    def file_source(self):
        """What a Ray cluster's CPU tasks read: each source file through `SquareReader` (`core.scale.data`)."""
        from core.scale.data import FileSource

        return FileSource(str(self.root), SquareReader(self.size, self.channels),
                          (self.size, self.size, self.channels))

    def from_cache(self, image_ids) -> np.ndarray:
        """uint8 `[n, S, S, C]` of the images with these content ids read from the pixel cache (their first
        row) and resized to the model's size: the images whose file a cluster's worker could not use.
        Counted in `fallbacks`."""
        ids = [str(i) for i in image_ids]
        row_of = dict(self.store.query("SELECT image_id, min(row) FROM images WHERE dataset = ?"
                                       " AND list_contains(?, image_id) GROUP BY image_id", [self.name, ids]))
        self.fallbacks += len(ids)
        return np.stack([resize_square(np.asarray(self.pixels[int(row_of[i])]), self.size) for i in ids]) if ids \
            else np.zeros((0, self.size, self.size, self.channels), np.uint8)

    def images(self, rows, out: np.ndarray | None = None) -> np.ndarray:
        """uint8 `[n, S, S, C]` of the images at pixel-cache `rows`, written into `out` if given."""
        rows = np.asarray(rows, dtype=np.int64)
        if not self.sources:
            if out is None:
                return np.asarray(self.pixels[rows])
            out[:] = self.pixels[rows]
            return out
        if out is None:
            out = np.empty((len(rows), self.size, self.size, self.channels), np.uint8)
        for at, (arrays, ok) in _batches(_Files(self._files(rows), self.size, self.channels), len(rows)):
            out[at:at + len(arrays)] = arrays
            for j in np.flatnonzero(~ok):
                out[at + j] = resize_square(np.asarray(self.pixels[rows[at + j]]), self.size)
            self.fallbacks += int((~ok).sum())
            if self.check:
                self.check()
        return out


@contextmanager
def scratch_images(n: int, inputs: ModelImages):
    """Room for `n` images of `inputs` (uint8 `[n, S, S, C]`): None (let `images` allocate) when they are
    few, else an array memory-mapped from a temporary file under the LTRP artifacts, removed afterwards.
    A ranker trained on 20,000 images read at 224 px holds 3 GB of pixels: on disk, not in memory."""
    shape = (n, inputs.size, inputs.size, inputs.channels)
    if not inputs.sources or int(np.prod(shape)) <= IN_MEMORY_BYTES:
        yield None
        return
    with tempfile.TemporaryDirectory(dir=config.artifacts_dir("ltrp"), prefix="inputs-") as tmp:
        array = np.lib.format.open_memmap(Path(tmp) / "images.npy", mode="w+", dtype=np.uint8, shape=shape)
        try:
            yield array
        finally:
            del array


def resize_square(img: np.ndarray, size: int) -> np.ndarray:
    """uint8 `[S, S, C]` -> `[size, size, C]` (bicubic), for an image whose file could not be read."""
    from PIL import Image

    if img.shape[0] == size:
        return img
    resized = Image.fromarray(img[:, :, 0] if img.shape[2] == 1 else img).resize((size, size),
                                                                                  Image.Resampling.BICUBIC)
    arr = np.asarray(resized)
    return arr[:, :, None] if arr.ndim == 2 else arr


class _Files:
    """A map-style dataset of (file, content id) -> (uint8 [S, S, C], True), or (zeros, False) if unusable."""

    def __init__(self, files: list[tuple[Path, str]], size: int, channels: int):
        self.files, self.size, self.channels = files, size, channels

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[np.ndarray, bool]:
        path, image_id = self.files[i]
        try:
            return load_square(path, self.size, self.channels, image_id), True
        except BadImage:
            return np.zeros((self.size, self.size, self.channels), np.uint8), False


def _collate(items: list[tuple[np.ndarray, bool]]) -> tuple[np.ndarray, np.ndarray]:
    return np.stack([a for a, _ in items]), np.array([ok for _, ok in items], bool)


def _batches(files: _Files, n: int):
    """Yield (offset, (arrays, ok)) over `files` in order, decoded by DataLoader workers when there are many."""
    from torch.utils.data import DataLoader

    workers = decode_workers() if n >= PARALLEL_MIN else 0
    workers = min(workers, -(-n // LOADER_BATCH)) if workers > 1 else 0
    loader = DataLoader(files, batch_size=LOADER_BATCH, num_workers=workers, collate_fn=_collate,
                        worker_init_fn=_worker_init if workers else None)
    at = 0
    for arrays, ok in loader:
        yield at, (arrays, ok)
        at += len(arrays)


def _worker_init(_: int) -> None:
    from core.data.decode import ignore_stop_signals

    ignore_stop_signals()  # a cancelled job stops at its next progress report, its workers with it
