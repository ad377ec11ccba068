"""What every command group shares: the error type, the flags that recur, and following a job.

A command that starts long work launches the same background job as the app, then follows it
with a progress bar (`follow`) unless `--detach` was given.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from core import jobs, wording
from core.store.db import get_store

NEWEST_BACKBONE = "default: the newest backbone with embeddings"


class CliError(Exception):
    pass


# -- parsers -----------------------------------------------------------------------------------
def add_command(sub, command: str, func, help: str, *, dataset: bool = True) -> argparse.ArgumentParser:
    """A subcommand that runs `func(args)`; with `dataset`, its first argument is the dataset name."""
    p = sub.add_parser(command, help=help)
    if dataset:
        p.add_argument("name")
    p.set_defaults(func=func)
    return p


def add_detach_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--detach", action="store_true", help="start the job and return at once")


def add_ray_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ray", metavar="ADDRESS", help="run the heavy stage on the Ray cluster at ADDRESS (auto,"
                   " HOST:PORT; `local`: here); default: REDEX_RAY_ADDRESS, else the app's Ray setting (its"
                   " sidebar), else here (docs/scale-out.md)")


def add_linkage_flag(p) -> None:
    from core.redundancy.trees import LINKAGES

    p.add_argument("--linkage", default="complete", choices=LINKAGES)


def add_representative_flag(p) -> None:
    from core.redundancy.cuts import REPRESENTATIVES

    p.add_argument("--representative", default="nearest_mean", choices=REPRESENTATIVES)


# -- files the user names -----------------------------------------------------------------------
def check_out_file(out: str, suffixes: tuple[str, ...] | None = None, *, flag: str = "--out",
                   make_parents: bool = False) -> Path:
    """Refuse, before any work, an output file that cannot be written: a folder, a parent folder that
    is missing (unless the command creates it: `make_parents`) or is a file, no write permission, or
    (with `suffixes`) the wrong extension."""
    path = Path(out).expanduser()
    if path.is_dir():
        raise CliError(f"{flag} {out} is a folder; give a file name, e.g. {path / ('out' + (suffixes or ('',))[0])}")
    if suffixes and path.suffix.lower() not in suffixes:
        raise CliError(f"{flag} {out}: give a file name ending in {' or '.join(suffixes)}")
    parent = path.absolute().parent
    while make_parents and not parent.exists() and parent != parent.parent:
        parent = parent.parent  # the folder the missing ones will be made in
    if not parent.is_dir():
        raise CliError(f"{flag} {out}: {parent} is {'a file' if parent.exists() else 'not an existing folder'}")
    if not os.access(path if path.exists() else parent, os.W_OK):
        raise CliError(f"{flag} {out}: {'the file' if path.exists() else parent} is not writable")
    return path


def check_out_folder(out: str, flag: str) -> Path:
    """Refuse, before any work, an output folder that is an existing file."""
    path = Path(out).expanduser()
    if path.exists() and not path.is_dir():
        raise CliError(f"{flag} {out} is a file; give a folder that is empty or does not exist yet")
    return path


# -- starting and following a job --------------------------------------------------------------
def start_job(args, kind: str, dataset: str, params: dict | None, what: str, after=None) -> int:
    """Launch a job, say `what (job ID)`, then follow it (or not, with --detach). A `--ray` flag goes
    into the job's params (`core.scale.ray_address`)."""
    from core.scale import check_address

    if getattr(args, "ray", None) is not None:
        params = {**(params or {}), "ray": check_address(args.ray)}
    job_id = jobs.launch(kind, dataset, params)
    print(f"{what} (job {job_id})")
    return run_or_detach(args, job_id, after=after)


def run_or_detach(args, job_id: int, after=None) -> int:
    if args.detach:
        print(f"running in the background: `redex follow {job_id}`, `redex cancel {job_id}`")
        return 0
    code = follow(job_id)
    if code == 0 and after:
        after()
    return code


def follow(job_id: int, poll: float = 0.5) -> int:
    """Show a job's progress until it ends; exit code 0 if done, 1 if failed/cancelled."""
    from tqdm import tqdm

    store = get_store()
    bar, phase = None, None
    try:
        while True:
            job = jobs.get_job(job_id, store)
            if job is None:
                raise CliError(f"no job {job_id}")
            if job["phase"] != phase or bar is None:
                if bar is not None:
                    bar.close()
                phase = job["phase"]
                bar = tqdm(total=job["total"] or None, desc=phase or job["status"], unit=wording.job_unit(job),
                           dynamic_ncols=True, file=sys.stderr)
            if job["total"] and bar.total != job["total"]:
                bar.total = job["total"]
            bar.n = job["done"] or 0
            if job["message"]:
                bar.set_postfix_str(job["message"][:60], refresh=False)
            bar.refresh()
            if job["status"] in jobs.FINAL:
                bar.close()
                break
            time.sleep(poll)
    except KeyboardInterrupt:
        if bar is not None:
            bar.close()
        print(f"\nstopped following; job {job_id} keeps running (`redex cancel {job_id}` stops it)",
              file=sys.stderr)
        return 130
    if job["status"] == "done":
        return 0
    detail = job["error"] or job["message"] or ""
    print(f"redex: job {job_id} {job['status']}: {detail}", file=sys.stderr)
    tail = jobs.log_tail(job, 15)
    if job["status"] == "failed" and tail:
        print(tail, file=sys.stderr)
    return 1
