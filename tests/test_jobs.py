"""Background jobs as a user meets them: done, failed with its error, cancelled, killed, and restarts."""
import os
import signal
import subprocess
import sys

import pytest

from core import jobs
from core.data import scan, sources
from core.store.db import Store
from tests.conftest import wait_until


@pytest.fixture
def small_fmnist(store):
    name = sources.register("fashion-mnist", limit=1000)
    scan.scan(name, store)
    return name


def test_scan_job_runs_in_its_own_process_and_reports(store, image_folder):
    name = sources.register(str(image_folder), "jobscan")
    job_id = jobs.launch("scan", name, store=store)
    job = jobs.wait(job_id, store, timeout=120)
    assert job["status"] == "done"
    assert job["pid"] != os.getpid()
    assert job["result"]["images"] == 60
    assert job["done"] == job["total"] == 60
    assert "phase: scan images" in jobs.log_tail(job)
    assert any("60 images" in e[2] for e in jobs.job_events(job_id, store))


def test_failed_job_is_marked_failed_with_its_error(store, small_fmnist):
    job_id = jobs.launch("embed", small_fmnist, {"backbone": "timm:resnet18"}, store=store)
    job = jobs.wait(job_id, store, timeout=120)
    assert job["status"] == "failed"
    assert "BackboneUnavailable" in job["error"] and "checkpoint" in job["error"]
    assert "Traceback" in jobs.log_tail(job)


def test_cancel_stops_the_process(store, small_fmnist):
    job_id = jobs.launch("embed", small_fmnist, {"epochs": 50}, store=store)
    wait_until(lambda: (j := jobs.get_job(job_id, store))["status"] == "running" and (j["done"] or 0) > 0,
               what="the embed job to make progress")
    assert jobs.cancel(job_id, store)
    job = jobs.get_job(job_id, store)
    assert job["status"] == "cancelled"
    assert not jobs._alive(job["pid"], job_id)
    assert not jobs.cancel(job_id, store)  # already over


def test_killed_process_is_failed_not_running_forever(store, small_fmnist):
    job_id = jobs.launch("embed", small_fmnist, {"epochs": 50}, store=store)
    job = wait_until(lambda: (j := jobs.get_job(job_id, store))["status"] == "running" and j,
                     what="the embed job to start")
    os.killpg(job["pid"], signal.SIGKILL)
    job = wait_until(lambda: (j := jobs.get_job(job_id, store))["status"] != "running" and j, timeout=30,
                     what="the killed job to be noticed")
    assert job["status"] == "failed"
    assert "died" in job["error"]


def test_jobs_outlive_the_app_and_queue_for_the_cpu(store, image_folder, small_fmnist):
    """A job started by one process keeps running after it exits; heavy jobs wait for a free slot."""
    starter = subprocess.run(
        [sys.executable, "-c", "import sys; from core import jobs; print(jobs.launch('embed', sys.argv[1],"
         " {'epochs': 50}))", small_fmnist], capture_output=True, text=True, check=True)
    first = int(starter.stdout.strip())
    restarted = Store(store.path)  # what an app restarted now would see
    wait_until(lambda: jobs.get_job(first, restarted)["status"] == "running", what="the first job to start")
    second = jobs.launch("embed", small_fmnist, {"epochs": 1}, store=store)
    # Decided once the second job's process has tried for a compute slot: it says it waits, or it runs.
    waiting = wait_until(lambda: ((j := jobs.get_job(second, restarted))["status"] != "queued"
                                  or "waiting" in (j["message"] or "")) and j, what="the second job to try for a slot")
    assert waiting["status"] == "queued" and waiting["message"] == f"waiting for: job {first} (embed)"
    assert jobs.get_job(first, restarted)["status"] == "running"  # the slot it waits for is the first job's
    jobs.cancel(first, restarted)
    assert jobs.wait(second, restarted, timeout=300)["status"] == "done"
