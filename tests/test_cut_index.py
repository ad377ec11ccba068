"""The cut index answers what `select_subset` answers, at any fraction or threshold, without cutting
class by class: groups, sizes, counts per class and the kept image of any group."""
import numpy as np
import pytest

from core.redundancy import cuts, trees
from core.redundancy.index import CutIndex


@pytest.fixture(scope="module")
def classes():
    """Three classes of clustered 16-d embeddings (with exact copies), members interleaved over 900 images."""
    rng = np.random.default_rng(7)
    owner = rng.permutation(np.repeat([0, 1, 2], [400, 300, 200]))
    out = {}
    for c, label in enumerate(["b", "a", "c"]):  # not in sorted order: the index sorts labels
        members = np.flatnonzero(owner == c)
        centres = rng.normal(size=(12, 16))
        emb = centres[rng.integers(0, 12, len(members))] + 0.2 * rng.normal(size=(len(members), 16))
        emb[5] = emb[4]  # an exact copy: a zero-height merge
        emb = emb.astype(np.float32)
        out[label] = (trees.build_class_tree(emb, "complete"), emb, members)
    return out


@pytest.mark.parametrize("cut", [{"fraction": f} for f in (0.01, 0.3, 0.5, 0.9, 1.0)]
                         + [{"threshold": t} for t in (0.0, 0.05, 0.2, 2.0)])
@pytest.mark.parametrize("rule", ["nearest_mean", "random", "farthest_mean"])
def test_index_matches_select_subset(classes, cut, rule):
    oracle = cuts.select_subset(classes, representative=rule, seed=3, **cut)
    c = CutIndex.build(classes).cut(**cut)
    assert c.n_groups == len(oracle.representatives)
    group_of = np.full(900, -1)
    for g in range(c.n_groups):
        group_of[c.members(g)] = g
    assert np.array_equal(group_of, oracle.group)
    assert [c.representative(g, rule, seed=3) for g in range(c.n_groups)] == oracle.representatives.tolist()
    table = c.per_class()
    assert table.label.tolist() == ["a", "b", "c"]
    assert table.kept.tolist() == [p["kept"] for p in oracle.per_class]
    sizes, counts = c.size_histogram()
    expected = cuts.group_size_histogram(oracle.group)
    assert np.array_equal(sizes, expected[0]) and np.array_equal(counts, expected[1])


def test_largest_groups_first_and_per_class(classes):
    c = CutIndex.build(classes).cut(fraction=0.3)
    sizes = c.group_sizes
    ids = c.largest()
    assert (sizes[ids] >= 2).all() and (np.diff(sizes[ids]) <= 0).all()
    assert len(ids) == int((sizes >= 2).sum())
    only_c = c.largest("c")
    assert len(only_c) and all(set(classes["c"][2]) >= set(c.members(g)) for g in only_c)


def test_bad_cuts_are_refused(classes):
    index = CutIndex.build(classes)
    for bad in ({}, {"fraction": 0.5, "threshold": 0.1}, {"fraction": 1.5}, {"threshold": -0.1}):
        with pytest.raises(ValueError):
            index.cut(**bad)
