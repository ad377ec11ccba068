"""Benchmark of the semantic-redundancy engine (core/redundancy.py) on Fashion-MNIST.

Embeddings: real Fashion-MNIST pixels projected to 64-d by a fixed random projection (seed 0);
planted near copies are made in pixel space (noise sigma 4/255, 85 % brightness, JPEG q90).

(a) tree build time and peak RSS (above the process's RSS before the step): one class of 6k, one
    class of 20k, and 60k as 10 classes x 6k (Fashion-MNIST train);
(b) latency of one slider move on the 60k trees (a new fraction or threshold -> the new subset,
    representatives included; target < 50 ms; median, p95 and max after one warm-up call), against
    a naive baseline measured in the same run: scipy fcluster(maxclust) per class + a Python loop
    choosing each group's representative;
(c) the approximate path on one class of 200k (60k real + 140k near copies): time, peak RSS,
    cut latency, near copies grouped with their original;
(d) agreement of the approximation with the exact tree on a class of 12k (6k real + 6k copies):
    adjusted Rand index of the cuts at several fractions next to the ARI between two exact trees
    whose embeddings differ by 0.1 % noise (how stable complete-linkage cuts are anyway), mean
    cosine distance of removed images to their kept representative, near copies grouped;
(e) exact duplicates (pixel hashes) and cross-class near duplicates on all 70k images;
(f) with --compare: imagededup (PHash) from /tmp/benchvenv on the same PNGs as ours;
(g) with --near-copies (this part only): planted near copies of four kinds (1-2 px shifts, small
    crops/rescales, JPEG re-encodes, brightness/noise) among the 10,000 Fashion-MNIST test images,
    held out from the backbone's training; redex's own trained backbone (one per recipe of
    --nc-recipes), cut at fraction 0.9, without and with the near-copy pairs by pixels joined first
    (`core.redundancy.copies`, the default), next to fastdup (its own venv, FASTDUP_PYTHON) and
    imagededup PHash (the `bench` extra) on the same files: recall per kind, images flagged, wall time.

    .venv/bin/python bench/cluster.py [--quick] [--compare]
    .venv/bin/python bench/cluster.py --near-copies [--nc-recipes '[{}, {"contrastive": 0}]']
    .venv/bin/python bench/cluster.py --nc-cost 0 [--nc-against REV]   # the pair search on one train class
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.cluster.hierarchy import fcluster
from sklearn.metrics import adjusted_rand_score

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core import config
from core.data import idx
from core.redundancy import checks, cuts
from core.redundancy import trees as redundancy_trees

CUT_TARGET_MS = 50.0
BENCH_PYTHON = Path("/tmp/benchvenv/bin/python")
COMPARE_THRESHOLD = 0.004  # cosine distance on raw pixels that groups the planted copies (see tests)
PHASH_MAX_DISTANCE = 10    # imagededup's default Hamming distance for PHash


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, a smoke run of under a minute")
    parser.add_argument("--compare", action="store_true", help="also time imagededup from /tmp/benchvenv")
    parser.add_argument("--near-copies", action="store_true", help="only (g): the planted near-copy benchmark")
    parser.add_argument("--nc-train", type=int, default=20_000, help="train images for each backbone of (g)")
    parser.add_argument("--nc-per-kind", type=int, default=50, help="planted copies per kind in (g)")
    parser.add_argument("--nc-recipes", default='[{}, {"contrastive": 0}]',
                        help="JSON list of overrides of backbone_recipe (with 'arch'), one backbone each; the first "
                             "is the ratios' baseline. Default: the backbone recipe, then cross-entropy only")
    parser.add_argument("--nc-no-tools", action="store_true", help="(g) without fastdup and imagededup")
    parser.add_argument("--nc-load", default="",
                        help="comma-separated state_dict files (torch.save(model.state_dict())), one per recipe "
                             "of --nc-recipes: use those weights instead of training (top-1 then not measured)")
    parser.add_argument("--nc-k", type=int, help="candidates per image and descriptor of the pairs (default: copies.DEFAULT_SETTINGS)")
    parser.add_argument("--nc-threshold", type=float, help="tolerant-distance threshold of the pairs (default: "
                                                           "core.redundancy.copies.DEFAULT_SETTINGS)")
    parser.add_argument("--nc-cost", type=int, metavar="LABEL",
                        help="only the cost of the near-copy search (copies.class_pairs) on the Fashion-MNIST train "
                             "class LABEL (6,000 images), timed twice, and with --nc-against once between")
    parser.add_argument("--nc-against", metavar="REV",
                        help="with --nc-cost: also time core/redundancy/copies.py as of this git revision, in the "
                             "same run (its own default settings), and report the ratio")
    return parser.parse_args()


# -- measuring ------------------------------------------------------------------------------------
def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))


@contextmanager
def peak_memory():
    """Yields a dict that gets 'peak_gb': the peak RSS above the RSS at entry (Linux /proc)."""
    with open("/proc/self/clear_refs", "w") as f:  # "5" resets the peak (VmHWM) to the current RSS
        f.write("5")
    start, out = _status_kib("VmRSS"), {}
    yield out
    out["peak_gb"] = (_status_kib("VmHWM") - start) / 2**20


def timed(fn, *args, **kwargs):
    """(result, seconds, peak GB above the start)."""
    with peak_memory() as mem:
        start = time.perf_counter()
        result = fn(*args, **kwargs)
        seconds = time.perf_counter() - start
    return result, seconds, mem["peak_gb"]


# -- data -----------------------------------------------------------------------------------------
def load(quick: bool):
    """uint8 images [N, 28, 28] and labels [N] of train then test; the train count."""
    folder = config.fashion_mnist_dir()
    x_train, y_train = idx.load_fashion_mnist(folder, "train")
    x_test, y_test = idx.load_fashion_mnist(folder, "test")
    if quick:
        x_train, y_train, x_test, y_test = x_train[:6000], y_train[:6000], x_test[:1000], y_test[:1000]
    return np.concatenate([x_train, x_test]), np.concatenate([y_train, y_test]), len(x_train)


PROJECTION = np.random.default_rng(0).standard_normal((784, 64)).astype(np.float32) / 28.0


def embed(images: np.ndarray) -> np.ndarray:
    """float32 [N, 64]: pixels in [0, 1] times a fixed random projection, by chunks."""
    out = np.empty((len(images), 64), np.float32)
    for lo in range(0, len(images), 20_000):
        out[lo:lo + 20_000] = images[lo:lo + 20_000].reshape(-1, 784).astype(np.float32) / 255 @ PROJECTION
    return out


def near_copies(images: np.ndarray, seed: int) -> np.ndarray:
    """uint8 [N, 28, 28]: image i gets noise (i % 3 == 0), 85 % brightness (1) or JPEG q90 (2)."""
    rng = np.random.default_rng(seed)
    out = np.clip(images + rng.normal(0.0, 4.0, images.shape), 0, 255).astype(np.uint8)
    out[1::3] = (images[1::3] * 0.85).astype(np.uint8)
    for i in range(2, len(images), 3):
        buf = io.BytesIO()
        Image.fromarray(images[i]).save(buf, format="JPEG", quality=90)
        out[i] = np.array(Image.open(buf))
    return out


def copies_grouped(labels: np.ndarray, original: np.ndarray) -> float:
    """Fraction of copies (original >= 0) in the same group as their original; labels [N]."""
    copies = np.flatnonzero(original >= 0)
    return float(np.mean(labels[copies] == labels[original[copies]]))


# -- (a) builds -----------------------------------------------------------------------------------
def build_classes(emb: np.ndarray, labels: np.ndarray, **build) -> dict:
    """label -> (tree, emb [n_c, D], member_index [n_c])."""
    out = {}
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        out[int(c)] = (redundancy_trees.build_class_tree(emb[members], **build), emb[members], members)
    return out


def bench_builds(emb: np.ndarray, labels: np.ndarray, quick: bool, report: list[str]) -> dict:
    """Times the 6k / 20k / 60k builds; returns the 60k (10-class) trees."""
    small, single = (500, 3000) if quick else (6000, 20_000)
    cases = [(f"1 class x {small:,}", emb[labels == 0][:small], np.zeros(small, int)),
             (f"1 class x {single:,}", emb[:single], np.zeros(single, int)),
             (f"10 classes, {len(emb):,} total", emb, labels)]
    for name, e, lab in cases:
        trees, seconds, peak = timed(build_classes, e, lab)
        exact = all(t.exact for t, _, _ in trees.values())
        report.append(f"build {name:<24} {seconds:7.1f} s   peak +{peak:5.2f} GB   {'exact' if exact else 'approx'}")
        print(report[-1], flush=True)
    return trees


# -- (b) cuts -------------------------------------------------------------------------------------
def naive_subset(class_trees: dict, fraction: float) -> np.ndarray:
    """The baseline: fcluster per class, then a Python loop over groups for nearest-mean representatives."""
    kept = []
    for tree, emb, members in class_trees.values():
        k = cuts.groups_for_fraction(tree.n, fraction)
        labels = fcluster(tree.linkage, k, "maxclust") if tree.n > 1 else np.ones(1, int)
        order = np.argsort(labels, kind="stable")
        for group in np.split(order, np.flatnonzero(np.diff(labels[order])) + 1):
            x = emb[group]
            mean = x.mean(axis=0)
            cos = x @ mean / (np.linalg.norm(x, axis=1) * np.linalg.norm(mean))
            kept.append(members[group[np.argmax(cos)]])
    return np.sort(np.array(kept))


def latencies_ms(fn, values) -> np.ndarray:
    out = []
    for v in values:
        start = time.perf_counter()
        fn(v)
        out.append((time.perf_counter() - start) * 1e3)
    return np.array(out)


def bench_cuts(trees: dict, quick: bool, report: list[str]) -> None:
    rng = np.random.default_rng(0)
    n = sum(t.n for t, _, _ in trees.values())
    cuts.select_subset(trees, fraction=0.5)  # warm-up: first-call costs are not a slider move
    fractions = rng.permutation(np.linspace(0.01, 0.99, 99))
    ours = latencies_ms(lambda f: cuts.select_subset(trees, fraction=f), fractions)
    by_t = latencies_ms(lambda t: cuts.select_subset(trees, threshold=t), rng.permutation(np.linspace(0.0, 0.3, 61)))
    few = fractions[:5 if quick else 15]
    naive = latencies_ms(lambda f: naive_subset(trees, f), few)
    differ = [len(np.setdiff1d(naive_subset(trees, f), cuts.select_subset(trees, fraction=f).kept_indices)) for f in few]
    kept = sum(len(cuts.select_subset(trees, fraction=f).representatives) for f in few)
    arrays = [t.to_arrays() for t, _, _ in trees.values()]
    _, restore_s, _ = timed(lambda: [redundancy_trees.ClassTree.from_arrays(a, m) for a, m in arrays])
    report += [
        f"cut by fraction, {n:,} images, {len(trees)} classes, nearest_mean, {len(ours)} moves: median "
        f"{np.median(ours):.1f} ms, p95 {np.percentile(ours, 95):.1f} ms, max {np.max(ours):.1f} ms "
        f"(target < {CUT_TARGET_MS:.0f} ms: {'met' if np.percentile(ours, 95) < CUT_TARGET_MS else 'MISSED'} at p95)",
        f"cut by threshold, {len(by_t)} moves: median {np.median(by_t):.1f} ms, p95 {np.percentile(by_t, 95):.1f} ms, "
        f"max {np.max(by_t):.1f} ms",
        f"naive baseline (fcluster + Python loop), {len(naive)} moves: median {np.median(naive):.0f} ms, "
        f"max {np.max(naive):.0f} ms -> ours is {np.median(naive) / np.median(ours):.0f}x faster (median); "
        f"kept images that differ from ours: {sum(differ)} of {kept:,}",
        f"restore {len(trees)} trees from stored arrays: {restore_s * 1e3:.0f} ms",
    ]
    print("\n".join(report[-4:]), flush=True)


# -- (c) the large class --------------------------------------------------------------------------
def bench_large(images: np.ndarray, n_train: int, quick: bool, report: list[str]) -> None:
    total = 30_000 if quick else 200_000
    originals = images[:n_train]
    source = np.arange(total - n_train) % n_train
    emb = np.concatenate([embed(originals), *(embed(near_copies(originals[source[lo:lo + n_train]], seed=lo))
                                              for lo in range(0, len(source), n_train))])
    original = np.concatenate([np.full(n_train, -1), source])
    build = {"exact_limit": 5000, "part_size": 2000} if quick else {}
    tree, seconds, peak = timed(redundancy_trees.build_class_tree, emb, **build)
    k = n_train
    grouped = copies_grouped(cuts.labels_for_k(tree, k), original)
    one_class = {0: (tree, emb, np.arange(total))}
    cuts.select_subset(one_class, fraction=0.5)  # warm-up
    cut = latencies_ms(lambda f: cuts.select_subset(one_class, fraction=f), np.linspace(0.05, 0.95, 19))
    report += [
        f"large class {total:,} ({n_train:,} real + {total - n_train:,} near copies): build {seconds:.1f} s, "
        f"peak +{peak:.2f} GB, {'exact' if tree.exact else 'approx'}, {tree.meta['n_parts']} parts "
        f"(exact_limit {tree.meta['exact_limit']:,}, part_size {tree.meta['part_size']:,})",
        f"large class: cut median {np.median(cut):.1f} ms, max {np.max(cut):.1f} ms; "
        f"near copies grouped with their original at k = {k:,}: {grouped:.1%}",
    ]
    print("\n".join(report[-2:]), flush=True)


# -- (d) approximation vs exact -------------------------------------------------------------------
def removed_distance(tree: redundancy_trees.ClassTree, emb: np.ndarray, k: int) -> float:
    """Mean cosine distance of the removed images to their group's nearest_mean representative."""
    labels = cuts.labels_for_k(tree, k)
    reps = cuts.representatives(tree, emb, labels)
    unit = redundancy_trees.unit_rows(emb)
    removed = np.setdiff1d(np.arange(tree.n), reps)
    if len(removed) == 0:
        return 0.0
    return float(np.mean(1.0 - np.einsum("ij,ij->i", unit[removed], unit[reps[labels[removed]]])))


def bench_agreement(images: np.ndarray, labels: np.ndarray, n_train: int, quick: bool, report: list[str]) -> None:
    originals = images[:n_train][labels[:n_train] == 0]
    n_orig = len(originals)
    emb = np.concatenate([embed(originals), embed(near_copies(originals, seed=1))])
    original = np.concatenate([np.full(n_orig, -1), np.arange(n_orig)])
    jitter = np.random.default_rng(2).standard_normal(emb.shape).astype(np.float32)
    jittered = emb + 1e-3 * jitter * np.linalg.norm(emb, axis=1, keepdims=True) / np.sqrt(emb.shape[1])
    exact, exact_s, exact_gb = timed(redundancy_trees.build_class_tree, emb)
    noisy = redundancy_trees.build_class_tree(jittered)
    part = n_orig // 3 if quick else redundancy_trees.PART_SIZE
    approx, approx_s, approx_gb = timed(redundancy_trees.build_class_tree, emb, exact_limit=part, part_size=part)
    n = exact.n
    report.append(f"agreement on one class of {n:,} ({n_orig:,} real + {n_orig:,} copies): exact {exact_s:.1f} s "
                  f"+{exact_gb:.2f} GB; approx ({approx.meta['n_parts']} parts of <= {part:,}) {approx_s:.1f} s "
                  f"+{approx_gb:.2f} GB")
    report.append("  fraction   ARI(approx,exact)  ARI(exact,exact+0.1% noise)  removed->kept dist exact / approx")
    for f in (0.1, 0.25, 0.5, 0.75, 0.9):
        k = cuts.groups_for_fraction(n, f)
        a, e, j = (cuts.labels_for_k(t, k) for t in (approx, exact, noisy))
        report.append(f"  {f:8.2f}   {adjusted_rand_score(e, a):17.3f}  {adjusted_rand_score(e, j):27.3f}  "
                      f"{removed_distance(exact, emb, k):.4f} / {removed_distance(approx, emb, k):.4f}")
    grouped = [copies_grouped(cuts.labels_for_k(t, n_orig), original) for t in (exact, approx)]
    report.append(f"  near copies grouped with their original at k = {n_orig:,}: exact {grouped[0]:.1%}, "
                  f"approx {grouped[1]:.1%}")
    print("\n".join(report[-8:]), flush=True)


# -- (e) duplicates -------------------------------------------------------------------------------
def bench_duplicates(images: np.ndarray, labels: np.ndarray, report: list[str]) -> None:
    keys, hash_s, _ = timed(lambda: [hashlib.blake2b(x.tobytes(), digest_size=16).digest() for x in images])
    groups, group_s, _ = timed(checks.exact_duplicates, keys)
    mixed = sum(len(set(labels[g].tolist())) > 1 for g in groups)
    emb = embed(images)
    rows, seconds, peak = timed(checks.cross_class_conflicts, emb, labels)
    report += [
        f"exact duplicates (pixel hashes) in {len(images):,}: {len(groups)} groups, {mixed} with mixed labels; "
        f"hash {hash_s:.2f} s + group {group_s * 1e3:.0f} ms",
        f"cross-class near duplicates in {len(images):,} x 64-d (cosine <= 0.01): {len(rows):,} pairs in "
        f"{seconds:.1f} s, peak +{peak:.2f} GB",
    ]
    print("\n".join(report[-2:]), flush=True)


# -- (g) planted near copies: redex's own embeddings, fastdup and imagededup on the same files --------
COPY_KINDS = ("shift", "crop", "jpeg", "photometric")
COPY_FRACTION = 0.9  # the cut the copies must survive: each class keeps round(0.9 n_c) groups
FASTDUP_PYTHON = Path(os.environ.get("FASTDUP_PYTHON", "/tmp/fastdupvenv/bin/python"))
FASTDUP_SCRIPT = """
import json, os, sys, time
os.environ["SENTRY_OPT_OUT"] = "1"
start = time.perf_counter()
import fastdup, numpy as np
imported = time.perf_counter()
rc = fastdup.run(input_dir=sys.argv[1], work_dir=sys.argv[2], verbose=False)
run_s = time.perf_counter() - imported
names, feats = fastdup.load_binary_feature(os.path.join(sys.argv[2], "atrain_features.dat"), d=576)
np.save(os.path.join(sys.argv[2], "features.npy"), np.asarray(feats, np.float32))
print(json.dumps({"rc": rc, "import_s": imported - start, "run_s": run_s, "names": [os.path.basename(n) for n in names]}))
"""


def make_copy(image: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    """One near copy of uint8 `image [H, W]`:

    shift: 1 or 2 px in one of 8 directions, zero fill; crop: a (H-2)..(H-3) px box at a random
    offset, resized back (bilinear, a 1.07-1.12x rescale); jpeg: re-encoded at quality 70-90;
    photometric: 85-95 % brightness or Gaussian noise of sigma 4.
    """
    h, w = image.shape
    if kind == "shift":
        d = int(rng.integers(1, 3))
        dy, dx = [(a, b) for a in (-1, 0, 1) for b in (-1, 0, 1) if a or b][rng.integers(8)]
        out = np.zeros_like(image)
        out[max(0, d * dy):h + min(0, d * dy), max(0, d * dx):w + min(0, d * dx)] = \
            image[max(0, -d * dy):h + min(0, -d * dy), max(0, -d * dx):w + min(0, -d * dx)]
        return out
    if kind == "crop":
        s = h - int(rng.integers(2, 4))
        y, x = (int(v) for v in rng.integers(0, h - s + 1, 2))
        return np.array(Image.fromarray(image[y:y + s, x:x + s]).resize((w, h), Image.BILINEAR))
    if kind == "jpeg":
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="JPEG", quality=int(rng.integers(70, 91)))
        return np.array(Image.open(buf))
    if kind == "photometric":
        if rng.random() < 0.5:
            return (image * rng.uniform(0.85, 0.95)).astype(np.uint8)
        return np.clip(image + rng.normal(0.0, 4.0, image.shape), 0, 255).astype(np.uint8)
    raise ValueError(f"unknown copy kind {kind!r}; valid: {', '.join(COPY_KINDS)}")


def plant_copies(images: np.ndarray, per_kind: int, seed: int = 0):
    """(copies uint8 [K, H, W], source index int [K] into `images`, kind index int [K]): `per_kind`
    copies of each kind in `COPY_KINDS`, of distinct originals drawn at random."""
    rng = np.random.default_rng(seed)
    source = rng.choice(len(images), per_kind * len(COPY_KINDS), replace=False)
    kinds = np.repeat(np.arange(len(COPY_KINDS)), per_kind)
    copies = np.stack([make_copy(images[i], COPY_KINDS[k], rng) for i, k in zip(source, kinds)])
    return copies, source, kinds


def recall_by_kind(hit: np.ndarray, kinds: np.ndarray) -> dict:
    """{kind: share of its copies found, 'all': share of all}; hit bool [K]."""
    out = {kind: float(hit[kinds == k].mean()) for k, kind in enumerate(COPY_KINDS)}
    return dict(out, all=float(hit.mean()))


def copy_pairs(pixels: np.ndarray, labels: np.ndarray, settings=None) -> dict:
    """Near-copy pairs by pixels per class (`core.redundancy.copies.class_pairs`): label -> positions
    int64 [m, 2] among the class's members (np.flatnonzero(labels == label))."""
    from core.redundancy import copies

    settings = settings or copies.DEFAULT_SETTINGS
    return {int(c): copies.class_pairs(pixels[labels == c], settings)[0] for c in np.unique(labels)}


def other_pairs(pairs: dict, labels: np.ndarray, n_orig: int, source: np.ndarray) -> int:
    """How many of the pairs by pixels (`copy_pairs`) are not a planted copy and its original."""
    planted = {(int(i), n_orig + j) for j, i in enumerate(source)}
    found = 0
    for c, p in pairs.items():
        members = np.flatnonzero(labels == c)
        found += sum((int(members[a]), int(members[b])) not in planted for a, b in p)
    return found


def copy_grouping(emb: np.ndarray, labels: np.ndarray, n_orig: int, source: np.ndarray, kinds: np.ndarray,
                  fraction: float = COPY_FRACTION, pairs: dict | None = None) -> dict:
    """Cut the per-class trees of `emb` ([n_orig originals; copies], labels by image) at `fraction`:
    recall per copy kind (copy in its original's group), images flagged (in a group of two or more)
    and images removed. `pairs`: per class the near copies joined first (`copy_pairs`), or None."""
    class_trees = {}
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        joined = None if pairs is None else pairs[int(c)]
        class_trees[int(c)] = (redundancy_trees.build_class_tree(emb[members], pairs=joined), emb[members], members)
    subset = cuts.select_subset(class_trees, fraction=fraction)
    group = subset.group
    hit = group[n_orig + np.arange(len(source))] == group[source]
    sizes = np.bincount(group)
    return dict(recall_by_kind(hit, kinds), flagged=int((sizes[group] > 1).sum()),
                removed=int(len(emb) - len(subset.kept_indices)))


def pair_hits(found: dict[str, list[str]], names: list[str], n_orig: int, source: np.ndarray) -> tuple[np.ndarray, int]:
    """(copy found as a duplicate of its original: bool [K], images with any duplicate) from a tool's
    {file: [duplicate files]}."""
    hit = np.array([names[n_orig + j] in found.get(names[i], ()) or names[i] in found.get(names[n_orig + j], ())
                    for j, i in enumerate(source)])
    return hit, sum(1 for dups in found.values() if dups)


def matched_threshold(x: np.ndarray, metric: str, n_orig: int, source: np.ndarray, kinds: np.ndarray,
                      target_flagged: int, thresholds: np.ndarray) -> dict:
    """A tool at the threshold whose flagged count comes nearest `target_flagged` (redex's): pairs at
    distance <= t are duplicates; `x` bit rows (bool [N, B], metric 'hamming') or features ('cosine')."""
    if metric == "hamming":
        a = x.astype(np.float32)
        ones = a.sum(1)
        dist = ones[:, None] + ones[None, :] - 2 * a @ a.T
    else:
        u = redundancy_trees.unit_rows(x.astype(np.float32))
        dist = 1.0 - u @ u.T
    np.fill_diagonal(dist, np.inf)
    nearest = dist.min(1)
    copy_d = dist[n_orig + np.arange(len(source)), source]
    flagged = np.array([(nearest <= t).sum() for t in thresholds])
    best = int(np.argmin(np.abs(flagged - target_flagged)))
    return dict(recall_by_kind(copy_d <= thresholds[best], kinds), flagged=int(flagged[best]),
                threshold=float(thresholds[best]))


def run_phash(folder: Path, names: list[str], n_orig: int, source: np.ndarray, kinds: np.ndarray,
              target_flagged: int) -> list[dict]:
    """imagededup's PHash on the folder: at its default (Hamming <= 10) and at redex's flagged count."""
    from imagededup.methods import PHash

    start = time.perf_counter()
    phash = PHash(verbose=False)
    encodings = phash.encode_images(image_dir=str(folder))
    found = phash.find_duplicates(encoding_map=encodings, max_distance_threshold=PHASH_MAX_DISTANCE)
    seconds = time.perf_counter() - start
    hit, flagged = pair_hits(found, names, n_orig, source)
    bits = np.stack([np.unpackbits(np.frombuffer(bytes.fromhex(encodings[n]), np.uint8)) for n in names]).astype(bool)
    matched = matched_threshold(bits, "hamming", n_orig, source, kinds, target_flagged, np.arange(0, 33))
    return [dict(recall_by_kind(hit, kinds), tool="imagededup PHash", setting=f"Hamming <= {PHASH_MAX_DISTANCE} (default)",
                 flagged=flagged, seconds=seconds),
            dict(matched, tool="imagededup PHash", setting=f"Hamming <= {matched['threshold']:.0f} (flags ~ redex)",
                 seconds=seconds)]


def run_fastdup(folder: Path, names: list[str], n_orig: int, source: np.ndarray, kinds: np.ndarray,
                target_flagged: int) -> list[dict] | str:
    """fastdup (its own venv: it pins numpy 1.26, pillow 10.3, scikit-learn 1.5) on the folder, at its
    defaults (similarity >= 0.9, 2 nearest neighbours) and at redex's flagged count; or why not."""
    if not FASTDUP_PYTHON.exists():
        return f"{FASTDUP_PYTHON} not found (python3 -m venv /tmp/fastdupvenv && /tmp/fastdupvenv/bin/pip install fastdup)"
    with tempfile.TemporaryDirectory() as work:
        start = time.perf_counter()
        proc = subprocess.run([str(FASTDUP_PYTHON), "-c", FASTDUP_SCRIPT, str(folder), work], capture_output=True, check=False,
                              text=True, env={**os.environ, "SENTRY_OPT_OUT": "1", "PYTHONWARNINGS": "ignore"})
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            return f"fastdup failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}"
        out = json.loads(proc.stdout.strip().splitlines()[-1])
        features = np.load(Path(work) / "features.npy")
        pairs = [line.split(",") for line in (Path(work) / "similarity.csv").read_text().splitlines()[1:]]
    row = {n: i for i, n in enumerate(out["names"])}
    features = features[[row[n] for n in names]]
    found: dict[str, list[str]] = {}
    for a, b, _ in pairs:
        found.setdefault(Path(a).name, []).append(Path(b).name)
    hit, flagged = pair_hits(found, names, n_orig, source)
    matched = matched_threshold(features, "cosine", n_orig, source, kinds, target_flagged,
                                np.concatenate([np.linspace(0, 0.02, 81), np.linspace(0.0205, 0.2, 360)]))
    seconds = out["run_s"]
    return [dict(recall_by_kind(hit, kinds), tool="fastdup", setting="similarity >= 0.9, k = 2 (default)",
                 flagged=flagged, seconds=seconds, wall=wall),
            dict(matched, tool="fastdup", setting=f"similarity >= {1 - matched['threshold']:.4f} (flags ~ redex)",
                 seconds=seconds, wall=wall)]


def redex_on_files(folder: Path, names: list[str], labels: np.ndarray, model, n_orig: int, source: np.ndarray,
                   kinds: np.ndarray, settings=None) -> list[dict]:
    """redex's path after the backbone: decode the PNGs, embed, per-class trees, cut at 0.9; without
    the pairs by pixels (the paper's method), then with them (their search timed apart, `pairs_s`)."""
    from core.embed.backbones import embed_batches

    start = time.perf_counter()
    pixels = np.stack([np.array(Image.open(folder / name)) for name in names])[..., None]
    emb = np.concatenate([f for _, _, f in embed_batches(model, pixels, batch_size=512, device="cpu")])
    decode_embed_s = time.perf_counter() - start
    start = time.perf_counter()
    alone = copy_grouping(emb, labels, n_orig, source, kinds)
    trees_s = time.perf_counter() - start
    start = time.perf_counter()
    pairs = copy_pairs(pixels[..., 0], labels, settings)
    pairs_s = time.perf_counter() - start
    start = time.perf_counter()
    joined = copy_grouping(emb, labels, n_orig, source, kinds, pairs=pairs)
    joined_s = time.perf_counter() - start
    return [dict(alone, seconds=decode_embed_s + trees_s, pairs=None),
            dict(joined, seconds=decode_embed_s + pairs_s + joined_s, pairs_s=pairs_s,
                 pairs=int(sum(len(p) for p in pairs.values())), other=other_pairs(pairs, labels, n_orig, source))]


def bench_near_copies(args, report: list[str]) -> None:
    """Planted near copies of the Fashion-MNIST test split (held out from the backbone's training):
    redex at fraction 0.9 with each recipe of `--nc-recipes`, then fastdup and imagededup PHash."""
    from core.embed import backbones
    from core.training.recipe import backbone_recipe

    folder_fm = config.fashion_mnist_dir()
    x_train, y_train = idx.load_fashion_mnist(folder_fm, "train")
    x_held, y_held = idx.load_fashion_mnist(folder_fm, "test")
    n_train, n_held, per_kind = (3000, 2000, 20) if args.quick else (args.nc_train, len(x_held), args.nc_per_kind)
    x_train, y_train, x_held, y_held = x_train[:n_train], y_train[:n_train], x_held[:n_held], y_held[:n_held]
    copies, source, kinds = plant_copies(x_held, per_kind, seed=0)
    names = [f"o{i:05d}.png" for i in range(n_held)] + [f"c{j:04d}.png" for j in range(len(copies))]
    labels = np.concatenate([y_held, y_held[source]])
    report.append(f"near copies: {n_held:,} held-out test images + {len(copies)} planted copies ({per_kind} per kind: "
                  f"{', '.join(COPY_KINDS)}); backbones trained on {n_train:,} train images; cut at fraction "
                  f"{COPY_FRACTION}; load average {os.getloadavg()[0]:.1f}")
    header = (f"  {'tool':<34} {'setting':<40} {'shift':>6} {'crop':>6} {'jpeg':>6} {'photo':>6} {'all':>6} "
              f"{'flagged':>8} {'wall s':>7} {'ratio':>6}")
    rows, first = [], None
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for name, image in zip(names, np.concatenate([x_held, copies])):
            Image.fromarray(image).save(folder / name)
        from core.redundancy import copies

        settings = dataclasses.replace(copies.DEFAULT_SETTINGS, **{k: v for k, v in (
            ("threshold", args.nc_threshold), ("k", args.nc_k)) if v is not None})
        loads = [p for p in args.nc_load.split(",") if p]
        for r, overrides in enumerate(json.loads(args.nc_recipes)):
            overrides = dict(overrides)
            arch = overrides.pop("arch", backbones.parse_spec(backbones.DEFAULT_BACKBONE).name)
            recipe = dataclasses.replace(backbone_recipe(28, arch=arch), **overrides)
            start = time.perf_counter()
            if r < len(loads):
                import torch

                model = backbones.build_model(f"trained:{arch}", 10, 1, 28)
                model.load_state_dict(torch.load(loads[r], map_location="cpu"))
                model.eval()
                trained = f"weights from {loads[r]}"
            else:
                model, metrics = backbones.train_backbone(f"trained:{arch}", x_train[..., None], y_train, 10,
                                                          recipe=recipe, eval_images=x_held[..., None],
                                                          eval_labels=y_held, device="cpu")
                trained = (f"held-out top-1 {metrics['test_top1']:.2%}, trained in {time.perf_counter() - start:.0f} s"
                           f" (load {os.getloadavg()[0]:.1f})")
            alone, joined = redex_on_files(folder, names, labels, model, n_held, source, kinds, settings)
            first = first or alone
            label = f"redex trained:{arch}"
            setting = json.dumps(overrides) if overrides else "default recipe"
            rows.append(dict(alone, tool=label, setting=setting))
            rows.append(dict(joined, tool=label + " + pairs", setting=f"{setting}, k {settings.k}, t {settings.threshold:g}"))
            report.append(f"  {label} {setting}: {trained}; {joined['pairs']} pairs by pixels ({joined['other']} not a "
                          f"planted copy and its original) found in {joined['pairs_s']:.1f} s (load {os.getloadavg()[0]:.1f})")
            print(report[-1], flush=True)
        if not args.nc_no_tools:
            target = first["flagged"]
            try:
                rows += run_phash(folder, names, n_held, source, kinds, target)
            except ImportError:
                report.append("  imagededup not installed (pip install -e '.[bench]') -> skipped")
            theirs = run_fastdup(folder, names, n_held, source, kinds, target)
            if isinstance(theirs, str):
                report.append(f"  fastdup skipped: {theirs}")
            else:
                rows += theirs
    report.append(header)
    for r in rows:
        ratio = r["seconds"] / first["seconds"]
        report.append(f"  {r['tool']:<34} {r['setting'][:40]:<40} " + " ".join(f"{r[k]:6.0%}" for k in
                      (*COPY_KINDS, "all")) + f" {r['flagged']:8,} {r['seconds']:7.1f} {ratio:6.2f}")
    report.append("  (recall: copy in its original's group (redex) or listed as its duplicate (the tools); flagged: "
                  "images in a group of 2+ / with any duplicate; redex wall s = decode + embed + trees + cut, "
                  "backbone training apart; ratio = wall s / the first redex row's)")
    print("\n".join(report[-len(rows) - 2:]), flush=True)


def bench_copy_cost(label: int, against: str | None, report: list[str]) -> None:
    """Seconds of `copies.class_pairs` (default settings) on one Fashion-MNIST train class: the working
    tree's module, then `against`'s (a git revision, loaded from `git show`), then the working tree's again,
    with the load average around each; the ratio is against the mean of the two runs of the working tree's.
    Wall and CPU seconds: with one torch thread (OMP_NUM_THREADS=1) the CPU time moves less with the load."""
    import importlib.util

    import torch

    from core.redundancy import copies

    x, y = idx.load_fashion_mnist(config.fashion_mnist_dir(), "train")
    pixels = x[y == label]
    runs = [("working tree", copies)]
    if against:
        source = subprocess.run(["git", "show", f"{against}:core/redundancy/copies.py"], check=True, capture_output=True,
                                text=True, cwd=Path(__file__).resolve().parents[1]).stdout
        with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
            f.write(source)
        spec = importlib.util.spec_from_file_location("copies_at_rev", f.name)
        old = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = old  # dataclasses look their module up there
        spec.loader.exec_module(old)
        os.unlink(f.name)
        runs += [(against, old), ("working tree", copies)]
    report.append(f"near-copy search cost: train class {label} ({len(pixels):,} images), {torch.get_num_threads()} "
                  f"torch thread(s)")
    wall: dict[str, list[float]] = {}
    cpu: dict[str, list[float]] = {}
    for name, module in runs:
        load = os.getloadavg()[0]
        start, start_cpu = time.perf_counter(), time.process_time()
        pairs, _ = module.class_pairs(pixels)
        wall.setdefault(name, []).append(time.perf_counter() - start)
        cpu.setdefault(name, []).append(time.process_time() - start_cpu)
        report.append(f"  {name}: {wall[name][-1]:.1f} s wall, {cpu[name][-1]:.1f} s CPU, {len(pairs)} pairs, "
                      f"load {load:.1f} -> {os.getloadavg()[0]:.1f}")
        print(report[-1], flush=True)
    if against:
        report.append(f"  ratio {against} / working tree: {wall[against][0] / np.mean(wall['working tree']):.1f} (wall), "
                      f"{cpu[against][0] / np.mean(cpu['working tree']):.1f} (CPU)")


# -- (f) imagededup -------------------------------------------------------------------------------
IMAGEDEDUP_SCRIPT = """
import json, sys, time
start = time.perf_counter()
from imagededup.methods import PHash
imported = time.perf_counter()
found = PHash(verbose=False).find_duplicates(image_dir=sys.argv[1], max_distance_threshold=int(sys.argv[2]))
print(json.dumps({"import_s": imported - start, "run_s": time.perf_counter() - imported, "found": found}))
"""


def write_pngs(images: np.ndarray, folder: Path) -> list[str]:
    names = [f"{i:05d}.png" for i in range(len(images))]
    for name, img in zip(names, images):
        Image.fromarray(img).save(folder / name)
    return names


def ours_from_pngs(folder: Path, names: list[str]) -> dict[str, list[str]]:
    """Our near-duplicate groups from the PNGs: decode, raw-pixel embedding, one tree, cut at a threshold."""
    pixels = np.stack([np.array(Image.open(folder / name)) for name in names])
    emb = pixels.reshape(len(pixels), -1).astype(np.float32) / 255
    tree = redundancy_trees.build_class_tree(emb)
    labels = cuts.labels_for_threshold(tree, COMPARE_THRESHOLD)
    return {names[i]: [names[j] for j in np.flatnonzero(labels == labels[i]) if j != i] for i in range(len(names))}


def pair_recall(found: dict[str, list[str]], pairs: list[tuple[str, str]]) -> float:
    return float(np.mean([b in found.get(a, ()) or a in found.get(b, ()) for a, b in pairs]))


def flagged(found: dict[str, list[str]]) -> int:
    return sum(1 for dups in found.values() if dups)


def bench_compare(images: np.ndarray, quick: bool, report: list[str]) -> None:
    if not BENCH_PYTHON.exists():
        report.append(f"compare: {BENCH_PYTHON} not found -> skipped "
                      "(python3 -m venv /tmp/benchvenv && /tmp/benchvenv/bin/pip install imagededup)")
        print(report[-1], flush=True)
        return
    n_orig, n_copies = (1000, 200) if quick else (4000, 1000)
    sample = np.concatenate([images[:n_orig], near_copies(images[:n_copies], seed=3)])
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        names = write_pngs(sample, folder)
        pairs = [(names[i], names[n_orig + i]) for i in range(n_copies)]
        ours, ours_s, _ = timed(ours_from_pngs, folder, names)
        start = time.perf_counter()
        proc = subprocess.run([str(BENCH_PYTHON), "-c", IMAGEDEDUP_SCRIPT, str(folder), str(PHASH_MAX_DISTANCE)],
                              capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        wall = time.perf_counter() - start
    if proc.returncode != 0:
        report.append(f"compare: imagededup failed ({proc.stderr.strip().splitlines()[-1:]}) -> skipped")
        print(report[-1], flush=True)
        return
    theirs = json.loads(proc.stdout.strip().splitlines()[-1])
    report += [
        f"compare on {len(sample):,} PNGs ({n_orig:,} real + {n_copies:,} near copies), near-duplicate groups:",
        f"  ours (decode + raw pixels + one complete-linkage tree + cut at cosine {COMPARE_THRESHOLD}): "
        f"{ours_s:.1f} s, planted pairs found {pair_recall(ours, pairs):.1%}, images flagged {flagged(ours):,}",
        f"  imagededup PHash (max Hamming {PHASH_MAX_DISTANCE}): {theirs['run_s']:.1f} s "
        f"(+{theirs['import_s']:.1f} s import, {wall:.1f} s subprocess wall), planted pairs found "
        f"{pair_recall(theirs['found'], pairs):.1%}, images flagged {flagged(theirs['found']):,}",
        f"  -> ours / imagededup time: {ours_s / theirs['run_s']:.2f}",
    ]
    print("\n".join(report[-4:]), flush=True)


def main() -> None:
    args = parse_args()
    if args.nc_cost is not None:
        report = [f"machine: {os.cpu_count()} CPUs, load average at start {os.getloadavg()[0]:.1f}"]
        bench_copy_cost(args.nc_cost, args.nc_against, report)
        report.append(f"load average at end {os.getloadavg()[0]:.1f}")
        print("\n==== summary ====\n" + "\n".join(report))
        return
    if args.near_copies:
        report = [f"machine: {os.cpu_count()} CPUs, load average at start {os.getloadavg()[0]:.1f}"]
        bench_near_copies(args, report)
        report.append(f"load average at end {os.getloadavg()[0]:.1f}")
        print("\n==== summary ====\n" + "\n".join(report))
        return
    images, labels, n_train = load(args.quick)
    emb = embed(images)
    load_avg = os.getloadavg()[0]
    report = [f"machine: {os.cpu_count()} CPUs, load average at start {load_avg:.1f}"]
    trees = bench_builds(emb[:n_train], labels[:n_train], args.quick, report)
    bench_cuts(trees, args.quick, report)
    bench_large(images, n_train, args.quick, report)
    bench_agreement(images, labels, n_train, args.quick, report)
    bench_duplicates(images, labels, report)
    if args.compare:
        bench_compare(images, args.quick, report)
    report.append(f"load average at end {os.getloadavg()[0]:.1f}")
    print("\n==== summary ====\n" + "\n".join(report))


if __name__ == "__main__":
    main()
