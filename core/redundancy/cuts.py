"""Cuts of the merge trees: groups at a fraction or a threshold, one representative each (O(n))."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Hashable, Mapping, Sequence

import numpy as np
from scipy import sparse

from core.redundancy.trees import ClassTree, row_norms

REPRESENTATIVES = ("nearest_mean", "random", "farthest_mean")
SCORE_BYTES = 96 << 10  # chunk of the representative scoring: below glibc's 128 KB mmap threshold


# -- cuts ------------------------------------------------------------------------------------------
def groups_for_fraction(n: int, fraction: float) -> int:
    """k_c = max(1, round(f * n_c)) (Python's round: halves go to the even number)."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    return max(1, round(fraction * n))


def _open_gaps_for_k(tree: ClassTree, k: int) -> np.ndarray:
    """bool [n-1]: gaps (in dendrogram order) whose merge is undone when the last k-1 merges are."""
    if not 1 <= k <= tree.n:
        raise ValueError(f"k must be in 1..{tree.n}, got {k}")
    return tree.gap_merge >= tree.n - k


def _open_gaps_for_threshold(tree: ClassTree, threshold: float) -> np.ndarray:
    """bool [n-1]: gaps whose merge distance is above `threshold`."""
    if not threshold >= 0.0:
        raise ValueError(f"threshold must be >= 0, got {threshold}")
    return tree.linkage[tree.gap_merge, 2] > threshold


def _labels(tree: ClassTree, open_gaps: np.ndarray) -> np.ndarray:
    """Group ids int32 [n] (0.., numbered in dendrogram order) from the open gaps bool [n-1]."""
    in_order = np.concatenate([[0], np.cumsum(open_gaps, dtype=np.int32)])
    labels = np.empty(tree.n, np.int32)
    labels[tree.order] = in_order
    return labels


def labels_for_k(tree: ClassTree, k: int) -> np.ndarray:
    """Group ids int32 [n] in 0..k-1: exactly k groups, the tree with its last k-1 merges undone."""
    return _labels(tree, _open_gaps_for_k(tree, k))


def labels_for_threshold(tree: ClassTree, threshold: float) -> np.ndarray:
    """Group ids int32 [n]: members joined by merges at cosine distance <= threshold share a group."""
    return _labels(tree, _open_gaps_for_threshold(tree, threshold))


# -- representatives -------------------------------------------------------------------------------
def representatives(tree: ClassTree, emb: np.ndarray, labels: np.ndarray, rule: str = "nearest_mean",
                    seed: int | Sequence[int] = 0) -> np.ndarray:
    """Member index int64 [k] kept for each group g = 0..k-1 of a cut.

    labels: int32 [n] exactly as returned by `labels_for_k` / `labels_for_threshold` (numbered in
    dendrogram order, so each group is one run of `tree.order`); emb: float [n, D].
    Rules: nearest_mean / farthest_mean: the member with the highest / lowest cosine similarity to
    its group's mean embedding; random: uniform, seeded. Ties go to the first member in tree.order.
    """
    in_order = np.asarray(labels)[tree.order]
    steps = np.diff(in_order)
    if in_order[0] != 0 or np.any((steps != 0) & (steps != 1)):
        raise ValueError("labels must come from labels_for_k / labels_for_threshold of this tree")
    starts = np.flatnonzero(np.concatenate([[True], steps == 1]))
    if rule == "random":
        score = np.random.default_rng(seed).random(tree.n)[tree.order]
    elif rule in ("nearest_mean", "farthest_mean"):
        score = _mean_alignment(tree, emb, in_order, starts)
        if rule == "farthest_mean":
            score = -score
    else:
        raise ValueError(f"representative must be one of {REPRESENTATIVES}, got {rule!r}")
    best = np.maximum.reduceat(score, starts)
    first_best = np.where(score == best[in_order], np.arange(tree.n), tree.n)
    return tree.order[np.minimum.reduceat(first_best, starts)]


def _mean_alignment(tree: ClassTree, emb: np.ndarray, in_order: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """float32 [n] in dendrogram order: cos(member, its group's mean) times |group sum|, which ranks
    the members of a group like the cosine does; 0 for single-member groups (nothing to rank).

    in_order: group id int [n] of each position of tree.order; starts: int [k] where each group starts.
    Works in chunks of SCORE_BYTES: small temporaries are recycled by the allocator, large ones can
    cost fresh pages (page faults) on every call, which tripled the latency of a cut in our bench.
    """
    emb = np.asarray(emb, np.float32)
    sizes = np.diff(np.append(starts, tree.n))
    shared = sizes[in_order] > 1
    score = np.zeros(tree.n, np.float32)
    if not shared.any():
        return score
    members = tree.order[shared]  # grouped: each group with 2+ members is one run
    multi = sizes[sizes > 1]
    indptr = np.concatenate([[0], np.cumsum(multi)])
    sums = sparse.csr_matrix((np.ones(len(members), np.float32), members, indptr), shape=(len(multi), tree.n)) @ emb
    group = np.repeat(np.arange(len(multi)), multi)
    aligned = np.empty(len(members), np.float32)
    rows = max(1, SCORE_BYTES // (4 * emb.shape[1]))
    for lo in range(0, len(members), rows):
        x = np.take(emb, members[lo:lo + rows], axis=0)
        dots = np.einsum("ij,ij->i", x, np.take(sums, group[lo:lo + rows], axis=0))
        aligned[lo:lo + rows] = dots / np.maximum(row_norms(x), np.finfo(np.float32).tiny)
    score[shared] = aligned
    return score


# -- subsets ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Subset:
    """The kept subset over N images (N = largest member index + 1).

    group: int32 [N], global group id of each image (-1: in no class); the groups of the i-th class
        (classes in sorted label order) are per_class[i]['first_group'] + 0..groups-1.
    representatives: int64 [G], the image kept for each group.
    per_class: one dict per class: label, images, groups, kept, removed, kept_fraction, first_group.
    """

    group: np.ndarray = field(repr=False)
    representatives: np.ndarray = field(repr=False)
    per_class: list[dict[str, Any]]
    settings: dict[str, Any]

    @property
    def kept(self) -> np.ndarray:
        """bool [N]: True for the images kept."""
        mask = np.zeros(len(self.group), bool)
        mask[self.representatives] = True
        return mask

    @property
    def kept_indices(self) -> np.ndarray:
        """int64 [G], sorted."""
        return np.sort(self.representatives)

    @property
    def kept_fraction(self) -> float:
        images = sum(c["images"] for c in self.per_class)
        return len(self.representatives) / images if images else 0.0


ClassInput = tuple[ClassTree, np.ndarray, np.ndarray]  # (tree, emb [n, D], member_index int [n])


def select_subset(
    class_trees: Mapping[Hashable, ClassInput],
    *,
    fraction: float | None = None,
    threshold: float | None = None,
    representative: str = "nearest_mean",
    seed: int = 0,
) -> Subset:
    """Cut every class's tree and keep one representative per group.

    class_trees: label -> (tree, emb [n_c, D], member_index int [n_c]), member_index giving each
    member's position among all N images. Exactly one of `fraction` (each class keeps
    k_c = max(1, round(f * n_c)) groups) or `threshold` (cosine distance) must be given.
    Deterministic for a fixed seed (the i-th class in sorted label order draws with [seed, i]).
    """
    if (fraction is None) == (threshold is None):
        raise ValueError("give exactly one of fraction or threshold")
    labels = sorted(class_trees)
    n_total = 1 + max((int(np.max(class_trees[c][2])) for c in labels), default=-1)
    group = np.full(n_total, -1, np.int32)
    reps, per_class, first = [], [], 0
    for i, label in enumerate(labels):
        tree, emb, members = class_trees[label]
        members = np.asarray(members, np.int64)
        if len(members) != tree.n or len(emb) != tree.n:
            raise ValueError(f"class {label!r}: tree has {tree.n} members, emb {len(emb)}, index {len(members)}")
        open_gaps = (_open_gaps_for_k(tree, groups_for_fraction(tree.n, fraction)) if fraction is not None
                     else _open_gaps_for_threshold(tree, threshold))
        if np.any(group[members] != -1):
            raise ValueError(f"class {label!r}: an image belongs to two classes")
        local = _labels(tree, open_gaps)
        group[members] = first + local
        reps.append(members[representatives(tree, emb, local, representative, seed=[seed, i])])
        k = len(reps[-1])
        per_class.append({"label": label, "images": tree.n, "groups": k, "kept": k, "removed": tree.n - k,
                          "kept_fraction": k / tree.n, "first_group": first})
        first += k
    settings = {"fraction": fraction, "threshold": threshold, "representative": representative, "seed": seed}
    return Subset(group, np.concatenate(reps) if reps else np.zeros(0, np.int64), per_class, settings)


def group_size_histogram(group: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Group sizes int64 [S] (ascending) and how many groups have each size int64 [S].

    `group`: group id per image, int [N]; negative ids are ignored.
    """
    group = np.asarray(group)
    sizes = np.bincount(group[group >= 0])
    return np.unique(sizes[sizes > 0], return_counts=True)
