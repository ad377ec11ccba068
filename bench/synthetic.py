"""A SYNTHETIC benchmark dataset: ImageNet-shaped (1,000 classes x 1,281 train images) with no image files.

Nothing here is real data. The generator writes straight into the store (REDEX_CACHE, default
./cache) what a scan and an embedding job would have written for such a dataset:

- a `datasets` row of kind 'synthetic' (source and root: 'synthetic (bench/synthetic.py)');
- one `images` row per image: path 'synthetic/<class>/<i>.png' (never on disk), random hex
  content ids and pixel hashes (shared only by the planted exact duplicates), split 'train' for
  `per_class` images and 'test' for `test_per_class` more per class;
- a pixel cache of small thumbnails (default 16x16x1 uint8, 256 bytes an image) drawn from each
  image's embedding through a fixed smooth projection, so similar embeddings look similar;
- a `backbones` row 'synthetic:clustered<D>@<name>' and one D-dim embedding per content id.

Embeddings are clustered: per class a direction, `centres` sub-centres around it (uneven sizes) and
Gaussian noise around those. Planted on the train split and recorded in
`<cache>/<name>.planted.json` (pixel-cache rows), so a benchmark can check that they group:
near copies (`near_frac`: a tiny perturbation of another train image of the same class), exact
duplicates (`dup_frac`: same content id, pixel hash, thumbnail and embedding as another image of the
same class) and cross-class near copies (`conflict_frac`: a tiny perturbation of an image of the
previous class, i.e. a likely label error).

Everything is generated and written in chunks of whole classes of at most `chunk` images (one
write transaction each, Arrow bulk inserts; pixels appended to the .npy file), so the writer's
memory does not grow with the dataset. Each class draws from its own seeded generator.

Steps (`--steps`, default all): `generate`; `cluster` (the real background job,
`core.jobs.launch('cluster', ...)`, its wall time, CPU time and peak RSS from wait4);
`load` (`load_clustering` in a fresh process, as the app's server does, then a cut at fraction 0.9,
its frame and `review.duplicates`: wall time, RSS, what holds the memory, planted pairs grouped).

    REDEX_CACHE=/tmp/synth .venv/bin/python bench/synthetic.py --classes 1000 --per-class 1281
    REDEX_CACHE=/tmp/synth-small .venv/bin/python bench/synthetic.py --classes 20 --per-class 500
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core import config  # noqa: E402
from core.store.db import Store, get_store, to_json  # noqa: E402

KIND = "synthetic"
SOURCE = "synthetic (bench/synthetic.py)"
CENTRE_SPREAD = 0.8   # sub-centre = class direction + 0.8 x a random unit vector
IMAGE_NOISE = 0.5     # image = sub-centre + noise of norm ~0.5 (cosine distance to the centre ~0.1)
COPY_NOISE = 0.01     # a planted near copy = original + noise of norm ~0.01 (distance ~5e-5)
LOW_FREQ = 4          # thumbnails are mixes of 2-D cosines with frequencies 0..LOW_FREQ-1


@dataclass(frozen=True)
class SyntheticSpec:
    """What to generate. Counts are per class; planted fractions are of the train images."""
    classes: int = 1000
    per_class: int = 1281
    test_per_class: int = 50
    dim: int = 64
    thumb: int = 16
    channels: int = 1
    centres: int = 8
    near_frac: float = 0.03
    dup_frac: float = 0.002
    conflict_frac: float = 0.0005
    seed: int = 0
    chunk: int = 100_000

    @property
    def images(self) -> int:
        return self.classes * (self.per_class + self.test_per_class)


def default_name(spec: SyntheticSpec) -> str:
    """'synthetic-1.28m' for 1,000 x 1,281 train images, 'synthetic-10k' for 20 x 500."""
    n = spec.classes * spec.per_class
    size = f"{n / 1e6:.3g}m" if n >= 1e6 else f"{n / 1e3:.3g}k" if n >= 1e3 else str(n)
    return f"synthetic-{size}"


def backbone_id(name: str, spec: SyntheticSpec) -> str:
    return f"{backbone_spec(spec)}@{name}"


def backbone_spec(spec: SyntheticSpec) -> str:
    return f"synthetic:clustered{spec.dim}"


def planted_path(name: str) -> Path:
    """The JSON beside the store that lists the planted pairs of dataset `name`."""
    return config.cache_dir() / f"{name}.planted.json"


def load_planted(name: str) -> dict:
    """{'near_copies', 'exact_duplicates', 'label_conflicts'}: lists of [original row, copy row]."""
    return json.loads(planted_path(name).read_text())


# -- one class -------------------------------------------------------------------------------------
def _spread(frac: float, n: int, c: int) -> int:
    """How many of class c's n train images to plant so that the total over classes is ~frac x all."""
    return math.floor((c + 1) * frac * n) - math.floor(c * frac * n)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@dataclass
class ClassBlock:
    """One class: embeddings float32 [m, D], ids [m] (hex str), pixel hashes [m], planted pairs in
    class-local indices (conflicts: (row in the previous class's block, local index))."""
    emb: np.ndarray
    ids: np.ndarray
    hashes: np.ndarray
    near: list
    dups: list
    conflicts: list


def class_block(spec: SyntheticSpec, c: int, prev: ClassBlock | None) -> ClassBlock:
    """Class c's embeddings (train first, then test), ids and planted pairs, from its own seed."""
    rng = np.random.default_rng([spec.seed, c])
    d, n, m = spec.dim, spec.per_class, spec.per_class + spec.test_per_class
    direction = _unit(rng.normal(size=d))
    centres = direction + CENTRE_SPREAD * _unit(rng.normal(size=(spec.centres, d)))
    which = rng.choice(spec.centres, size=m, p=rng.dirichlet(np.full(spec.centres, 2.0)))
    emb = centres[which] + IMAGE_NOISE * rng.normal(size=(m, d)) / math.sqrt(d)
    ids = _hex_ids(rng, m)
    hashes = _hex_ids(rng, m)
    n_near, n_dup = _spread(spec.near_frac, n, c), _spread(spec.dup_frac, n, c)
    n_conf = _spread(spec.conflict_frac, n, c) if prev is not None else 0
    copies = rng.choice(n, size=min(n, n_near + n_dup + n_conf), replace=False)
    originals = np.setdiff1d(np.arange(n), copies)
    originals = rng.choice(originals, size=len(copies), replace=len(originals) < len(copies))
    near = list(zip(originals[:n_near].tolist(), copies[:n_near].tolist()))
    dups = list(zip(originals[n_near:n_near + n_dup].tolist(), copies[n_near:n_near + n_dup].tolist()))
    noise = COPY_NOISE * rng.normal(size=(len(copies), d)) / math.sqrt(d)
    for k, (o, x) in enumerate(near):
        emb[x] = emb[o] + noise[k]
    for o, x in dups:
        emb[x], ids[x], hashes[x] = emb[o], ids[o], hashes[o]
    conflicts = []
    for k, x in enumerate(copies[n_near + n_dup:].tolist()):
        o = int(rng.integers(spec.per_class))
        emb[x] = prev.emb[o] + noise[n_near + n_dup + k]
        conflicts.append((o, x))
    return ClassBlock(emb.astype(np.float32), ids, hashes, near, dups, conflicts)


def _hex_ids(rng: np.random.Generator, m: int) -> np.ndarray:
    raw = rng.bytes(16 * m).hex()
    return np.array([raw[i:i + 32] for i in range(0, 32 * m, 32)], dtype=object)


def thumbnail_projection(spec: SyntheticSpec) -> np.ndarray:
    """float32 [D, S*S*C]: a random mix of low-frequency 2-D cosines per embedding dimension."""
    rng = np.random.default_rng([spec.seed, 1 << 30])
    s, ch = spec.thumb, spec.channels
    grid = (np.arange(s) + 0.5) / s
    waves = [np.outer(np.cos(np.pi * fy * grid), np.cos(np.pi * fx * grid))
             for fy in range(LOW_FREQ) for fx in range(LOW_FREQ)]
    basis = np.stack([w[:, :, None] * rng.normal(size=ch) for w in waves]).reshape(len(waves), -1)
    proj = rng.normal(size=(spec.dim, len(waves))) @ basis
    return (proj / np.linalg.norm(proj, axis=0, keepdims=True) * math.sqrt(spec.dim)).astype(np.float32)


def thumbnails(emb: np.ndarray, proj: np.ndarray, spec: SyntheticSpec) -> np.ndarray:
    """uint8 [m, S, S, C] from embeddings [m, D]: close embeddings give close pixels."""
    x = _unit(emb) @ proj
    pix = np.rint(127.5 + 127.5 * np.tanh(x / 1.5))
    return pix.astype(np.uint8).reshape(len(emb), spec.thumb, spec.thumb, spec.channels)


# -- writing ---------------------------------------------------------------------------------------
def generate(spec: SyntheticSpec, name: str | None = None, *, store: Store | None = None,
             log=print) -> dict:
    """Write the synthetic dataset `name` into the store (replacing an older synthetic one of that name).

    Returns {'name', 'backbone_id', 'images', 'train', 'test', 'planted', 'pixels', 'seconds', ...}.
    """
    store = store or get_store()
    name = name or default_name(spec)
    bid = backbone_id(name, spec)
    t0 = time.perf_counter()
    _drop(store, name, bid)
    labels = [f"class{c:04d}" for c in range(spec.classes)]
    mode = {1: "L", 3: "RGB"}[spec.channels]
    shape = (spec.images, spec.thumb, spec.thumb, spec.channels)
    pix_path = config.artifacts_dir("pixels") / f"{name}-{spec.thumb}x{spec.channels}-synthetic.npy"
    with store.write() as con:
        con.execute("INSERT INTO datasets (name, kind, source, root, options, image_size, channels, classes)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?)", [name, KIND, SOURCE, SOURCE, to_json(dataclasses.asdict(spec)),
                                                         spec.thumb, spec.channels, labels])
        con.execute("INSERT INTO backbones (backbone_id, dataset, spec, checkpoint, dim, metrics)"
                    " VALUES (?, ?, ?, NULL, ?, '{}')", [bid, name, backbone_spec(spec), spec.dim])
    proj = thumbnail_projection(spec)
    planted = {"near_copies": [], "exact_duplicates": [], "label_conflicts": []}
    per = spec.per_class + spec.test_per_class
    classes_per_chunk = max(1, spec.chunk // per)
    times = {"compute": 0.0, "pixels": 0.0, "store": 0.0}
    prev, prev_base = None, 0
    with open(pix_path.with_suffix(".tmp.npy"), "wb") as pix_file:
        np.lib.format.write_array_header_1_0(
            pix_file, {"descr": "|u1", "fortran_order": False, "shape": shape})
        for lo in range(0, spec.classes, classes_per_chunk):
            t = time.perf_counter()
            blocks = []
            for c in range(lo, min(lo + classes_per_chunk, spec.classes)):
                block = class_block(spec, c, prev)
                base = c * per
                planted["near_copies"] += [[base + o, base + x] for o, x in block.near]
                planted["exact_duplicates"] += [[base + o, base + x] for o, x in block.dups]
                planted["label_conflicts"] += [[prev_base + o, base + x] for o, x in block.conflicts]
                blocks.append(block)
                prev, prev_base = block, base
            emb = np.concatenate([b.emb for b in blocks])
            ids = np.concatenate([b.ids for b in blocks])
            images = _images_chunk(spec, name, lo, len(blocks), ids, np.concatenate([b.hashes for b in blocks]), mode)
            pix = thumbnails(emb, proj, spec)
            times["compute"] += time.perf_counter() - t
            t = time.perf_counter()
            pix_file.write(pix.tobytes())
            times["pixels"] += time.perf_counter() - t
            t = time.perf_counter()
            _insert_chunk(store, bid, images, ids, emb)
            times["store"] += time.perf_counter() - t
            done = lo + len(blocks)
            log(f"  classes {done:,}/{spec.classes:,} ({done * per:,} images)  {_elapsed(t0)}  rss {_rss_mb():,.0f} MB")
    os.replace(pix_path.with_suffix(".tmp.npy"), pix_path)
    with store.write() as con:
        con.execute("UPDATE datasets SET pixels = ?, scanned_at = now() WHERE name = ?", [str(pix_path), name])
    planted_path(name).write_text(json.dumps(planted))
    return {"name": name, "backbone_id": bid, "images": spec.images, "train": spec.classes * spec.per_class,
            "test": spec.classes * spec.test_per_class, "planted": {k: len(v) for k, v in planted.items()},
            "pixels": str(pix_path), "pixel_bytes": pix_path.stat().st_size,
            "seconds": time.perf_counter() - t0, "seconds_by_part": times}


def _images_chunk(spec: SyntheticSpec, name: str, first_class: int, n_classes: int, ids, hashes, mode: str):
    """Arrow table of the `images` rows of classes first_class.. (n_classes of them)."""
    import pyarrow as pa

    per = spec.per_class + spec.test_per_class
    labels = [f"class{c:04d}" for c in range(first_class, first_class + n_classes) for _ in range(per)]
    path = [f"synthetic/{label}/{i % per:05d}.png" for i, label in enumerate(labels)]
    split = np.where(np.tile(np.arange(per), n_classes) < spec.per_class, "train", "test")
    m = len(labels)
    return pa.table({
        "dataset": pa.array([name] * m, pa.string()),
        "row": pa.array(first_class * per + np.arange(m), pa.int32()),
        "path": pa.array(path, pa.string()),
        "image_id": pa.array(list(ids), pa.string()),
        "pixel_hash": pa.array(list(hashes), pa.string()),
        "label": pa.array(labels, pa.string()),
        "split": pa.array(split.tolist(), pa.string()),
        "width": pa.array(np.full(m, spec.thumb, np.int32)),
        "height": pa.array(np.full(m, spec.thumb, np.int32)),
        "mode": pa.array([mode] * m, pa.string()),
    })


def _insert_chunk(store: Store, bid: str, images, ids: np.ndarray, emb: np.ndarray) -> None:
    """One write transaction: the chunk's images, and one embedding per content id (the planted exact
    duplicates of a chunk's classes are in the same chunk; random 128-bit ids never collide)."""
    import pyarrow as pa

    _, first = np.unique(ids, return_index=True)  # exact duplicates share their original's vector
    first.sort()
    vec = pa.FixedSizeListArray.from_arrays(pa.array(emb[first].ravel()), emb.shape[1])
    vectors = pa.table({"image_id": pa.array(list(ids[first]), pa.string()), "vec": vec})
    with store.write() as con:
        con.register("new_images", images)
        con.execute("INSERT INTO images (dataset, row, path, image_id, pixel_hash, label, split, width, height, mode)"
                    " SELECT * FROM new_images")
        con.register("new_vectors", vectors)
        con.execute("INSERT INTO embeddings (backbone_id, image_id, vec) SELECT ?, image_id, vec::FLOAT[]"
                    " FROM new_vectors", [bid])
        con.unregister("new_images")
        con.unregister("new_vectors")


def _drop(store: Store, name: str, bid: str) -> None:
    """Remove an older synthetic dataset of this name and everything derived from it; refuse a real one."""
    old = store.query("SELECT kind, pixels FROM datasets WHERE name = ?", [name])
    if not old:
        return
    if old[0][0] != KIND:
        raise SystemExit(f"a non-synthetic dataset named {name!r} exists: choose another --name")
    with store.write() as con:
        for table in ("images", "problems", "trees", "projections"):
            con.execute(f"DELETE FROM {table} WHERE dataset = ?", [name])
        con.execute("DELETE FROM embeddings WHERE backbone_id = ?", [bid])
        con.execute("DELETE FROM backbones WHERE backbone_id = ? OR dataset = ?", [bid, name])
        con.execute("DELETE FROM datasets WHERE name = ?", [name])
    if old[0][1]:
        Path(old[0][1]).unlink(missing_ok=True)


# -- measuring -------------------------------------------------------------------------------------
def _rss_mb() -> float:
    return _proc_status("VmRSS") / 1024


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _proc_status(field: str, pid: str = "self") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return float(line.split()[1])  # kB
    return 0.0


def _load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def _elapsed(t0: float) -> str:
    return f"{time.perf_counter() - t0:,.1f} s"


def step_generate(spec: SyntheticSpec, name: str) -> dict:
    store = get_store()
    load_before = _load()
    out = generate(spec, name, store=store, log=print)
    out.update(db_bytes=store.path.stat().st_size, peak_rss_mb=_peak_mb(), load_before=load_before,
               load_after=_load())
    parts = ", ".join(f"{k} {v:.1f} s" for k, v in out["seconds_by_part"].items())
    print(f"generate: {out['images']:,} images ({out['train']:,} train) in {out['seconds']:.1f} s ({parts});"
          f" peak RSS {out['peak_rss_mb']:,.0f} MB; load {load_before} -> {out['load_after']}")
    print(f"  planted {out['planted']}; DuckDB file {out['db_bytes'] / 2**20:,.0f} MiB"
          f" ({store.path}); pixel cache {out['pixel_bytes'] / 2**20:,.0f} MiB ({out['pixels']})")
    return out


def step_cluster(name: str, bid: str, linkage: str = "complete") -> dict:
    """The real cluster job; its peak RSS and CPU time from wait4 (it is this process's child)."""
    from core import jobs

    store = get_store()
    load_before = _load()
    t0 = time.perf_counter()
    job_id = jobs.launch("cluster", name, {"backbone_id": bid, "linkage": linkage}, store)
    pid = store.query("SELECT pid FROM jobs WHERE id = ?", [job_id])[0][0]
    last = 0.0
    while True:
        done_pid, _, usage = os.wait4(pid, os.WNOHANG)
        if done_pid:
            break
        if time.perf_counter() - last > 30:
            last = time.perf_counter()
            job = store.query("SELECT status, done, total, message FROM jobs WHERE id = ?", [job_id])[0]
            print(f"  job {job_id}: {job[0]} {job[1]:,}/{job[2] or 0:,} {job[3]}  {_elapsed(t0)}"
                  f"  job RSS {_proc_status('VmRSS', str(pid)) / 1024:,.0f} MB  load {_load()}", flush=True)
        time.sleep(0.5)
    seconds = time.perf_counter() - t0
    job = jobs.get_job(job_id, store)
    out = {"job": job_id, "status": job["status"], "error": job["error"], "result": job["result"],
           "seconds": seconds, "cpu_seconds": usage.ru_utime + usage.ru_stime,
           "peak_rss_mb": usage.ru_maxrss / 1024, "load_before": load_before, "load_after": _load(),
           "db_bytes": store.path.stat().st_size}
    print(f"cluster (job {job_id}, {linkage}): {job['status']} {job['result'] or job['error']} in {seconds:.1f} s"
          f" wall, {out['cpu_seconds']:.1f} s CPU; peak RSS {out['peak_rss_mb']:,.0f} MB;"
          f" load {load_before} -> {out['load_after']}; DuckDB file now {out['db_bytes'] / 2**20:,.0f} MiB")
    return out


def step_load(name: str, bid: str) -> dict:
    """`measure_load` in a fresh process (what the app's server holds); prints and returns its figures."""
    proc = subprocess.run([sys.executable, __file__, "--name", name, "--backbone-id", bid, "--measure-load"],
                          capture_output=True, text=True, env=os.environ)
    if proc.returncode:
        raise SystemExit(f"load step failed:\n{proc.stderr}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"load_clustering (fresh process): {out['load_s']:.1f} s, RSS {out['rss_after_load_mb']:,.0f} MB"
          f" (after imports {out['rss_imports_mb']:,.0f} MB), peak {out['peak_after_load_mb']:,.0f} MB;"
          f" load {out['load_before']} -> {out['load_after']}")
    print(f"  held: {out['held_mb']}")
    print(f"  cut at 0.9 + frame: {out['cut_s'] * 1000:,.0f} ms; kept {out['kept']:,} of {out['train']:,};"
          f" near copies grouped with their original {out['near_grouped']:.1%}, exact duplicates"
          f" {out['dups_grouped']:.1%}; RSS {out['rss_after_cut_mb']:,.0f} MB, peak {out['peak_after_cut_mb']:,.0f} MB")
    print(f"  review.duplicates(): {out['duplicates_s']:.1f} s, {out['duplicate_groups']:,} groups"
          f" ({out['planted_found']:.0%} of the planted exact duplicates);"
          f" peak {out['peak_after_duplicates_mb']:,.0f} MB")
    return out


def measure_load(name: str, bid: str) -> dict:
    """In this (fresh) process: load_clustering, a cut at fraction 0.9 and its frame, duplicates."""
    from core.redundancy import clusterings, review

    out = {"rss_imports_mb": _rss_mb(), "load_before": _load()}
    t = time.perf_counter()
    c = clusterings.load_clustering(name, bid)
    out.update(load_s=time.perf_counter() - t, rss_after_load_mb=_rss_mb(), peak_after_load_mb=_peak_mb(),
               load_after=_load(), held_mb=held_memory(c))
    t = time.perf_counter()
    s = clusterings.subset(c, fraction=0.9)
    frame = clusterings.subset_frame(c, s)
    out.update(cut_s=time.perf_counter() - t, kept=int(frame.kept.sum()), train=len(frame),
               rss_after_cut_mb=_rss_mb(), peak_after_cut_mb=_peak_mb())
    planted = load_planted(name)
    out["near_grouped"] = grouped_share(frame, planted["near_copies"])
    out["dups_grouped"] = grouped_share(frame, planted["exact_duplicates"])
    del frame, s, c
    t = time.perf_counter()
    dups = review.duplicates(name)
    out.update(duplicates_s=time.perf_counter() - t,
               duplicate_groups=len(dups[["kind", "group"]].drop_duplicates()),
               planted_found=found_share(dups, planted["exact_duplicates"]), peak_after_duplicates_mb=_peak_mb())
    return out


def held_memory(c) -> dict:
    """MB held by a Clustering's parts: the image table, the embeddings, per-class copies, the trees."""
    mb = 2 ** 20
    per_class = sum((0 if np.shares_memory(e, c.emb) else e.nbytes) + p.nbytes for _, e, p in c.classes.values())
    tree_arrays = sum(t.linkage.nbytes + t.order.nbytes + t.gap_merge.nbytes for t, _, _ in c.classes.values())
    return {"table": round(c.table.memory_usage(deep=True).sum() / mb), "emb": round(c.emb.nbytes / mb),
            "class_emb_and_positions": round(per_class / mb), "trees": round(tree_arrays / mb)}


def grouped_share(frame, pairs: list) -> float:
    """Share of planted (original row, copy row) pairs whose two images share a group in `frame`."""
    if not pairs:
        return float("nan")
    group = dict(zip(frame.row.to_numpy().tolist(), frame.group.to_numpy().tolist()))
    return float(np.mean([group[a] == group[b] for a, b in pairs]))


def found_share(dups, pairs: list) -> float:
    """Share of planted exact-duplicate pairs listed in one group of `duplicates()`."""
    if not pairs:
        return float("nan")
    key = {(k, r): g for k, g, r in zip(dups.kind, dups.group, dups.row)}
    by_row: dict[int, set] = {}
    for (k, r), g in key.items():
        by_row.setdefault(r, set()).add((k, g))
    return float(np.mean([bool(by_row.get(a, set()) & by_row.get(b, set())) for a, b in pairs]))


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    d = SyntheticSpec()
    p.add_argument("--classes", type=int, default=d.classes)
    p.add_argument("--per-class", type=int, default=d.per_class, help="train images per class")
    p.add_argument("--test-per-class", type=int, default=d.test_per_class)
    p.add_argument("--name", help="dataset name (default: synthetic-<train size>, e.g. synthetic-1.28m)")
    p.add_argument("--dim", type=int, default=d.dim)
    p.add_argument("--thumb", type=int, default=d.thumb, help="thumbnail side in pixels")
    p.add_argument("--channels", type=int, choices=(1, 3), default=d.channels)
    p.add_argument("--centres", type=int, default=d.centres, help="sub-centres per class")
    p.add_argument("--near-frac", type=float, default=d.near_frac)
    p.add_argument("--dup-frac", type=float, default=d.dup_frac)
    p.add_argument("--conflict-frac", type=float, default=d.conflict_frac)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--chunk", type=int, default=d.chunk, help="images per write transaction")
    p.add_argument("--steps", default="generate,cluster,load", help="comma-separated: generate, cluster, load")
    p.add_argument("--backbone-id", help=argparse.SUPPRESS)
    p.add_argument("--measure-load", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args()


def main() -> None:
    args = parse_args()
    spec = SyntheticSpec(args.classes, args.per_class, args.test_per_class, args.dim, args.thumb, args.channels,
                         args.centres, args.near_frac, args.dup_frac, args.conflict_frac, args.seed, args.chunk)
    name = args.name or default_name(spec)
    bid = args.backbone_id or backbone_id(name, spec)
    if args.measure_load:
        print(json.dumps(measure_load(name, bid)))
        return
    steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    unknown = set(steps) - {"generate", "cluster", "load"}
    if unknown:
        raise SystemExit(f"unknown steps {sorted(unknown)}: use generate, cluster, load")
    print(f"store {config.db_path()}; dataset {name!r}; {spec.images:,} images; {os.cpu_count()} CPUs;"
          f" load {_load()}", flush=True)
    results = {"spec": dataclasses.asdict(spec), "name": name}
    if "generate" in steps:
        results["generate"] = step_generate(spec, name)
    if "cluster" in steps:
        results["cluster"] = step_cluster(name, bid)
    if "load" in steps:
        results["load"] = step_load(name, bid)
    out = config.cache_dir() / f"{name}.bench.json"  # figures of earlier steps are kept
    old = json.loads(out.read_text()) if out.exists() and "generate" not in steps else {}
    out.write_text(json.dumps({**old, **results}, indent=1, default=str))
    print(f"figures: {out}")


if __name__ == "__main__":
    main()
