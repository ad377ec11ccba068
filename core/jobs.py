"""Background jobs: every long computation runs as its own process, tracked by a row in the store.

Life of a job: `launch()` inserts a row (queued) and starts `python -m core.jobs <id>` in a new
process session, so jobs outlive the app and a restart of it. The process waits for a compute
slot of its lane (below), marks itself running, reports progress through short store
transactions (at most one per second), and ends done, failed (with the error) or cancelled.
Every look at the jobs (`get_job`, `list_jobs`, `active_jobs`) first checks that the processes
of active jobs are alive, and marks any whose process is gone as failed, so nothing shows
'running' forever; the look itself only reads: the store is written only when a job has died.

Lanes. Each task kind runs in one of three lanes:
- light: takes no compute slot (scanning files, a sweep's scheduler that only plans and waits);
- quick: the interactive path, short jobs a person waits for at the screen (the UMAP map, the
  merge trees, scoring the images a ranker has not seen): `REDEX_QUICK_JOBS` slots (default 1)
  of their own, or any free heavy slot, so they never wait behind a training run;
- heavy: long computations (training a backbone and embedding, subset training runs, LTRP):
  `REDEX_MAX_JOBS` slots (default 1: the CPU is the bottleneck).
A slot is an flock'd file under `<cache>/jobs/slots/` holding its holder's job id, so a crashed
job frees its slot with its process. A job waiting for a slot records on its row what it waits
for (`waiting_for`: the jobs holding the slots it may take, a training run with its sweep), e.g.
"waiting for: job 12 (train, run 3 of sweep 2: random 0.5 seed 0)".

Task functions register with `@task(kind, heavy=..., lane=...)`; they receive a `JobContext`.
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

from core import config, wording
from core.store.db import Store, get_store, to_json

ACTIVE = ("queued", "running")
FINAL = ("done", "failed", "cancelled")
LANES = ("light", "quick", "heavy")
# Heavy kinds on the interactive path: they run in the quick lane unless `@task(lane=...)` says otherwise.
QUICK_KINDS = frozenset({"project", "cluster", "ltrp_score"})
_WAIT_POLL_S = 0.5      # how often a waiting job tries the slots again
_WAIT_DESCRIBE_S = 5.0  # ... and reads again who holds them (to catch a training run linked late)
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
    lane: str = "heavy"
    ray_lane: str | None = None  # the lane when the job's work runs on a Ray cluster (None: `lane`)


TASKS: dict[str, TaskDef] = {}


def task(kind: str, heavy: bool = True, lane: str | None = None, ray_lane: str | None = None):
    """Register a task function under `kind`, in `lane` (light, quick or heavy; see the module docstring).

    Default lane: light when not `heavy`, quick for the kinds in `QUICK_KINDS`, else heavy. `ray_lane`:
    the lane when the job has a Ray address (`core.scale.ray_address`) and its whole work runs there
    (a training run: 'light', it takes no slot here)."""
    lane = lane or ("light" if not heavy else "quick" if kind in QUICK_KINDS else "heavy")
    if lane not in LANES or (ray_lane is not None and ray_lane not in LANES):
        raise ValueError(f"unknown lane {lane!r}; known: {', '.join(LANES)}")

    def register(fn):
        TASKS[kind] = TaskDef(kind, fn, lane != "light", lane, ray_lane)
        return fn
    return register


def job_lane(taskdef: TaskDef, params: dict | None) -> str:
    """The lane a job runs in: its kind's, or its `ray_lane` when the job runs on a Ray cluster."""
    if taskdef.ray_lane is not None:
        from core.scale import ray_address

        if ray_address(params):
            return taskdef.ray_lane
    return taskdef.lane


def max_parallel() -> int:
    """How many heavy jobs run at once (`REDEX_MAX_JOBS`, default 1)."""
    return max(1, int(os.environ.get("REDEX_MAX_JOBS", "1")))


def max_quick() -> int:
    """How many quick jobs run at once besides the heavy ones (`REDEX_QUICK_JOBS`, default 1)."""
    return max(1, int(os.environ.get("REDEX_QUICK_JOBS", "1")))


def slot_names(lane: str) -> list[str]:
    """The slot files a job of `lane` may take, in order of preference (none for light jobs).

    Quick jobs take their own slots first, then any free heavy one; heavy jobs only heavy ones,
    so a training run never holds up the quick lane."""
    heavy = [f"slot-{i}" for i in range(max_parallel())]
    if lane == "heavy":
        return heavy
    if lane == "quick":
        return [f"quick-{i}" for i in range(max_quick())] + heavy
    return []


# -- launching and looking ---------------------------------------------------------------------
def launch(kind: str, dataset: str | None = None, params: dict | None = None,
           store: Store | None = None) -> int:
    """Insert a job row and start its process. Returns the job id.

    A kind that can run on Ray gets the app's Ray setting as its `ray` parameter when neither `params`
    nor REDEX_RAY_ADDRESS name a place (`core.scale.setting.for_launch`: flag > environment > setting)."""
    from core.scale import setting  # reads the store only; imports no ray

    _load_tasks()
    if kind not in TASKS:
        raise ValueError(f"unknown job kind {kind!r}; known: {', '.join(sorted(TASKS))}")
    store = store or get_store()
    log_dir = config.cache_dir() / "jobs"
    log_dir.mkdir(parents=True, exist_ok=True)
    with store.write() as con:
        params = setting.for_launch(kind, params, store)  # in the insert's transaction: read with it
        job_id = con.execute(
            "INSERT INTO jobs (kind, dataset, params, status, message, lane) VALUES (?, ?, ?, 'queued', ?, ?)"
            " RETURNING id", [kind, dataset, to_json(params or {}), "starting",
                              job_lane(TASKS[kind], params)]).fetchone()[0]
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
    rows = _look(store or get_store(), "WHERE id = ?", [job_id])
    return rows[0] if rows else None


def list_jobs(store: Store | None = None, dataset: str | None = None, limit: int = 200) -> list[dict]:
    """The newest `limit` jobs (of `dataset`), newest first."""
    if dataset:
        return _look(store or get_store(), "WHERE dataset = ? ORDER BY id DESC LIMIT ?", [dataset, limit])
    return _look(store or get_store(), "ORDER BY id DESC LIMIT ?", [limit])


def active_jobs(store: Store | None = None, dataset: str | None = None,
                kinds: tuple[str, ...] | list[str] | None = None) -> list[dict]:
    """The queued and running jobs (of `dataset`, of `kinds`), newest first: what a page has to watch."""
    where, params = "WHERE status IN ('queued', 'running')", []
    if dataset:
        where, params = where + " AND dataset = ?", [dataset]
    if kinds:
        where, params = where + " AND list_contains(?, kind)", params + [list(kinds)]
    return _look(store or get_store(), where + " ORDER BY id DESC", params)


def _look(store: Store, where: str, params: list) -> list[dict]:
    """Job rows, after failing the active jobs whose process is gone: one read, and a write only
    when a job has died (polling pages and waiting loops take no write lock)."""
    with store.read():
        dead = dead_jobs(store)
        rows = _job_rows(store, where, params)
    if dead:
        mark_dead(store, dead)
        rows = _job_rows(store, where, params)
    return rows


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


def waiting_text(job: dict) -> str:
    """What a queued job waits for, in words ('' when it is not waiting for a slot), e.g.
    'waiting for: job 12 (train, run 3 of sweep 2: random 0.5 seed 0)'."""
    waiting = job.get("waiting_for")
    if job.get("status") != "queued" or waiting is None:
        return ""
    holders = waiting.get("jobs") or []
    if not holders:
        return f"waiting for a free {waiting.get('lane', 'compute')} slot"
    names = [holder_text(h) for h in holders]
    return ("waiting for: " if len(names) == 1 else "waiting for the first of: ") + ", ".join(names)


def holder_text(holder: dict) -> str:
    """'job 12 (train, run 3 of sweep 2: random 0.5 seed 0)', 'job 14 (cluster)'."""
    what = holder["kind"]
    if holder.get("sweep_id") is not None:
        what += f", run {holder['run']} of sweep {holder['sweep_id']}"
        if holder.get("method"):
            what += f": {holder['method']} {holder['fraction']:g} seed {holder['seed']}"
    return f"job {holder['id']} ({what})"


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
    if rate and (total or 0) > 1:  # a one-step phase (a UMAP fit, a merge) has no meaningful rate
        parts.append(wording.rate(rate, wording.job_unit(job)))  # '102 images/s', '3.4 files/s'
    if eta is not None:
        parts.append(f"about {wording.duration(eta)} left")
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
    """Mark active jobs whose process is gone as failed. Returns how many were marked.

    Reads only (a shared lock) unless a job has died: the write lock is taken only to mark it."""
    store = store or get_store()
    dead = dead_jobs(store)
    mark_dead(store, dead)
    return len(dead)


def dead_jobs(store: Store) -> list[int]:
    """Ids of the queued/running jobs whose process is gone (a read, and a look at /proc)."""
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
    return dead


def mark_dead(store: Store, job_ids: list[int]) -> None:
    """Fail the given jobs (found by `dead_jobs`) if they are still active; no write when there are none."""
    if not job_ids:
        return
    with store.write():
        for job_id in job_ids:
            _finish(store, job_id, "failed", error="the job's process died unexpectedly "
                    "(killed, or out of memory); see its log", only_if_active=True)


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
    _interrupt: bool = False

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

    def ran_on(self, where: dict | None) -> None:
        """Record where the job's work runs: None here, else the Ray cluster (`core.scale.cluster`)."""
        self.store.execute("UPDATE jobs SET ran_on = ?, updated_at = now() WHERE id = ?",
                           [None if where is None else to_json(where), self.job_id])

    @contextlib.contextmanager
    def interruptible(self):
        """Inside, a cancel raises `JobCancelled` at once instead of at the next progress call: for a
        driver blocked waiting on a cluster (use it around waits only, never around store writes)."""
        self.check_cancelled()
        self._interrupt = True
        try:
            yield
        finally:
            self._interrupt = False

    def _on_cancel(self, *_) -> None:
        self._cancelled = True
        if self._interrupt:
            self._interrupt = False
            raise JobCancelled()

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
    signal.signal(signal.SIGTERM, ctx._on_cancel)
    taskdef = TASKS.get(job["kind"])
    try:
        if taskdef is None:
            raise ValueError(f"unknown job kind {job['kind']!r}")
        with _compute_slot(ctx, job_lane(taskdef, ctx.params)):
            ctx.check_cancelled()
            store.execute("UPDATE jobs SET status = 'running', started_at = now(), updated_at = now(), pid = ?,"
                          " waiting_for = NULL, message = NULL WHERE id = ? AND status = 'queued'",
                          [os.getpid(), job_id])
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
def _compute_slot(ctx: JobContext, lane: str = "heavy"):
    """Hold one of the slots of `lane` (see `slot_names`; none for light jobs) while the body runs.

    A slot is an exclusive flock on `<cache>/jobs/slots/<name>.lock`, released by the kernel if the
    process dies; the file holds the holder's job id while it is held. The job stays queued while it
    waits, with `waiting_for` on its row naming the jobs that hold the slots it may take."""
    names = slot_names(lane)
    if not names:
        yield None
        return
    slot_dir = config.cache_dir() / "jobs" / "slots"
    slot_dir.mkdir(parents=True, exist_ok=True)
    recorded, holders, described_at = None, None, 0.0
    while True:
        for name in names:
            fd = os.open(slot_dir / f"{name}.lock", os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            try:
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{ctx.job_id}\n".encode(), 0)
                yield name
            finally:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, 0)  # before the unlock: nobody reads a stale holder
                os.close(fd)
            return
        ctx.check_cancelled()
        now_holders = _slot_holders(slot_dir, names)
        if now_holders != holders or time.monotonic() - described_at > _WAIT_DESCRIBE_S:
            holders, described_at = now_holders, time.monotonic()
            waiting = {"lane": lane, "jobs": _holder_info(ctx.store, holders)}
            if waiting != recorded:  # a write only when what it waits for changed
                recorded = waiting
                ctx.store.execute("UPDATE jobs SET waiting_for = ?, message = ?, updated_at = now()"
                                  " WHERE id = ? AND status = 'queued'",
                                  [to_json(waiting), waiting_text({"status": "queued", "waiting_for": waiting}),
                                   ctx.job_id])
        time.sleep(_WAIT_POLL_S)


def _slot_holders(slot_dir: Path, names: list[str]) -> list[int]:
    """Job ids written in the given (held) slot files, in slot order, without repeats."""
    out = []
    for name in names:
        with contextlib.suppress(OSError, ValueError):
            text = (slot_dir / f"{name}.lock").read_text().strip()
            if text and int(text) not in out:
                out.append(int(text))
    return out


def _holder_info(store: Store, job_ids: list[int]) -> list[dict]:
    """Who holds the slots: id, kind, dataset; for a subset training run also its sweep, its place
    among the sweep's runs (in launch order), method, fraction and seed."""
    if not job_ids:
        return []
    with store.read() as con:
        cur = con.execute(
            "SELECT j.id, j.kind, j.dataset, r.sweep_id,"
            " CASE WHEN r.sweep_id IS NOT NULL THEN (SELECT count(*) FROM train_runs x WHERE x.sweep_id = r.sweep_id"
            "   AND x.job_id IS NOT NULL AND x.job_id <= j.id) END AS run,"
            " r.method, r.fraction, r.seed"
            " FROM jobs j LEFT JOIN train_runs r ON r.job_id = j.id WHERE list_contains(?, j.id)", [job_ids])
        cols = [d[0] for d in cur.description]
        found = {row[0]: dict(zip(cols, row)) for row in cur.fetchall()}
    return [{k: v for k, v in found[i].items() if v is not None} for i in job_ids if i in found]


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
        for key in ("params", "result", "waiting_for", "ran_on"):
            if isinstance(r.get(key), str):
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
