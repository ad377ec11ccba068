"""`VectorTable`'s compute step on a Ray cluster: the missing images out, their vectors back in chunks."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np

from core.scale import cluster as ray_cluster
from core.scale.data import paths_by_row, pixel_source, pool_size, stream_vectors

if TYPE_CHECKING:
    from core.jobs import JobContext
    from core.store.db import Store
    from core.store.vectors import ModelCompute


def on_cluster(address: str, dataset: str, rows: np.ndarray, ids: np.ndarray, compute: ModelCompute,
               store: Store, chunk: int, ctx: JobContext | None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(content ids, vectors) of the given images computed on the cluster at `address` (each part through
    `compute.returned` first, if given), regrouped into chunks of `chunk` images (the unit the caller
    commits; the last one smaller). The workers read `compute.source`, else the dataset's pixels."""
    paths = paths_by_row(dataset, store)[rows]
    joined = ray_cluster.connect(address)
    workers = pool_size(joined)
    if ctx:
        ctx.ran_on(joined.ran_on(workers))
        ctx.log(f"on Ray at {address}: {workers} model workers, {joined.nodes} nodes,"
                f" {joined.cpus:g} CPUs, {joined.gpus:g} GPUs")
    held_ids, held_vecs, held = [], [], 0
    source = compute.source if compute.source is not None else pixel_source(dataset, store)
    stream = stream_vectors(joined, rows, ids, paths, source, compute.model, compute.apply,
                            compute.batch_size, workers=workers)
    while True:
        with ctx.interruptible() if ctx else contextlib.nullcontext():  # a cancel ends the wait at once
            part = next(stream, None)
        if part is None:
            break
        part_ids, vectors, reasons = part
        if compute.returned is not None:
            vectors = compute.returned(part_ids, vectors, reasons if reasons is not None
                                       else np.full(len(part_ids), "", dtype=str))
        held_ids.append(part_ids)
        held_vecs.append(vectors)
        held += len(part_ids)
        while held >= chunk:
            all_ids, all_vecs = np.concatenate(held_ids), np.concatenate(held_vecs)
            yield all_ids[:chunk], all_vecs[:chunk]
            held_ids, held_vecs, held = [all_ids[chunk:]], [all_vecs[chunk:]], held - chunk
    if held:
        yield np.concatenate(held_ids), np.concatenate(held_vecs)

