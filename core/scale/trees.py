"""Merge trees on a Ray cluster: one task per class, and one per part of a big class's approximation."""
from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np

from core.scale import cluster as ray_cluster

if TYPE_CHECKING:
    from core.jobs import JobContext
    from core.redundancy.trees import ClassTree


def class_tree(emb: np.ndarray, linkage: str) -> ClassTree:
    """One class's tree, on a worker: `trees.build_class_tree`, the same call as on the local path;
    above `trees.EXACT_LIMIT` members its parts' exact trees are tasks of their own."""
    from core.redundancy import trees

    if len(emb) > trees.EXACT_LIMIT:
        return trees.build_class_tree(emb, linkage, map_parts=ray_cluster.map_ordered)
    return trees.build_class_tree(emb, linkage)


def build_trees(address: str, class_embs: list[np.ndarray], linkage: str, ctx: JobContext | None = None,
                ) -> Iterator[tuple[int, ClassTree]]:
    """(index into `class_embs`, tree) as the cluster at `address` finishes them, one task per class."""
    joined = ray_cluster.connect(address)
    options = ray_cluster.task_options(joined, cpus=1)
    if ctx:
        workers = min(len(class_embs), ray_cluster.capacity(joined, options))
        ctx.ran_on(joined.ran_on(workers))
        ctx.log(f"on Ray at {address}: {len(class_embs)} class trees as tasks, up to {workers} at once")
    yield from ray_cluster.map_unordered(class_tree, [(emb, linkage) for emb in class_embs], options, ctx=ctx)
