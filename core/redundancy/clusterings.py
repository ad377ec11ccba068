"""Redundant groups of a dataset: cached merge trees per class, subsets, duplicates and exports.

The computation is `core.redundancy.trees` and `.cuts` (Birodkar et al. 2019); this module ties it to the store.
What is clustered is the train split (the set a subset is taken from); other splits stay whole.
A tree is cached per (dataset, backbone, linkage, class) with a fingerprint of its members'
content ids, so new embeddings (another backbone, changed files) invalidate exactly the classes
they touch, and a cluster job killed half-way resumes at the first class without a valid tree.

Near copies (ours, beside the paper's method): with `near_copies` on (the default, stored per
dataset in `copy_state`), the cluster job first finds near-copy pairs inside each class of the train
split from the pixel cache (`core.redundancy.copies`), once per (class's images, pixels, settings), stored
class by class as each class finishes (a killed search resumes; with a Ray address each class is a Ray
task), and each class's tree joins its pairs before its own merges. The class's pairs are part of its tree's
fingerprint, so new pairs rebuild exactly the classes whose pairs changed; off, the trees are the
paper's and their fingerprints what they were before pairs existed.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from core.embed.embeddings import list_backbones, load_embeddings
from core.jobs import JobContext, task
from core.redundancy import copies, cuts, review, trees
from core.redundancy.index import CutIndex
from core.store.db import Store, get_store, to_json

SUBSET_SPLIT = "train"
SAVE_EVERY_S = 3.0  # built trees are committed together at most this often: each write opens the store
NEAR_COPIES_DEFAULT = True  # join near copies by pixels in the trees (`copies`); off: the paper's method


@dataclass(frozen=True)
class Clustering:
    """A dataset's train images with their embeddings and one cached tree per class.

    table: the train images (row, path, image_id, label, split), position i = embedding row i.
    emb: float32 [N, D]. classes: label -> (tree, emb [n_c, D], positions int64 [n_c] into table).
    index: the `CutIndex` over the classes when it came ready-made (from a snapshot); see `cut_index`.
    """
    dataset: str
    backbone_id: str
    linkage: str
    table: pd.DataFrame
    emb: np.ndarray
    classes: dict
    index: CutIndex | None = field(default=None, repr=False, compare=False)


def cut_index(c: Clustering) -> CutIndex:
    """The cut index over `c`'s classes: the snapshot's (memory-mapped), else built (0.5 s at 1.28M)."""
    return c.index if c.index is not None else CutIndex.build(c.classes)


def default_backbone(name: str, store: Store | None = None) -> str:
    backs = list_backbones(name, store)
    backs = backs[backs.embedded > 0]
    if backs.empty:
        raise ValueError(f"no embeddings for {name!r} yet: run `redex embed {name}` first")
    return str(backs.backbone_id.iloc[0])


def _train_embeddings(name: str, bid: str, store: Store) -> tuple[pd.DataFrame, np.ndarray]:
    table, emb = load_embeddings(name, bid, store)
    keep = (table.split == SUBSET_SPLIT).to_numpy()
    if not keep.any():
        raise ValueError(f"{name!r} has no embedded {SUBSET_SPLIT} images to cluster")
    return table[keep].reset_index(drop=True), emb[keep]


def _fingerprint(image_ids, pairs: np.ndarray | None = None) -> str:
    """Of a class's members' content ids, and of its joined near-copy pairs when it has any."""
    fp = hashlib.blake2b("\n".join(image_ids).encode(), digest_size=12).hexdigest()
    return fp if pairs is None or not len(pairs) else f"{fp}+{copies.pairs_fingerprint(pairs)}"


# -- near copies by pixels -------------------------------------------------------------------------
def near_copies_enabled(name: str, store: Store | None = None) -> bool:
    """The dataset's setting (`copy_state.enabled`); `NEAR_COPIES_DEFAULT` before any cluster job."""
    store = store or get_store()
    row = store.query("SELECT enabled FROM copy_state WHERE dataset = ?", [name])
    return bool(row[0][0]) if row else NEAR_COPIES_DEFAULT


def _copies_fingerprint(classes: dict[str, tuple[np.ndarray, str]]) -> str:
    """Of the whole search, from its classes' fingerprints (`_copy_classes`): matches `copy_state.fingerprint`
    when the stored pairs are current (one cheap check)."""
    return hashlib.blake2b("\n".join(f"{label}:{cfp}" for label, (_, cfp) in classes.items()).encode(),
                           digest_size=12).hexdigest()


def _copy_classes(name: str, store: Store, settings: copies.CopySettings) -> dict[str, tuple[np.ndarray, str]]:
    """label -> (the class's pixel-cache rows int64 ascending, the fingerprint of its search: those rows,
    their pixel hashes, the pixel cache and the settings), labels sorted. A class's search depends on
    nothing else, so a stored result with this fingerprint is the result."""
    from core.data import catalog

    ds = catalog.get_dataset(name, store)
    frame = store.query_df("SELECT row, pixel_hash, label FROM images WHERE dataset = ? AND split = ? ORDER BY row",
                           [name, SUBSET_SPLIT])
    head = f"{ds['pixels']}|{ds['image_size']}|{ds['channels']}|{settings.key()}"
    rows, hashes = frame.row.to_numpy(np.int64), frame.pixel_hash.to_numpy()
    out = {}
    for label, pos in _members_by_class(frame).items():
        h = hashlib.blake2b(f"{head}|{label}\n".encode(), digest_size=12)
        h.update(np.ascontiguousarray(rows[pos]).tobytes())
        h.update("\n".join(hashes[pos]).encode())
        out[label] = (rows[pos], h.hexdigest())
    return out


def ensure_copy_pairs(name: str, enabled: bool | None = None, *, store: Store | None = None,
                      ctx: JobContext | None = None,
                      settings: copies.CopySettings = copies.DEFAULT_SETTINGS) -> np.ndarray:
    """Near-copy pairs of the train split as pixel-cache rows int64 [m, 2] (empty when off), found
    here only when the stored ones are missing or stale (other images, pixels or settings); `enabled`
    None keeps the dataset's setting, else it becomes the setting.

    The search is per class, and each class's result is stored as it finishes (`copy_classes`, under a
    fingerprint of that class's rows, pixels and the settings): a killed or cancelled search resumes at
    the classes with no current result, and a changed class is searched again alone. The pairs the trees
    join (`copy_pairs`, `copy_state`) change only when every class has a current result, in one
    transaction. With a Ray address (`core.scale.ray_address`) each class is a Ray task."""
    from core.data import catalog

    store = store or get_store()
    enabled = near_copies_enabled(name, store) if enabled is None else bool(enabled)
    row = store.query("SELECT enabled, fingerprint FROM copy_state WHERE dataset = ?", [name])
    if not enabled:
        if not row or row[0][0]:
            with store.write() as con:  # the per-class results stay: turning it on again reuses them
                con.execute("INSERT OR REPLACE INTO copy_state (dataset, enabled, fingerprint, settings, pairs)"
                            " VALUES (?, false, NULL, NULL, 0)", [name])
                con.execute("DELETE FROM copy_pairs WHERE dataset = ?", [name])
        return np.zeros((0, 2), np.int64)
    classes = _copy_classes(name, store, settings)
    fp = _copies_fingerprint(classes)
    if row and row[0][0] and row[0][1] == fp:
        return stored_copy_pairs(name, store)
    try:
        pixels = catalog.load_pixels(name, store)
    except catalog.DatasetError as e:  # no pixel cache (yet): the trees of the embeddings alone
        with store.write() as con:
            con.execute("DELETE FROM copy_pairs WHERE dataset = ?", [name])
        if ctx:
            ctx.log(f"near copies by pixels skipped: {e}")
        return np.zeros((0, 2), np.int64)
    stored = dict(store.query("SELECT label, fingerprint FROM copy_classes WHERE dataset = ?", [name]))
    todo = [label for label, (_, cfp) in classes.items() if stored.get(label) != cfp]
    total = sum(len(r) for r, _ in classes.values())
    done = total - sum(len(classes[label][0]) for label in todo)
    if ctx:
        ctx.phase(f"near copies by pixels in {len(classes)} classes ({total:,} images)", total=total)
        if len(todo) < len(classes):
            ctx.resume_from(done)
            ctx.log(f"resuming: {len(classes) - len(todo)} of {len(classes)} classes already searched")
    start, pending, saved_at = time.perf_counter(), [], time.monotonic()
    try:  # closing: a cancel ends the search's generator (and its Ray tasks) at once
        with contextlib.closing(_search_classes(todo, classes, pixels, settings, ctx)) as found:
            for label, pairs, dist, seconds in found:
                rows = classes[label][0]
                pending.append((label, classes[label][1], rows[pairs], dist, seconds))
                done += len(rows)
                if time.monotonic() - saved_at >= SAVE_EVERY_S:
                    _save_copy_classes(store, name, pending)
                    pending, saved_at = [], time.monotonic()
                if ctx:
                    ctx.progress(done, total, f"class {label}: {len(pairs):,} pairs")  # raises on a cancel
    finally:  # what finished is kept, also when the job is cancelled or fails
        _save_copy_classes(store, name, pending)
    frame, seconds = _commit_copy_pairs(store, name, fp, settings, list(classes))
    if ctx:
        ctx.log(f"near copies by pixels: {len(frame):,} pairs; {len(todo)} classes searched in"
                f" {time.perf_counter() - start:.0f} s ({seconds:.0f} s of search in all classes)")
    return frame[["row_a", "row_b"]].to_numpy(np.int64)


def _search_classes(todo: list[str], classes: dict[str, tuple[np.ndarray, str]], pixels: np.ndarray,
                    settings: copies.CopySettings, ctx: JobContext | None):
    """(label, pairs as positions int64 [m, 2] into the class's rows, distances float32 [m], seconds) of
    each class of `todo`: here one after the other, or, when the job has a Ray address, as one Ray task
    per class (`core.scale.copies`), yielded as they finish. Nothing to search joins no cluster."""
    from core.scale import ray_address

    if not todo:
        return
    address = ray_address(ctx.params if ctx else None)
    if address is None:
        for label in todo:
            start = time.perf_counter()
            pairs, dist = copies.class_pairs(pixels[classes[label][0]], settings)
            yield label, pairs, dist, time.perf_counter() - start
        return
    from core.scale.copies import search_classes
    from core.scale.trees import ClassRows

    # ClassRows: each class's pixels are read out of the memory-mapped cache only when its task is submitted
    for i, (pairs, dist, seconds) in search_classes(address, ClassRows(pixels, [classes[lb][0] for lb in todo]),
                                                    settings, ctx):
        yield todo[i], pairs, dist, seconds


def _save_copy_classes(store: Store, name: str, pending: list[tuple[str, str, np.ndarray, np.ndarray, float]]) -> None:
    """Store (label, fingerprint, pairs as rows [m, 2], distances [m], seconds) of several classes in one
    write transaction."""
    if not pending:
        return
    with store.write() as con:
        for label, cfp, rows, dist, seconds in pending:
            con.execute("INSERT OR REPLACE INTO copy_classes (dataset, label, fingerprint, pairs, rows, distances,"
                        " seconds, computed_at) VALUES (?, ?, ?, ?, ?, ?, ?, current_timestamp)",
                        [name, label, cfp, len(rows), np.ascontiguousarray(rows, np.int32).tobytes(),
                         np.ascontiguousarray(dist, np.float32).tobytes(), float(seconds)])


def _commit_copy_pairs(store: Store, name: str, fp: str, settings: copies.CopySettings,
                       labels: list[str]) -> tuple[pd.DataFrame, float]:
    """Every class has a current result: make them the pairs the trees join (`copy_pairs`, `copy_state`), and
    drop the results of classes that no longer exist, in one transaction. Returns the pairs (row_a, row_b,
    distance, ordered) and the seconds the search took in all (the classes' sum)."""
    with store.write() as con:
        con.execute("DELETE FROM copy_classes WHERE dataset = ? AND NOT list_contains(?, label)", [name, labels])
        found = con.execute("SELECT rows, distances, seconds FROM copy_classes WHERE dataset = ? ORDER BY label",
                            [name]).fetchall()
        rows = np.concatenate([np.frombuffer(r, np.int32).reshape(-1, 2) for r, _, _ in found] or
                              [np.zeros((0, 2), np.int32)])
        dist = np.concatenate([np.frombuffer(d, np.float32) for _, d, _ in found] or [np.zeros(0, np.float32)])
        frame = pd.DataFrame({"row_a": rows[:, 0], "row_b": rows[:, 1], "distance": dist})
        frame = frame.sort_values(["row_a", "row_b"], kind="stable", ignore_index=True)
        seconds = float(sum(s or 0.0 for _, _, s in found))
        con.execute("DELETE FROM copy_pairs WHERE dataset = ?", [name])
        con.register("found_pairs", frame)
        con.execute("INSERT INTO copy_pairs SELECT ?, row_a, row_b, distance FROM found_pairs", [name])
        con.unregister("found_pairs")
        con.execute("INSERT OR REPLACE INTO copy_state (dataset, enabled, fingerprint, settings, pairs, seconds,"
                    " computed_at) VALUES (?, true, ?, ?, ?, ?, current_timestamp)",
                    [name, fp, to_json(settings.to_dict()), len(frame), seconds])
    return frame, seconds


def copy_state(name: str, store: Store | None = None) -> dict:
    """The dataset's near-copy setting and its last search: enabled, pairs, seconds (None before one)."""
    store = store or get_store()
    row = store.query("SELECT enabled, pairs, seconds FROM copy_state WHERE dataset = ?", [name])
    if not row:
        return {"enabled": NEAR_COPIES_DEFAULT, "pairs": None, "seconds": None}
    return {"enabled": bool(row[0][0]), "pairs": row[0][1], "seconds": row[0][2]}


def copy_pairs_pending(name: str, enabled: bool | None = None, store: Store | None = None,
                       settings: copies.CopySettings = copies.DEFAULT_SETTINGS) -> bool:
    """Whether `ensure_copy_pairs(name, enabled)` would search (the setting is on and the stored pairs are
    missing or stale), rather than return what is stored."""
    store = store or get_store()
    if not (near_copies_enabled(name, store) if enabled is None else bool(enabled)):
        return False
    row = store.query("SELECT enabled, fingerprint FROM copy_state WHERE dataset = ?", [name])
    return not (row and row[0][0] and row[0][1] == _copies_fingerprint(_copy_classes(name, store, settings)))


def stored_copy_pairs(name: str, store: Store | None = None) -> np.ndarray:
    """The stored pairs (pixel-cache rows int64 [m, 2]) when the dataset's setting is on, else none."""
    store = store or get_store()
    if not near_copies_enabled(name, store):
        return np.zeros((0, 2), np.int64)
    rows = store.query("SELECT row_a, row_b FROM copy_pairs WHERE dataset = ? ORDER BY row_a, row_b", [name])
    return np.array(rows, np.int64).reshape(-1, 2)


def _class_pairs(table: pd.DataFrame, by_class: dict[str, np.ndarray], pairs: np.ndarray) -> dict[str, np.ndarray]:
    """label -> pairs as positions inside the class (int64 [m, 2]), for pairs whose two rows are both
    among `table`'s (the embedded train images) and in the same class."""
    out = {label: np.zeros((0, 2), np.int64) for label in by_class}
    if not len(pairs):
        return out
    position = pd.Series(np.arange(len(table)), index=table.row.to_numpy())
    a = position.reindex(pairs[:, 0]).to_numpy()
    b = position.reindex(pairs[:, 1]).to_numpy()
    ok = ~(np.isnan(a) | np.isnan(b))
    a, b = a[ok].astype(np.int64), b[ok].astype(np.int64)
    labels = list(by_class)
    klass, local = np.empty(len(table), np.int64), np.empty(len(table), np.int64)
    for c, pos in enumerate(by_class.values()):
        klass[pos], local[pos] = c, np.arange(len(pos))
    same = klass[a] == klass[b]
    a, b = a[same], b[same]
    ab = np.sort(np.stack([local[a], local[b]], 1), axis=1)
    order = np.argsort(klass[a], kind="stable")
    bounds = np.searchsorted(klass[a][order], np.arange(len(labels) + 1))
    for c, label in enumerate(labels):
        if bounds[c + 1] > bounds[c]:
            out[label] = np.unique(ab[order[bounds[c]:bounds[c + 1]]], axis=0)
    return out


def _members_by_class(table: pd.DataFrame) -> dict[str, np.ndarray]:
    """label -> ascending positions in `table`, labels sorted. One sort, not a scan per class (1,000
    classes x 1.28M images: 0.4 s instead of ~150 s)."""
    codes, labels = pd.factorize(table.label, sort=True)
    order = np.argsort(codes, kind="stable")
    return dict(zip(labels, np.split(order, np.cumsum(np.bincount(codes, minlength=len(labels)))[:-1])))


def cluster(name: str, bid: str | None = None, linkage: str = "complete", *, store: Store | None = None,
            ctx: JobContext | None = None, near_copies: bool | None = None, search: bool = True) -> dict:
    """Build (or reuse) the merge tree of every class. Returns counts of built and reused trees.

    `near_copies`: join near copies by pixels first (ours; `ensure_copy_pairs`); None keeps the
    dataset's setting (default on), True/False sets it. `search` False: join the pairs stored now
    instead of searching for missing or stale ones (the cluster job's first pass: trees in seconds,
    the search after them; `_cluster_task`)."""
    store = store or get_store()
    bid = bid or default_backbone(name, store)
    if linkage not in trees.LINKAGES:
        raise ValueError(f"linkage must be one of {trees.LINKAGES}")
    if search or near_copies is False:
        pairs = ensure_copy_pairs(name, near_copies, store=store, ctx=ctx)
    else:
        pairs = stored_copy_pairs(name, store)
    table, emb = _train_embeddings(name, bid, store)
    by_class = _members_by_class(table)
    class_pairs = _class_pairs(table, by_class, pairs)
    valid = _valid_fingerprints(store, name, bid, linkage)
    total = sum(len(m) for m in by_class.values())
    if ctx:
        ctx.phase(f"{linkage}-linkage trees of {len(by_class)} classes ({total:,} images)", total=total)
    built = reused = done = 0
    ids, paths = table.image_id.to_numpy(), table.path.to_numpy()  # once: each call copies all N strings
    pending, saved_at = [], time.monotonic()
    for i, (label, pos, fp, tree) in enumerate(_class_trees(by_class, valid, ids, emb, linkage, ctx, class_pairs)):
        if tree is None:
            reused += 1
        else:
            pending.append((label, fp, paths[pos], tree))
            built += 1
        done += len(pos)
        if ctx:
            ctx.check_cancelled()
        if i == len(by_class) - 1 or time.monotonic() - saved_at >= SAVE_EVERY_S:
            _save_trees(store, name, bid, linkage, pending)
            pending, saved_at = [], time.monotonic()
            if ctx:
                ctx.progress(done, total, f"class {label}: {len(pos):,} images", force=True)
    with store.write() as con:  # classes that no longer exist
        con.execute("DELETE FROM trees WHERE dataset = ? AND backbone_id = ? AND linkage = ?"
                    " AND NOT list_contains(?, label)", [name, bid, linkage, list(by_class)])
    del table, emb, ids, paths  # the review loads the embeddings again: one copy at a time
    review.find_label_conflicts(name, bid, store=store, ctx=ctx)  # what the page lists beside the groups
    return {"backbone_id": bid, "linkage": linkage, "built": built, "reused": reused, "images": total}


def _class_trees(by_class: dict[str, np.ndarray], valid: dict[str, str], ids: np.ndarray, emb: np.ndarray,
                 linkage: str, ctx: JobContext | None, class_pairs: dict[str, np.ndarray] | None = None):
    """(label, positions, fingerprint, tree) of every class, tree None where the stored one is still
    valid. The others are built here one after the other, or, when the job has a Ray address
    (`core.scale.ray_address`), as one Ray task per class, yielded as they finish."""
    from core.scale import ray_address

    class_pairs = class_pairs or {}
    todo = []
    for label, pos in by_class.items():
        fp = _fingerprint(ids[pos], class_pairs.get(label))
        if valid.get(label) == fp:
            yield label, pos, fp, None
        else:
            todo.append((label, pos, fp))
    address = ray_address(ctx.params if ctx else None)
    if not todo:  # every tree is current: nothing to build, no cluster to join
        return
    if address is None:
        for label, pos, fp in todo:
            yield label, pos, fp, trees.build_class_tree(emb[pos], linkage, pairs=class_pairs.get(label))
        return
    from core.scale.trees import ClassRows, build_trees

    # ClassRows: each class is copied out of `emb` only when its task is submitted (bounded in flight)
    for i, tree in build_trees(address, ClassRows(emb, [pos for _, pos, _ in todo]), linkage, ctx,
                               class_pairs=[class_pairs.get(label) for label, _, _ in todo]):
        yield *todo[i], tree


def _valid_fingerprints(store: Store, name: str, bid: str, linkage: str) -> dict[str, str]:
    return dict(store.query("SELECT label, fingerprint FROM trees WHERE dataset = ? AND backbone_id = ?"
                            " AND linkage = ?", [name, bid, linkage]))


def _save_trees(store, name, bid, linkage, pending: list[tuple[str, str, np.ndarray, trees.ClassTree]]) -> None:
    """Store (label, fingerprint, member paths, tree) of several classes in one write transaction."""
    if not pending:
        return
    with store.write() as con:
        for label, fp, paths, tree in pending:
            arrays, meta = tree.to_arrays()
            con.execute("INSERT OR REPLACE INTO trees (dataset, backbone_id, linkage, label, fingerprint, members,"
                        " merges, meta) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                        [name, bid, linkage, label, fp, list(paths),
                         np.ascontiguousarray(arrays["linkage"], np.float64).tobytes(), to_json(meta)])


@task("cluster")
def _cluster_task(ctx: JobContext) -> dict:
    """Two passes when the near-copy search is due: the trees with the pairs stored now (none at first)
    and their snapshot, so the pages can show groups within seconds; then the search (minutes: 38 s a
    6,000-image class on 2 cores) and the trees of the classes whose pairs changed, and a new snapshot."""
    p = ctx.params
    name, linkage, near = ctx.dataset, p.get("linkage", "complete"), p.get("near_copies")
    passes = [False, True] if copy_pairs_pending(name, near, ctx.store) else [True]
    done = []
    for search in passes:
        done.append(cluster(name, p.get("backbone_id"), linkage, store=ctx.store, ctx=ctx, near_copies=near,
                            search=search))
        ctx.phase("snapshot for the pages")
        open_clustering(name, done[-1]["backbone_id"], linkage, store=ctx.store)  # writes it
    return {**done[-1], "built": sum(d["built"] for d in done), "reused": done[0]["reused"],
            "near_copies": {"pairs": int(len(stored_copy_pairs(name, ctx.store))),
                            "on": near_copies_enabled(name, ctx.store)}}


def open_clustering(name: str, bid: str, linkage: str = "complete", version: str | None = None,
                    store: Store | None = None) -> Clustering:
    """`load_clustering` through the snapshot of this `state_version`: memory-mapped when there is one,
    else read from the store and the snapshot written for the next time (`core.redundancy.snapshot`)."""
    from core.redundancy import snapshot

    store = store or get_store()
    version = version or state_version(name, bid, linkage, store)
    c = snapshot.load(name, bid, linkage, version)
    if c is None:
        c = load_clustering(name, bid, linkage, store)
        try:
            snapshot.save(c, version)
        except OSError:
            pass  # a full or read-only disk: the pages then load from the store each time
    return c


def tree_status(name: str, bid: str, linkage: str = "complete", store: Store | None = None) -> dict:
    """How many classes have an up-to-date tree: {'classes', 'ready', 'stale'}."""
    store = store or get_store()
    table, _ = _train_embeddings(name, bid, store)
    by_class = _members_by_class(table)
    class_pairs = _class_pairs(table, by_class, stored_copy_pairs(name, store))
    valid = _valid_fingerprints(store, name, bid, linkage)
    ids = table.image_id.to_numpy()  # once: pandas 3 strings are Arrow-backed, each to_numpy() copies all N
    ready = sum(valid.get(c) == _fingerprint(ids[pos], class_pairs[c]) for c, pos in by_class.items())
    return {"classes": len(by_class), "ready": ready, "stale": len(by_class) - ready}


def load_clustering(name: str, bid: str | None = None, linkage: str = "complete",
                    store: Store | None = None) -> Clustering:
    """Everything a cut needs, read once. Raises if a class has no up-to-date tree."""
    store = store or get_store()
    bid = bid or default_backbone(name, store)
    table, emb = _train_embeddings(name, bid, store)
    rows = {r[0]: r[1:] for r in store.query(
        "SELECT label, fingerprint, merges, meta FROM trees WHERE dataset = ? AND backbone_id = ? AND linkage = ?",
        [name, bid, linkage])}
    classes = {}
    ids = table.image_id.to_numpy()  # once: pandas 3 strings are Arrow-backed, each to_numpy() copies all N
    by_class = _members_by_class(table)
    class_pairs = _class_pairs(table, by_class, stored_copy_pairs(name, store))
    for label, pos in by_class.items():
        row = rows.get(label)
        if row is None or row[0] != _fingerprint(ids[pos], class_pairs[label]):
            raise ValueError(f"the {linkage}-linkage tree of class {label!r} is missing or out of date:"
                             f" run `redex cluster {name} --linkage {linkage}`")
        merges = np.frombuffer(row[1], np.float64).reshape(-1, 4)
        tree = trees.ClassTree.from_arrays({"linkage": merges}, json.loads(row[2]))
        classes[label] = (tree, _rows_of(emb, pos), pos)
    return Clustering(name, bid, linkage, table, emb, classes)


def _rows_of(emb: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """emb[pos] for ascending positions: a view when they are one run (classes stored one after the
    other, as a folder scan stores them), else a copy."""
    if len(pos) and pos[-1] - pos[0] == len(pos) - 1:
        return emb[pos[0]:pos[-1] + 1]
    return emb[pos]


# -- subsets -----------------------------------------------------------------------------------
def subset(c: Clustering, *, fraction: float | None = None, threshold: float | None = None,
           representative: str = "nearest_mean", seed: int = 0) -> cuts.Subset:
    return cuts.select_subset(c.classes, fraction=fraction, threshold=threshold,
                                    representative=representative, seed=seed)


def subset_frame(c: Clustering, s: cuts.Subset) -> pd.DataFrame:
    """One row per train image: path, label, split, group (global id), kept, group_size."""
    sizes = np.bincount(s.group[s.group >= 0])
    return pd.DataFrame({"path": c.table.path, "label": c.table.label, "split": c.table.split,
                         "group": s.group, "kept": s.kept, "group_size": sizes[s.group],
                         "row": c.table.row})


def per_class_table(s: cuts.Subset) -> pd.DataFrame:
    df = pd.DataFrame(s.per_class).drop(columns="first_group")
    return df[["label", "images", "groups", "kept", "removed", "kept_fraction"]]


def groups_by_size(frame: pd.DataFrame, label: str | None = None, min_size: int = 2) -> pd.DataFrame:
    """Groups (id, label, size, kept row) with at least `min_size` members, largest first."""
    df = frame if label is None else frame[frame.label == label]
    groups = df.groupby("group").agg(label=("label", "first"), size=("path", "size"))
    groups = groups[groups["size"] >= min_size].sort_values(["size"], ascending=False, kind="stable")
    return groups.reset_index()


def trees_version(name: str, bid: str, linkage: str, store: Store | None = None) -> str:
    """Changes whenever a tree of (dataset, backbone, linkage) is written: a cache key for the pages."""
    store = store or get_store()
    count, newest = store.query("SELECT count(*), max(created_at) FROM trees WHERE dataset = ? AND backbone_id = ?"
                                " AND linkage = ?", [name, bid, linkage])[0]
    return f"{count}:{newest}"


def state_version(name: str, bid: str, linkage: str, store: Store | None = None) -> str:
    """Changes whenever anything a cut of (dataset, backbone, linkage) depends on changes: the scan,
    the embeddings, the trees, the label-conflict search. One cheap query: pages key caches on it."""
    store = store or get_store()
    row = store.query(
        "SELECT (SELECT scanned_at FROM datasets WHERE name = $n),"
        " (SELECT count(*) FROM embeddings WHERE backbone_id = $b),"
        " (SELECT count(*) || ':' || max(created_at) FROM trees WHERE dataset = $n AND backbone_id = $b"
        "  AND linkage = $l),"
        " (SELECT max(computed_at) FROM review_state WHERE dataset = $n AND backbone_id = $b),"
        " (SELECT enabled || ':' || computed_at FROM copy_state WHERE dataset = $n)",
        {"n": name, "b": bid, "l": linkage})[0]
    return "|".join(str(v) for v in row)
