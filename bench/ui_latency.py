"""Latency of the app's widgets, measured in a real browser (Playwright + Debian's chromium).

For each widget it makes N changes and records, in the browser's own clock, the time from the key
press or click (the page's keydown or pointerdown event) to the updated value on screen, and to the
page being idle again (Streamlit's script state back to notRunning). Prints p50 / p95 per widget, the
page loads (by the page's link in a new session, and from the sidebar of the open app), and the ratio
to the pure cut function's time (the floor of the slider's latency), with the machine's load.

    .venv/bin/python bench/ui_latency.py --cache /tmp/fm70k --dataset fashion-mnist
    .venv/bin/python bench/ui_latency.py --cache /tmp/fm70k --dataset fashion-mnist --root /tmp/base  # old code
    .venv/bin/python bench/ui_latency.py --cache /tmp/synth --dataset synthetic-1.28m --widgets fraction,threshold

The server is started from `--root` (default: this checkout) on a free port with REDEX_CACHE=--cache,
and stopped at the end. The dataset must be embedded and its merge trees built (the page's expensive
inputs); the Patch heatmaps widget needs a ranker (`redex ltrp train`), else it is skipped.
`--prepare-ltrp` first builds such a cache in `--cache`: the Fashion-MNIST demo (`--limit` images per
split), a one-epoch backbone, its trees, a tiny LTRP ranker and every image's score map (a few minutes):

    .venv/bin/python bench/ui_latency.py --cache /tmp/ltrp-demo --dataset fashion-mnist --prepare-ltrp \
        --widgets keep_ratio
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.app_server import start_server, stop_server  # noqa: E402

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]

# In the page: watch one target's text (or image source) and the script state; record the first
# change of the target after the move, and the first moment after it at which the script is idle.
WATCH_JS = """([selector, attr]) => {
  const read = () => {
    const els = [...document.querySelectorAll(selector)];
    return els.map(e => attr ? e.getAttribute(attr) : e.innerText).join('|');
  };
  const state = () => document.querySelector('[data-testid=stApp]')?.getAttribute('data-test-script-state');
  // The clock starts at the input event itself (key or pointer press, as the page receives it), not
  // when Playwright is asked to act: a click first waits for the element to be visible and stable.
  const m = {prev: read(), t0: null, setup: performance.now(), changed: null, idle: null};
  const start = e => { if (m.t0 === null) m.t0 = e.timeStamp; };
  for (const kind of ['keydown', 'pointerdown', 'mousedown']) document.addEventListener(kind, start, {capture: true, once: true});
  const check = () => {
    const now = performance.now();
    if (m.changed === null && read() !== m.prev) m.changed = now;
    if (m.changed !== null && m.idle === null && state() === 'notRunning') { m.idle = now; obs.disconnect(); }
  };
  const obs = new MutationObserver(check);
  obs.observe(document.body, {subtree: true, childList: true, characterData: true, attributes: true});
  window.__m = m;
  return m.prev;
}"""


def wait_idle(page, timeout_ms: int = 120_000, quiet_ms: int = 300) -> None:
    """Until the script state has been notRunning for `quiet_ms` (a page may rerun itself at once)."""
    page.wait_for_function("""quiet => {
        const idle = document.querySelector('[data-testid=stApp]')?.getAttribute('data-test-script-state') === 'notRunning';
        const now = performance.now();
        if (!idle) { window.__idleSince = null; return false; }
        window.__idleSince = window.__idleSince ?? now;
        return now - window.__idleSince >= quiet;
    }""", arg=quiet_ms, timeout=timeout_ms, polling="raf")


def measure(page, target: tuple[str, str | None], act, timeout_ms: int = 60_000) -> tuple[float, float] | None:
    """(ms to the changed value, ms to idle) of one move, or None when nothing changed in time."""
    page.evaluate(WATCH_JS, list(target))
    act()
    try:
        page.wait_for_function("() => window.__m.idle !== null", timeout=timeout_ms, polling="raf")
    except Exception:  # noqa: BLE001 - a move that changed nothing is reported, not fatal
        return None
    m = page.evaluate("() => window.__m")
    t0 = m["t0"] if m["t0"] is not None else m["setup"]
    return m["changed"] - t0, m["idle"] - t0


def open_page(page, url: str, path: str, ready: str) -> dict:
    """Load a page: ms to `ready` on screen ("content") and to the script idle ("idle"), in the browser's
    clock from the start of the navigation (the 300 ms that confirm the idle state are not counted)."""
    page.goto(f"{url}/{path}")
    content = page.wait_for_function(
        "sel => { const e = document.querySelector(sel); return e && e.offsetParent !== null ? performance.now() : null; }",
        arg=ready, timeout=300_000, polling="raf").json_value()
    wait_idle(page, 300_000)
    return {"content": content, "idle": page.evaluate("() => window.__idleSince")}


def loads(page, url: str, path: str, ready: str, repeat: int = 5) -> dict:
    """The first load of `path` (a fresh server: cold caches), then `repeat` loads as new sessions (warm
    caches): medians and maxima of those."""
    first = open_page(page, url, path, ready)
    again = [open_page(page, url, path, ready) for _ in range(repeat)]
    out = {"first_content_ms": first["content"], "first_idle_ms": first["idle"]}
    for k in ("content", "idle"):
        values = [a[k] for a in again]
        out[f"warm_{k}_p50_ms"], out[f"warm_{k}_max_ms"] = float(np.median(values)), float(max(values))
    return out


NAV_JS = """() => {
  // From the press on the sidebar link to the page's "Kept" metric on screen, in the browser's clock.
  window.__nav = {t0: null, shown: null};
  document.addEventListener('pointerdown', e => { window.__nav.t0 = e.timeStamp; }, {capture: true, once: true});
  const obs = new MutationObserver(() => {
    const kept = [...document.querySelectorAll('[data-testid=stMetric]')].find(e => e.innerText.includes('Kept'));
    if (kept && window.__nav.shown === null) { window.__nav.shown = performance.now(); obs.disconnect(); }
  });
  obs.observe(document.body, {subtree: true, childList: true, characterData: true});
}"""


def nav_loads(page, url: str, dataset: str, repeat: int = 5) -> dict:
    """The Redundant groups page opened as a user of the open app does: from the Datasets page, a click on
    its sidebar link (no new page load: the frontend stays, the server runs the page). `repeat` times, after
    a first visit in this browser session; median and maximum of those."""
    def once() -> float:
        page.goto(f"{url}/?dataset={dataset}")
        page.get_by_role("link", name="Redundant groups").wait_for(timeout=300_000)
        wait_idle(page, 300_000)
        page.evaluate(NAV_JS)
        page.get_by_role("link", name="Redundant groups").click()
        page.wait_for_function("() => window.__nav.shown !== null", timeout=300_000)
        n = page.evaluate("() => window.__nav")
        wait_idle(page, 300_000)
        return n["shown"] - n["t0"]

    first = once()
    again = [once() for _ in range(repeat)]
    return {"first_ms": first, "p50_ms": float(np.median(again)), "max_ms": float(max(again))}


def slider_moves(page, key: str, target, moves: int) -> list:
    thumb = page.locator(f".st-key-{key}").get_by_role("slider").first
    thumb.wait_for(timeout=300_000)
    thumb.focus()
    out = []
    for i in range(moves):
        key_name = "ArrowLeft" if i % 2 == 0 else "ArrowRight"
        out.append(measure(page, target, lambda: thumb.press(key_name)))
        wait_idle(page)
    return out


def select_moves(page, key: str, target, moves: int) -> list:
    # Streamlit's select box is a combo box: a click on its text field only focuses it; a key opens it
    box = page.locator(f".st-key-{key}").get_by_role("combobox").first
    out = []
    for i in range(moves):
        box.click()
        box.press("ArrowDown")
        options = page.get_by_role("option")
        options.first.wait_for()
        n = min(options.count(), 7)  # the list is virtual: an option below the fold is scrolled to after the
        choice = options.nth(1 + i % max(1, n - 1))  # clock starts, which timed Playwright, not the app
        out.append(measure(page, target, choice.click))
        wait_idle(page)
    return out


def step_moves(page, key: str, target, moves: int) -> list:
    up = page.locator(f".st-key-{key} button").last
    down = page.locator(f".st-key-{key} button").first
    out = []
    for i in range(moves):
        out.append(measure(page, target, (up if i % 2 == 0 else down).click))
        wait_idle(page)
    return out


def stats(samples: list) -> dict:
    ok = [s for s in samples if s is not None]
    if not ok:
        return {"n": 0, "missed": len(samples)}
    value, idle = np.array([s[0] for s in ok]), np.array([s[1] for s in ok])
    return {"n": len(ok), "missed": len(samples) - len(ok),
            "value_p50": float(np.percentile(value, 50)), "value_p95": float(np.percentile(value, 95)),
            "idle_p50": float(np.percentile(idle, 50)), "idle_p95": float(np.percentile(idle, 95)),
            "value_ms": [round(float(v), 1) for v in value], "idle_ms": [round(float(v), 1) for v in idle]}


def cut_time(cache: Path, dataset: str) -> dict:
    """Median seconds of the pure cut at fraction 0.9: the index's, and `select_subset`'s (every
    representative), on this machine now (the floor of the slider's latency)."""
    os.environ["REDEX_CACHE"] = str(cache)
    from core.redundancy import clusterings
    from core.redundancy.index import CutIndex

    c = clusterings.load_clustering(dataset)
    index = CutIndex.build(c.classes)

    def median_s(fn, n=15):
        times = []
        for i in range(n):
            t = time.perf_counter()
            fn(0.9 - 0.01 * (i % 3))
            times.append(time.perf_counter() - t)
        return float(np.median(times))

    return {"images": index.n, "index_cut_s": median_s(lambda f: index.cut(fraction=f).per_class()),
            "select_subset_s": median_s(lambda f: clusterings.subset(c, fraction=f), n=5)}


def prepare_ltrp(cache: Path, limit: int) -> None:
    """The Fashion-MNIST demo in `cache`, embedded, clustered, with a tiny ranker and its score maps."""
    os.environ["REDEX_CACHE"] = str(cache)
    import torch

    from core.data import scan, sources
    from core.embed import embeddings
    from core.embed.backbones import DEFAULT_BACKBONE
    from core.ltrp import models, scoring
    from core.redundancy import clusterings
    from core.store import db
    from tests.test_patches import TINY

    torch.set_num_threads(1)
    store = db.get_store()
    name = sources.register("fashion-mnist", limit=limit, store=store)
    scan.scan(name, store)
    model, bid = embeddings.ensure_backbone(name, DEFAULT_BACKBONE, epochs=1, store=store)
    embeddings.embed_dataset(name, model, bid, store=store)
    clusterings.cluster(name, bid, store=store)
    clusterings.open_clustering(name, bid, store=store)  # the snapshot, as the cluster job writes it
    rid = models.train_ltrp(name, models.LtrpSettings(**TINY), store=store)["ranker_id"]
    scoring.score_dataset(name, rid, store=store)
    db._stores.clear()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", required=True, type=Path)
    ap.add_argument("--dataset", required=True)
    ap.add_argument("--root", type=Path, default=ROOT, help="the code to serve (e.g. an older checkout)")
    ap.add_argument("--moves", type=int, default=20)
    ap.add_argument("--widgets", default="fraction,threshold,class,page,keep_ratio")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--prepare-ltrp", action="store_true", help="first build the demo with a ranker in --cache")
    ap.add_argument("--limit", type=int, default=300, help="--prepare-ltrp: images per split")
    ap.add_argument("--no-baseline", action="store_true", help="skip the bare Streamlit page (bench/bare_app.py)")
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright

    widgets = args.widgets.split(",")
    if args.prepare_ltrp:
        prepare_ltrp(args.cache, args.limit)
    load_before = os.getloadavg()
    proc, url = start_server(args.cache, code_root=args.root)
    results: dict = {"root": str(args.root), "dataset": args.dataset}
    metric = ("[data-testid=stMetric]", None)
    image = ("[data-testid=stImage] img", "src")
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
            ctx = browser.new_context(viewport={"width": 1400, "height": 1000})
            page = ctx.new_page()
            where = f"redundant_groups?dataset={args.dataset}"
            results["loads"] = loads(page, url, where, "[data-testid=stMetric]")
            results["nav_loads"] = nav_loads(page, url, args.dataset)
            open_page(page, url, where, "[data-testid=stMetric]")
            def run(widget, fn):
                if widget not in widgets:
                    return
                try:
                    results[widget] = stats(fn())
                except Exception as exc:  # noqa: BLE001 - report it, measure the other widgets
                    results[widget] = {"skipped": f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"}

            run("fraction", lambda: slider_moves(page, "fraction", metric, args.moves))
            run("class", lambda: select_moves(page, "group_class", image, args.moves))
            run("page", lambda: step_moves(page, "group_page", image, args.moves))

            def threshold_moves():
                page.locator(".st-key-cut_mode label").filter(has_text="threshold").click()
                wait_idle(page)
                return slider_moves(page, "threshold", metric, args.moves)
            run("threshold", threshold_moves)
            if "keep_ratio" in widgets:
                try:
                    open_page(page, url, f"patch_heatmaps?dataset={args.dataset}", ".st-key-keep_ratio")
                    results["keep_ratio"] = stats(slider_moves(page, "keep_ratio", metric, args.moves))
                except Exception as exc:  # noqa: BLE001 - no ranker for this dataset
                    results["keep_ratio"] = {"skipped": f"{type(exc).__name__}: {str(exc)[:120]}"}
            results["server_memory"] = server_memory(proc.pid)
            browser.close()
    finally:
        stop_server(proc)
    if not args.no_baseline:
        results["bare"] = baseline(args.cache, args.moves)
    results["cut"] = cut_time(args.cache, args.dataset)
    results["load"] = {"before": load_before, "after": os.getloadavg()}
    report(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


def server_memory(pid: int) -> dict:
    """The server process's resident memory now and its peak (MiB), from /proc."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return {"rss_mib": int(fields["VmRSS"].split()[0]) / 1024, "peak_mib": int(fields["VmHWM"].split()[0]) / 1024}


def baseline(cache: Path, moves: int) -> dict:
    """The same measures on a bare Streamlit page (a slider and a metric): Streamlit's own floor here."""
    from playwright.sync_api import sync_playwright

    proc, url = start_server(cache, script="bench/bare_app.py")
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
            page = browser.new_context(viewport={"width": 1400, "height": 1000}).new_page()
            out = {"loads": loads(page, url, "", "[data-testid=stMetric]"),
                   "deep_loads": loads(page, url, "deep", "[data-testid=stMetric]")}
            out["slider"] = stats(slider_moves(page, "bare", ("[data-testid=stMetric]", None), moves))
            out["select"] = stats(select_moves(page, "bare_class", ("[data-testid=stImage] img", "src"), moves))
            browser.close()
    finally:
        stop_server(proc)
    return out


def report(r: dict) -> None:
    cut_ms = 1000 * r["cut"]["index_cut_s"]
    print(f"{r['dataset']} ({r['cut']['images']:,} train images), code {r['root']}")
    print(f"load average {r['load']['before'][0]:.2f} before, {r['load']['after'][0]:.2f} after")
    print("page loads, from the navigation's start to the metrics on screen / to the script idle:")
    for who, ld in (("ours", r["loads"]), ("bare Streamlit page (bench/bare_app.py)", (r.get("bare") or {}).get("loads")),
                    ("the bare page at its own URL (/deep)", (r.get("bare") or {}).get("deep_loads"))):
        if ld:
            print(f"  {who}: fresh server {ld['first_content_ms']:.0f} / {ld['first_idle_ms']:.0f} ms; new sessions"
                  f" (warm), p50 {ld['warm_content_p50_ms']:.0f} / {ld['warm_idle_p50_ms']:.0f} ms,"
                  f" max {ld['warm_content_max_ms']:.0f} / {ld['warm_idle_max_ms']:.0f} ms")
    nav = r.get("nav_loads")
    if nav:
        print(f"  ours, opened from the sidebar of the open app (Datasets -> Redundant groups): first visit"
              f" {nav['first_ms']:.0f} ms; again p50 {nav['p50_ms']:.0f} ms, max {nav['max_ms']:.0f} ms")
    if "server_memory" in r:
        m = r["server_memory"]
        print(f"server process after the moves: {m['rss_mib']:,.0f} MiB resident, peak {m['peak_mib']:,.0f} MiB")
    bare = r.get("bare")
    if bare:
        b = bare["slider"]
        ours, theirs = r["loads"]["warm_content_p50_ms"], bare["loads"]["warm_content_p50_ms"]
        deep = (bare.get("deep_loads") or {}).get("warm_content_p50_ms")
        sel = bare.get("select") or {}
        print(f"bare page, same machine and run: warm load to content ours / bare {ours / theirs:.2f}"
              + (f" (ours / bare at its own URL {ours / deep:.2f})" if deep else "") + ";"
              f" slider value p50 / p95 {b.get('value_p50', float('nan')):.0f} / {b.get('value_p95', float('nan')):.0f} ms,"
              f" idle p50 / p95 {b.get('idle_p50', float('nan')):.0f} / {b.get('idle_p95', float('nan')):.0f} ms;"
              f" select box to a new image list: value p50 / p95 {sel.get('value_p50', float('nan')):.0f} /"
              f" {sel.get('value_p95', float('nan')):.0f} ms")
    print(f"pure cut (index, with the per-class table): {cut_ms:.1f} ms;"
          f" select_subset (every representative): {1000 * r['cut']['select_subset_s']:.1f} ms")
    print("| widget | moves | value p50 | value p95 | idle p50 | idle p95 | value p95 / cut | value p95 / bare |")
    print("|---|---|---|---|---|---|---|---|")
    for w in ("fraction", "threshold", "class", "page", "keep_ratio"):
        s = r.get(w)
        if not s:
            continue
        if "skipped" in s or not s.get("n"):
            print(f"| {w} | {s.get('n', 0)} | {s.get('skipped', 'no change seen')} | | | | | |")
            continue
        floor = (bare or {}).get("select" if w == "class" else "slider") or {}  # the bare page's like widget
        to_bare = f"{s['value_p95'] / floor['value_p95']:.2f}" if floor.get("n") else ""
        print(f"| {w} | {s['n']} (+{s['missed']} missed) | {s['value_p50']:.0f} ms | {s['value_p95']:.0f} ms |"
              f" {s['idle_p50']:.0f} ms | {s['idle_p95']:.0f} ms | {s['value_p95'] / max(cut_ms, 1e-3):.1f} |"
              f" {to_bare} |")


if __name__ == "__main__":
    main()
