"""Merge trees of semantic redundancy (Birodkar et al. 2019): one agglomerative tree per class.

Pure computation on numpy arrays; the store and the pages call into it.

`build_class_tree` clusters one class's embeddings once, with cosine dissimilarity (1 - cos) and
complete linkage by default (average and single as options). The result is a full merge tree over
all n members (a scipy linkage matrix with monotone distances), so every number of groups k in 1..n
and every distance threshold is a cut of it (`core.redundancy.cuts`, `core.redundancy.index`).

Exact trees need the n(n-1)/2 pairwise distances of a class. scipy's linkage copies them, so the
peak is about 8 n^2 bytes (n = 20,000: 3.2 GB). Above `exact_limit` members a class is clustered
approximately with bounded memory: seeded k-means on the unit vectors splits it into parts of at
most `part_size` members, each part gets its exact tree, and the part roots are then agglomerated
by the same linkage on distances estimated from up to `PART_SAMPLE` sampled members per part. A
part-level merge gets height max(estimate, heights of the two subtrees), so the tree stays
monotone. Peak memory of that path: about 8 part_size^2 bytes (5,000: 0.2 GB) plus a few copies of
the [n, D] embeddings.

Near copies (ours, not the paper's): `pairs` of members found by another signal
(`core.redundancy.copies`) can be joined first: every pair inside a connected component of the pairs
gets distance 0, so under any linkage the component merges at height 0 before the tree's own merges
and shares a group at every cut that keeps at most n - (members joined away) groups. On the
approximate path a component is moved whole into the part of its smallest member first.

Cuts are O(n) and vectorised: at build time the leaves are put in dendrogram order, in which every
group of every cut is a contiguous run, and each of the n-1 gaps between neighbours in that order is
tagged with the merge that joins them. A cut is then "which gaps stay open", a comparison and a
cumulative sum; representatives are a sparse group-sum and segment reductions over the same runs.
"""
from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np
from scipy.cluster.hierarchy import leaves_list
from scipy.cluster.hierarchy import linkage as scipy_linkage

LINKAGES = ("complete", "average", "single")
EXACT_LIMIT = 20_000   # largest class clustered exactly (peak ~8 n^2 bytes: 3.2 GB)
PART_SIZE = 5_000      # largest part of the approximate path (peak ~0.2 GB per part)
PART_SAMPLE = 128      # members per part sampled to estimate distances between parts
BLOCK_BYTES = 64 << 20  # working block of the blocked distance computations
Progress = Callable[[int, int], None]


# -- the tree ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ClassTree:
    """A full merge tree over the n members of one class, ready for O(n) cuts.

    linkage: float64 [n-1, 4], scipy format (child, child, cosine distance, size), rows sorted by
        distance, ids < n are members (rows of the class's embedding matrix).
    order: int64 [n], members in dendrogram order; every group of every cut is a contiguous run.
    gap_merge: int64 [n-1], row of `linkage` whose merge joins order[p] and order[p+1].
    meta: how it was built (method, exact, n, exact_limit, part_size, seed, n_parts); JSON-able.
    """

    linkage: np.ndarray = field(repr=False)
    order: np.ndarray = field(repr=False)
    gap_merge: np.ndarray = field(repr=False)
    meta: dict[str, Any]

    @property
    def n(self) -> int:
        return len(self.order)

    @property
    def exact(self) -> bool:
        return bool(self.meta["exact"])

    @classmethod
    def from_linkage(cls, linkage: np.ndarray, meta: dict[str, Any]) -> ClassTree:
        """Wrap a monotone, distance-sorted linkage matrix float64 [n-1, 4] (n = meta['n'])."""
        linkage = np.asarray(linkage, np.float64).reshape(-1, 4)
        order, gap_merge = _dendrogram_gaps(linkage, int(meta["n"]))
        return cls(linkage, order, gap_merge, dict(meta))

    def to_arrays(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Plain data for a database: {'linkage': float64 [n-1, 4]} and the JSON-able `meta`."""
        return {"linkage": self.linkage}, dict(self.meta)

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> ClassTree:
        """Inverse of `to_arrays` (the dendrogram order is recomputed, O(n log n))."""
        return cls.from_linkage(arrays["linkage"], dict(meta))


def _dendrogram_gaps(linkage: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Leaf order int64 [n] and, per gap between neighbours in it, the joining merge int64 [n-1].

    `leaves_list` visits the first child before the second, so merge i closes the gap just before
    the leftmost leaf of its second child; leftmost leaves come from pointer jumping on first children.
    """
    if n == 1:
        return np.zeros(1, np.int64), np.zeros(0, np.int64)
    order = leaves_list(linkage).astype(np.int64)
    position = np.empty(n, np.int64)
    position[order] = np.arange(n)
    children = linkage[:, :2].astype(np.int64)
    leftmost = np.concatenate([np.arange(n), children[:, 0]])
    for _ in range(max(1, math.ceil(math.log2(n))) + 1):
        leftmost = leftmost[leftmost]
    gap_merge = np.empty(n - 1, np.int64)
    gap_merge[position[leftmost[children[:, 1]]] - 1] = np.arange(n - 1)
    return order, gap_merge


# -- building ------------------------------------------------------------------------------------
def build_class_tree(
    emb: np.ndarray,
    linkage: str = "complete",
    *,
    exact_limit: int = EXACT_LIMIT,
    part_size: int = PART_SIZE,
    seed: int = 0,
    progress: Progress | None = None,
    map_parts: Callable = map,
    pairs: np.ndarray | None = None,
) -> ClassTree:
    """Agglomerative tree of one class's embeddings `emb` [n, D] under cosine dissimilarity.

    Exact for n <= exact_limit; above it, the bounded-memory approximation of the module docstring
    (parts of at most min(part_size, exact_limit) members). `progress(done, total)` counts finished
    parts (one for an exact tree). `map_parts(fn, parts)` computes the parts' exact trees, in order
    (default: one after the other here; `core.scale` passes one that runs them as Ray tasks).
    `pairs` int [m, 2]: members to join before any merge (distance 0 within their connected components).
    """
    if linkage not in LINKAGES:
        raise ValueError(f"linkage must be one of {LINKAGES}, got {linkage!r}")
    emb = np.asarray(emb)
    if emb.ndim != 2 or len(emb) == 0:
        raise ValueError(f"expected embeddings [n >= 1, D], got shape {emb.shape}")
    if not np.isfinite(emb).all():
        raise ValueError("embeddings contain NaN or infinity")
    if min(exact_limit, part_size) < 2:
        raise ValueError("exact_limit and part_size must be >= 2")
    n = len(emb)
    unit = unit_rows(emb)
    comp = _components(n, pairs)
    meta = {"method": linkage, "n": n, "exact_limit": exact_limit, "part_size": part_size,
            "seed": seed, "exact": n <= exact_limit, "n_parts": 1}
    if comp is not None:
        meta["joined"] = int(n - len(np.unique(comp)))  # merges at height 0 that the pairs force
    if n <= exact_limit:
        z = exact_linkage(unit, linkage, comp)
        if progress is not None:
            progress(1, 1)
    else:
        parts = partition(unit, min(part_size, exact_limit), seed)
        if comp is not None:
            parts = _keep_components_whole(parts, comp)
        meta["n_parts"] = len(parts)
        z = _approximate_linkage(unit, parts, linkage, seed, progress, map_parts, comp)
    return ClassTree.from_linkage(z, meta)


def unit_rows(emb: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length, float32 [n, D]; all-zero rows stay zero (cosine distance 1 to all)."""
    emb = np.asarray(emb, np.float32)
    return emb / np.maximum(row_norms(emb), np.finfo(np.float32).tiny)[:, None]


def row_norms(emb: np.ndarray) -> np.ndarray:
    """Euclidean norm of each row of emb [n, D] -> [n]."""
    return np.sqrt(np.einsum("ij,ij->i", emb, emb))


def exact_linkage(unit: np.ndarray, method: str, comp: np.ndarray | None = None) -> np.ndarray:
    """scipy linkage matrix float64 [n-1, 4] of unit rows [n, D] under cosine distance; members with the
    same `comp` id (int [n], see `_components`) at distance 0."""
    if len(unit) == 1:
        return np.zeros((0, 4))
    dist = condensed_cosine(unit)
    if comp is not None:
        _join(dist, comp)
    return scipy_linkage(dist, method=method)


def _components(n: int, pairs: np.ndarray | None) -> np.ndarray | None:
    """Component id int64 [n] of the members joined by `pairs` [m, 2] (None without pairs)."""
    if pairs is None or len(pairs) == 0:
        return None
    from core.redundancy.copies import components

    pairs = np.asarray(pairs, np.int64).reshape(-1, 2)
    if pairs.min() < 0 or pairs.max() >= n:
        raise ValueError(f"pairs must be member positions in 0..{n - 1}")
    return components(n, pairs)


def _join(dist: np.ndarray, comp: np.ndarray) -> None:
    """Set to 0, in condensed distances `dist` of n members, every pair with the same `comp` id."""
    n = len(comp)
    order = np.argsort(comp, kind="stable")
    bounds = np.flatnonzero(np.diff(comp[order])) + 1
    for members in np.split(order, bounds):
        if len(members) < 2:
            continue
        i, j = np.triu_indices(len(members), 1)
        a, b = members[i], members[j]  # ascending: a stable sort by component keeps the members in order
        dist[n * a - a * (a + 1) // 2 + (b - a - 1)] = 0.0


def _keep_components_whole(parts: list[np.ndarray], comp: np.ndarray) -> list[np.ndarray]:
    """`parts` with each joined component moved into the part of its smallest member (its id)."""
    part_of = np.empty(len(comp), np.int64)
    for p, idx in enumerate(parts):
        part_of[idx] = p
    target = part_of[comp]
    moved = [np.flatnonzero(target == p) for p in range(len(parts))]
    return sorted((m for m in moved if len(m)), key=lambda m: int(m[0]))


def condensed_cosine(unit: np.ndarray) -> np.ndarray:
    """Condensed cosine distances float64 [n(n-1)/2] of unit rows [n, D], by blocks of rows (BLAS)."""
    x = np.asarray(unit, np.float64)
    xt = np.ascontiguousarray(x.T)  # [D, n]: BLAS is several times faster than on a transposed view
    n = len(x)
    out = np.empty(n * (n - 1) // 2)
    rows = max(1, BLOCK_BYTES // (8 * n))
    start = 0
    for lo in range(0, n - 1, rows):
        hi = min(lo + rows, n - 1)
        block = x[lo:hi] @ xt[:, lo:]  # [hi-lo, n-lo]
        np.subtract(1.0, block, out=block)
        for r in range(hi - lo):
            row = block[r, r + 1:]
            out[start:start + len(row)] = row
            start += len(row)
    return np.clip(out, 0.0, 2.0, out=out)


def partition(unit: np.ndarray, part_size: int, seed: int) -> list[np.ndarray]:
    """Split rows of `unit` [n, D] into index arrays of at most `part_size`, by seeded k-means.

    Each split aims at parts of half the limit; a part still too large is split again (evenly by
    index if k-means cannot separate it, e.g. identical points). Sorted by first member.
    """
    from sklearn.cluster import KMeans
    from sklearn.exceptions import ConvergenceWarning

    todo, parts = [np.arange(len(unit))], []
    while todo:
        idx = todo.pop()
        if len(idx) <= part_size:
            parts.append(idx)
            continue
        k = math.ceil(2 * len(idx) / part_size)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            lab = KMeans(k, n_init=1, max_iter=100, random_state=seed).fit_predict(unit[idx])
        pieces = np.split(idx[np.argsort(lab, kind="stable")], np.cumsum(np.bincount(lab, minlength=k))[:-1])
        pieces = [p for p in pieces if len(p)]
        todo.extend(pieces if len(pieces) > 1 else np.array_split(idx, k))
    return sorted(parts, key=lambda p: int(p[0]))


def _approximate_linkage(unit: np.ndarray, parts: list[np.ndarray], method: str, seed: int,
                         progress: Progress | None, map_parts: Callable = map,
                         comp: np.ndarray | None = None) -> np.ndarray:
    """Linkage float64 [n-1, 4] over all rows: exact trees inside `parts`, then the parts agglomerated."""
    n = len(unit)
    children, heights, sizes, roots, root_heights = _part_trees(unit, parts, method, progress, map_parts, comp)
    dist = _part_distances(unit, parts, method, np.random.default_rng(seed))
    top = _agglomerate(dist, np.array([len(p) for p in parts], np.float64), method)
    node_ids = np.concatenate([roots, n + len(heights) + np.arange(len(top))])
    node_heights = np.concatenate([root_heights, np.zeros(len(top))])
    for t, (a, b, d, _) in enumerate(top):  # never below a subtree: the tree stays monotone
        node_heights[len(parts) + t] = max(d, node_heights[a], node_heights[b])
    top_children = node_ids[np.array([(a, b) for a, b, _, _ in top], np.int64).reshape(-1, 2)]
    return _assemble(n, np.concatenate([children, top_children]),
                     np.concatenate([heights, node_heights[len(parts):]]),
                     np.concatenate([sizes, [size for *_, size in top]]))


def _part_linkage(item: tuple[np.ndarray, np.ndarray | None], method: str) -> np.ndarray:
    """`exact_linkage` of one part: item = (its unit rows, its members' component ids or None)."""
    return exact_linkage(item[0], method, item[1])


def _part_trees(unit: np.ndarray, parts: list[np.ndarray], method: str, progress: Progress | None,
                map_parts: Callable = map, comp: np.ndarray | None = None):
    """Exact trees of the parts as merges over global ids (ids >= n: n + position in the list).

    Returns children int64 [m, 2], heights [m], sizes [m] (m = n - P), and per part its root id
    int64 [P] and root height [P] (0 for a single member).
    """
    n = len(unit)
    children, heights, sizes = [], [], []
    roots, root_heights = np.empty(len(parts), np.int64), np.zeros(len(parts))
    done = 0
    if comp is None:
        part_linkages = map_parts(functools.partial(exact_linkage, method=method), (unit[idx] for idx in parts))
    else:
        part_linkages = map_parts(functools.partial(_part_linkage, method=method),
                                  ((unit[idx], comp[idx]) for idx in parts))
    for p, (idx, z) in enumerate(zip(parts, part_linkages)):
        ids = np.concatenate([idx, n + done + np.arange(len(z))])  # part-local id -> global id
        children.append(ids[z[:, :2].astype(np.int64)])
        heights.append(z[:, 2])
        sizes.append(z[:, 3])
        roots[p], root_heights[p] = ids[-1], (z[-1, 2] if len(z) else 0.0)
        done += len(z)
        if progress is not None:
            progress(p + 1, len(parts))
    return np.concatenate(children), np.concatenate(heights), np.concatenate(sizes), roots, root_heights


def _part_distances(unit: np.ndarray, parts: list[np.ndarray], method: str,
                    rng: np.random.Generator) -> np.ndarray:
    """Estimated linkage distance float64 [P, P] between parts, from up to PART_SAMPLE members each.

    complete: largest sampled pair distance; single: smallest; average: mean over sampled pairs.
    """
    picks = [rng.choice(p, min(PART_SAMPLE, len(p)), replace=False) for p in parts]
    counts = np.array([len(p) for p in picks])
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    sample = unit[np.concatenate(picks)]
    reduce = {"complete": np.maximum, "single": np.minimum, "average": np.add}[method]
    dist = np.empty((len(parts), len(parts)))
    for p, (lo, m) in enumerate(zip(starts, counts)):
        block = 1.0 - sample[lo:lo + m] @ sample.T  # [m, total sampled]
        dist[p] = reduce.reduceat(reduce.reduce(block, axis=0), starts)
    if method == "average":
        dist /= np.outer(counts, counts)
    return np.clip(dist, 0.0, 2.0)


def _agglomerate(dist: np.ndarray, sizes: np.ndarray, method: str) -> list[tuple[int, int, float, float]]:
    """Lance-Williams agglomeration of P items with distances [P, P] and sizes [P].

    Returns P-1 merges (a, b, distance, size); ids < P are items, P + t is the t-th merge. O(P^3).
    """
    d = dist.astype(np.float64, copy=True)
    np.fill_diagonal(d, np.inf)
    count = len(d)
    slot_id = np.arange(count)
    sizes = sizes.astype(np.float64, copy=True)
    merges = []
    for t in range(count - 1):
        a, b = np.unravel_index(np.argmin(d), d.shape)
        if method == "complete":
            row = np.maximum(d[a], d[b])
        elif method == "single":
            row = np.minimum(d[a], d[b])
        else:
            row = (sizes[a] * d[a] + sizes[b] * d[b]) / (sizes[a] + sizes[b])
        merges.append((int(slot_id[a]), int(slot_id[b]), float(d[a, b]), float(sizes[a] + sizes[b])))
        d[a], d[:, a] = row, row
        d[a, a] = np.inf
        d[b], d[:, b] = np.inf, np.inf
        sizes[a] += sizes[b]
        slot_id[a] = count + t
    return merges


def _assemble(n: int, children: np.ndarray, heights: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """scipy linkage float64 [n-1, 4] from merges listed children-first (ids >= n: n + list position).

    Rows are sorted by height (stable, so a parent tied with a child stays after it) and renumbered.
    """
    rank = np.argsort(heights, kind="stable")
    new_row = np.empty_like(rank)
    new_row[rank] = np.arange(len(rank))
    kids = children[rank].copy()
    internal = kids >= n
    kids[internal] = n + new_row[kids[internal] - n]
    kids.sort(axis=1)
    return np.column_stack([kids, heights[rank], sizes[rank]]).astype(np.float64)
