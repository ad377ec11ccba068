"""Background jobs: every long computation runs as its own process, tracked by a row in the store.

Life of a job: `launch()` inserts a row (queued) and starts `python -m core.jobs <id>` in a new
process session, so jobs outlive the app and a restart of it. The process waits for a compute
slot if its kind is heavy (one at a time by default: the CPU is the bottleneck), marks itself
running, reports progress through short store transactions (at most one per second), and ends
done, failed (with the error) or cancelled. `refresh()` (called on every look at the jobs) marks
any queued/running job whose process is gone as failed, so nothing shows 'running' forever.

Task functions register with `@task(kind, heavy=...)`; they receive a `JobContext`.
"""
from __future__ import annotations

import contextlib
import fcntl
import importlib
import json
import os
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from core import config
from core.store.db import Store, get_store, to_json

ACTIVE = ("queued", "running")
FINAL = ("done", "failed", "cancelled")
# Modules whose import registers task kinds.
TASK_MODULES = ("core.data.scan", "core.embed.embeddings", "core.embed.projection", "core.redundancy.clusterings",
                "core.subsets.sweeps", "core.ltrp.scoring")


class JobCancelled(Exception):
    """Raised inside a task when the user cancelled it."""


@dataclass(frozen=True)
class TaskDef:
    kind: str
    fn: Callable[["JobContext"], Any]
    heavy: bool


TASKS: dict[str, TaskDef] = {}


def task(kind: str, heavy: bool = True):
    """Register a task function under `kind`. Heavy tasks share the compute slots."""
    def register(fn):
        TASKS[kind] = TaskDef(kind, fn, heavy)
        return fn
    return register


def max_parallel() -> int:
    """How many heavy jobs run at once (`REDEX_MAX_JOBS`, default 1)."""
    return max(1, int(os.environ.get("REDEX_MAX_JOBS", "1")))


# -- launching and looking ---------------------------------------------------------------------
def launch(kind: str, dataset: str | None = None, params: dict | None = None,
           store: Store | None = None) -> int:
    """Insert a job row and start its process. Returns the job id."""
    _load_tasks()
    if kind not in TASKS:
        raise ValueError(f"unknown job kind {kind!r}; known: {', '.join(sorted(TASKS))}")
    store = store or get_store()
    log_dir = config.cache_dir() / "jobs"
    log_dir.mkdir(parents=True, exist_ok=True)
    with store.write() as con:
        job_id = con.execute(
            "INSERT INTO jobs (kind, dataset, params, status, message) VALUES (?, ?, ?, 'queued', ?)"
            " RETURNING id", [kind, dataset, to_json(params or {}), "starting"]).fetchone()[0]
        log_path = log_dir / f"job-{job_id}.log"
        con.execute("UPDATE jobs SET log_path = ? WHERE id = ?", [str(log_path), job_id])
    env = dict(os.environ, REDEX_CACHE=str(config.cache_dir()), PYTHONUNBUFFERED="1")
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "core.jobs", str(job_id), str(store.path)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True, env=env, cwd=str(config.REPO_ROOT))
    store.execute("UPDATE jobs SET pid = ? WHERE id = ?", [proc.pid, job_id])
    _reap_later(proc)
    return job_id


def get_job(job_id: int, store: Store | None = None) -> dict | None:
    store = store or get_store()
    refresh(store)
    rows = _job_rows(store, "WHERE id = ?", [job_id])
    return rows[0] if rows else None


def list_jobs(store: Store | None = None, dataset: str | None = None, limit: int = 200) -> list[dict]:
    store = store or get_store()
    refresh(store)
    if dataset:
        return _job_rows(store, "WHERE dataset = ? ORDER BY id DESC LIMIT ?", [dataset, limit])
    return _job_rows(store, "ORDER BY id DESC LIMIT ?", [limit])


def job_events(job_id: int, store: Store | None = None, limit: int = 50) -> list[tuple]:
    store = store or get_store()
    return store.query("SELECT ts, level, message FROM job_events WHERE job_id = ? "
                       "ORDER BY ts DESC LIMIT ?", [job_id, limit])[::-1]


def log_tail(job: dict, lines: int = 40) -> str:
    path = job.get("log_path")
    if not path or not Path(path).exists():
        return ""
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - 64 * 1024))
        text = f.read().decode("utf-8", "replace")
    return "\n".join(text.splitlines()[-lines:])


def describe(job: dict) -> dict:
    """What a progress bar shows: fraction done (or None), ETA in seconds (or None), and a line of text."""
    done, total, rate = job.get("done") or 0, job.get("total"), job.get("rate")
    fraction = min(1.0, done / total) if total else None
    eta = (total - done) / rate if total and rate and job["status"] == "running" else None
    parts = [job["status"]]
    if job.get("phase"):
        parts.append(job["phase"])
    if total:
        parts.append(f"{done:,}/{total:,}")
    if rate:
        parts.append(f"{rate:,.1f}/s")
    if eta is not None:
        parts.append(f"ETA {format_seconds(eta)}")
    if job.get("message") and job["message"] not in (job.get("phase"), job["status"]):
        parts.append(job["message"])
    if job["status"] == "failed" and job.get("error"):
        parts.append(job["error"])
    return {"fraction": fraction, "eta_s": eta, "text": " · ".join(parts)}


def format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def cancel(job_id: int, store: Store | None = None, wait_s: float = 10.0) -> bool:
    """Ask a job to stop (SIGTERM to its process group; SIGKILL after `wait_s`). True if it was active."""
    store = store or get_store()
    job = get_job(job_id, store)
    if job is None or job["status"] not in ACTIVE:
        return False
    pid = job["pid"]
    if pid and _alive(pid, job_id):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline and _alive(pid, job_id):
            time.sleep(0.1)
        if _alive(pid, job_id):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
    _finish(store, job_id, "cancelled", message="cancelled by the user", only_if_active=True)
    return True


def refresh(store: Store | None = None) -> int:
    """Mark active jobs whose process is gone as failed. Returns how many were marked."""
    store = store or get_store()
    rows = store.query("SELECT id, pid, created_at FROM jobs WHERE status IN ('queued', 'running')")
    dead = []
    for job_id, pid, created_at in rows:
        if pid is None:
            # The launcher inserts the row before it knows the pid; allow it a moment.
            age = time.time() - created_at.timestamp() if created_at else 0
            if age > 60:
                dead.append(job_id)
        elif not _alive(pid, job_id):
            dead.append(job_id)
    for job_id in dead:
        _finish(store, job_id, "failed", error="the job's process died unexpectedly "
                "(killed, or out of memory); see its log", only_if_active=True)
    return len(dead)


def wait(job_id: int, store: Store | None = None, timeout: float = 600, poll: float = 0.5) -> dict:
    """Block until the job is final (for the CLI and tests)."""
    deadline = time.monotonic() + timeout
    while True:
        job = get_job(job_id, store)
        if job is None or job["status"] in FINAL:
            return job
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} still {job['status']} after {timeout:.0f} s")
        time.sleep(poll)


# -- inside the job process --------------------------------------------------------------------
@dataclass
class JobContext:
    """What a task sees: its parameters, progress reporting, logging and cancellation."""
    job_id: int
    kind: str
    dataset: str | None
    params: dict
    store: Store
    _last_report: float = 0.0
    _phase_start: float = field(default_factory=time.monotonic)
    _phase_done0: int = 0
    _cancelled: bool = False

    def phase(self, name: str, total: int | None = None) -> None:
        """Start a named phase with its own progress count (e.g. 'train backbone', 'embed')."""
        self._phase_start, self._phase_done0 = time.monotonic(), 0
        self.store.execute("UPDATE jobs SET phase = ?, done = 0, total = ?, rate = NULL, message = ?,"
                           " updated_at = now() WHERE id = ?", [name, total, name, self.job_id])
        self.log(f"phase: {name}")

    def progress(self, done: int, total: int | None = None, message: str | None = None,
                 force: bool = False) -> None:
        """Report progress; written at most once a second unless `force`. Also checks cancel."""
        self.check_cancelled()
        now = time.monotonic()
        if not force and now - self._last_report < 1.0:
            return
        self._last_report = now
        elapsed = now - self._phase_start
        rate = (done - self._phase_done0) / elapsed if elapsed > 0 and done else None
        self.store.execute(
            "UPDATE jobs SET done = ?, total = coalesce(?, total), rate = ?, message = coalesce(?, message),"
            " updated_at = now() WHERE id = ?", [done, total, rate, message, self.job_id])

    def resume_from(self, done: int) -> None:
        """Tell the rate estimate that `done` units were already finished before this run."""
        self._phase_done0 = done

    def log(self, message: str, level: str = "info") -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {level}: {message}", flush=True)
        self.store.execute("INSERT INTO job_events (job_id, level, message) VALUES (?, ?, ?)",
                           [self.job_id, level, message])

    def should_stop(self) -> bool:
        return self._cancelled

    def check_cancelled(self) -> None:
        if self._cancelled:
            raise JobCancelled()


def run_job(job_id: int, store: Store) -> int:
    """Body of a job process. Returns the process exit code."""
    _load_tasks()
    row = _job_rows(store, "WHERE id = ?", [job_id])
    if not row:
        print(f"job {job_id} not found", file=sys.stderr)
        return 2
    job = row[0]
    ctx = JobContext(job_id, job["kind"], job["dataset"], job["params"] or {}, store)
    signal.signal(signal.SIGTERM, lambda *_: setattr(ctx, "_cancelled", True))
    taskdef = TASKS.get(job["kind"])
    try:
        if taskdef is None:
            raise ValueError(f"unknown job kind {job['kind']!r}")
        with _compute_slot(ctx) if taskdef.heavy else contextlib.nullcontext():
            ctx.check_cancelled()
            store.execute("UPDATE jobs SET status = 'running', started_at = now(), updated_at = now(),"
                          " pid = ? WHERE id = ? AND status = 'queued'", [os.getpid(), job_id])
            ctx.log(f"started {job['kind']} {job['dataset'] or ''} {to_json(ctx.params)}")
            result = taskdef.fn(ctx)
        _finish(store, job_id, "done", result=result, message="done")
        ctx.log("done")
        return 0
    except BaseException as exc:  # noqa: BLE001 - every failure is recorded and becomes the exit code
        if isinstance(exc, JobCancelled) or ctx.should_stop():  # a task's own cancel exception too
            _finish(store, job_id, "cancelled", message="cancelled by the user")
            return 0
        traceback.print_exc()
        error = f"{type(exc).__name__}: {exc}"
        _finish(store, job_id, "failed", error=error, message="failed")
        with contextlib.suppress(Exception):
            ctx.log(error, level="error")
        return 1


@contextlib.contextmanager
def _compute_slot(ctx: JobContext):
    """Hold one of `max_parallel()` slot locks; the job stays queued while it waits."""
    slot_dir = config.cache_dir() / "jobs" / "slots"
    slot_dir.mkdir(parents=True, exist_ok=True)
    n, announced = max_parallel(), False
    while True:
        for i in range(n):
            fd = os.open(slot_dir / f"slot-{i}.lock", os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            try:
                yield
            finally:
                os.close(fd)
            return
        if not announced:
            ctx.store.execute("UPDATE jobs SET message = ? WHERE id = ?",
                              ["waiting for a free compute slot", ctx.job_id])
            announced = True
        ctx.check_cancelled()
        time.sleep(0.5)


def _finish(store: Store, job_id: int, status: str, *, error: str | None = None, result: Any = None,
            message: str | None = None, only_if_active: bool = False) -> None:
    guard = " AND status IN ('queued', 'running')" if only_if_active else ""
    store.execute(
        f"UPDATE jobs SET status = ?, error = coalesce(?, error), result = coalesce(?, result),"
        f" done = CASE WHEN ? = 'done' THEN coalesce(total, done) ELSE done END, message = coalesce(?, message), finished_at = now(), updated_at = now() WHERE id = ?{guard}",
        [status, error, None if result is None else to_json(result), status, message, job_id])


def _job_rows(store: Store, where: str, params: list) -> list[dict]:
    with store.read() as con:
        cur = con.execute(f"SELECT * FROM jobs {where}", params)
        cols = [d[0] for d in cur.description]
        rows = [dict(zip(cols, r)) for r in cur.fetchall()]
    for r in rows:
        for key in ("params", "result"):
            if isinstance(r[key], str):
                r[key] = json.loads(r[key])
    return rows


def _alive(pid: int, job_id: int) -> bool:
    """Is `pid` a live (not zombie) process running job `job_id`? Guards against pid reuse."""
    proc = Path(f"/proc/{pid}")
    if proc.exists():
        try:
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
        except (OSError, IndexError):
            return False
        return state not in ("Z", "X") and b"core.jobs" in cmdline and str(job_id).encode() in cmdline
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return not Path("/proc/self").exists()  # no procfs (macOS): trust kill(0)


_children: list[subprocess.Popen] = []


def _reap_later(proc: subprocess.Popen) -> None:
    """Keep the handle and reap finished children so they don't linger as zombies."""
    _children.append(proc)
    _children[:] = [p for p in _children if p.poll() is None]


def _load_tasks() -> None:
    for module in TASK_MODULES:
        importlib.import_module(module)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    job_id = int(argv[0])
    store = get_store(argv[1]) if len(argv) > 1 else get_store()
    return run_job(job_id, store)


if __name__ == "__main__":
    # Run through the imported module, not __main__, so task registrations land in one TASKS.
    from core.jobs import main as _main
    sys.exit(_main())
