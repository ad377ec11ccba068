"""Semantic-redundancy engine on real Fashion-MNIST images with planted near copies.

Embedding: the raw pixels (784-d, cosine). Planted copies are near in that space: small Gaussian
noise, a brightness change and a JPEG re-encoding (all < 0.004 cosine distance from their original,
while the closest pair of distinct originals used here is > 0.0049 apart).
"""
from __future__ import annotations

import hashlib
import io
import json

import numpy as np
import pytest
from PIL import Image
from scipy.cluster.hierarchy import fcluster, is_monotonic, is_valid_linkage, linkage
from scipy.spatial.distance import pdist, squareform

from core.redundancy import checks, cuts, trees

CLASSES = (0, 1, 7)  # T-shirt/top, Trouser, Sneaker
ORIGINALS = 300      # per class
COPIES = 60          # per class: the first 60 originals get one near copy each


def pixels(images: np.ndarray) -> np.ndarray:
    """The test embedding: float32 [N, 784] raw pixels in [0, 1]."""
    return images.reshape(len(images), -1).astype(np.float32) / 255.0


def near_copy(image: np.ndarray, kind: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 [28, 28]: noise (sigma 4/255), 85 % brightness, or JPEG quality 90, by kind % 3."""
    if kind % 3 == 0:
        return np.clip(image + rng.normal(0.0, 4.0, image.shape), 0, 255).astype(np.uint8)
    if kind % 3 == 1:
        return (image * 0.85).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=90)
    return np.array(Image.open(buf))


@pytest.fixture(scope="module")
def planted(fmnist_test):
    """Real images of CLASSES plus near copies: dict with images uint8 [N, 28, 28], labels [N],
    original int64 [N] (index of the image copied, -1 for originals) and emb float32 [N, 784]."""
    images, labels = fmnist_test
    rng = np.random.default_rng(0)
    out_images, out_labels, original = [], [], []
    for cls in CLASSES:
        start = len(out_images)
        originals = images[labels == cls][:ORIGINALS]
        out_images += list(originals)
        out_images += [near_copy(originals[i], i, rng) for i in range(COPIES)]
        out_labels += [cls] * (ORIGINALS + COPIES)
        original += [-1] * ORIGINALS + [start + i for i in range(COPIES)]
    stacked = np.stack(out_images)
    return {"images": stacked, "labels": np.array(out_labels), "original": np.array(original),
            "emb": pixels(stacked)}


def class_inputs(emb: np.ndarray, labels: np.ndarray, **build) -> dict:
    """label -> (tree, emb [n_c, D], member_index [n_c]), one tree per class."""
    out = {}
    for cls in np.unique(labels):
        idx = np.flatnonzero(labels == cls)
        out[int(cls)] = (trees.build_class_tree(emb[idx], **build), emb[idx], idx)
    return out


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """True when labelings a [n] and b [n] define the same groups."""
    pairs = np.unique(np.stack([a, b]), axis=1).shape[1]
    return pairs == len(np.unique(a)) == len(np.unique(b))


def assert_copies_grouped(group: np.ndarray, original: np.ndarray) -> None:
    copies = np.flatnonzero(original >= 0)
    apart = copies[group[copies] != group[original[copies]]]
    assert len(apart) == 0, f"{len(apart)} of {len(copies)} near copies not grouped with their original"


# -- planted redundancy -----------------------------------------------------------------------------
def test_planted_copies_are_near_and_originals_apart(planted):
    """The premise of the planted tests: every copy is nearer its original than any two originals are."""
    unit = trees.unit_rows(planted["emb"])
    copies = np.flatnonzero(planted["original"] >= 0)
    copy_dist = 1.0 - np.einsum("ij,ij->i", unit[copies], unit[planted["original"][copies]])
    originals = unit[planted["original"] < 0]
    gram = originals @ originals.T
    np.fill_diagonal(gram, -1.0)
    assert copy_dist.max() < 0.004 < 1.0 - gram.max()


@pytest.mark.parametrize("method", trees.LINKAGES)
def test_copies_grouped_with_originals_at_original_fraction(planted, method):
    inputs = class_inputs(planted["emb"], planted["labels"], linkage=method)
    subset = cuts.select_subset(inputs, fraction=ORIGINALS / (ORIGINALS + COPIES))
    assert_copies_grouped(subset.group, planted["original"])
    assert [c["kept"] for c in subset.per_class] == [ORIGINALS] * len(CLASSES)
    # no group mixes classes, and every group has its own id
    labels_of_group = {}
    for g, lab in zip(subset.group, planted["labels"]):
        assert labels_of_group.setdefault(g, lab) == lab
    assert len(labels_of_group) == len(subset.representatives)


def test_approximate_tree_is_valid_and_keeps_copies(planted):
    inputs = class_inputs(planted["emb"], planted["labels"], exact_limit=100, part_size=100, seed=3)
    for tree, _, _ in inputs.values():
        n = tree.n
        assert not tree.exact and tree.meta["n_parts"] >= 7
        z = tree.linkage
        assert z.shape == (n - 1, 4) and is_valid_linkage(z) and is_monotonic(z)
        assert np.all(np.diff(z[:, 2]) >= 0) and z[-1, 3] == n
        for k in (1, 2, 7, 50, n // 2, n - 1, n):
            assert len(np.unique(cuts.labels_for_k(tree, k))) == k
    subset = cuts.select_subset(inputs, fraction=ORIGINALS / (ORIGINALS + COPIES))
    assert_copies_grouped(subset.group, planted["original"])


def test_part_distances_are_the_linkage_between_small_parts(fmnist_test):
    """With parts of at most PART_SAMPLE members every member is sampled: the estimate is exact."""
    images, _ = fmnist_test
    unit = trees.unit_rows(pixels(images[:400]))
    parts = np.split(np.arange(400), [60, 60 + trees.PART_SAMPLE, 300])  # sizes 60, 128, 112, 100
    reduce = {"complete": np.max, "single": np.min, "average": np.mean}
    for method in trees.LINKAGES:
        dist = trees._part_distances(unit, parts, method, np.random.default_rng(0))
        for p in range(4):
            for q in range(4):
                if p != q:
                    expected = reduce[method](1.0 - unit[parts[p]] @ unit[parts[q]].T)
                    assert dist[p, q] == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("method", trees.LINKAGES)
def test_part_agglomeration_weights_parts_by_size(fmnist_test, method):
    """Agglomerating parts of given sizes = scipy's linkage on the parts' members repeated size times."""
    images, _ = fmnist_test
    dist = squareform(pdist(pixels(images[:6]).astype(np.float64), "cosine"))
    sizes = np.array([1, 3, 2, 1, 4, 2])
    item = np.repeat(np.arange(6), sizes)
    reference = linkage(squareform(dist[np.ix_(item, item)], checks=False), method)
    merges = trees._agglomerate(dist, sizes.astype(float), method)
    np.testing.assert_allclose([m[2] for m in merges], reference[sizes.sum() - 6:, 2], atol=1e-9)
    assert merges[-1][3] == sizes.sum()


# -- the trees and their cuts -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def real_class(fmnist_test):
    """500 real Sandal images: emb float32 [500, 784]."""
    images, labels = fmnist_test
    return pixels(images[labels == 5][:500])


@pytest.mark.parametrize("method", trees.LINKAGES)
def test_exact_tree_equals_scipy_on_cosine_distances(real_class, method):
    tree = trees.build_class_tree(real_class, method)
    reference = linkage(pdist(real_class.astype(np.float64), "cosine"), method)
    assert tree.exact and tree.meta["method"] == method
    np.testing.assert_allclose(tree.linkage[:, 2], reference[:, 2], atol=1e-6)
    for k in (2, 10, 100, 400):
        assert same_partition(cuts.labels_for_k(tree, k), fcluster(reference, k, "maxclust"))


@pytest.mark.parametrize("method", trees.LINKAGES)
def test_labels_for_k_agree_with_fcluster_maxclust(real_class, method):
    tree = trees.build_class_tree(real_class, method)
    assert len(np.unique(tree.linkage[:, 2])) == tree.n - 1  # no ties
    for k in range(1, tree.n + 1, 7):
        labels = cuts.labels_for_k(tree, k)
        assert labels.dtype == np.int32 and set(np.unique(labels)) == set(range(k))
        assert same_partition(labels, fcluster(tree.linkage, k, "maxclust"))


@pytest.mark.parametrize("method", trees.LINKAGES)
def test_labels_for_threshold_agree_with_fcluster_distance(real_class, method):
    tree = trees.build_class_tree(real_class, method)
    heights = tree.linkage[:, 2]
    for t in [0.0, *np.quantile(heights, [0.1, 0.5, 0.9, 0.99]), heights[123], heights[-1]]:
        assert same_partition(cuts.labels_for_threshold(tree, t), fcluster(tree.linkage, t, "distance"))


def test_threshold_subset_reports_its_fractions(planted):
    inputs = class_inputs(planted["emb"], planted["labels"])
    subset = cuts.select_subset(inputs, threshold=0.004)
    assert_copies_grouped(subset.group, planted["original"])
    for row, (tree, _, _) in zip(subset.per_class, inputs.values()):
        groups = len(np.unique(cuts.labels_for_threshold(tree, 0.004)))
        assert row["kept"] == row["groups"] == groups == ORIGINALS
        assert row["kept_fraction"] == groups / tree.n
    assert subset.kept_fraction == ORIGINALS / (ORIGINALS + COPIES)


# -- subsets ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def uneven(fmnist_test):
    """Classes of 1, 2, 37 and 401 real images: (inputs, emb [440, 784], labels [440])."""
    images, labels = fmnist_test
    idx = np.concatenate([np.flatnonzero(labels == c)[:m] for c, m in ((3, 1), (4, 2), (6, 37), (8, 401))])
    emb = pixels(images[idx])
    return class_inputs(emb, labels[idx]), emb, labels[idx]


@pytest.mark.parametrize("fraction", [0.0, 0.01, 0.1, 0.25, 0.5, 0.77, 0.9, 1.0])
def test_kept_counts_follow_the_paper_rule(uneven, fraction):
    inputs, _, labels = uneven
    subset = cuts.select_subset(inputs, fraction=fraction)
    for row in subset.per_class:
        n = int(np.sum(labels == row["label"]))
        k = max(1, round(fraction * n))
        assert (row["images"], row["groups"], row["kept"], row["removed"]) == (n, k, k, n - k)
    kept = subset.kept
    assert kept.sum() == len(subset.representatives) == sum(r["kept"] for r in subset.per_class)
    assert np.array_equal(np.flatnonzero(kept), subset.kept_indices)
    # exactly one kept image per group, and it belongs to that group
    assert np.array_equal(np.sort(subset.group[subset.representatives]), np.arange(len(subset.representatives)))
    assert subset.kept_fraction == kept.sum() / len(labels)


def test_class_groups_are_numbered_per_class(uneven):
    inputs, _, labels = uneven
    subset = cuts.select_subset(inputs, fraction=0.3)
    for row in subset.per_class:
        ids = np.unique(subset.group[labels == row["label"]])
        assert np.array_equal(ids, row["first_group"] + np.arange(row["groups"]))


def brute_force_scores(emb: np.ndarray, members: np.ndarray) -> np.ndarray:
    """Cosine similarity of each member to the mean embedding of `members`, one group at a time."""
    mean = emb[members].mean(axis=0)
    x = emb[members]
    return x @ mean / (np.linalg.norm(x, axis=1) * np.linalg.norm(mean))


@pytest.mark.parametrize("rule", ["nearest_mean", "farthest_mean"])
def test_representative_rule_picks_what_it_says(real_class, rule):
    tree = trees.build_class_tree(real_class)
    labels = cuts.labels_for_k(tree, 60)
    reps = cuts.representatives(tree, real_class, labels, rule)
    assert len(reps) == 60
    for g, rep in enumerate(reps):
        members = np.flatnonzero(labels == g)
        assert rep in members
        scores = brute_force_scores(real_class, members)
        target = scores.max() if rule == "nearest_mean" else scores.min()
        assert scores[members == rep][0] == pytest.approx(target, abs=1e-5)


def test_random_representatives_are_seeded_members(real_class):
    tree = trees.build_class_tree(real_class)
    labels = cuts.labels_for_k(tree, 60)
    first = cuts.representatives(tree, real_class, labels, "random", seed=1)
    assert np.array_equal(first, cuts.representatives(tree, real_class, labels, "random", seed=1))
    assert np.array_equal(labels[first], np.arange(60))
    assert not np.array_equal(first, cuts.representatives(tree, real_class, labels, "random", seed=2))


def test_representatives_reject_foreign_labels(real_class):
    tree = trees.build_class_tree(real_class)
    scipy_labels = fcluster(tree.linkage, 60, "maxclust") - 1
    with pytest.raises(ValueError):
        cuts.representatives(tree, real_class, scipy_labels)


def test_select_subset_is_deterministic(uneven):
    inputs, emb, labels = uneven
    again = class_inputs(emb, labels)
    for rule in cuts.REPRESENTATIVES:
        a = cuts.select_subset(inputs, fraction=0.4, representative=rule, seed=5)
        b = cuts.select_subset(again, fraction=0.4, representative=rule, seed=5)
        assert np.array_equal(a.group, b.group) and np.array_equal(a.representatives, b.representatives)
    c = cuts.select_subset(inputs, fraction=0.4, representative="random", seed=6)
    assert not np.array_equal(a.representatives, c.representatives)


def test_approximate_build_is_deterministic_and_reports_progress(real_class):
    calls = []
    a = trees.build_class_tree(real_class, exact_limit=120, part_size=120, seed=4, progress=lambda *c: calls.append(c))
    b = trees.build_class_tree(real_class, exact_limit=120, part_size=120, seed=4)
    assert np.array_equal(a.linkage, b.linkage)
    parts = a.meta["n_parts"]
    assert calls == [(p, parts) for p in range(1, parts + 1)]


def test_tiny_classes(fmnist_test):
    images, _ = fmnist_test
    one, two = pixels(images[:1]), pixels(images[1:3])
    t1, t2 = trees.build_class_tree(one), trees.build_class_tree(two)
    assert t1.linkage.shape == (0, 4) and t2.linkage.shape == (1, 4)
    assert np.array_equal(cuts.labels_for_k(t1, 1), [0]) and np.array_equal(cuts.labels_for_threshold(t1, 0.5), [0])
    assert len(np.unique(cuts.labels_for_k(t2, 2))) == 2 and len(np.unique(cuts.labels_for_k(t2, 1))) == 1
    inputs = {"a": (t1, one, np.array([0])), "b": (t2, two, np.array([1, 2]))}
    for fraction, kept in ((0.0, 2), (0.5, 2), (0.8, 3), (1.0, 3)):
        assert cuts.select_subset(inputs, fraction=fraction).kept.sum() == kept
    assert cuts.select_subset(inputs, threshold=2.0).kept.sum() == 2
    assert cuts.select_subset(inputs, threshold=0.0).kept.sum() == 3


def test_tree_survives_storage_as_plain_arrays(real_class):
    tree = trees.build_class_tree(real_class, exact_limit=200, part_size=200)
    arrays, meta = tree.to_arrays()
    assert all(type(a) is np.ndarray for a in arrays.values())
    restored = trees.ClassTree.from_arrays({k: a.copy() for k, a in arrays.items()}, json.loads(json.dumps(meta)))
    assert restored.meta == tree.meta and not restored.exact
    for k in (1, 30, 250, 500):
        assert np.array_equal(cuts.labels_for_k(restored, k), cuts.labels_for_k(tree, k))


def test_group_size_histogram():
    sizes, counts = cuts.group_size_histogram(np.array([4, 0, 0, 1, 4, 4, -1, 7, 2, 2]))
    assert sizes.tolist() == [1, 2, 3] and counts.tolist() == [2, 2, 1]


# -- duplicates -------------------------------------------------------------------------------------
def test_exact_duplicates_of_pixel_hashes(fmnist_test):
    images, _ = fmnist_test
    sample = np.concatenate([images[:200], images[[5, 17, 5]]])  # 200, 201, 202 copy 5, 17, 5
    keys = [hashlib.blake2b(img.tobytes(), digest_size=8).hexdigest() for img in sample]
    natural = checks.exact_duplicates(keys[:200])
    assert not any(5 in g or 17 in g for g in natural)
    assert all(len({keys[i] for i in g}) == 1 for g in natural)
    assert checks.exact_duplicates(keys) == sorted(natural + [[5, 200, 202], [17, 201]])


def brute_force_conflicts(emb: np.ndarray, labels: np.ndarray, threshold: float) -> set[tuple[int, int]]:
    unit = trees.unit_rows(emb)
    dist = 1.0 - unit @ unit.T
    i, j = np.nonzero((dist <= threshold) & (labels[:, None] != labels[None, :]))
    return {(a, b) for a, b in zip(i.tolist(), j.tolist()) if a < b}


def test_cross_class_conflicts_find_mislabelled_copies(fmnist_test):
    images, labels = fmnist_test
    images, labels = images[:2000].copy(), labels[:2000].copy()
    rng = np.random.default_rng(1)
    planted = {}  # original -> slot overwritten by its near copy, labelled as another class
    for slot, (cls, wrong) in zip((1500, 1600, 1700), ((0, 1), (9, 0), (4, 6))):
        orig = int(np.flatnonzero(labels == cls)[0])
        images[slot], labels[slot] = near_copy(images[orig], slot, rng), wrong
        planted[orig] = slot
    emb = pixels(images)
    rows = checks.cross_class_conflicts(emb, labels, threshold=0.01)
    found = {(int(i), int(j)) for i, j in zip(rows["i"], rows["j"])}
    assert set(planted.items()) <= found
    assert found == brute_force_conflicts(emb, labels, 0.01)
    assert np.all(labels[rows["i"]] != labels[rows["j"]]) and np.all(np.diff(rows["distance"]) >= 0)
    closest = checks.cross_class_conflicts(emb, labels, threshold=0.01, max_pairs=2)
    assert np.array_equal(closest, rows[:2])
