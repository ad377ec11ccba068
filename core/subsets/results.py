"""Reading subset-training results: runs, summaries by (method, fraction), evidence, per-class deltas."""
from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from core import jobs
from core.store.db import Store, get_store
from core.subsets.plan import SubsetTrainingError, recipe_tag

if TYPE_CHECKING:
    pass


def get_run(key: str, store: Store | None = None) -> dict:
    store = store or get_store()
    df = store.query_df("SELECT * FROM train_runs WHERE run_key = ?", [key])
    if df.empty:
        raise SubsetTrainingError(f"no training run {key!r}")
    row = df.iloc[0].to_dict()
    for col in ("selection", "recipe", "metrics"):
        row[col] = json.loads(row[col]) if isinstance(row[col], str) else row[col]
    return row


# -- reading results ---------------------------------------------------------------------------
# Runs left active by a training job, or waiting on a sweep, that is over.
_UNSETTLED = (
    "SELECT (SELECT count(*) FROM train_runs r JOIN jobs j ON r.job_id = j.id WHERE r.status IN ('pending', 'running')"
    " AND j.status IN ('failed', 'cancelled')) + (SELECT count(*) FROM train_runs r JOIN sweeps s ON r.sweep_id = s.id"
    " JOIN jobs j ON s.job_id = j.id WHERE r.status = 'pending' AND r.job_id IS NULL"
    " AND j.status IN ('done', 'failed', 'cancelled'))")


def refresh_runs(store: Store | None = None) -> bool:
    """Runs left active by a job or sweep that is gone become failed (never 'running' forever).

    One read; the write lock is taken only when a job died or a run must be settled. True if it wrote."""
    store = store or get_store()
    with store.read():
        dead = jobs.dead_jobs(store)
        unsettled = store.query(_UNSETTLED)[0][0]
    if not dead and not unsettled:
        return False
    _settle_runs(store, dead)
    return True


def _settle_runs(store: Store, dead: list[int]) -> None:
    jobs.mark_dead(store, dead)
    with store.write() as con:
        con.execute(
            "UPDATE train_runs r SET status = j.status, error = coalesce(j.error, 'the training job ended'),"
            " finished_at = now() FROM jobs j WHERE r.job_id = j.id AND r.status IN ('pending', 'running')"
            " AND j.status IN ('failed', 'cancelled')")
        con.execute(
            "UPDATE train_runs r SET status = 'failed', error = 'the sweep stopped before this run started',"
            " finished_at = now() FROM sweeps s, jobs j WHERE r.sweep_id = s.id AND s.job_id = j.id"
            " AND r.status = 'pending' AND r.job_id IS NULL AND j.status IN ('done', 'failed', 'cancelled')")


_RUNS = (
    "SELECT r.run_key, r.sweep_id, r.method, r.fraction, r.seed, r.n_train, r.status, r.job_id, r.error,"
    " TRY_CAST(r.metrics->>'test_top1' AS DOUBLE) AS test_top1,"
    " TRY_CAST(r.metrics->>'test_loss' AS DOUBLE) AS test_loss,"
    " TRY_CAST(r.metrics->>'seconds' AS DOUBLE) AS seconds, r.metrics->>'device' AS device,"
    " r.metrics->>'eval_split' AS eval_split, TRY_CAST(r.metrics->>'n_eval' AS INTEGER) AS n_eval,"
    " r.recipe, r.selection, r.created_at, r.finished_at, j.done, j.total, j.rate, j.message"
    " FROM train_runs r LEFT JOIN jobs j ON j.id = r.job_id WHERE r.dataset = ?"
    " ORDER BY r.created_at DESC, r.fraction DESC, r.method, r.seed")


def runs(name: str, store: Store | None = None, refresh: bool = True) -> pd.DataFrame:
    """Every run of a dataset, newest first, with its live job progress and its headline metrics.

    `refresh`: first settle runs whose job or sweep is gone. It costs one read (the same one that
    reads the runs) and writes only when there is something to settle, so polling pages may use it."""
    store = store or get_store()
    with store.read():
        dead = jobs.dead_jobs(store) if refresh else []
        unsettled = store.query(_UNSETTLED)[0][0] if refresh else 0
        df = store.query_df(_RUNS, [name])
    if dead or unsettled:
        _settle_runs(store, dead)
        df = store.query_df(_RUNS, [name])
    df["recipe_tag"] = [recipe_tag(json.loads(r)) for r in df.recipe]
    df["backbone_id"] = [json.loads(s).get("backbone_id") for s in df.selection]
    return df


def summary(df: pd.DataFrame, tag: str | None = None) -> pd.DataFrame:
    """Finished runs grouped by (method, fraction): images, seeds, mean and std of test top-1.

    `tag`: only runs of that recipe (see `recipe_tag`); default: the recipe of the newest run.
    std is the sample std over seeds (0 for one seed). One run per (method, fraction, seed, selection): the
    newest. When the trees change (new embeddings, near-copy pairs), a semantic subset changes and a sweep
    trains it anew; the runs of the subset before it stay in the store, but are not averaged with the
    new ones (they were: 4 runs under "2 seeds", docs/reproduction.md).
    """
    done = df[df.status == "done"]
    if done.empty:
        return pd.DataFrame(columns=["method", "fraction", "n_train", "seeds", "top1_mean", "top1_std",
                                     "recipe_tag", "backbone_id"])
    tag = tag or done.recipe_tag.iloc[0]
    done = done[done.recipe_tag == tag].fillna({"backbone_id": ""})
    done = (done.sort_values(["finished_at", "created_at"], kind="stable", na_position="first")
            .drop_duplicates(["method", "fraction", "seed", "selection"], keep="last"))
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
    '0.9 semantic: 91.2 ± 0.2 vs random 90.8 ± 0.3 vs full 91.3 ± 0.1 (test top-1 %, up to 3 seeds)'; None if
    no run."""
    return evidence_from(summary(runs(name, store, refresh=False)), fraction, backbone_id)


def evidence_from(s: pd.DataFrame, fraction: float, backbone_id: str | None = None) -> str | None:
    """`evidence` from a `summary` table already read (a page reads it once, then moves a slider)."""
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
