"""`redex jobs|cancel|follow`: the background jobs that the CLI and the app start."""
from __future__ import annotations

from core import jobs, wording
from core.cli.common import CliError, add_command, follow


def add_parsers(sub) -> None:
    jl = add_command(sub, "jobs", cmd_jobs, "list jobs", dataset=False)
    jl.add_argument("--all", action="store_true", help="all jobs, not only the last 20")
    add_command(sub, "cancel", cmd_cancel, "cancel a job", dataset=False).add_argument("job_id", type=int)
    add_command(sub, "follow", cmd_follow, "follow a job until it ends", dataset=False).add_argument("job_id", type=int)


def cmd_jobs(args) -> int:
    rows = jobs.list_jobs(limit=10_000 if args.all else 20)
    if not rows:
        print("no jobs yet")
        return 0
    print(f"{'id':>5}  {'job':<15} {'dataset':<20} {'status':<10} detail")
    for j in rows:
        text = jobs.describe(j)["text"]  # progress, rate with its unit, time left, message or error
        text = text[len(j["status"]) + 3:] if text.startswith(j["status"] + " · ") else text
        print(f"{j['id']:>5}  {wording.job_kind(j['kind']):<15} {j['dataset'] or '':<20} {j['status']:<10} {text}")
    return 0


def cmd_cancel(args) -> int:
    if jobs.cancel(args.job_id):
        print(f"job {args.job_id} cancelled")
        return 0
    job = jobs.get_job(args.job_id)
    raise CliError(f"job {args.job_id} " + ("does not exist" if job is None else f"is already {job['status']}"))


def cmd_follow(args) -> int:
    return follow(args.job_id)
