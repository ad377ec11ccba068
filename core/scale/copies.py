"""The near-copy search on a Ray cluster: one task per class (`core.redundancy.copies.class_pairs`).

As for the merge trees (`core.scale.trees`), the driver (the cluster job) keeps a bounded number of
classes in flight and copies a class's pixels out of the pixel cache only when it submits that class
(`ClassRows` over the memory-mapped cache); the workers return each class's pairs and the driver stores
them, the store's only writer. A class's pixels are larger than its embeddings (Fashion-MNIST: 4.7 MB a
class of 6,000; a 64-px RGB class of 10,000: 123 MB) and a search lasts seconds to minutes, so fewer
classes are in flight than for the trees: `IN_FLIGHT_PER_WORKER` per task the cluster runs at once.
"""
from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import numpy as np

from core.scale import cluster as ray_cluster

if TYPE_CHECKING:
    from core.jobs import JobContext
    from core.redundancy.copies import CopySettings

IN_FLIGHT_PER_WORKER = 2  # one running, one waiting in the object store, per search task at once


def class_search(pixels: np.ndarray, settings: CopySettings) -> tuple[np.ndarray, np.ndarray, float]:
    """One class's near copies on a worker, the same call as on the local path: (positions int64 [m, 2] i < j into
    `pixels` [n, S, S(, C)], distances float32 [m], seconds the search took). torch uses the CPUs Ray gave
    the task."""
    import torch

    from core.redundancy import copies

    torch.set_num_threads(ray_cluster.torch_threads())
    start = time.perf_counter()
    pairs, dist = copies.class_pairs(pixels, settings)
    return pairs, dist, time.perf_counter() - start


def search_classes(address: str, class_pixels: Sequence[np.ndarray], settings: CopySettings,
                   ctx: JobContext | None = None) -> Iterator[tuple[int, tuple[np.ndarray, np.ndarray, float]]]:
    """(index into `class_pixels`, `class_search`'s result) as the cluster at `address` finishes them, one
    task (1 CPU) per class. `class_pixels`: a list of arrays, or a `ClassRows` over the pixel cache so that
    each class is copied out only when its task is submitted. Records where the job runs (`ctx.ran_on`):
    call it only with classes to search."""
    joined = ray_cluster.connect(address)
    options = ray_cluster.task_options(joined, cpus=1)
    workers = min(len(class_pixels), ray_cluster.capacity(joined, options))
    if ctx:
        ctx.ran_on(joined.ran_on(workers))
        ctx.log(f"on Ray at {address}: the near-copy search of {len(class_pixels)} classes as tasks,"
                f" up to {workers} at once")
    calls = ((class_pixels[i], settings) for i in range(len(class_pixels)))
    yield from ray_cluster.map_unordered(class_search, calls, options, ctx=ctx,
                                         in_flight=max(2, IN_FLIGHT_PER_WORKER * workers))
