"""Sweeps and runs as background jobs: a light scheduler job launching one `train` job per run."""
from __future__ import annotations

import json
import time

import numpy as np

from core import estimates, jobs, wording
from core.data.catalog import get_dataset, images_table, load_pixels
from core.jobs import JobCancelled, JobContext, task
from core.scale import ray_address
from core.store.db import Store, get_store, to_json
from core.subsets.plan import (
    Selection,
    SubsetTrainingError,
    SweepSpec,
    base_recipe,
    eval_split,
    fingerprint,
    plan_runs,
    resolve_selection,
    subset_table,
)
from core.subsets.results import get_run, refresh_runs

RUN_ACTIVE = ("pending", "running")


# -- sweeps ------------------------------------------------------------------------------------
def launch_sweep(name: str, spec: SweepSpec, store: Store | None = None, *, ray: str | None = None) -> tuple[int, int]:
    """Record the sweep and start its scheduler job. Returns (sweep id, job id). `ray`: the Ray cluster
    its runs train on ('local' for here; default `REDEX_RAY_ADDRESS`, see `core.scale`)."""
    store = store or get_store()
    get_dataset(name, store)
    eval_split(name, store)           # fail here, not in the job, when there is nothing to evaluate on
    base_recipe(name, spec, store)    # ... or the recipe is bad
    resolve_selection(name, spec, store)
    return _launch(name, {"grid": spec.to_dict()}, store, ray)


def retry(name: str, store: Store | None = None, *, ray: str | None = None) -> tuple[int, int] | None:
    """Start a sweep of this dataset's failed and cancelled runs; None when there are none."""
    store = store or get_store()
    keys = [k for (k,) in store.query("SELECT run_key FROM train_runs WHERE dataset = ? AND status IN"
                                      " ('failed', 'cancelled') ORDER BY created_at", [name])]
    return _launch(name, {"retry": keys}, store, ray) if keys else None


def _launch(name: str, spec: dict, store: Store, ray: str | None = None) -> tuple[int, int]:
    sweep_id = store.execute("INSERT INTO sweeps (dataset, spec) VALUES (?, ?) RETURNING id",
                             [name, to_json(spec)])[0][0]
    job_id = jobs.launch("sweep", name, {"sweep_id": sweep_id, **({"ray": ray} if ray is not None else {})},
                         store=store)
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
    ctx.phase(wording.plural(len(todo), "training run") + (f" ({wording.plural(reused, 'identical finished run')}"
                                                            " reused)" if reused else ""), total=len(todo))
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
        ctx.log(f"{wording.plural(len(busy), 'identical run')} already queued or running in another sweep:"
                " not started twice")
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
    ctx.log(f"planned {wording.plural(len(plans), 'run')}: {len(todo)} to train,"
            f" {wording.plural(reused, 'identical run')} already done")
    return [p.run_key for p in todo], reused


def _ensure_trees(name: str, selection: Selection, ctx: JobContext) -> None:
    """Build the merge trees the semantic subset needs, as a cluster job of its own."""
    from core.redundancy import clusterings

    if clusterings.tree_status(name, selection.backbone_id, selection.linkage, ctx.store)["stale"] == 0:
        return
    ctx.phase("building the merge trees")
    child = jobs.launch("cluster", name, {"backbone_id": selection.backbone_id, "linkage": selection.linkage,
                                          **_on_ray(ctx)},
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
    """Launch a `train` job per run, at most `jobs.max_parallel()` at once (on a Ray cluster: as many as
    it holds); returns key -> final status."""
    store, queue, active, finished = ctx.store, list(keys), {}, {}
    address = ray_address(ctx.params)
    if address is not None and keys:
        from core.scale.runs import run_capacity

        at_once = run_capacity(address)
        ctx.log(f"on Ray at {address}: up to {at_once} runs at once")
    else:
        at_once = jobs.max_parallel()
    try:
        while queue or active:
            while queue and len(active) < at_once:
                key = queue.pop(0)
                job_id = jobs.launch("train", ctx.dataset, {"run_key": key, **_on_ray(ctx)}, store=store)
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
@task("train", ray_lane="light")  # on a Ray cluster a run takes no compute slot here
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


def train_run(key: str, store: Store | None = None, ctx: JobContext | None = None) -> dict:
    """Train and evaluate one planned run; store its metrics. Returns them."""
    from core.embed.backbones import train_backbone
    from core.embed.embeddings import label_indices, progress_message
    from core.training.recipe import Recipe

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
    batch = recipe.batch_for(len(table))  # progress counts images (steps x batch): the rate reads in images/s
    if ctx:
        ctx.phase(f"train {run['method']} {run['fraction']:g} seed {run['seed']} ({len(table):,} images,"
                  f" eval on {split})", total=recipe.total_steps(len(table)) * batch)
        ctx.log(f"recipe: {to_json(recipe.to_dict())}")
    report = ((lambda done, total, info: ctx.progress(done * batch, total * batch, progress_message(info)))
              if ctx else None)
    address = ray_address(ctx.params if ctx else None)
    if address is not None:  # one Ray task with the run's resources; this job relays and stores
        metrics = _train_on_cluster(address, name, store, recipe, table, held, classes, report, ctx)
    else:
        _, metrics = train_backbone(
            f"trained:{recipe.arch}", np.asarray(pixels[table.row.to_numpy()]), label_indices(table.label, classes),
            len(classes), recipe=recipe, eval_images=np.asarray(pixels[held.row.to_numpy()]),
            eval_labels=label_indices(held.label, classes), progress=report,
            should_stop=ctx.should_stop if ctx else None)
    metrics = {**metrics, "eval_split": split, "n_eval": len(held), "classes": classes, "n_train": len(table)}
    estimates.record("train", estimates.training_key(recipe.arch, ds["image_size"], ds["channels"]),
                     metrics["images_per_s"] * metrics["seconds"], metrics["seconds"])
    store.execute("UPDATE train_runs SET status = 'done', metrics = ?, error = NULL, finished_at = now()"
                  " WHERE run_key = ?", [to_json(metrics), key])
    if ctx:
        ctx.log(f"test top-1 {metrics['test_top1']:.4f} after {metrics['seconds']:.0f} s")
    return {"run_key": key, "test_top1": metrics["test_top1"], "seconds": metrics["seconds"]}


def _train_on_cluster(address: str, name: str, store: Store, recipe, table, held, classes: list, report, ctx) -> dict:
    """`train_backbone` of one run as a task on the Ray cluster at `address` (`core.scale.runs`)."""
    from core.embed.embeddings import label_indices
    from core.scale.data import paths_by_row, pixel_source
    from core.scale.runs import train_on_cluster

    paths = paths_by_row(name, store)

    def part(frame):
        rows = frame.row.to_numpy()
        return rows, paths[rows], label_indices(frame.label, classes)
    return train_on_cluster(address, pixel_source(name, store), f"trained:{recipe.arch}", part(table), len(classes),
                            recipe, part(held), report, ctx)


def _on_ray(ctx: JobContext) -> dict:
    """The `ray` parameter a sweep hands to the jobs it starts (none: they read `REDEX_RAY_ADDRESS`)."""
    return {"ray": ctx.params["ray"]} if ctx.params.get("ray") is not None else {}


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
