"""Scale-out on Ray (core.scale) against the local path, on this machine: embedding throughput and merge trees.

A synthetic set (bench/synthetic.py: clustered 64-d embeddings, a pixel cache of `--thumb` px thumbnails,
no image files) is written once into `--cache` (a folder of its own; never an existing cache). Then each
configuration runs in a fresh process of its own, one after the other, on the same store:

- local: the path without Ray (`embed_dataset`, then `clusterings.cluster`) with `--local-threads` torch and
  BLAS threads (default 1, what Ray gives a 1-CPU worker: OMP_NUM_THREADS=1);
- ray-N: a local Ray cluster started by that process (`ray.init(num_cpus=N)`, stopped at its end) with N
  model workers (REDEX_RAY_WORKERS=N) for the embedding and N class-tree tasks at once.

Per configuration: embedding wall time and images/s (untrained default backbone, same seeded weights
everywhere: speed does not depend on training), the same from the first stored chunk on (steady state,
without the cluster's start and the workers' start), the merge trees' wall time, the driver's peak RSS
and each Ray worker's peak RSS (VmHWM of the raylet's worker processes). Ratios are against `local` of
the same run; the load average is printed beside each. The embeddings and trees of every configuration
are checked equal to the local ones.

    .venv/bin/python bench/scale.py                                   # 20 classes x 3,000, 28 px
    .venv/bin/python bench/scale.py --classes 1000 --per-class 1281 --thumb 16 --skip-embed --workers 2

`--copies`: the near-copy search by pixels (`clusterings.ensure_copy_pairs`) instead, from nothing, per
configuration: seconds per class (all of it, and from the first class finished on), the classes' own search
time, the driver's and the workers' peak RSS, pairs checked identical. `--stop-after K` cancels it after K
classes (what is kept, as in a cancelled job); `--resume` keeps what is stored (a resumed search).

    .venv/bin/python bench/scale.py --copies --classes 20 --per-class 1281 --thumb 16 --workers 2 --local-threads 2
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ROOT = Path(__file__).resolve().parents[1]


def _start_cluster(workers: int) -> float:
    """A local Ray cluster of `workers` CPUs in this process, its address in `REDEX_RAY_ADDRESS`; seconds it took."""
    import ray

    t = time.perf_counter()
    ray.init(num_cpus=workers, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    os.environ["REDEX_RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    return time.perf_counter() - t


def _load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def _vm(pid: int, field: str) -> float:
    """MB of a /proc/<pid>/status field (VmHWM: peak RSS); 0 when the process is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return float(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _worker_peaks() -> list[float]:
    """Peak RSS (MB) of the worker processes of this process's local Ray node (children of its raylet)."""
    import ray

    node = ray._private.worker._global_node  # the node ray.init started here
    raylet = node.all_processes["raylet"][0].process.pid
    peaks = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmd = (proc / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == raylet and cmd.startswith(b"ray::"):
            peaks.append(_vm(int(proc.name), "VmHWM"))
    return sorted(peaks, reverse=True)


def _peak(phases: dict) -> float:
    """This process's peak RSS so far (MB), also across a reset by `_watch_ray_trees`."""
    return max([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, *phases.values()])


def _watch_ray_trees() -> dict:
    """Split the trees stage's driver peak in two (this process only): up to the Ray part (reading the
    embeddings, the classes) and the Ray part (`core.scale.trees.build_trees`), by resetting the peak
    (VmHWM; /proc/self/clear_refs) when the Ray part starts. Filled in as the stage runs."""
    from core.scale import trees as ray_trees

    found: dict = {}
    build = ray_trees.build_trees

    def watched(*args, **kwargs):
        found["driver_peak_before_ray_mb"] = _vm(os.getpid(), "VmHWM")
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            return (yield from build(*args, **kwargs))
        yield from build(*args, **kwargs)
        found["driver_peak_ray_mb"] = _vm(os.getpid(), "VmHWM")

    ray_trees.build_trees = watched
    return found


# -- one configuration, in its own process ----------------------------------------------------------
def run_one(config_name: str, name: str, bid: str, workers: int, skip_embed: bool) -> dict:
    from core.redundancy import clusterings
    from core.redundancy.index import CutIndex
    from core.store.db import get_store

    store = get_store()
    out = {"config": config_name, "workers": workers, "threads": None, "load_before": _load()}
    if not skip_embed:  # trees only: no torch in this process, as in the cluster job (its peak is the job's)
        import torch

        if not workers and os.environ.get("OMP_NUM_THREADS"):
            torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
        out["threads"] = torch.get_num_threads()
    if workers:
        out["cluster_start_s"] = _start_cluster(workers)
        os.environ["REDEX_RAY_WORKERS"] = str(workers)
    key = f"bench-{config_name}"
    if not skip_embed:
        from core.data.catalog import get_dataset
        from core.embed import embeddings
        from core.embed.backbones import DEFAULT_BACKBONE, build_model

        ds = get_dataset(name, store)
        torch.manual_seed(0)
        model = build_model(DEFAULT_BACKBONE, len(ds["classes"]), ds["channels"], ds["image_size"])
        store.execute("DELETE FROM embeddings WHERE backbone_id = ?", [key])
        first = {}
        table = embeddings.EMBEDDINGS
        insert = table.insert

        def noting_insert(k, ids, vectors, s):  # the first chunk's arrival starts the steady state
            first.setdefault("t", time.perf_counter())
            first.setdefault("n", len(vectors))
            return insert(k, ids, vectors, s)

        object.__setattr__(table, "insert", noting_insert)  # this process only
        t = time.perf_counter()
        filled = embeddings.embed_dataset(name, model, key, store=store)
        end = time.perf_counter()
        object.__delattr__(table, "insert")
        out["embed"] = {"images": filled["embedded"], "seconds": end - t, "per_s": filled["embedded"] / (end - t),
                        "steady_per_s": ((filled["embedded"] - first["n"]) / (end - first["t"])
                                         if filled["embedded"] > first.get("n", 0) else None),
                        "first_chunk_s": first["t"] - t}
    store.execute("DELETE FROM trees WHERE dataset = ? AND backbone_id = ?", [name, bid])
    clusterings.review.find_label_conflicts = lambda *a, **k: None  # trees only (this process)
    phases = _watch_ray_trees() if workers else {}
    t = time.perf_counter()
    res = clusterings.cluster(name, bid, store=store)
    out["trees"] = {"seconds": time.perf_counter() - t, "built": res["built"], "images": res["images"],
                    "driver_peak_mb": _peak(phases), **phases}  # before the cut
    trees = store.query("SELECT label, merges FROM trees WHERE dataset = ? AND backbone_id = ? AND linkage ="
                        " 'complete' ORDER BY label", [name, bid])
    out["trees_digest"] = hashlib.blake2b(b"".join(bytes(m) for _, m in trees)).hexdigest()[:16]
    t = time.perf_counter()  # the cut, on the driver as the app's server does it
    c = clusterings.load_clustering(name, bid, store=store)
    loaded = time.perf_counter() - t
    index = clusterings.cut_index(c) if hasattr(clusterings, "cut_index") else CutIndex.build(c.classes)
    kept = int(index.cut(fraction=0.9).n_groups)
    out["cut"] = {"load_s": loaded, "cut_s": time.perf_counter() - t - loaded, "kept": kept,
                  "rss_mb": _vm(os.getpid(), "VmRSS")}
    out["driver_peak_mb"] = _peak(phases)
    if workers:
        out["worker_peaks_mb"] = _worker_peaks()
        import ray

        ray.shutdown()
    out["load_after"] = _load()
    return out


class _Stop(Exception):
    """The bench's `--stop-after`: the search is cancelled after that many classes (as a job's cancel)."""


class _BenchCtx:
    """What `ensure_copy_pairs` reports to a job, noted here: when each class finished; with `stop_after`, a
    cancel after that many classes (the classes finished are kept, as in a cancelled job)."""

    def __init__(self, stop_after: int | None = None):
        self.params, self.stop_after, self.times, self.ran = {}, stop_after, [], None
        self.messages: list[str] = []

    def phase(self, name: str, total: int | None = None) -> None:
        self.messages.append(name)

    def resume_from(self, done: int) -> None:
        pass

    def log(self, message: str, level: str = "info") -> None:
        self.messages.append(message)

    def ran_on(self, where: dict | None) -> None:
        self.ran = where

    def check_cancelled(self) -> None:
        if self.stop_after is not None and len(self.times) >= self.stop_after:
            raise _Stop()

    def progress(self, done: int, total: int | None = None, message: str | None = None, force: bool = False) -> None:
        self.times.append(time.perf_counter())
        self.check_cancelled()


def run_copies(config_name: str, name: str, workers: int, stop_after: int | None, resume: bool) -> dict:
    """The near-copy search (`clusterings.ensure_copy_pairs`) of every train class from nothing (or, with
    `resume`, from what is stored), here or on a local Ray cluster of `workers` CPUs: wall time, seconds per
    class (all of it, and from the first class finished on), the classes' own search seconds, driver peak RSS."""
    from core.redundancy import clusterings
    from core.store.db import get_store

    store = get_store()
    out = {"config": config_name, "workers": workers, "threads": None, "load_before": _load()}
    if not workers:
        import torch  # the local path imports it to search; the Ray driver never does

        if os.environ.get("OMP_NUM_THREADS"):
            torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
        out["threads"] = torch.get_num_threads()
    if workers:
        out["cluster_start_s"] = _start_cluster(workers)
    if not resume:
        with store.write() as con:
            for table in ("copy_state", "copy_pairs", "copy_classes"):
                con.execute(f"DELETE FROM {table} WHERE dataset = ?", [name])
    before, before_s = store.query("SELECT count(*), coalesce(sum(seconds), 0) FROM copy_classes WHERE dataset = ?",
                                   [name])[0]
    ctx = _BenchCtx(stop_after)
    t = time.perf_counter()
    try:
        clusterings.ensure_copy_pairs(name, True, store=store, ctx=ctx)
        out["finished"] = True
    except _Stop:
        out["finished"] = False
    seconds = time.perf_counter() - t
    n = len(ctx.times)
    stored, task_s = store.query("SELECT count(*), sum(seconds) FROM copy_classes WHERE dataset = ?", [name])[0]
    pairs = store.query("SELECT row_a, row_b, distance FROM copy_pairs WHERE dataset = ? ORDER BY row_a, row_b",
                        [name])
    out["copies"] = {"seconds": seconds, "classes": n, "stored_before": before, "stored_after": stored,
                     "per_class_s": seconds / max(n, 1),
                     "steady_per_class_s": (ctx.times[-1] - ctx.times[0]) / (n - 1) if n > 1 else None,
                     "first_class_s": ctx.times[0] - t if n else None,
                     "class_search_s": (task_s or 0.0) - before_s, "pairs": len(pairs),
                     "pairs_digest": hashlib.blake2b(np.array([p[:2] for p in pairs], np.int64).tobytes(),
                                                     digest_size=8).hexdigest(),
                     "distances": [float(p[2]) for p in pairs],
                     "driver_peak_mb": _vm(os.getpid(), "VmHWM"), "resumed": [m for m in ctx.messages
                                                                              if m.startswith("resuming")]}
    if workers:
        out["worker_peaks_mb"] = _worker_peaks()
        import ray

        ray.shutdown()
    out["load_after"] = _load()
    return out


def report_copies(r: dict, base: dict) -> None:
    c, b = r["copies"], base["copies"]
    parts = [f"{r['config']:>8}:"]
    if r["threads"]:
        parts.append(f"{r['threads']} torch thread(s);")
    if r.get("cluster_start_s") is not None:
        parts.append(f"cluster start {r['cluster_start_s']:.1f} s;")
    if c["stored_before"]:
        parts.append(f"{c['stored_before']} classes stored before ({'; '.join(c['resumed'])});")
    parts.append(f"near-copy search of {c['classes']} classes in {c['seconds']:.1f} s = {c['per_class_s']:.2f} s a"
                 f" class ({b['per_class_s'] / c['per_class_s']:.2f}x local speed)")
    if c["steady_per_class_s"]:
        parts.append(f"({c['steady_per_class_s']:.2f} s a class after the first, which came after"
                     f" {c['first_class_s']:.1f} s);")
    parts.append(f"classes' own search {c['class_search_s']:.1f} s in all; {c['pairs']:,} pairs"
                 f" ({c['pairs_digest']}){'' if r['finished'] else ', stopped: not committed'};"
                 f" driver peak {c['driver_peak_mb']:,.0f} MB;")
    if r.get("worker_peaks_mb"):
        parts.append(f"worker peaks {', '.join(f'{m:,.0f}' for m in r['worker_peaks_mb'])} MB;")
    parts.append(f"load {r['load_before']} -> {r['load_after']}")
    print(" ".join(parts), flush=True)


def insert_rate(folder: str, chunks: int = 60, chunk: int = 4096, dim: int = 64) -> dict:
    """The driver's store writes alone: `chunks` commits of `chunk` vectors of `dim` floats into a fresh
    store in `folder` (`VectorTable.insert`, one write transaction each, as the jobs commit them)."""
    from core.store.db import Store
    from core.store.vectors import VectorTable

    store = Store(Path(folder) / "insert-rate.duckdb")
    table = VectorTable("embeddings", key="backbone_id", column="vec")
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((chunk, dim)).astype(np.float32)
    times = []
    for c in range(chunks):
        ids = [f"{c:06d}-{i:05d}" for i in range(chunk)]
        t = time.perf_counter()
        table.insert("rate", ids, vectors, store)
        times.append(time.perf_counter() - t)
    first, last = np.median(times[:10]), np.median(times[-10:])
    return {"rows": chunks * chunk, "dim": dim, "per_s_first": chunk / first, "per_s_last": chunk / last,
            "per_s_all": chunks * chunk / sum(times), "load": _load()}


# -- the whole benchmark -----------------------------------------------------------------------------
def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cache", default="/tmp/redex-bench-scale", help="its own REDEX_CACHE (created; reused)")
    p.add_argument("--classes", type=int, default=20)
    p.add_argument("--per-class", type=int, default=3000)
    p.add_argument("--thumb", type=int, default=28, help="pixel size of the synthetic thumbnails")
    p.add_argument("--workers", default="1,2", help="Ray configurations to run (comma-separated worker counts)")
    p.add_argument("--skip-embed", action="store_true", help="trees only")
    p.add_argument("--local-threads", type=int, default=1, help="torch/BLAS threads of the local path")
    p.add_argument("--insert-rate", action="store_true", help="only the store's vector-insert rate")
    p.add_argument("--name", help="the synthetic dataset's name (default from its size, e.g. synthetic-40k-28px)")
    p.add_argument("--skip-local", action="store_true", help="Ray configurations only (no ratios)")
    p.add_argument("--copies", action="store_true", help="the near-copy search instead of embedding and trees")
    p.add_argument("--stop-after", type=int, help="with --copies: cancel the search after this many classes")
    p.add_argument("--resume", action="store_true", help="with --copies: keep what is stored (default: from nothing)")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one configuration (JSON on stdout)
    args = p.parse_args()
    os.environ["REDEX_CACHE"] = args.cache
    from bench import synthetic

    spec = synthetic.SyntheticSpec(classes=args.classes, per_class=args.per_class, thumb=args.thumb)
    name = args.name or synthetic.default_name(spec) + f"-{args.thumb}px"
    bid = synthetic.backbone_id(name, spec)
    if args.insert_rate:
        Path(args.cache).mkdir(parents=True, exist_ok=True)
        r = insert_rate(args.cache)
        print(f"store inserts: {r['rows']:,} vectors of {r['dim']} floats in chunks of 4,096: {r['per_s_all']:,.0f}/s"
              f" (first chunks {r['per_s_first']:,.0f}/s, last {r['per_s_last']:,.0f}/s); load {r['load']}")
        return 0
    if args.one:
        workers = 0 if args.one == "local" else int(args.one.split("-")[1])
        if args.copies:
            result = run_copies(args.one, name, workers, args.stop_after, args.resume)
        else:
            result = run_one(args.one, name, bid, workers, args.skip_embed)
        print("RESULT " + json.dumps(result), flush=True)
        return 0

    from core.store.db import get_store

    if not get_store().query("SELECT count(*) FROM datasets WHERE name = ?", [name])[0][0]:
        print(f"generating {name} ({spec.images:,} images) into {args.cache} ...", flush=True)
        synthetic.generate(spec, name, log=lambda *_: None)
    print(f"{name}: {spec.classes * spec.per_class:,} train images of {spec.images:,}; {os.cpu_count()} CPUs;"
          f" load {_load()}", flush=True)
    configs = ([] if args.skip_local else ["local"]) + [f"ray-{w}" for w in args.workers.split(",") if w]
    results = []
    for config_name in configs:
        cmd = [sys.executable, __file__, "--cache", args.cache, "--classes", str(args.classes), "--per-class",
               str(args.per_class), "--thumb", str(args.thumb), "--name", name, "--one", config_name]
        if args.skip_embed:
            cmd.append("--skip-embed")
        if args.copies:
            cmd += ["--copies", *(["--resume"] if args.resume else []),
                    *(["--stop-after", str(args.stop_after)] if args.stop_after else [])]
        env = dict(os.environ)
        if config_name == "local":
            threads = str(args.local_threads)
            env.update(OMP_NUM_THREADS=threads, OPENBLAS_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
        done = subprocess.run(cmd, check=False, capture_output=True, text=True, cwd=ROOT, env=env)
        line = next((ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            print(f"{config_name}: failed\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
            return 1
        results.append(json.loads(line[7:]))
        (report_copies if args.copies else report)(results[-1], results[0])
    if args.copies:
        check_copies(results)
    else:
        check_equal(name, configs, results, args.skip_embed)
    out = Path(args.cache) / f"{name}{'.copies' if args.copies else ''}.scale.json"
    out.write_text(json.dumps(results, indent=1))
    print(f"results: {out}")
    return 0


def report(r: dict, base: dict) -> None:
    parts = [f"{r['config']:>8}:"]
    if not r["workers"] and r["threads"]:
        parts.append(f"{r['threads']} torch/BLAS thread(s);")
    if r.get("cluster_start_s") is not None:
        parts.append(f"cluster start {r['cluster_start_s']:.1f} s;")
    if "embed" in r:
        e, b = r["embed"], base["embed"]  # base: the first configuration (local unless --skip-local)
        steady = (f"steady {e['steady_per_s']:,.0f} img/s ({e['steady_per_s'] / b['steady_per_s']:.2f}x)"
                  if e["steady_per_s"] and b["steady_per_s"] else "steady n/a (one chunk)")
        parts.append(f"embed {e['images']:,} in {e['seconds']:.1f} s = {e['per_s']:,.0f} img/s"
                     f" ({e['per_s'] / b['per_s']:.2f}x local), {steady}, first chunk after"
                     f" {e['first_chunk_s']:.1f} s;")
    t, b = r["trees"], base["trees"]
    parts.append(f"trees {t['built']} classes in {t['seconds']:.1f} s ({b['seconds'] / t['seconds']:.2f}x local"
                 " speed);")
    if r.get("cut"):
        parts.append(f"load_clustering {r['cut']['load_s']:.1f} s + cut at 0.9 {r['cut']['cut_s']:.1f} s"
                     f" (kept {r['cut']['kept']:,});")
    if t.get("driver_peak_ray_mb"):
        parts.append(f"driver peak while reading the embeddings {t['driver_peak_before_ray_mb']:,.0f} MB, while the"
                     f" trees ran on Ray {t['driver_peak_ray_mb']:,.0f} MB;")
    parts.append(f"driver peak {t.get('driver_peak_mb', 0):,.0f} MB after the trees, {r['driver_peak_mb']:,.0f} MB"
                 " after the cut;")
    if r.get("worker_peaks_mb"):
        parts.append(f"worker peaks {', '.join(f'{m:,.0f}' for m in r['worker_peaks_mb'])} MB;")
    parts.append(f"load {r['load_before']} -> {r['load_after']}")
    print(" ".join(parts), flush=True)


def check_copies(results: list[dict]) -> None:
    finished = [r for r in results if r["finished"]]
    if len(finished) < 2:
        return
    same = len({r["copies"]["pairs_digest"] for r in finished}) == 1
    diff = max((float(np.abs(np.subtract(r["copies"]["distances"], finished[0]["copies"]["distances"])).max(initial=0))
                for r in finished[1:] if same), default=0.0)
    print(f"near-copy pairs identical in every configuration: {same}"
          + (f" (distances: max |diff| {diff:.1e})" if same else ""))


def check_equal(name: str, configs: list[str], results: list[dict], skip_embed: bool) -> None:
    from core.embed.embeddings import load_embeddings

    same_trees = len({r["trees_digest"] for r in results}) == 1
    print(f"trees identical in every configuration: {same_trees}")
    if skip_embed:
        return
    _, base = load_embeddings(name, "bench-local")
    for c in configs[1:]:
        _, other = load_embeddings(name, f"bench-{c}")
        print(f"embeddings {c} vs local: max |diff| {np.abs(other - base).max():.2e} over {other.shape}")


if __name__ == "__main__":
    sys.exit(main())
