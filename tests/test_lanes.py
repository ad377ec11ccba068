"""Job lanes: quick jobs never wait behind a training run, a waiting job says what it waits for, and
looking at jobs and runs only reads the store unless something must be fixed."""
import fcntl
import subprocess
import sys

import pytest

from core import jobs
from core.data import scan, sources
from core.embed import embeddings
from core.embed.backbones import DEFAULT_BACKBONE
from core.subsets import results
from tests.conftest import wait_until

pytestmark = pytest.mark.usefixtures("one_thread")
LONG_EPOCHS = 2000  # many minutes: the job holds the heavy slot until it is cancelled


@pytest.fixture
def scanned(store, image_folder, monkeypatch):
    """60 real images (3 classes x 15 train + 5 test), scanned; one heavy and one quick slot."""
    monkeypatch.setenv("REDEX_MAX_JOBS", "1")
    monkeypatch.setenv("REDEX_QUICK_JOBS", "1")
    name = sources.register(str(image_folder), "lanes")
    scan.scan(name, store)
    return name


def test_every_kind_has_its_lane():
    jobs._load_tasks()
    lanes = {kind: t.lane for kind, t in jobs.TASKS.items()}
    assert {k: lanes[k] for k in ("scan", "sweep")} == {"scan": "light", "sweep": "light"}
    assert {k: lanes[k] for k in ("project", "cluster", "ltrp_score")} == dict.fromkeys(
        ("project", "cluster", "ltrp_score"), "quick")
    assert {k: lanes[k] for k in ("embed", "train", "ltrp")} == dict.fromkeys(("embed", "train", "ltrp"), "heavy")
    assert jobs.slot_names("light") == [] and jobs.slot_names("heavy") == ["slot-0"]
    assert jobs.slot_names("quick") == ["quick-0", "slot-0"]  # its own slot first, then a free heavy one


def test_quick_job_runs_while_a_heavy_job_holds_the_only_heavy_slot(store, scanned):
    name = scanned
    holder = jobs.launch("embed", name, {"epochs": LONG_EPOCHS}, store=store)  # boots while we embed below
    model, bid = embeddings.ensure_backbone(name, DEFAULT_BACKBONE, epochs=1, store=store)
    embeddings.embed_dataset(name, model, bid, store=store)
    wait_until(lambda: jobs.get_job(holder, store)["status"] == "running", what="the long embed job to start")

    # A second heavy job queues behind it, and its row says for what.
    heavy = jobs.launch("embed", name, {"epochs": 1}, store=store)
    waiting = wait_until(lambda: (j := jobs.get_job(heavy, store))["waiting_for"] and j,
                         what="the second embed job to record what it waits for")
    assert waiting["status"] == "queued" and waiting["lane"] == "heavy"
    assert waiting["waiting_for"] == {"lane": "heavy", "jobs": [{"id": holder, "kind": "embed", "dataset": name}]}
    assert jobs.waiting_text(waiting) == f"waiting for: job {holder} (embed)"
    assert f"waiting for: job {holder} (embed)" in jobs.describe(waiting)["text"]

    # A quick job (the merge trees) does not wait: it runs and ends while the heavy job goes on.
    quick = jobs.launch("cluster", name, {"backbone_id": bid, "linkage": "complete"}, store=store)
    done = wait_until(lambda: (j := jobs.get_job(quick, store))["status"] in jobs.FINAL and j, timeout=90,
                      what="the cluster job to end")
    assert done["status"] == "done" and done["lane"] == "quick" and done["waiting_for"] is None, done
    assert jobs.get_job(holder, store)["status"] == "running"
    assert jobs.get_job(heavy, store)["status"] == "queued"

    # The slot is free again: the queued job starts, and no longer says it is waiting.
    assert jobs.cancel(holder, store)
    started = wait_until(lambda: (j := jobs.get_job(heavy, store))["status"] != "queued" and j, timeout=60,
                         what="the second embed job to start")
    assert started["waiting_for"] is None and jobs.waiting_text(started) == ""
    jobs.cancel(heavy, store)


def test_a_training_run_is_named_by_its_sweep(store):
    """What a waiting job records of a slot holder that is a subset training run: its sweep and its place."""
    with store.write() as con:
        con.execute("INSERT INTO jobs (id, kind, dataset, status) VALUES (40, 'sweep', 'd', 'running'),"
                    " (41, 'train', 'd', 'done'), (42, 'train', 'd', 'done'), (43, 'train', 'd', 'running'),"
                    " (44, 'cluster', 'd', 'running')")
        con.execute("INSERT INTO sweeps (id, dataset, spec, job_id) VALUES (2, 'd', '{}', 40)")
        for key, method, fraction, job in (("a", "full", 1.0, 41), ("b", "semantic", 0.9, 42),
                                           ("c", "random", 0.9, 43), ("d", "random", 0.5, None)):
            con.execute("INSERT INTO train_runs (run_key, dataset, sweep_id, method, fraction, seed, selection, recipe,"
                        " subset_fp, n_train, status, job_id) VALUES (?, 'd', 2, ?, ?, 1, '{}', '{}', 'fp', 10,"
                        " 'pending', ?)", [key, method, fraction, job])
    holders = jobs._holder_info(store, [43, 44])
    assert holders == [{"id": 43, "kind": "train", "dataset": "d", "sweep_id": 2, "run": 3, "method": "random",
                        "fraction": 0.9, "seed": 1}, {"id": 44, "kind": "cluster", "dataset": "d"}]
    job = {"status": "queued", "waiting_for": {"lane": "quick", "jobs": holders}}
    assert jobs.waiting_text(job) == ("waiting for the first of: job 43 (train, run 3 of sweep 2: random 0.9 seed 1),"
                                      " job 44 (cluster)")
    assert jobs.waiting_text({"status": "queued", "waiting_for": {"lane": "heavy", "jobs": []}}) == (
        "waiting for a free heavy slot")


def test_looks_read_and_write_only_to_fix_a_dead_job(store, monkeypatch):
    """get_job, list_jobs, active_jobs and results.runs take no write lock unless a job has died or a run
    must be settled; then they fix it once."""
    writes = []
    real_locked = store._locked

    def counting_locked(mode):  # every exclusive (write) lock the store takes
        if mode == fcntl.LOCK_EX:
            writes.append(mode)
        return real_locked(mode)

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    with store.write() as con:
        con.execute("INSERT INTO jobs (id, kind, dataset, status, pid) VALUES (101, 'scan', 'd', 'done', NULL),"
                    " (102, 'train', 'd', 'running', ?)", [gone.pid])
        con.execute("INSERT INTO train_runs (run_key, dataset, method, fraction, seed, selection, recipe, subset_fp,"
                    " n_train, status, job_id) VALUES ('k', 'd', 'full', 1.0, 0, '{}', '{}', 'fp', 10, 'running', 102)")
    monkeypatch.setattr(store, "_locked", counting_locked)

    assert [j["id"] for j in jobs.list_jobs(store)] == [102, 101]  # job 102's process is gone: one write
    assert jobs.get_job(102, store)["status"] == "failed" and len(writes) == 1
    assert results.runs("d", store).status.tolist() == ["failed"]  # its run is settled: one more write
    assert len(writes) == 2
    for _ in range(3):  # from now on, every look only reads
        jobs.list_jobs(store)
        jobs.get_job(101, store)
        assert jobs.active_jobs(store, "d") == []
        results.runs("d", store)
        assert not results.refresh_runs(store)
    assert len(writes) == 2
