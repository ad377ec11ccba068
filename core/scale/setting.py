"""Where heavy jobs run, as set in the app: a Ray address kept in the store, its check, and its precedence.

A job's Ray address, the first one given wins:

1. the job's `ray` parameter: `--ray ADDRESS` on a heavy CLI command (`--ray local`: here);
2. `REDEX_RAY_ADDRESS` in the environment of the process that launches the job (the app or the CLI);
3. this setting (the sidebar's "Heavy jobs" control; the `settings` table, key `ray_address`);
4. none: the job runs here, and nothing imports ray.

The environment wins over the setting because whoever starts the app (a shell, a KubeRay pod spec) fixes
it for that deployment; the sidebar says so when it does. `core.jobs.launch` resolves the address once,
at launch (`for_launch`), and writes a setting into the job's `ray` parameter: a queued or running job
keeps the cluster it was launched for, its process looks nothing up, and the job's row says where it
was sent.

Checking an address means joining the cluster, which a process can do once and which at a wrong address
waits minutes. So the app never joins one: a check first opens a TCP connection to HOST:PORT (3 s),
then runs `python -m core.scale.probe ADDRESS` (`PROBE_TIMEOUT_S`), in a background thread; the page
polls `state()` and never waits on it. Nothing here imports ray.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

from core import config
from core.scale import ENV, LOCAL
from core.store.db import Store

KEY = "ray_address"
# The job kinds whose heavy stage can run on Ray (core.scale's module docstring): the others never get
# the setting written into their parameters.
RAY_KINDS = frozenset({"embed", "cluster", "ltrp", "ltrp_score", "train", "sweep"})
CONNECT_TIMEOUT_S = 3.0   # the TCP check of HOST:PORT
PROBE_TIMEOUT_S = 30.0    # joining the cluster in the probe process (importing ray included)
STATUS_TTL_S = 120.0      # how long the sidebar trusts what a cluster said before asking again
_HOST = re.compile(r"[A-Za-z0-9._:-]+")  # a name, IPv4, or IPv6 without its brackets
READ_TTL_S = 60.0         # how long the sidebar trusts its read of the setting while the store is unchanged


# -- the stored setting --------------------------------------------------------------------------------
_read_cache: dict[str, tuple[float, tuple, str | None]] = {}


def saved(store: Store, max_age_s: float = 0.0) -> str | None:
    """The Ray address saved in the app, or None. `max_age_s`: a read this recent (in this process) is
    reused while no process has written to the store since (`Store.generation`, two stat calls), for the
    sidebar of every page and every new session: a store read opens the file, 30-60 ms of each first load
    of a page here (py-spy on the server)."""
    generation = store.generation()
    hit = _read_cache.get(str(store.path))
    if hit is not None and hit[1] == generation and time.monotonic() - hit[0] <= max_age_s:
        return hit[2]
    rows = store.query("SELECT value FROM settings WHERE key = ?", [KEY])
    value = rows[0][0] if rows else None
    _read_cache[str(store.path)] = (time.monotonic(), generation, value)
    return value


def save(address: str, store: Store) -> None:
    """Keep `address` as where heavy jobs run (check it first: `start_check(..., save=True)`)."""
    store.execute("INSERT OR REPLACE INTO settings (key, value, updated_at) VALUES (?, ?, now())", [KEY, address])
    _read_cache.pop(str(store.path), None)


def clear(store: Store) -> None:
    """Heavy jobs run here again (unless `REDEX_RAY_ADDRESS` or `--ray` say otherwise)."""
    store.execute("DELETE FROM settings WHERE key = ?", [KEY])
    _read_cache.pop(str(store.path), None)


def env_value() -> str | None:
    """`REDEX_RAY_ADDRESS` as set ('local' included), or None when it is unset or empty."""
    value = os.environ.get(ENV, "").strip()
    return value or None


@dataclass(frozen=True)
class Where:
    """Where a job launched now from this process goes: `address` (None: here) and what decided it:
    'env' (REDEX_RAY_ADDRESS), 'setting' (the app's) or None (nothing set)."""
    address: str | None
    source: str | None


def effective(store: Store, max_age_s: float = 0.0) -> Where:
    env = env_value()
    if env is not None:
        return Where(None if env.lower() in LOCAL else env, "env")
    value = saved(store, max_age_s)
    return Where(value, "setting" if value else None)


def for_launch(kind: str, params: dict | None, store: Store) -> dict | None:
    """`params` of a job about to be launched, with the saved address as its `ray` parameter when the
    kind can use Ray and neither the parameters nor the environment name a place already."""
    if kind not in RAY_KINDS or (params or {}).get("ray") is not None or env_value() is not None:
        return params
    value = saved(store)
    return {**(params or {}), "ray": value} if value else params


# -- checking an address -------------------------------------------------------------------------------
def normalize(text: str) -> str | None:
    """The address as it will be saved, None for one that means here ('', 'local'...). Raises ValueError
    with the accepted forms for anything that is not auto, HOST:PORT or ray://HOST:PORT."""
    value = (text or "").strip()
    if value.lower() in LOCAL:
        return None
    if value == "auto":
        return value
    if _host_port(value) is None:
        raise ValueError(f"{value!r} is not a Ray address: give auto, HOST:PORT (the head's GCS port, e.g."
                         " 10.0.0.5:6379) or ray://HOST:PORT")
    return value


def _host_port(address: str) -> tuple[str, int] | None:
    rest = address[len("ray://"):] if address.startswith("ray://") else address
    host, sep, port = rest.rpartition(":")
    host = host.strip("[]")  # [::1]:6379
    if not sep or not _HOST.fullmatch(host) or not port.isdigit() or not 0 < int(port) < 65536:
        return None
    return host, int(port)


def check(address: str, timeout_s: float = PROBE_TIMEOUT_S) -> dict:
    """Join the cluster at `address` in a probe process and say what it holds (blocks up to
    CONNECT_TIMEOUT_S + `timeout_s`): {"ok": True, "ray", "nodes", "cpus", "gpus", "workers", "tree_tasks"}
    or {"ok": False, "error": one line}: not installed, unreachable, no answer in time, version mismatch."""
    if importlib.util.find_spec("ray") is None:
        return {"ok": False, "error": "Ray is not installed here: pip install -e '.[ray]' on this machine and on"
                                      " every node of the cluster"}
    hp = _host_port(address)
    if hp is not None:
        try:
            socket.create_connection(hp, timeout=CONNECT_TIMEOUT_S).close()
        except socket.gaierror:
            return {"ok": False, "error": f"unreachable: no host named {hp[0]!r}"}
        except TimeoutError:
            return {"ok": False, "error": f"unreachable: {hp[0]}:{hp[1]} did not answer within"
                                          f" {CONNECT_TIMEOUT_S:g} s"}
        except OSError as exc:
            return {"ok": False, "error": f"unreachable: nothing answers at {hp[0]}:{hp[1]}"
                                          f" ({exc.strerror or exc})"}
    try:
        done = subprocess.run([sys.executable, "-m", "core.scale.probe", address], capture_output=True, text=True,
                              timeout=timeout_s, cwd=str(config.REPO_ROOT), stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"no Ray cluster answered at {address} within {timeout_s:g} s (is it a Ray"
                                      " head's GCS port? Ray versions match?)"}
    line = next((ln for ln in reversed(done.stdout.splitlines()) if ln.startswith("{")), None)
    if line is None:
        tail = " ".join((done.stderr or "").strip().splitlines()[-1:])[:300]
        return {"ok": False, "error": f"the check of {address} failed (exit {done.returncode}): {tail}"}
    return json.loads(line)


def describe(result: dict) -> str:
    """'2 nodes, 48 CPUs, 4 GPUs · 4 model workers, 48 tree tasks at once' for the sidebar."""
    nodes = result.get("nodes", 0)
    return (f"{nodes} node{'s' if nodes != 1 else ''}, {result.get('cpus', 0):g} CPUs, {result.get('gpus', 0):g} GPUs"
            f" · {result.get('workers', 0)} model worker{'s' if result.get('workers') != 1 else ''},"
            f" {result.get('tree_tasks', 0)} tree tasks at once")


@dataclass
class Check:
    """One check of an address, in a background thread. `result` None while it runs; `previous`: the result
    of the check before it (the sidebar shows it while asking again); `saved`: whether the address was saved
    after it (asked for with `save`)."""
    address: str
    previous: dict | None = None
    started: float = field(default_factory=time.monotonic)
    finished: float | None = None
    result: dict | None = None
    save_to: Store | None = None
    saved: bool = False

    @property
    def known(self) -> dict | None:
        """What the cluster said last: this check's result, else the one before."""
        return self.result if self.result is not None else self.previous


_checks: dict[str, Check] = {}
_lock = threading.Lock()


def start_check(address: str, store: Store | None = None, *, save: bool = False) -> Check:
    """Check `address` in the background (returns at once), or join the check of it already running. With
    `save`, the address is saved in `store` if and only if the check succeeds. A successful check younger
    than STATUS_TTL_S is reused (and the address saved at once when asked); a failed one is not, when saving."""
    with _lock:
        current = _checks.get(address)
        if current is not None and current.finished is None:
            if save:
                current.save_to = store
            return current
        if (current is not None and time.monotonic() - current.finished < STATUS_TTL_S
                and (current.result.get("ok") or not save)):
            if save:
                _save(current, store)
            return current
        current = _checks[address] = Check(address, previous=current.known if current else None,
                                           save_to=store if save else None)
    threading.Thread(target=_run, args=(current,), daemon=True, name=f"ray-check {address}").start()
    return current


def _run(current: Check) -> None:
    try:
        result = check(current.address)
    except Exception as exc:  # noqa: BLE001 - a check never takes the app down
        result = {"ok": False, "error": f"the check of {current.address} failed: {type(exc).__name__}: {exc}"}
    with _lock:  # saved before it reads as finished: a page never sees "ok" without the save
        current.result = result
        if result.get("ok") and current.save_to is not None:
            _save(current, current.save_to)
        current.finished = time.monotonic()


def _save(current: Check, store: Store) -> None:
    try:
        save(current.address, store)
        current.saved = True
    except Exception as exc:  # noqa: BLE001 - said on the page, never raised in the check's thread
        current.result = {"ok": False, "error": f"{current.address} answers, but saving it failed: {exc}"}


def state(address: str) -> Check | None:
    """The latest check of `address` (running or finished), or None if none was started in this process."""
    with _lock:
        return _checks.get(address)


def status(address: str) -> Check:
    """What the cluster at `address` holds, for the sidebar: the latest check, started again in the
    background when there is none or it is older than STATUS_TTL_S (`Check.known` keeps the old answer)."""
    current = state(address)
    if current is None or (current.finished is not None and time.monotonic() - current.finished >= STATUS_TTL_S):
        return start_check(address)
    return current
