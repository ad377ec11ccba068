"""Joining a Ray cluster, what it holds, and running independent units on it as tasks.

Only the job process (the driver) imports this, and only when a job has a Ray address.
"""
from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from core.jobs import JobContext

POLL_S = 0.5  # how often a driver waiting on tasks checks for a cancel


@dataclass(frozen=True)
class Cluster:
    """A joined cluster: the address as given, alive nodes, and its total CPUs and GPUs."""
    address: str
    nodes: int
    cpus: float
    gpus: float

    def ran_on(self, workers: int) -> dict:
        """What a job records as where it ran (`core.jobs.JobContext.ran_on`)."""
        return {**asdict(self), "workers": int(workers)}


def connect(address: str) -> Cluster:
    """Join the cluster at `address` ('auto', 'HOST:PORT', 'ray://HOST:PORT') once per process."""
    import ray

    if not ray.is_initialized():
        # The job log shows the workers' output; Ray's own INFO lines stay in its session folder.
        on_term = signal.getsignal(signal.SIGTERM)
        try:
            ray.init(address=address, logging_level="WARNING", log_to_driver=True)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise ConnectionError(f"no Ray cluster at {address!r} ({exc}); start one (`ray start --head`) or"
                                  " fix the app's Ray setting / REDEX_RAY_ADDRESS / --ray, or run here with"
                                  " --ray local") from None
        finally:
            if threading.current_thread() is threading.main_thread() and on_term is not None:
                signal.signal(signal.SIGTERM, on_term)  # ray.init installs its own (exit); a job's cancel is ours
    import ray.data

    data = ray.data.DataContext.get_current()  # a job reports through its row, not Ray Data's log lines
    data.enable_progress_bars = False
    data.print_on_execution_start = False
    resources = ray.cluster_resources()
    nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    return Cluster(address, nodes, float(resources.get("CPU", 0)), float(resources.get("GPU", 0)))


def task_options(cluster: Cluster, *, cpus: float = 1, gpu: bool = False) -> dict:
    """Ray options of one unit of work: one GPU (when the cluster has any and `gpu`), else `cpus` CPUs.

    Retries: a task whose worker died is run again (`max_retries`); an error raised by our own code
    is not retried (it would fail the same way)."""
    if gpu and cluster.gpus >= 1:
        return {"num_gpus": 1, "num_cpus": 1, "max_retries": 3}
    return {"num_cpus": cpus, "max_retries": 3}


def capacity(cluster: Cluster, options: dict) -> int:
    """How many tasks with `options` the whole cluster holds at once (at least 1)."""
    if options.get("num_gpus"):
        return max(1, int(cluster.gpus // options["num_gpus"]))
    return max(1, int(cluster.cpus // max(options.get("num_cpus", 1), 1e-9)))


def map_unordered(fn: Callable, calls: Iterable[tuple], options: dict, *, ctx: JobContext | None = None,
                  in_flight: int | None = None) -> Iterator[tuple[int, Any]]:
    """Run `fn(*args)` for every tuple of `calls` as a Ray task with `options`; yield (index, result)
    as tasks finish. Ray schedules them as resources free up. With `in_flight`, at most that many tasks
    are submitted at once and `calls` is read only as they finish, so the driver holds (and the object
    store keeps) the arguments of those tasks only; else every call is submitted at once. A cancel of
    the job (or leaving the loop early) cancels the tasks still pending or running; a task's error is
    raised here as its own type."""
    import ray

    remote = ray.remote(_call).options(**options)
    todo = iter(enumerate(calls))
    pending: dict = {}

    def submit() -> None:
        while in_flight is None or len(pending) < in_flight:
            nxt = next(todo, None)
            if nxt is None:
                return
            pending[remote.remote(fn, *nxt[1])] = nxt[0]  # the arguments go to the object store here

    try:
        submit()
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1, timeout=POLL_S, fetch_local=True)
            if done:  # and every other one finished by now: refill as soon as one ends, not when all have
                done, _ = ray.wait(list(pending), num_returns=len(pending), timeout=0, fetch_local=True)
            for ref in done:
                yield pending.pop(ref), ray.get(ref)
            submit()
            if ctx is not None:
                ctx.check_cancelled()
    finally:
        for ref in pending:
            ray.cancel(ref, force=True)


def _call(fn: Callable, *args):
    return fn(*args)


def map_ordered(fn: Callable, items: Iterable, options: dict | None = None) -> Iterator:
    """`map(fn, items)` with each call a Ray task, results in order: for a task that fans out
    (a big class's parts inside the class's own task). A worker blocked here lends its CPU back."""
    calls = [(item,) for item in items]
    results: dict[int, Any] = {}
    nxt = 0
    for i, value in map_unordered(fn, calls, options or {"num_cpus": 1, "max_retries": 3}):
        results[i] = value
        while nxt in results:
            yield results.pop(nxt)
            nxt += 1


def torch_threads() -> int:
    """Threads a worker's torch should use: the CPUs Ray gave it (at least 1)."""
    import ray

    try:
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
    except Exception:  # noqa: BLE001 - outside a Ray worker
        cpus = os.cpu_count() or 1
    return max(1, int(cpus))
