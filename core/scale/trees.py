"""Merge trees on a Ray cluster: one task per class, and one per part of a big class's approximation.

The driver (the cluster job) keeps a bounded number of classes in flight (`in_flight`), and takes each
class's rows out of the embeddings only when it submits it (`ClassRows`): it never holds a copy of every
class, and the object store holds the rows of the tasks in flight only (at 1.28M images the copies of
every class were 330 MB in the driver and 310 MB more in the object store; docs/scale-out.md, "Memory
of the driver").
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import numpy as np

from core.scale import cluster as ray_cluster

if TYPE_CHECKING:
    from core.jobs import JobContext
    from core.redundancy.trees import ClassTree

# Classes in flight at once: per tree task the cluster runs at once, and at least MIN_IN_FLIGHT, so the
# workers keep busy while the driver commits trees (a second or two under load; ~0.1 s a class of 1,281).
IN_FLIGHT_PER_WORKER = 4
MIN_IN_FLIGHT = 64


class ClassRows(Sequence):
    """Class i's rows of `emb` (float32 [n_i, D]; or of the memory-mapped pixel cache, uint8 [n_i, S, S, C], for
    the near-copy search), copied out only when asked for: the lazy form of `[emb[pos] for pos in positions]`.
    `positions`: one int array per class, into `emb`'s rows."""

    def __init__(self, emb: np.ndarray, positions: Sequence[np.ndarray]):
        self.emb, self.positions = emb, positions

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return ClassRows(self.emb, self.positions[i])
        return self.emb[self.positions[i]]


def class_tree(emb: np.ndarray, linkage: str, pairs: np.ndarray | None = None) -> ClassTree:
    """One class's tree, on a worker: `trees.build_class_tree`, the same call as on the local path
    (`pairs`: its near copies to join first, or None); above `trees.EXACT_LIMIT` members its parts'
    exact trees are tasks of their own."""
    from core.redundancy import trees

    if len(emb) > trees.EXACT_LIMIT:
        return trees.build_class_tree(emb, linkage, map_parts=ray_cluster.map_ordered, pairs=pairs)
    return trees.build_class_tree(emb, linkage, pairs=pairs)


def build_trees(address: str, class_embs: Sequence[np.ndarray], linkage: str, ctx: JobContext | None = None,
                class_pairs: Sequence[np.ndarray | None] | None = None) -> Iterator[tuple[int, ClassTree]]:
    """(index into `class_embs`, tree) as the cluster at `address` finishes them, one task per class.

    `class_embs`: a list of arrays, or a `ClassRows` so that each class is copied out of the embeddings
    only when its task is submitted. At most `in_flight(workers)` classes are in flight. `class_pairs`:
    per class its near-copy pairs to join first (None: none)."""
    joined = ray_cluster.connect(address)
    options = ray_cluster.task_options(joined, cpus=1)
    workers = min(len(class_embs), ray_cluster.capacity(joined, options))
    if ctx:
        ctx.ran_on(joined.ran_on(workers))
        ctx.log(f"on Ray at {address}: {len(class_embs)} class trees as tasks, up to {workers} at once")
    calls = ((class_embs[i], linkage, None if class_pairs is None else class_pairs[i])
             for i in range(len(class_embs)))
    yield from ray_cluster.map_unordered(class_tree, calls, options, ctx=ctx, in_flight=in_flight(workers))


def in_flight(workers: int) -> int:
    """Classes submitted at once to a cluster that runs `workers` tree tasks at a time."""
    return max(MIN_IN_FLIGHT, IN_FLIGHT_PER_WORKER * workers)
