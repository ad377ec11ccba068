"""A cut index over every class's merge tree: a whole dataset's cut in a few vectorised passes.

`select_subset` (core.redundancy.cuts) cuts class by class and picks every group's representative,
which a page needs only for the groups it shows. `CutIndex` lays all classes' dendrogram orders end
to end (classes in sorted label order, as `select_subset` numbers its groups), with, at each global
position p, the merge that joins p - 1 and p: its height (cosine distance) and its rank from the top
of its class's tree. A cut is then one comparison over N positions (fraction: rank < k_c; threshold:
height > t), a `flatnonzero` and a `diff`: counts, group sizes and the largest groups of a 1.28-million
image set take milliseconds, and group ids equal `select_subset`'s. Representatives are computed per
class on demand, with the same function and seeds as `select_subset`, so what a page shows is what an
export writes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Hashable, Mapping

import numpy as np
import pandas as pd

from core.redundancy.cuts import ClassInput, representatives


@dataclass(frozen=True)
class CutIndex:
    """Dendrogram orders of all classes, end to end (N positions, C classes).

    labels: the classes, sorted. sizes: int64 [C] members per class. starts: int64 [C] first position
    of each class. member: int64 [N] image index (into the clustering's table) at each position.
    local: int64 [N] the member's index within its class. class_of: int32 [N] class at each position.
    rank: int64 [N] rank from the top of the class's tree of the merge joining p - 1 and p (1 = the
    last merge; 0 at a class's first position, which always starts a group). height: float64 [N] that
    merge's cosine distance (+inf at a class's first position).
    """

    labels: list = field(repr=False)
    sizes: np.ndarray = field(repr=False)
    starts: np.ndarray = field(repr=False)
    member: np.ndarray = field(repr=False)
    local: np.ndarray = field(repr=False)
    class_of: np.ndarray = field(repr=False)
    rank: np.ndarray = field(repr=False)
    height: np.ndarray = field(repr=False)
    classes: Mapping[Hashable, ClassInput] = field(repr=False)

    @classmethod
    def build(cls, class_trees: Mapping[Hashable, ClassInput]) -> CutIndex:
        """From label -> (tree, emb [n_c, D], member index int [n_c]), as `select_subset` takes."""
        labels = sorted(class_trees)
        sizes = np.array([class_trees[c][0].n for c in labels], np.int64)
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        member, local, rank, height = [], [], [], []
        for label in labels:
            tree, _, members = class_trees[label]
            local.append(tree.order)
            member.append(np.asarray(members, np.int64)[tree.order])
            rank.append(np.concatenate([[0], tree.n - 1 - tree.gap_merge]))
            height.append(np.concatenate([[np.inf], tree.linkage[tree.gap_merge, 2]]))
        cat = (lambda parts, dtype: np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype))
        return cls(labels, sizes, starts, cat(member, np.int64), cat(local, np.int64),
                   np.repeat(np.arange(len(labels), dtype=np.int32), sizes), cat(rank, np.int64),
                   cat(height, np.float64), class_trees)

    @property
    def n(self) -> int:
        return len(self.member)

    def threshold_for(self, kept: float) -> float:
        """The cosine distance at which about a share `kept` of the images is kept: a threshold cut keeps one
        image per position whose merge is above it (+inf at each class's first position)."""
        if not 0.0 < kept <= 1.0:
            raise ValueError(f"kept must be in (0, 1], got {kept}")
        finite = self.height[np.isfinite(self.height)]
        if not len(finite):
            return 0.0
        return float(min(np.quantile(self.height, 1.0 - kept, method="lower"), finite.max()))

    def cut(self, *, fraction: float | None = None, threshold: float | None = None) -> Cut:
        """The groups at `fraction` (each class keeps k_c = max(1, round(f * n_c)) groups) or at a
        cosine-distance `threshold`; exactly one must be given."""
        if (fraction is None) == (threshold is None):
            raise ValueError("give exactly one of fraction or threshold")
        if fraction is not None:
            if not 0.0 <= fraction <= 1.0:
                raise ValueError(f"fraction must be in [0, 1], got {fraction}")
            k = np.maximum(1, np.round(fraction * self.sizes)).astype(np.int64)  # round half to even
            opens = self.rank < k[self.class_of]
        else:
            if not threshold >= 0.0:
                raise ValueError(f"threshold must be >= 0, got {threshold}")
            opens = self.height > threshold
        return Cut(self, np.flatnonzero(opens), {"fraction": fraction, "threshold": threshold})


@dataclass
class Cut:
    """One cut: G groups, numbered as `select_subset` numbers them.

    first: int64 [G] first position of each group (groups are runs of positions).
    """

    index: CutIndex = field(repr=False)
    first: np.ndarray = field(repr=False)
    settings: dict
    _reps: dict = field(default_factory=dict, repr=False)
    _largest: dict = field(default_factory=dict, repr=False)

    @property
    def n_groups(self) -> int:
        return len(self.first)

    # Computed once per cut (a page keeps its cuts): over a million groups each is a few milliseconds,
    # and a page of groups asks for them once per group shown.
    @cached_property
    def group_sizes(self) -> np.ndarray:
        """int64 [G] members per group."""
        return np.diff(np.append(self.first, self.index.n))

    @cached_property
    def group_class(self) -> np.ndarray:
        """int32 [G] class index of each group."""
        return self.index.class_of[self.first]

    def groups_per_class(self) -> np.ndarray:
        """int64 [C] groups (= images kept) per class."""
        return np.bincount(self.group_class, minlength=len(self.index.labels))

    def per_class(self) -> pd.DataFrame:
        """label, images, groups, kept, removed, kept_fraction: one row per class."""
        kept = self.groups_per_class()
        sizes = self.index.sizes
        return pd.DataFrame({"label": self.index.labels, "images": sizes, "groups": kept, "kept": kept,
                             "removed": sizes - kept, "kept_fraction": kept / np.maximum(sizes, 1)})

    def size_histogram(self) -> tuple[np.ndarray, np.ndarray]:
        """Group sizes int64 [S] (ascending) and how many groups have each size int64 [S]."""
        counts = np.bincount(self.group_sizes)
        sizes = np.flatnonzero(counts)
        return sizes, counts[sizes]

    def largest(self, label: Hashable | None = None, min_size: int = 2) -> np.ndarray:
        """Group ids int64 with at least `min_size` members (of one class, or all), largest first;
        equal sizes in group-id order. A class's groups are one run of ids, so picking a class costs
        its own groups (at 1.28 million images a pass over every group took 4-20 ms per pick). Kept per
        (label, min_size): at most every group id once per class picked."""
        key = (label, min_size)
        if key not in self._largest:
            sizes = self.group_sizes
            if label is None:
                ids = np.flatnonzero(sizes >= min_size)
            else:
                c = self.index.labels.index(label)
                lo = self.index.starts[c]
                a, b = np.searchsorted(self.first, [lo, lo + self.index.sizes[c]])
                ids = a + np.flatnonzero(sizes[a:b] >= min_size)
            self._largest[key] = ids[np.argsort(-sizes[ids], kind="stable")]
        return self._largest[key]

    def members(self, group: int) -> np.ndarray:
        """Image indices int64 of one group's members, in dendrogram order."""
        lo = self.first[group]
        return self.index.member[lo:lo + self.group_sizes[group]]

    def representative(self, group: int, rule: str = "nearest_mean", seed: int = 0) -> int:
        """The image kept for `group`: the same one `select_subset` keeps with this rule and seed."""
        c = int(self.group_class[group])
        key = (c, rule, seed)
        if key not in self._reps:
            self._reps[key] = self._class_representatives(c, rule, seed)
        first_of_class = np.searchsorted(self.first, self.index.starts[c])
        return int(self._reps[key][group - first_of_class])

    def _class_representatives(self, c: int, rule: str, seed: int) -> np.ndarray:
        """Image indices int64 [k_c] kept for class c's groups, in group order."""
        idx = self.index
        label = idx.labels[c]
        tree, emb, members = idx.classes[label]
        lo, hi = idx.starts[c], idx.starts[c] + idx.sizes[c]
        opens = np.zeros(hi - lo, bool)
        a, b = np.searchsorted(self.first, [lo, hi])  # the class's groups: a run of `first`
        opens[self.first[a:b] - lo] = True
        local_labels = np.empty(tree.n, np.int32)
        local_labels[idx.local[lo:hi]] = np.cumsum(opens, dtype=np.int32) - 1
        return np.asarray(members, np.int64)[representatives(tree, emb, local_labels, rule, seed=[seed, c])]
