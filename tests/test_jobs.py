"""Background jobs as a user meets them: done, failed with its error, cancelled, killed, and restarts."""
import os
import signal
import subprocess
import sys
import time

import pytest

from core import jobs
from core.data import scan, sources
from core.store.db import Store


def wait_for(predicate, timeout=120, poll=0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise TimeoutError("condition not met in time")


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
    job = wait_for(lambda: (j := jobs.get_job(job_id, store))["status"] == "running" and (j["done"] or 0) > 0 and j)
    assert jobs.cancel(job_id, store)
    job = jobs.get_job(job_id, store)
    assert job["status"] == "cancelled"
    assert not jobs._alive(job["pid"], job_id)
    assert not jobs.cancel(job_id, store)  # already over


def test_killed_process_is_failed_not_running_forever(store, small_fmnist):
    job_id = jobs.launch("embed", small_fmnist, {"epochs": 50}, store=store)
    job = wait_for(lambda: (j := jobs.get_job(job_id, store))["status"] == "running" and j)
    os.killpg(job["pid"], signal.SIGKILL)
    job = wait_for(lambda: (j := jobs.get_job(job_id, store))["status"] != "running" and j, timeout=30)
    assert job["status"] == "failed"
    assert "died" in job["error"]


def test_jobs_outlive_the_app_and_queue_for_the_cpu(store, image_folder, small_fmnist):
    """A job started by one process keeps running after it exits; heavy jobs wait for a free slot."""
    starter = subprocess.run(
        [sys.executable, "-c", "import sys; from core import jobs; print(jobs.launch('embed', sys.argv[1],"
         " {'epochs': 50}))", small_fmnist], capture_output=True, text=True, check=True)
    first = int(starter.stdout.strip())
    restarted = Store(store.path)  # what an app restarted now would see
    wait_for(lambda: jobs.get_job(first, restarted)["status"] == "running")
    second = jobs.launch("embed", small_fmnist, {"epochs": 1}, store=store)
    time.sleep(3)
    waiting = jobs.get_job(second, restarted)
    assert waiting["status"] == "queued" and "waiting" in waiting["message"]
    jobs.cancel(first, restarted)
    assert jobs.wait(second, restarted, timeout=300)["status"] == "done"
