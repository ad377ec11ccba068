"""Subset training: the evidence behind a subset (Birodkar et al. 2019, step 5 and Figure 2).

A classifier is trained from scratch on the full train split, on the semantic subset at fraction f
(one representative per redundant group, `core.groups`), and on a random subset with the same
per-class counts k_c = max(1, round(f * n_c)) (the paper's baseline), and evaluated on the test
split (else val). Every run is a row of `train_runs`, keyed by everything that decides its result
(the training images' content ids and labels, the evaluation images, the recipe with its seed), so
an identical run is never trained twice unless asked, and results outlive restarts.

A sweep (fractions x methods x seeds) is a light scheduler job (`sweep`) that plans the runs, builds
the merge trees first if the semantic subset needs them, and launches one heavy `train` job per run,
as many at once as there are compute slots (`REDEX_MAX_JOBS`, default 1). A run that fails or whose
process is killed is marked failed and the sweep goes on with the next; `retry` starts a sweep of the
failed and cancelled runs. A `train` job recomputes its subset from the run's settings and checks it
against the planned fingerprint, so it can never silently train on other images.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from core import jobs
from core.datasets import get_dataset, images_table, load_pixels
from core.jobs import JobCancelled, JobContext, task
from core.redundancy import REPRESENTATIVES, groups_for_fraction
from core.store import Store, get_store, to_json

if TYPE_CHECKING:
    from core.training import Recipe

METHODS = ("semantic", "random")          # "full" is the run at fraction 1.0
DEFAULT_FRACTIONS = (1.0, 0.9, 0.8, 0.7, 0.5)
DEFAULT_SEEDS = 3
BUDGET_RULES = ("epochs", "steps")        # same epochs as the full run, or the same optimisation steps
EVAL_SPLITS = ("test", "val")
RUN_ACTIVE = ("pending", "running")
# Training speed (images/s) assumed for a time estimate before anything ran on this machine:
# resnet8s2 at 28 px on 2 CPU cores (bench/embed.py: 2,173 img/s), scaled by pixels and width.
FALLBACK_IMAGES_PER_S = {"cpu": 2000.0, "cuda": 40000.0, "mps": 8000.0}
# Seconds each run spends outside its training loop: process start, imports, data, evaluation
# (measured: 5-10 s on the 2-core CPU, 10-15 s for six runs sharing an H100 machine).
RUN_OVERHEAD_S = 10.0


class SubsetTrainingError(ValueError):
    """A sweep or run cannot be made as asked; the message says why and what to do."""


@dataclass(frozen=True)
class Selection:
    """How the semantic subset is chosen (the trees of `core.groups`)."""

    backbone_id: str
    linkage: str = "complete"
    representative: str = "nearest_mean"

    def __post_init__(self) -> None:
        if self.representative not in REPRESENTATIVES:
            raise SubsetTrainingError(f"representative must be one of {', '.join(REPRESENTATIVES)}")


@dataclass(frozen=True)
class SweepSpec:
    """What a sweep trains: every (fraction, method, seed), with one recipe (its seed set per run)."""

    fractions: tuple[float, ...] = DEFAULT_FRACTIONS
    methods: tuple[str, ...] = METHODS
    seeds: int = DEFAULT_SEEDS
    recipe: dict = field(default_factory=dict)     # Recipe fields; empty: the dataset's default recipe
    budget: str = "epochs"
    selection: dict | None = None                   # Selection fields; None: newest backbone, complete
    force: bool = False                             # train again even when an identical run is done

    def __post_init__(self) -> None:
        if not self.fractions or any(not 0.0 < f <= 1.0 for f in self.fractions):
            raise SubsetTrainingError("fractions must lie in (0, 1]")
        bad = [m for m in self.methods if m not in METHODS]
        if bad or not self.methods:
            raise SubsetTrainingError(f"methods must be among {', '.join(METHODS)}; got {list(self.methods)}")
        if not 1 <= self.seeds <= 100:
            raise SubsetTrainingError("seeds must be between 1 and 100")
        if self.budget not in BUDGET_RULES:
            raise SubsetTrainingError(f"budget must be one of {', '.join(BUDGET_RULES)}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SweepSpec:
        data = dict(data)
        data["fractions"] = tuple(float(f) for f in data.get("fractions", DEFAULT_FRACTIONS))
        data["methods"] = tuple(data.get("methods", METHODS))
        return cls(**data)


@dataclass(frozen=True)
class RunPlan:
    """One planned run: which images it trains on, with which recipe, and its key."""

    run_key: str
    method: str              # full | semantic | random
    fraction: float
    seed: int
    selection: dict          # empty unless semantic
    recipe: Recipe
    subset_fp: str
    n_train: int


# -- the data of a run -------------------------------------------------------------------------
def eval_split(name: str, store: Store | None = None) -> str:
    """The split a run is evaluated on: test, else val. A subset run never evaluates on train images."""
    store = store or get_store()
    present = {s for (s,) in store.query("SELECT DISTINCT split FROM images WHERE dataset = ?", [name])}
    for split in EVAL_SPLITS:
        if split in present:
            return split
    raise SubsetTrainingError(
        f"{name!r} has no test or val images to evaluate on. Add a test/ (or val/) folder, or a split column"
        f" in the manifest: a held-out part of train would be clustered with the subset it is meant to judge")


def _train_pool(name: str, store: Store) -> pd.DataFrame:
    table = images_table(name, store, split="train")
    if table.empty:
        raise SubsetTrainingError(f"{name!r} has no train images")
    return table[["row", "path", "image_id", "label"]].reset_index(drop=True)


def subset_table(name: str, method: str, fraction: float, seed: int, selection: Selection | None = None, *,
                 store: Store | None = None, clustering=None) -> pd.DataFrame:
    """The train images (row, path, image_id, label) a run trains on, in row order.

    full: every train image. semantic: the representatives of the cut at `fraction` (`core.groups`).
    random: per class (sorted labels), k_c = max(1, round(f * n_c)) images drawn with `seed`.
    """
    store = store or get_store()
    if method == "full" or fraction >= 1.0:
        return _train_pool(name, store)
    if method == "random":
        pool = _train_pool(name, store)
        rng = np.random.default_rng(seed)
        picks = []
        for label in sorted(pool.label.unique()):
            members = np.flatnonzero((pool.label == label).to_numpy())
            picks.append(rng.choice(members, groups_for_fraction(len(members), fraction), replace=False))
        return pool.iloc[np.sort(np.concatenate(picks))].reset_index(drop=True)
    if method != "semantic":
        raise SubsetTrainingError(f"unknown method {method!r}")
    from core import groups

    if selection is None:
        raise SubsetTrainingError("a semantic subset needs a selection (backbone, linkage, representative)")
    c = clustering or groups.load_clustering(name, selection.backbone_id, selection.linkage, store)
    s = groups.subset(c, fraction=fraction, representative=selection.representative, seed=seed)
    kept = c.table.iloc[s.kept_indices]
    return kept.sort_values("row")[["row", "path", "image_id", "label"]].reset_index(drop=True)


def fingerprint(table: pd.DataFrame) -> str:
    """Of the images' content ids and labels, in row order: equal tables train the same run."""
    text = "\n".join(f"{i}\t{label}" for i, label in zip(table.image_id, table.label))
    return hashlib.blake2b(text.encode(), digest_size=12).hexdigest()


def _run_key(name: str, method: str, fraction: float, selection: dict, recipe: Recipe, subset_fp: str,
             eval_fp: str) -> str:
    ident = {"dataset": name, "method": method, "fraction": round(fraction, 6), "selection": selection,
             "recipe": recipe.to_dict(), "subset": subset_fp, "eval": eval_fp}
    return hashlib.blake2b(to_json(ident).encode(), digest_size=10).hexdigest()


def recipe_tag(recipe: dict) -> str:
    """Runs that differ only in their seed share a tag: their results are compared with each other."""
    rest = {k: v for k, v in recipe.items() if k != "seed"}
    return hashlib.blake2b(to_json(rest).encode(), digest_size=4).hexdigest()


def base_recipe(name: str, spec: SweepSpec, store: Store | None = None) -> Recipe:
    """The spec's recipe over the dataset's default one, with the budget rule applied (seed 0).

    budget 'steps': every run takes as many optimisation steps as the full run's epochs give.
    """
    from core.training import Recipe, default_recipe  # torch: imported where a recipe is made, not by the CLI

    ds = get_dataset(name, store)
    recipe = default_recipe(ds["image_size"])
    try:
        recipe = Recipe.from_dict({**recipe.to_dict(), **(spec.recipe or {}), "budget": "epochs", "steps": None})
    except (TypeError, ValueError) as exc:
        raise SubsetTrainingError(f"bad recipe: {exc}") from None
    if spec.budget == "steps":
        n_full = len(_train_pool(name, store or get_store()))
        recipe = dataclasses.replace(recipe, budget="steps", steps=recipe.total_steps(n_full))
    return recipe


def resolve_selection(name: str, spec: SweepSpec, store: Store | None = None) -> Selection | None:
    """The spec's selection, or the newest backbone with embeddings; None when no method needs one."""
    if "semantic" not in spec.methods or all(f >= 1.0 for f in spec.fractions):
        return None
    if spec.selection and spec.selection.get("backbone_id"):
        return Selection(**spec.selection)
    from core import groups

    try:
        bid = groups.default_backbone(name, store)
    except ValueError:
        raise SubsetTrainingError(f"the semantic subset needs embeddings of {name!r}: run `redex embed {name}`"
                                  f" (or Embed on the Datasets page) first") from None
    return Selection(bid, **{k: v for k, v in (spec.selection or {}).items() if k != "backbone_id"})


def plan_runs(name: str, spec: SweepSpec, store: Store | None = None, clustering=None) -> list[RunPlan]:
    """Every run of the sweep, in launch order (fractions as given, then methods, then seeds).

    Fraction 1.0 is one 'full' run per seed, whatever the methods. Needs up-to-date trees for
    semantic runs (`core.groups.cluster`).
    """
    store = store or get_store()
    recipe = base_recipe(name, spec, store)
    selection = resolve_selection(name, spec, store)
    if selection is not None and clustering is None:
        from core import groups

        clustering = groups.load_clustering(name, selection.backbone_id, selection.linkage, store)
    split = eval_split(name, store)
    eval_fp = fingerprint(images_table(name, store, split=split))
    plans, seen = [], set()
    for fraction in spec.fractions:
        methods = ("full",) if fraction >= 1.0 else spec.methods
        for method in methods:
            sel = dataclasses.asdict(selection) if method == "semantic" else {}
            for seed in range(spec.seeds):
                table = subset_table(name, method, fraction, seed, selection if sel else None, store=store,
                                     clustering=clustering)
                run_recipe = dataclasses.replace(recipe, seed=seed)
                fp = fingerprint(table)
                key = _run_key(name, method, fraction, sel, run_recipe, fp, eval_fp)
                if key not in seen:
                    seen.add(key)
                    plans.append(RunPlan(key, method, float(fraction), seed, sel, run_recipe, fp, len(table)))
    return plans


# -- estimates ---------------------------------------------------------------------------------
def training_speed(name: str, arch: str, store: Store | None = None) -> tuple[float, str]:
    """Images/s of training `arch` here: the median of finished runs of this dataset, else the
    backbone training of it, else an assumed figure. Returns (speed, where it comes from)."""
    store = store or get_store()
    rows = store.query("SELECT TRY_CAST(metrics->>'images_per_s' AS DOUBLE) FROM train_runs WHERE dataset = ?"
                       " AND status = 'done' AND recipe->>'arch' = ? ORDER BY finished_at DESC LIMIT 9", [name, arch])
    speeds = [r[0] for r in rows if r[0]]
    if speeds:
        return float(np.median(speeds)), f"median of {len(speeds)} finished runs"
    rows = store.query("SELECT TRY_CAST(metrics->>'images_per_s' AS DOUBLE) FROM backbones WHERE dataset = ?"
                       " AND spec = ? ORDER BY created_at DESC LIMIT 1", [name, f"trained:{arch}"])
    if rows and rows[0][0]:
        return float(rows[0][0]), "the backbone training of this dataset"
    from core.device import pick_device

    ds = get_dataset(name, store)
    device = pick_device().type
    scale = (28 / ds["image_size"]) ** 2 * (1 if ds["channels"] == 1 else 0.8)
    return FALLBACK_IMAGES_PER_S.get(device, 2000.0) * scale, f"an assumed {device} speed"


def estimate(name: str, spec: SweepSpec, store: Store | None = None) -> dict[str, Any]:
    """Runs, images to process and seconds a sweep will take before it starts (no trees needed).

    Counts come from k_c = max(1, round(f * n_c)), the same for both methods; runs already done
    (identical key) are not counted unless `spec.force` (only known once the sweep is planned, so
    here every run counts). Time: training images at the measured speed plus `RUN_OVERHEAD_S` a run,
    shared by the runs that go at once.
    """
    store = store or get_store()
    eval_split(name, store)  # a sweep with nothing to evaluate on is refused before any estimate
    recipe = base_recipe(name, spec, store)
    counts = _train_pool(name, store).label.value_counts().to_numpy()
    runs = images = 0
    for fraction in spec.fractions:
        n = int(sum(groups_for_fraction(int(c), fraction) for c in counts)) if fraction < 1.0 else int(counts.sum())
        n_methods = 1 if fraction >= 1.0 else len(spec.methods)
        steps = recipe.total_steps(n)
        runs += n_methods * spec.seeds
        images += n_methods * spec.seeds * steps * recipe.batch_for(n)
    speed, source = training_speed(name, recipe.arch, store)
    parallel = jobs.max_parallel()
    seconds = (images / speed + runs * RUN_OVERHEAD_S) / min(parallel, max(runs, 1))
    return {"runs": runs, "images": images, "seconds": seconds,
            "images_per_s": speed, "speed_source": source, "parallel": parallel}


# -- sweeps ------------------------------------------------------------------------------------
def launch_sweep(name: str, spec: SweepSpec, store: Store | None = None) -> tuple[int, int]:
    """Record the sweep and start its scheduler job. Returns (sweep id, job id)."""
    store = store or get_store()
    get_dataset(name, store)
    eval_split(name, store)           # fail here, not in the job, when there is nothing to evaluate on
    base_recipe(name, spec, store)    # ... or the recipe is bad
    resolve_selection(name, spec, store)
    return _launch(name, {"grid": spec.to_dict()}, store)


def retry(name: str, store: Store | None = None) -> tuple[int, int] | None:
    """Start a sweep of this dataset's failed and cancelled runs; None when there are none."""
    store = store or get_store()
    keys = [k for (k,) in store.query("SELECT run_key FROM train_runs WHERE dataset = ? AND status IN"
                                      " ('failed', 'cancelled') ORDER BY created_at", [name])]
    return _launch(name, {"retry": keys}, store) if keys else None


def _launch(name: str, spec: dict, store: Store) -> tuple[int, int]:
    sweep_id = store.execute("INSERT INTO sweeps (dataset, spec) VALUES (?, ?) RETURNING id",
                             [name, to_json(spec)])[0][0]
    job_id = jobs.launch("sweep", name, {"sweep_id": sweep_id}, store=store)
    store.execute("UPDATE sweeps SET job_id = ? WHERE id = ?", [job_id, sweep_id])
    return sweep_id, job_id


@task("sweep", heavy=False)
def _sweep_task(ctx: JobContext) -> dict:
    return run_sweep(ctx.dataset, int(ctx.params["sweep_id"]), ctx)


def run_sweep(name: str, sweep_id: int, ctx: JobContext) -> dict:
    """Body of the scheduler job: plan (building trees if needed), then run the runs, a slot at a time."""
    store = ctx.store
    spec = json.loads(store.query("SELECT spec FROM sweeps WHERE id = ?", [sweep_id])[0][0])
    if "retry" in spec:
        keys = list(spec["retry"])
        with store.write() as con:
            con.execute("UPDATE train_runs SET status = 'pending', error = NULL, job_id = NULL, sweep_id = ?"
                        " WHERE list_contains(?, run_key) AND status IN ('failed', 'cancelled')", [sweep_id, keys])
            mine = {k for (k,) in con.execute("SELECT run_key FROM train_runs WHERE sweep_id = ? AND status ="
                                              " 'pending'", [sweep_id]).fetchall()}
        todo, reused = [k for k in keys if k in mine], 0  # not those another sweep has retried meanwhile
    else:
        todo, reused = _plan_and_record(name, SweepSpec.from_dict(spec["grid"]), sweep_id, ctx)
    ctx.phase(f"{len(todo)} training runs", total=len(todo))
    finished = _execute(todo, ctx)
    counts = {s: sum(1 for v in finished.values() if v == s) for s in ("done", "failed", "cancelled")}
    ctx.log(f"sweep {sweep_id}: {counts['done']} done, {counts['failed']} failed, {reused} reused")
    return {"sweep_id": sweep_id, "runs": len(todo), "reused": reused, **counts}


def _plan_and_record(name: str, spec: SweepSpec, sweep_id: int, ctx: JobContext) -> tuple[list[str], int]:
    store = ctx.store
    selection = resolve_selection(name, spec, store)
    if selection is not None:
        _ensure_trees(name, selection, ctx)
    ctx.phase("planning the runs")
    plans = plan_runs(name, spec, store)
    refresh_runs(store)
    status = dict(store.query("SELECT run_key, status FROM train_runs WHERE list_contains(?, run_key)",
                              [[p.run_key for p in plans]]))
    busy = [p for p in plans if status.get(p.run_key) in RUN_ACTIVE]  # in another live sweep
    if busy:
        ctx.log(f"{len(busy)} identical runs are already queued or running in another sweep: not started twice")
    todo = [p for p in plans if status.get(p.run_key) not in RUN_ACTIVE
            and (spec.force or status.get(p.run_key) != "done")]
    with store.write() as con:
        for p in todo:
            con.execute(
                "INSERT OR REPLACE INTO train_runs (run_key, dataset, sweep_id, method, fraction, seed, selection,"
                " recipe, subset_fp, n_train, status) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'pending')",
                [p.run_key, name, sweep_id, p.method, p.fraction, p.seed, to_json(p.selection),
                 to_json(p.recipe.to_dict()), p.subset_fp, p.n_train])
    reused = len(plans) - len(todo) - len(busy)
    ctx.log(f"planned {len(plans)} runs: {len(todo)} to train, {reused} identical runs already done")
    return [p.run_key for p in todo], reused


def _ensure_trees(name: str, selection: Selection, ctx: JobContext) -> None:
    """Build the merge trees the semantic subset needs, as a cluster job of its own."""
    from core import groups

    if groups.tree_status(name, selection.backbone_id, selection.linkage, ctx.store)["stale"] == 0:
        return
    ctx.phase("building the merge trees")
    child = jobs.launch("cluster", name, {"backbone_id": selection.backbone_id, "linkage": selection.linkage},
                        store=ctx.store)
    ctx.log(f"the semantic subset needs the {selection.linkage}-linkage trees: cluster job {child}")
    job = _wait_for(child, ctx)
    if job["status"] != "done":
        raise SubsetTrainingError(f"building the merge trees (job {child}) {job['status']}: {job.get('error') or ''}")


def _wait_for(job_id: int, ctx: JobContext) -> dict:
    try:
        while True:
            job = jobs.get_job(job_id, ctx.store)
            if job["status"] in jobs.FINAL:
                return job
            ctx.check_cancelled()
            time.sleep(0.5)
    except JobCancelled:
        jobs.cancel(job_id, ctx.store)
        raise


def _execute(keys: list[str], ctx: JobContext) -> dict[str, str]:
    """Launch a `train` job per run, at most `jobs.max_parallel()` at once; returns key -> final status."""
    store, queue, active, finished = ctx.store, list(keys), {}, {}
    try:
        while queue or active:
            while queue and len(active) < jobs.max_parallel():
                key = queue.pop(0)
                job_id = jobs.launch("train", ctx.dataset, {"run_key": key}, store=store)
                store.execute("UPDATE train_runs SET job_id = ? WHERE run_key = ?", [job_id, key])
                active[key] = job_id
            for key, job_id in list(active.items()):
                job = jobs.get_job(job_id, store)
                if job["status"] in jobs.FINAL:
                    finished[key] = _settle(store, key, job)
                    del active[key]
                    ctx.progress(len(finished), len(keys), _tally(finished), force=True)
            ctx.check_cancelled()
            time.sleep(0.5)
    except JobCancelled:
        for key, job_id in active.items():
            jobs.cancel(job_id, store)
            _settle(store, key, jobs.get_job(job_id, store))
        with store.write() as con:
            con.execute("UPDATE train_runs SET status = 'cancelled', error = 'the sweep was cancelled',"
                        " finished_at = now() WHERE list_contains(?, run_key) AND status = 'pending'", [queue])
        raise
    return finished


def _tally(finished: dict[str, str]) -> str:
    parts = [f"{sum(1 for v in finished.values() if v == s)} {s}" for s in ("done", "failed", "cancelled")]
    return ", ".join(parts)


def _settle(store: Store, key: str, job: dict) -> str:
    """A run's final status from its job's: a job that died without a word leaves the run failed."""
    status = job["status"]
    if status == "done":
        return "done"
    error = job.get("error") or job.get("message") or status
    store.execute("UPDATE train_runs SET status = ?, error = coalesce(error, ?), finished_at = now()"
                  " WHERE run_key = ? AND status IN ('pending', 'running')", [status, error, key])
    return status


# -- one run -----------------------------------------------------------------------------------
@task("train")
def _train_task(ctx: JobContext) -> dict:
    key = ctx.params["run_key"]
    try:
        return train_run(key, ctx.store, ctx)
    except BaseException as exc:
        cancelled = isinstance(exc, JobCancelled) or ctx.should_stop()
        ctx.store.execute("UPDATE train_runs SET status = ?, error = ?, finished_at = now() WHERE run_key = ?",
                          ["cancelled" if cancelled else "failed",
                           "cancelled by the user" if cancelled else f"{type(exc).__name__}: {exc}", key])
        raise


def get_run(key: str, store: Store | None = None) -> dict:
    store = store or get_store()
    df = store.query_df("SELECT * FROM train_runs WHERE run_key = ?", [key])
    if df.empty:
        raise SubsetTrainingError(f"no training run {key!r}")
    row = df.iloc[0].to_dict()
    for col in ("selection", "recipe", "metrics"):
        row[col] = json.loads(row[col]) if isinstance(row[col], str) else row[col]
    return row


def train_run(key: str, store: Store | None = None, ctx: JobContext | None = None) -> dict:
    """Train and evaluate one planned run; store its metrics. Returns them."""
    from core.backbones import train_backbone
    from core.embeddings import _labels_as_int, _train_message
    from core.training import Recipe

    store = store or get_store()
    run = get_run(key, store)
    name = run["dataset"]
    sel = Selection(**run["selection"]) if run["selection"] else None
    table = subset_table(name, run["method"], run["fraction"], int(run["seed"]), sel, store=store)
    if fingerprint(table) != run["subset_fp"]:
        raise SubsetTrainingError("the dataset, its embeddings or its trees changed since this run was planned:"
                                  " start the sweep again to plan it anew")
    recipe = Recipe.from_dict(run["recipe"])
    ds = get_dataset(name, store)
    classes = list(ds["classes"])
    split = eval_split(name, store)
    held = images_table(name, store, split=split)
    pixels = load_pixels(name, store)
    store.execute("UPDATE train_runs SET status = 'running' WHERE run_key = ?", [key])
    if ctx:
        ctx.phase(f"train {run['method']} {run['fraction']:g} seed {run['seed']} ({len(table):,} images,"
                  f" eval on {split})", total=recipe.total_steps(len(table)))
        ctx.log(f"recipe: {to_json(recipe.to_dict())}")
    _, metrics = train_backbone(
        f"trained:{recipe.arch}", np.asarray(pixels[table.row.to_numpy()]), _labels_as_int(table.label, classes),
        len(classes), recipe=recipe, eval_images=np.asarray(pixels[held.row.to_numpy()]),
        eval_labels=_labels_as_int(held.label, classes),
        progress=(lambda done, total, info: ctx.progress(done, total, _train_message(info))) if ctx else None,
        should_stop=ctx.should_stop if ctx else None)
    metrics = {**metrics, "eval_split": split, "n_eval": len(held), "classes": classes, "n_train": len(table)}
    store.execute("UPDATE train_runs SET status = 'done', metrics = ?, error = NULL, finished_at = now()"
                  " WHERE run_key = ?", [to_json(metrics), key])
    if ctx:
        ctx.log(f"test top-1 {metrics['test_top1']:.4f} after {metrics['seconds']:.0f} s")
    return {"run_key": key, "test_top1": metrics["test_top1"], "seconds": metrics["seconds"]}


# -- reading results ---------------------------------------------------------------------------
def refresh_runs(store: Store | None = None) -> None:
    """Runs left active by a job or sweep that is gone become failed (never 'running' forever)."""
    store = store or get_store()
    jobs.refresh(store)
    with store.write() as con:
        con.execute(
            "UPDATE train_runs r SET status = j.status, error = coalesce(j.error, 'the training job ended'),"
            " finished_at = now() FROM jobs j WHERE r.job_id = j.id AND r.status IN ('pending', 'running')"
            " AND j.status IN ('failed', 'cancelled')")
        con.execute(
            "UPDATE train_runs r SET status = 'failed', error = 'the sweep stopped before this run started',"
            " finished_at = now() FROM sweeps s, jobs j WHERE r.sweep_id = s.id AND s.job_id = j.id"
            " AND r.status = 'pending' AND r.job_id IS NULL AND j.status IN ('done', 'failed', 'cancelled')")


def runs(name: str, store: Store | None = None, refresh: bool = True) -> pd.DataFrame:
    """Every run of a dataset, newest first, with its live job progress and its headline metrics.

    `refresh`: first settle runs whose job or sweep is gone (a write; skip it on hot paths)."""
    store = store or get_store()
    if refresh:
        refresh_runs(store)
    df = store.query_df(
        "SELECT r.run_key, r.sweep_id, r.method, r.fraction, r.seed, r.n_train, r.status, r.job_id, r.error,"
        " TRY_CAST(r.metrics->>'test_top1' AS DOUBLE) AS test_top1,"
        " TRY_CAST(r.metrics->>'test_loss' AS DOUBLE) AS test_loss,"
        " TRY_CAST(r.metrics->>'seconds' AS DOUBLE) AS seconds, r.metrics->>'device' AS device,"
        " r.metrics->>'eval_split' AS eval_split, TRY_CAST(r.metrics->>'n_eval' AS INTEGER) AS n_eval,"
        " r.recipe, r.selection, r.created_at, r.finished_at, j.done, j.total, j.rate, j.message"
        " FROM train_runs r LEFT JOIN jobs j ON j.id = r.job_id WHERE r.dataset = ?"
        " ORDER BY r.created_at DESC, r.fraction DESC, r.method, r.seed", [name])
    df["recipe_tag"] = [recipe_tag(json.loads(r)) for r in df.recipe]
    df["backbone_id"] = [json.loads(s).get("backbone_id") for s in df.selection]
    return df


def summary(df: pd.DataFrame, tag: str | None = None) -> pd.DataFrame:
    """Finished runs grouped by (method, fraction): images, seeds, mean and std of test top-1.

    `tag`: only runs of that recipe (see `recipe_tag`); default: the recipe of the newest run.
    std is the sample std over seeds (0 for one seed).
    """
    done = df[df.status == "done"]
    if done.empty:
        return pd.DataFrame(columns=["method", "fraction", "n_train", "seeds", "top1_mean", "top1_std",
                                     "recipe_tag", "backbone_id"])
    tag = tag or done.recipe_tag.iloc[0]
    done = done[done.recipe_tag == tag].fillna({"backbone_id": ""})
    out = done.groupby(["method", "fraction", "backbone_id"], as_index=False).agg(
        n_train=("n_train", "mean"), seeds=("seed", "nunique"), top1_mean=("test_top1", "mean"),
        top1_std=("test_top1", lambda s: float(s.std(ddof=1)) if len(s) > 1 else 0.0))
    out["recipe_tag"] = tag
    order = {"full": 0, "semantic": 1, "random": 2}
    out = out.sort_values(["fraction", "method"], ascending=[False, True], key=lambda s: s.map(order)
                          if s.name == "method" else s).reset_index(drop=True)
    return out[["method", "fraction", "n_train", "seeds", "top1_mean", "top1_std", "recipe_tag", "backbone_id"]]


def format_pm(mean: float, std: float, seeds: int) -> str:
    """'91.2 ± 0.2' (percent), or '91.2' for one seed."""
    return f"{100 * mean:.1f} ± {100 * std:.1f}" if seeds > 1 else f"{100 * mean:.1f}"


def with_top1_text(table: pd.DataFrame) -> pd.DataFrame:
    """A `summary` table with a `top1` column of `format_pm` text, for people to read."""
    return table.assign(top1=[format_pm(m, s, n) for m, s, n in zip(table.top1_mean, table.top1_std, table.seeds)])


def evidence(name: str, fraction: float, backbone_id: str | None = None, store: Store | None = None) -> str | None:
    """The best evidence so far for the subset at `fraction`, e.g.
    '0.9 semantic: 91.2 ± 0.2 vs random 90.8 ± 0.3 vs full 91.3 ± 0.1 (top-1 %, 3 seeds)'; None if no run."""
    s = summary(runs(name, store, refresh=False))
    if s.empty:
        return None
    near = s[np.isclose(s.fraction, fraction, atol=0.005)]
    sem = near[(near.method == "semantic") & ((near.backbone_id == backbone_id) if backbone_id else True)]
    rnd = near[near.method == "random"]
    full = s[s.method == "full"]
    if sem.empty and rnd.empty:
        return None
    parts = []
    for label, rows in ((f"{fraction:g} semantic", sem), ("random", rnd), ("full", full)):
        if not rows.empty:
            r = rows.iloc[0]
            parts.append(f"{label}: {format_pm(r.top1_mean, r.top1_std, r.seeds)}" if not parts
                         else f"{label} {format_pm(r.top1_mean, r.top1_std, r.seeds)}")
    seeds = int(max(sem.seeds.max() if len(sem) else 0, rnd.seeds.max() if len(rnd) else 0))
    return " vs ".join(parts) + f" (test top-1 %, up to {seeds} seed{'s' if seeds > 1 else ''})"


def per_class_deltas(name: str, key: str, store: Store | None = None) -> pd.DataFrame:
    """Per-class test accuracy of run `key` against the mean of the full-set runs of the same recipe."""
    store = store or get_store()
    run = get_run(key, store)
    if run["status"] != "done":
        raise SubsetTrainingError(f"run {key} is {run['status']}, not done")
    tag = recipe_tag(run["recipe"])
    fulls = [json.loads(metrics)["per_class"] for recipe, metrics in store.query(
        "SELECT recipe, metrics FROM train_runs WHERE dataset = ? AND method = 'full' AND status = 'done'", [name])
        if recipe_tag(json.loads(recipe)) == tag]
    classes = run["metrics"]["classes"]
    df = pd.DataFrame({"label": classes, "accuracy": run["metrics"]["per_class"]})
    if fulls:
        full = np.array([[math.nan if v is None else v for v in f] for f in fulls], float).mean(0)
        df["full_accuracy"] = full
        df["delta"] = df.accuracy.astype(float) - df.full_accuracy
    return df


def active_sweeps(name: str, store: Store | None = None) -> list[dict]:
    """Sweeps of the dataset whose scheduler job is still queued or running."""
    store = store or get_store()
    out = []
    for sweep_id, job_id in store.query("SELECT id, job_id FROM sweeps WHERE dataset = ? ORDER BY id DESC", [name]):
        job = jobs.get_job(job_id, store) if job_id else None
        if job and job["status"] in jobs.ACTIVE:
            out.append({"sweep_id": sweep_id, **job})
    return out


def cancel_sweep(sweep_id: int, store: Store | None = None) -> bool:
    """Cancel a sweep: its running runs are cancelled and its pending ones dropped."""
    store = store or get_store()
    rows = store.query("SELECT job_id FROM sweeps WHERE id = ?", [sweep_id])
    if not rows or rows[0][0] is None:
        raise SubsetTrainingError(f"no sweep {sweep_id}")
    return jobs.cancel(rows[0][0], store, wait_s=30)
