"""How much CPU the Streamlit server burns with three browser tabs open on idle pages.

The issue's budget: under 5 % of one core. The script builds a scratch cache holding a small
Fashion-MNIST set (registered, then scanned and embedded by the real background jobs), starts the
app on 127.0.0.1 and a free port (`.venv/bin/streamlit run app.py`, REDEX_CACHE = the scratch
cache), opens three headless Chromium tabs (Playwright + Debian's /usr/bin/chromium) on three idle
pages, lets them settle, and reads the server process's CPU time from /proc/PID/stat over
`--seconds`, and counts the messages the tabs send it (a fragment's timed rerun is one). Streamlit's
file watcher is off by default (`--file-watcher none`): in a shared working tree other processes'
writes (test caches, `__pycache__`, a cache folder inside the repository) make it rescan the tree,
which measures the machine's churn rather than the app; `--file-watcher auto` keeps Streamlit's
default. With `--baseline-root DIR` it does the same with the code checked out in DIR (it
shares this venv; its server runs with cwd=DIR and PYTHONPATH=DIR) on a copy of the same cache.
The machine's load (`uptime`) is printed beside each figure: other work on the machine slows the
server's own reruns, so compare figures taken at similar loads.

    .venv/bin/python bench/server_idle.py [--seconds 60] [--baseline-root /tmp/base]
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.app_server import start_server  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
# URL path and page title of each idle page opened (the Datasets page is the default one: "/").
PAGES = {"datasets": ("", "Datasets"), "training": ("training", "Training"), "jobs": ("jobs", "Jobs"),
         "embedding_map": ("embedding_map", "Embedding map"), "patch_heatmaps": ("patch_heatmaps", "Patch heatmaps"),
         "redundant_groups": ("redundant_groups", "Redundant groups")}


def build_cache(cache: Path, limit: int) -> str:
    """Fashion-MNIST (the first `limit` images of each split) scanned and embedded by the real jobs."""
    os.environ["REDEX_CACHE"] = str(cache)
    from core import jobs
    from core.data import sources
    from core.store.db import get_store

    store = get_store()
    name = sources.register(sources.FASHION_MNIST, limit=limit, store=store)
    for kind, params in (("scan", {}), ("embed", {"epochs": 1})):
        job = jobs.wait(jobs.launch(kind, name, params, store=store), store, timeout=1800)
        if job["status"] != "done":
            raise SystemExit(f"{kind} job {job['id']} {job['status']}: {job.get('error')}")
    return name


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of the process (its threads included), from /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime: fields 14, 15


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def wait_idle(tab, timeout_ms: int = 300_000) -> None:
    """Until the page's script (and fragment) run is over."""
    tab.wait_for_function("() => document.querySelector('[data-testid=stApp]')"
                          "?.getAttribute('data-test-script-state') === 'notRunning'", timeout=timeout_ms)


def measure(label: str, code_root: Path, cache: Path, pages: list[str], seconds: float, settle: float,
            watcher: str) -> dict:
    from playwright.sync_api import sync_playwright

    proc, url = start_server(cache, code_root=code_root, watcher=watcher)
    sent = [0]
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            context = browser.new_context(viewport={"width": 1400, "height": 1000})
            tabs = []
            for page in pages:
                path, title = PAGES[page]
                tab = context.new_page()
                tab.on("websocket", lambda ws: ws.on("framesent", lambda _frame: sent.__setitem__(0, sent[0] + 1)))
                tab.goto(f"{url}/{path}")
                tab.get_by_role("heading", name=title).first.wait_for(timeout=300_000)
                wait_idle(tab)
                tabs.append(tab)
            tabs[0].wait_for_timeout(settle * 1000)  # let any rerun the first loads triggered finish
            for tab in tabs:
                wait_idle(tab)
            errors = sum(t.locator("[data-testid=stException]").count() for t in tabs)
            load_before = uptime()
            sent0, cpu0, t0 = sent[0], cpu_seconds(proc.pid), time.monotonic()
            tabs[0].wait_for_timeout(seconds * 1000)  # not time.sleep: Playwright handles the tabs' events meanwhile
            cpu1, t1, sent1 = cpu_seconds(proc.pid), time.monotonic(), sent[0]
            load_after = uptime()
            browser.close()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
    share = 100 * (cpu1 - cpu0) / (t1 - t0)
    return {"label": label, "cpu_s": cpu1 - cpu0, "wall_s": t1 - t0, "percent": share, "errors": errors,
            "messages": sent1 - sent0,
            "load_before": load_before, "load_after": load_after}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=60, help="measurement window (default 60)")
    ap.add_argument("--settle", type=float, default=15, help="wait after the tabs have loaded (default 15)")
    ap.add_argument("--limit", type=int, default=100, help="Fashion-MNIST images per split (default 100)")
    ap.add_argument("--pages", default="datasets,training,jobs", help=f"three of: {', '.join(PAGES)}")
    ap.add_argument("--baseline-root", type=Path, help="a checkout of the code before, measured the same way")
    ap.add_argument("--file-watcher", default="none", choices=["none", "auto", "watchdog", "poll"],
                    help="Streamlit's server.fileWatcherType (default none; see above)")
    ap.add_argument("--keep", action="store_true", help="keep the scratch cache (its path is printed)")
    args = ap.parse_args(argv)
    pages = [p.strip() for p in args.pages.split(",") if p.strip()]
    unknown = [p for p in pages if p not in PAGES]
    if unknown:
        ap.error(f"unknown pages: {', '.join(unknown)}")

    scratch = Path(tempfile.mkdtemp(prefix="redex-idle-"))
    try:
        print(f"building the scratch cache in {scratch} ({args.limit} images per split) ...", flush=True)
        name = build_cache(scratch / "ours", args.limit)
        runs = [("ours", ROOT, scratch / "ours")]
        if args.baseline_root:
            shutil.copytree(scratch / "ours", scratch / "baseline")
            runs.append(("baseline", args.baseline_root.resolve(), scratch / "baseline"))
        print(f"dataset {name}; pages {', '.join(pages)}; {args.seconds:g} s per measurement;"
              f" file watcher {args.file_watcher}", flush=True)
        results = []
        for label, code_root, cache in runs:
            r = measure(label, code_root, cache, pages, args.seconds, args.settle, args.file_watcher)
            results.append(r)
            errors = f"  ({r['errors']} pages show an exception!)" if r["errors"] else ""
            print(f"{label:>8}: server CPU {r['cpu_s']:6.2f} s in {r['wall_s']:.0f} s = {r['percent']:5.1f} % of one"
                  f" core; {r['messages']} messages from the tabs{errors}", flush=True)
            print(f"          load before: {r['load_before']}\n          load after:  {r['load_after']}", flush=True)
        return 0
    finally:
        if args.keep:
            print(f"scratch cache kept: {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
