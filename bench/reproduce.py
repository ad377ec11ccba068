"""The paper's experiment (Birodkar et al. 2019, Figure 2) on Fashion-MNIST with redex's defaults.

Steps, each cached in the store and resumable (run the script again after a kill and it goes on):
register + scan the full Fashion-MNIST (70,000 images), train the default backbone and embed every
image, build the complete-linkage trees, then a sweep of fractions x {semantic, random} x seeds with
the default recipe as background jobs (finished runs are reused). Writes the table, the reading of
it and the plot (matplotlib, the `bench` extra) to `--out` (default docs/reproduction.md).

    .venv/bin/python bench/reproduce.py                      # 40-90 min on 2 CPU cores; 6 on an H100
    .venv/bin/python bench/reproduce.py --limit 2000 --seeds 2 --fractions 1,0.5 --out /tmp/r.md   # a smoke run
    REDEX_MAX_JOBS=4 python bench/reproduce.py               # several runs at once (a GPU has room)
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core import jobs
from core.data import catalog, scan, sources
from core.embed import embeddings
from core.embed.backbones import DEFAULT_BACKBONE
from core.redundancy import clusterings
from core.store.db import get_store
from core.subsets import plan, results, sweeps

ROOT = Path(__file__).resolve().parents[1]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--fractions", default="1,0.9,0.8,0.7,0.5,0.3")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, help="default: the default recipe's")
    p.add_argument("--budget", default="epochs", choices=plan.BUDGET_RULES)
    p.add_argument("--limit", type=int, help="first N images of each split (a smoke run)")
    p.add_argument("--out", default=str(ROOT / "docs" / "reproduction.md"))
    p.add_argument("--prepare-only", action="store_true",
                   help="stop after the scan, backbone, embeddings and trees (to start the slow part early)")
    return p.parse_args()


def prepare(limit: int | None) -> tuple[str, str]:
    """Dataset scanned, backbone trained, every image embedded, trees built (each step reused if done)."""
    store = get_store()
    name = sources.register("fashion-mnist", limit=limit)
    t = time.perf_counter()
    if not len(catalog.images_table(name, store)):
        scan.scan(name, store)
    print(f"dataset {name}: {len(catalog.images_table(name, store)):,} images ({time.perf_counter() - t:.0f} s)")
    t = time.perf_counter()
    model, bid = embeddings.ensure_backbone(name, DEFAULT_BACKBONE, store=store)
    embeddings.embed_dataset(name, model, bid, store=store)
    print(f"backbone {bid} and embeddings ready ({time.perf_counter() - t:.0f} s)")
    t = time.perf_counter()
    clusterings.cluster(name, bid, store=store)
    print(f"complete-linkage trees ready ({time.perf_counter() - t:.0f} s)")
    return name, bid


def sweep(name: str, bid: str, args) -> float:
    """Run (or finish) the sweep; returns its wall time."""
    recipe = {"epochs": args.epochs} if args.epochs else {}
    spec = plan.SweepSpec(fractions=tuple(float(f) for f in args.fractions.split(",")), seeds=args.seeds,
                             recipe=recipe, budget=args.budget, selection={"backbone_id": bid})
    est = plan.estimate(name, spec)
    took = jobs.format_seconds(est["seconds"]) if est["seconds"] is not None else "unknown"
    print(f"sweep: {est['runs']} runs, at most {took} ({est['speed_source']});"
          f" {jobs.max_parallel()} at once")
    t = time.perf_counter()
    _, job_id = sweeps.launch_sweep(name, spec)
    last = None
    while (job := jobs.get_job(job_id))["status"] in jobs.ACTIVE:
        line = jobs.describe(job)["text"]
        if line != last:
            print(f"[{time.strftime('%H:%M:%S')}] {line}", flush=True)
            last = line
        time.sleep(5)
    if job["status"] != "done":
        raise SystemExit(f"sweep job {job_id} {job['status']}: {job.get('error')}")
    print(f"sweep done: {job['result']}")
    return time.perf_counter() - t


def reading(table) -> list[str]:
    """What the table shows, by two stated rules (3 seeds make every std a rough estimate)."""
    full = table[table.method == "full"]
    if full.empty:
        return ["No full-set run: nothing to compare with."]
    f = full.iloc[0]
    lines, first_miss = [], None
    for fraction in sorted(set(table.fraction[table.method != "full"]), reverse=True):
        sem = table[(table.method == "semantic") & (table.fraction == fraction)]
        rnd = table[(table.method == "random") & (table.fraction == fraction)]
        if sem.empty:
            continue
        s = sem.iloc[0]
        gap = 100 * (f.top1_mean - s.top1_mean)
        tol = 100 * math.hypot(f.top1_std, s.top1_std)
        matches = gap <= tol
        if not matches and first_miss is None:
            first_miss = fraction
        text = f"- f = {fraction:g} ({int(s.n_train):,} images): semantic {gap:+.2f} points below full (tolerance {tol:.2f}):" \
               f" {'matches' if matches else 'does not match'} the full set"
        if not rnd.empty:
            r = rnd.iloc[0]
            lead = 100 * (s.top1_mean - r.top1_mean)
            tol_r = 100 * math.hypot(s.top1_std, r.top1_std)
            verdict = "beats" if lead > tol_r else "loses to" if -lead > tol_r else "ties with"
            text += f"; semantic {verdict} random ({lead:+.2f} points, tolerance {tol_r:.2f})"
        lines.append(text)
    summary = (f"The semantic subset stops matching the full set at f = {first_miss:g}." if first_miss is not None
               else "The semantic subset matches the full set at every fraction tried.")
    return [summary, "", "Rules: *matches* = the full set's mean minus the subset's is at most the two stds"
            " combined (sqrt(s1² + s2²)); *beats*/*loses to* = a difference beyond that, else *ties*.", ""] + lines


def plot(table, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing (pip install -e '.[bench]'): no plot")
        return False
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    full = table[table.method == "full"]
    for method, color in (("semantic", "#d62728"), ("random", "#1f77b4")):
        rows = table[table.method.isin([method, "full"])].sort_values("n_train")
        ax.errorbar(rows.n_train, 100 * rows.top1_mean, yerr=100 * rows.top1_std, marker="o", capsize=3,
                    color=color, label=method)
    if not full.empty:
        f = full.iloc[0]
        ax.axhline(100 * f.top1_mean, color="gray", ls="--", lw=1, label="full set")
        ax.axhspan(100 * (f.top1_mean - f.top1_std), 100 * (f.top1_mean + f.top1_std), color="gray", alpha=0.15)
    ax.set_xlabel("training images (subset size)")
    ax.set_ylabel("test top-1 accuracy (%)")
    ax.set_title("Fashion-MNIST: semantic vs random subsets (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    return True


def write_report(name: str, bid: str, args, sweep_s: float, out: Path) -> None:
    runs = results.runs(name)
    table = results.summary(runs)
    done = runs[runs.status == "done"]
    devices = sorted(set(done.device.dropna()))
    import torch

    if "cuda" in devices and torch.cuda.is_available():
        devices = [f"cuda ({torch.cuda.get_device_name()}, torch {torch.__version__})" if d == "cuda" else d
                   for d in devices]
    recipe = done.recipe.iloc[0]
    png = out.with_suffix(".png")
    has_plot = plot(table, png)
    rows = ["| method | fraction | training images | seeds | test top-1 % (mean ± std) |", "|---|---:|---:|---:|---:|"]
    for r in table.itertuples():
        rows.append(f"| {r.method} | {r.fraction:g} | {int(r.n_train):,} | {r.seeds} |"
                    f" {100 * r.top1_mean:.2f} ± {100 * r.top1_std:.2f} |")
    cmd = "bench/reproduce.py " + " ".join(sys.argv[1:])
    text = [
        "# Reproduction: semantic redundancy on Fashion-MNIST (the paper's Figure 2)", "",
        f"Produced by `{cmd.strip()}` on {time.strftime('%Y-%m-%d')}: dataset `{name}`,"
        f" {len(done)} finished runs on {', '.join(devices)} ({platform.node() or 'unknown host'},"
        f" {os.cpu_count()} CPU cores); the sweep took {sweep_s / 60:.1f} min of wall time with"
        f" {jobs.max_parallel()} run(s) at once.", "",
        f"Recipe of every run (seed = run seed): `{recipe}`. Budget rule: same {args.budget}."
        f" Embeddings: the default backbone `{bid}` (recipe `core.training.recipe.backbone_recipe`) trained on"
        " the train split; complete linkage, nearest-mean"
        f" representatives; {_near_copies(name)}. Random subsets have the same per-class counts."
        f" Evaluated on the {done.eval_split.iloc[0]} split ({int(done.n_eval.iloc[0]):,} images).", "",
        *rows, "",
        *(["![test accuracy vs subset size](reproduction.png)", ""] if has_plot else []),
        "## What it shows", "", *reading(table), "",
    ]
    out.write_text("\n".join(text))
    print("\n".join(text))


def _near_copies(name: str) -> str:
    """How the trees treated near copies by pixels (`core.redundancy.clusterings.ensure_copy_pairs`)."""
    store = get_store()
    if not clusterings.near_copies_enabled(name, store):
        return "near copies by pixels off (the paper's method exactly)"
    pairs = len(clusterings.stored_copy_pairs(name, store))
    return f"near copies by pixels joined first ({pairs:,} pairs in the train split, `core.redundancy.copies`)"


def main() -> None:
    args = parse_args()
    name, bid = prepare(args.limit)
    if args.prepare_only:
        return
    sweep_s = sweep(name, bid, args)
    write_report(name, bid, args, sweep_s, Path(args.out))


if __name__ == "__main__":
    main()
