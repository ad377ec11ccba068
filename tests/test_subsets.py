"""Subset training through the store, jobs, CLI and page: real images, real DuckDB, real training."""
import os
import signal
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from core import jobs
from core.cli import main as cli
from core.data import catalog, scan, sources
from core.embed import embeddings
from core.embed.backbones import DEFAULT_BACKBONE
from core.redundancy import clusterings
from core.redundancy.cuts import groups_for_fraction
from core.subsets import plan, results, sweeps
from tests.conftest import copy_store, run_page, store_template, wait_until

QUICK = {"epochs": 1, "batch_size": 16}
LEARNS = {"epochs": 20, "batch_size": 16}  # 1 to 2 s a run; 1 epoch only learns to predict one class (1/3)


def build_ready(store, image_folder):
    """60 real images (3 classes x 15 train + 5 test), embedded and clustered."""
    name = sources.register(str(image_folder), "sub")
    scan.scan(name, store)
    model, bid = embeddings.ensure_backbone(name, DEFAULT_BACKBONE, epochs=1, store=store)
    embeddings.embed_dataset(name, model, bid, store=store)
    clusterings.cluster(name, bid, store=store)
    return name, bid


@pytest.fixture(scope="module")
def ready_template(tmp_path_factory):
    return store_template(tmp_path_factory.mktemp("ready"), build_ready)


@pytest.fixture
def ready(cache, ready_template):
    """`build_ready`'s store, this test's own copy."""
    return copy_store(ready_template, cache)


def test_plan_keeps_class_counts_and_keys_every_distinct_run(ready, store):
    name, bid = ready
    spec = plan.SweepSpec(fractions=(1.0, 0.5, 0.2), seeds=2, recipe=QUICK)
    plans = plan.plan_runs(name, spec, store)
    # 1.0 is one full run per seed; each smaller fraction one run per method and seed.
    assert [(p.method, p.fraction, p.seed) for p in plans] == [
        ("full", 1.0, 0), ("full", 1.0, 1),
        ("semantic", 0.5, 0), ("semantic", 0.5, 1), ("random", 0.5, 0), ("random", 0.5, 1),
        ("semantic", 0.2, 0), ("semantic", 0.2, 1), ("random", 0.2, 0), ("random", 0.2, 1)]
    assert len({p.run_key for p in plans}) == len(plans)
    for p in plans:
        assert p.recipe.seed == p.seed and p.recipe.epochs == 1
        table = plan.subset_table(name, p.method, p.fraction, p.seed,
                                     plan.Selection(**p.selection) if p.selection else None, store=store)
        assert plan.fingerprint(table) == p.subset_fp and len(table) == p.n_train
        counts = table.label.value_counts()
        # Both subsets keep k_c = max(1, round(f * n_c)) of each class's 15 train images; no test image.
        assert (counts == groups_for_fraction(15, p.fraction)).all() and len(counts) == 3
        assert set(table.path.str.split("/").str[0]) == {"train"}
    semantic = [p for p in plans if p.method == "semantic" and p.fraction == 0.5]
    random_ = [p for p in plans if p.method == "random" and p.fraction == 0.5]
    assert semantic[0].subset_fp == semantic[1].subset_fp  # nearest-mean representatives: one subset
    assert random_[0].subset_fp != random_[1].subset_fp    # a fresh draw per seed
    c = clusterings.load_clustering(name, bid)
    kept = set(c.table.path.iloc[clusterings.subset(c, fraction=0.5).kept_indices])
    assert set(plan.subset_table(name, "semantic", 0.5, 0, plan.Selection(bid), store=store).path) == kept
    # The step budget gives every run the full run's number of steps.
    steps = plan.plan_runs(name, plan.SweepSpec(fractions=(1.0, 0.2), seeds=1, recipe=QUICK, budget="steps"),
                              store)
    assert {p.recipe.total_steps(p.n_train) for p in steps} == {45 // 16}


def test_sweep_trains_evaluates_stores_and_reuses(ready, store, monkeypatch):
    name, bid = ready
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the jobs' torch: 1 thread, 8x faster than 2 on a busy 2-core machine
    spec = plan.SweepSpec(fractions=(1.0, 0.5), methods=("semantic",), seeds=1, recipe=LEARNS)
    sweep_id, job_id = sweeps.launch_sweep(name, spec, store)
    assert jobs.wait(job_id, store, timeout=300)["status"] == "done"
    df = results.runs(name, store)
    assert sorted(df.method) == ["full", "semantic"] and set(df.status) == {"done"}
    for r in df.itertuples():
        run = results.get_run(r.run_key, store)
        m = run["metrics"]
        assert m["n_eval"] == 15 and m["eval_split"] == "test"
        # Top-1 on the 5 test images of each class: the mean of the per-class accuracies, well above the 1/3
        # of a model that learnt nothing (measured: 0.87-1.0 from 45 images, 0.67-0.87 from 24, over 8 seeds).
        assert m["test_top1"] == pytest.approx(np.mean(m["per_class"]))
        assert m["test_top1"] >= 0.6, f"{r.method} run: test top-1 {m['test_top1']:.3f}"
        assert r.test_top1 == m["test_top1"]
        assert len(m["per_class"]) == 3 and m["recipe"] == run["recipe"]  # the recipe travels with the result
        assert jobs.get_job(int(r.job_id), store)["kind"] == "train"
    assert df[df.method == "semantic"].n_train.iloc[0] == 3 * groups_for_fraction(15, 0.5)

    # The same sweep again: both runs are identical, so nothing is trained.
    _, again = sweeps.launch_sweep(name, spec, store)
    result = jobs.wait(again, store, timeout=120)["result"]
    assert result["runs"] == 0 and result["reused"] == 2
    assert len([j for j in jobs.list_jobs(store) if j["kind"] == "train"]) == 2
    # ... unless asked: force trains them again.
    _, forced = sweeps.launch_sweep(name, plan.SweepSpec(**{**spec.to_dict(), "force": True}), store)
    assert jobs.wait(forced, store, timeout=300)["result"]["done"] == 2
    assert len([j for j in jobs.list_jobs(store) if j["kind"] == "train"]) == 4

    summary = results.summary(results.runs(name, store))
    assert list(summary.method) == ["full", "semantic"] and (summary.seeds == 1).all()
    top1 = results.runs(name, store).groupby("method").test_top1.mean()
    assert results.evidence(name, 0.5, bid, store) == (
        f"0.5 semantic: {100 * top1['semantic']:.1f} vs full {100 * top1['full']:.1f} (test top-1 %, up to 1 seed)")
    assert results.evidence(name, 0.8, bid, store) is None
    deltas = results.per_class_deltas(name, df[df.method == "semantic"].run_key.iloc[0], store)
    assert list(deltas.label) == ["class0", "class1", "class2"] and "delta" in deltas


def test_killed_run_fails_the_sweep_goes_on_cancel_and_retry(ready, store):
    name, _ = ready
    long = {"epochs": 400, "batch_size": 8}  # about a minute per run on this CPU: time to kill it
    spec = plan.SweepSpec(fractions=(1.0, 0.5), methods=("random",), seeds=1, recipe=long)
    sweep_id, sweep_job = sweeps.launch_sweep(name, spec, store)

    def running_run():
        df = results.runs(name, store)
        live = df[(df.status == "running") & df.done.fillna(0).gt(0)]
        return live.iloc[0] if len(live) else None

    wait_until(lambda: running_run() is not None, what="the first run to train")
    first = running_run()
    assert first.method == "full"
    os.kill(jobs.get_job(int(first.job_id), store)["pid"], signal.SIGKILL)
    # The killed run is failed with the reason, and the sweep starts the next one.
    wait_until(lambda: results.get_run(first.run_key, store)["status"] == "failed", what="the killed run to fail")
    assert "died" in results.get_run(first.run_key, store)["error"]
    wait_until(lambda: (r := running_run()) is not None and r.run_key != first.run_key, what="the next run")
    second = running_run()
    assert second.method == "random" and jobs.get_job(sweep_job, store)["status"] == "running"

    assert sweeps.cancel_sweep(sweep_id, store)
    assert jobs.get_job(sweep_job, store)["status"] == "cancelled"
    assert results.get_run(second.run_key, store)["status"] == "cancelled"
    assert jobs.get_job(int(second.job_id), store)["status"] == "cancelled"

    # Retry puts exactly the failed and cancelled runs back to work.
    retry_sweep, retry_job = sweeps.retry(name, store)
    wait_until(lambda: (r := running_run()) is not None and r.sweep_id == retry_sweep, what="a retried run")
    assert set(results.runs(name, store).sweep_id) == {retry_sweep}
    at = run_page("pages/training.py", dataset=name)  # live: one run training, one waiting for its turn
    assert not at.exception
    table = next(d.value for d in at.dataframe if "run_key" in d.value.columns)
    assert sorted(table.status) == ["pending", "running"]
    assert len(at.get("progress")) == 2  # live bars: the sweep, and the run that is training
    assert sweeps.cancel_sweep(retry_sweep, store)
    assert set(results.runs(name, store).status) == {"cancelled"}


def test_cli_train_results_and_errors(ready, store, capsys, tmp_path):
    name, _ = ready
    assert cli(["train", name, "--fraction", "0.5", "--method", "random", "--seeds", "2", "--epochs", "1",
                "--batch-size", "16"]) == 0
    out = capsys.readouterr().out
    assert "sweep 1" in out and "random" in out
    assert cli(["results", name, "--csv"]) == 0
    table = pd.read_csv(__import__("io").StringIO(capsys.readouterr().out))
    assert list(table.method) == ["random"] and table.seeds.iloc[0] == 2 and table.n_train.iloc[0] == 24
    assert cli(["results", name, "--runs"]) == 0
    assert capsys.readouterr().out.count("done") == 2

    assert cli(["sweep", name, "--methods", "semantic,clever"]) == 1
    assert "methods must be among semantic, random" in capsys.readouterr().err
    assert cli(["sweep", name, "--fractions", "0.5,1.5"]) == 1
    assert "fractions must lie in (0, 1]" in capsys.readouterr().err
    # A dataset with nothing to evaluate on is refused with the reason, before any job starts.
    train_only = tmp_path / "train_only"
    (train_only / "a").mkdir(parents=True)
    (train_only / "b").mkdir()
    for f in list((Path(catalog.get_dataset(name, store)["root"]) / "train" / "class0").iterdir())[:4]:
        (train_only / "a" / f.name).write_bytes(f.read_bytes())
        (train_only / "b" / f.name).write_bytes(f.read_bytes())
    other = sources.register(str(train_only), "trainonly")
    scan.scan(other, store)
    n_jobs = len(jobs.list_jobs(store))
    assert cli(["train", other, "--fraction", "0.5", "--method", "random"]) == 1
    assert "no test or val images" in capsys.readouterr().err
    assert len(jobs.list_jobs(store)) == n_jobs


def test_training_page_launches_and_plots(ready, store):
    name, bid = ready
    at = run_page("pages/training.py", dataset=name)
    assert not at.exception
    assert "No training runs yet." in [c.value for c in at.caption]
    estimate = next(i.value for i in at.info if "runs" in i.value)
    assert estimate.startswith("27 runs")  # 1.0 x 3 seeds + 4 fractions x 2 methods x 3 seeds
    at.multiselect(key="sweep_fractions").set_value([1.0, 0.5])
    at.multiselect(key="sweep_methods").set_value(["semantic", "random"])
    at.number_input(key="sweep_seeds").set_value(1)
    at.number_input(key="sweep_epochs").set_value(1)
    at.number_input(key="sweep_batch").set_value(16)
    at.run()
    assert next(i.value for i in at.info if "runs" in i.value).startswith("3 runs")
    at.button(key="launch_sweep").click()
    at.run()
    assert not at.exception
    sweep = sweeps.active_sweeps(name, store)
    assert len(sweep) == 1
    assert jobs.wait(sweep[0]["id"], store, timeout=300)["result"]["done"] == 3

    at = run_page("pages/training.py", dataset=name)
    assert not at.exception
    assert len(at.get("plotly_chart")) == 2  # accuracy vs size, and the per-class deltas
    summary = next(d.value for d in at.dataframe if "top1" in d.value.columns)
    assert list(summary.method) == ["full", "semantic", "random"]
    runs_table = next(d.value for d in at.dataframe if "run_key" in d.value.columns)
    assert set(runs_table.status) == {"done"} and len(runs_table) == 3

    groups_page = run_page("pages/redundant_groups.py", dataset=name, fraction=0.5)
    assert not groups_page.exception
    assert any(c.value.startswith("**Evidence:** 0.5 semantic: ") and "vs random" in c.value and "vs full" in c.value
               for c in groups_page.caption)


def test_summary_keeps_the_newest_run_of_each_seed_not_the_runs_of_a_subset_since_replaced(store):
    # New near-copy pairs or embeddings change the trees, so the semantic subset, and a sweep trains it anew: the
    # runs of the subset before it stay in the store, and the summary must not average the two subsets' runs
    recipe = '{"epochs": 1, "seed": 0}'
    rows = [("old0", "semantic", 0, "fpA", 0.50, "2026-01-01"), ("old1", "semantic", 1, "fpA", 0.52, "2026-01-01"),
            ("new0", "semantic", 0, "fpB", 0.80, "2026-02-01"), ("new1", "semantic", 1, "fpB", 0.84, "2026-02-01"),
            ("full0", "full", 0, "fpF", 0.90, "2026-01-01")]
    with store.write() as con:
        for key, method, seed, fp, top1, at in rows:
            fraction = 1.0 if method == "full" else 0.5
            con.execute("INSERT INTO train_runs (run_key, dataset, method, fraction, seed, selection, recipe, subset_fp,"
                        " n_train, status, metrics, created_at, finished_at) VALUES (?, 'd', ?, ?, ?, '{\"backbone_id\":"
                        " \"b\"}', ?, ?, 10, 'done', ?, ?, ?)",
                        [key, method, fraction, seed, recipe, fp, f'{{"test_top1": {top1}}}', at, at])
    table = results.summary(results.runs("d", store))
    semantic = table[table.method == "semantic"].iloc[0]
    assert semantic.seeds == 2 and semantic.top1_mean == pytest.approx(0.82)  # the newer subset's two runs only
    assert semantic.top1_std == pytest.approx(np.std([0.80, 0.84], ddof=1))
    assert table[table.method == "full"].iloc[0].top1_mean == pytest.approx(0.90)
