"""Exact duplicates and near-identical images with different labels (likely label errors)."""
from __future__ import annotations

from collections import defaultdict
from typing import Hashable, Sequence

import numpy as np

from core.redundancy.trees import BLOCK_BYTES, unit_rows


# -- duplicates ------------------------------------------------------------------------------------
def exact_duplicates(keys: Sequence[Hashable]) -> list[list[int]]:
    """Groups (>= 2) of indices whose keys (content or pixel hashes) are equal, by first index."""
    groups: dict[Hashable, list[int]] = defaultdict(list)
    for i, key in enumerate(keys):
        groups[key].append(i)
    return [g for g in groups.values() if len(g) > 1]


CONFLICT_DTYPE = np.dtype([("i", np.int64), ("j", np.int64), ("distance", np.float32)])


def cross_class_conflicts(
    emb: np.ndarray,
    labels: np.ndarray,
    threshold: float = 0.01,
    *,
    max_pairs: int = 100_000,
) -> np.ndarray:
    """Pairs of images with different labels within cosine distance `threshold` (likely label errors).

    emb [N, D], labels [N]. Blocked matrix products over class pairs, each pair computed once;
    memory: two float32 copies of the embeddings, blocks of BLOCK_BYTES and the pairs found.
    Returns a structured array (i, j, distance) with i < j, sorted by distance: at most
    `max_pairs` rows, the closest.
    """
    labels = np.asarray(labels)
    by_label = np.argsort(labels, kind="stable")
    unit = unit_rows(np.asarray(emb)[by_label])
    ends = np.flatnonzero(np.concatenate([labels[by_label][1:] != labels[by_label][:-1], [True]])) + 1
    found = _Closest(max_pairs, threshold)
    start = 0
    for end in ends[:-1]:  # rows: one class; columns: every class after it
        later = np.ascontiguousarray(unit[end:].T)  # [D, M]: BLAS is several times faster than on a view
        rows = max(1, BLOCK_BYTES // (4 * later.shape[1]))
        for lo in range(start, end, rows):
            sim = unit[lo:min(lo + rows, end)] @ later
            near = sim >= 1.0 - found.threshold
            hit = np.flatnonzero(near.any(axis=1))  # hits are rare: search only the rows that have one
            r, c = np.nonzero(near[hit])
            found.add(by_label[lo + hit[r]], by_label[end + c], 1.0 - sim[hit[r], c])
        start = end
    return found.rows()


class _Closest:
    """Accumulates pairs, keeping at most `limit` closest; tightens its threshold once full."""

    def __init__(self, limit: int, threshold: float):
        self.limit, self.threshold = limit, threshold
        self.chunks: list[np.ndarray] = []
        self.count = 0

    def add(self, i: np.ndarray, j: np.ndarray, distance: np.ndarray) -> None:
        chunk = np.empty(len(i), CONFLICT_DTYPE)
        chunk["i"], chunk["j"], chunk["distance"] = np.minimum(i, j), np.maximum(i, j), np.maximum(distance, 0)
        self.chunks.append(chunk)
        self.count += len(chunk)
        if self.count > 2 * self.limit:
            self.chunks = [self.rows()]
            self.count = len(self.chunks[0])
            self.threshold = float(self.chunks[0]["distance"][-1])

    def rows(self) -> np.ndarray:
        rows = np.concatenate(self.chunks) if self.chunks else np.empty(0, CONFLICT_DTYPE)
        return np.sort(rows, order=["distance", "i", "j"])[:self.limit]
