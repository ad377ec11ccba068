"""One screenshot per page under docs/screenshots/, taken in the real app on a small real dataset (Fashion-MNIST,
100 images per split, every step done), so the README's pictures stay current; and what a newcomer stumbled on in
the browser: the embedding map's selection says how many of how many it shows, a click after a box selection
selects the clicked point, the Training chart's axis reads in whole images and its semantic and random points
never hide one another, and the Jobs table fits the window."""
from pathlib import Path

import pytest

from tests.conftest import e2e_marks, embedded_demo, start_server, stop_server

pytestmark = e2e_marks

SHOTS = Path(__file__).resolve().parents[1] / "docs" / "screenshots"
PAGES = {  # file name: (URL path, text that says the page has drawn)
    "datasets": ("", "Images by class"),
    "embedding_map": ("embedding_map", "Select points"),
    "redundant_groups": ("redundant_groups", "Kept"),
    "training": ("training", "Per-class accuracy against the full set"),
    "patch_heatmaps": ("patch_heatmaps", "Kept patches"),
    "jobs": ("jobs", "Details of job"),
}


def prepare(cache: Path, monkeypatch) -> str:
    """Every step done on Fashion-MNIST (100 images per split): scan, embedding, map, merge trees, a one-epoch
    sweep (full, semantic and random at 0.5) and a one-epoch patch ranker. Returns the dataset name."""
    from core import jobs
    from core.embed import projection
    from core.ltrp import models as ltrp_models
    from core.redundancy import clusterings
    from core.store import db
    from core.subsets import plan, sweeps

    store, name, bid = embedded_demo(cache, monkeypatch)
    monkeypatch.setenv("REDEX_MAX_JOBS", "3")  # the three runs at once
    clusterings.cluster(name, bid, store=store)
    spec = plan.SweepSpec(fractions=(1.0, 0.5), seeds=1, recipe={"epochs": 1, "batch_size": 16},
                          selection={"backbone_id": bid})
    _, sweep_job = sweeps.launch_sweep(name, spec, store)  # its own processes, while this one computes
    projection.compute_projection(name, bid, store=store)
    ltrp_models.train_ltrp(name, ltrp_models.LtrpSettings(mae_epochs=1, ranker_epochs=1), store=store)
    assert jobs.wait(sweep_job, store, timeout=300)["status"] == "done"
    db._stores.clear()
    return name


@pytest.fixture
def app(tmp_path, monkeypatch):
    name = prepare(tmp_path / "cache", monkeypatch)
    proc, url = start_server(tmp_path / "cache")
    yield url, name
    stop_server(proc)


def drawn(page, text: str) -> None:
    """Wait until `text` shows, the script run is over and every image has loaded."""
    page.get_by_text(text).first.wait_for(timeout=60_000)
    page.wait_for_function("() => !document.querySelector('[data-testid=stStatusWidget]')"
                           " && !document.querySelector('[data-testid=stSkeleton]')"
                           " && [...document.images].every(i => i.complete)", timeout=60_000)
    page.wait_for_timeout(500)  # charts finish their transitions


def test_every_page_as_a_newcomer_sees_it(app, page):
    url, name = app
    SHOTS.mkdir(parents=True, exist_ok=True)
    for shot, (path, text) in PAGES.items():
        page.goto(f"{url}/{path}?dataset={name}")
        drawn(page, text)
        if shot == "embedding_map":
            select_everything_then_click_one(page)  # the screenshot then shows one image and its neighbours
        if shot == "training":
            ticks = page.evaluate("() => [...document.querySelector('.js-plotly-plot').querySelectorAll('.xtick text')]"
                                  ".map(t => t.textContent)")  # the accuracy chart's x axis
            assert ticks and all(t.replace(",", "").isdigit() for t in ticks), ticks  # whole images, one format
            semantic_and_random_both_show(page)
        if shot == "jobs":
            every_column_fits(page)
        whole_page(page, SHOTS / f"{shot}.png")


def semantic_and_random_both_show(page) -> None:
    """The accuracy chart: random's markers are larger and of another shape than semantic's, so where the two
    are equal (always at the full set, which both curves end at) one does not hide the other, and the page
    says where they are equal."""
    traces = page.evaluate("() => document.querySelector('.js-plotly-plot')._fullData.map(t => ({name: t.name,"
                           " symbol: t.marker.symbol, size: t.marker.size, x: t.x, y: t.y}))")
    by = {t["name"]: t for t in traces}
    sem, rnd = by["semantic"], by["random"]
    assert sem["symbol"] != rnd["symbol"] and rnd["size"] > sem["size"], traces
    assert set(sem["x"]) & set(rnd["x"])  # they share the full-set point at least
    page.get_by_text("Both curves end at the full-set run").wait_for(timeout=10_000)
    equal = [x for x, y in zip(sem["x"], sem["y"]) if x != max(sem["x"])
             and any(x2 == x and abs(y2 - y) < 5e-3 for x2, y2 in zip(rnd["x"], rnd["y"]))]
    if equal:
        page.get_by_text("Semantic and random are equal at").wait_for(timeout=10_000)


def every_column_fits(page) -> None:
    """At 1,400 px the jobs table shows every column: nothing is cut off on the right (no horizontal scroll)."""
    grid = page.locator("[data-testid=stDataFrame]").first
    grid.wait_for()
    widths = grid.evaluate("g => { const s = g.querySelector('.dvn-scroller');"
                           " return [s.scrollWidth, s.clientWidth]; }")
    assert widths[0] <= widths[1] + 1, widths
    page.get_by_text("Parameters and result as raw JSON").wait_for()  # the raw JSON, for experts, folded


def whole_page(page, path: Path) -> None:
    """A screenshot of the whole page: Streamlit scrolls inside its main block, so the window is made as tall."""
    height = page.evaluate("() => document.querySelector('[data-testid=stMain]').scrollHeight")
    page.set_viewport_size({"width": 1400, "height": min(int(height) + 40, 4000)})
    page.wait_for_timeout(800)  # charts redraw at the new size
    page.wait_for_function("() => [...document.images].every(i => i.complete)", timeout=60_000)
    page.screenshot(path=str(path))
    page.set_viewport_size({"width": 1400, "height": 1000})


def point_on_screen(page, i: int = 0) -> tuple[float, float]:
    """Where the map draws its first trace's point `i`, in page pixels."""
    return page.evaluate("""i => { const gd = document.querySelector('.js-plotly-plot');
        const xa = gd._fullLayout.xaxis, ya = gd._fullLayout.yaxis, t = gd._fullData[0];
        const r = gd.getBoundingClientRect();
        return [r.left + xa._offset + xa.l2p(t.x[i]), r.top + ya._offset + ya.l2p(t.y[i])]; }""", i)


def select_everything_then_click_one(page) -> None:
    """A click on a point selects it; the lasso round the whole map selects all 200 points and the page says it
    shows 96 of them; a click on a point then selects that point alone (it used to leave the lasso's selection
    as it was: the lasso stayed the tool); the hover label goes when the mouse leaves the map; "Clear the
    selection" deselects everything, and a click selects one point again."""
    page.wait_for_selector(".js-plotly-plot .nsewdrag")
    page.mouse.click(*point_on_screen(page))
    page.get_by_text("1 image selected").wait_for(timeout=60_000)
    page.locator(".modebar-btn[data-val='lasso']").first.click()
    box = page.locator(".js-plotly-plot .nsewdrag").first.bounding_box()
    x0, y0, x1, y1 = box["x"] + 2, box["y"] + 2, box["x"] + box["width"] - 2, box["y"] + box["height"] - 2
    page.mouse.move(x0, y0)
    page.mouse.down()
    for x, y in ((x1, y0), (x1, y1), (x0, y1), (x0, y0 + 1)):
        page.mouse.move(x, y, steps=8)
    page.mouse.up()
    page.get_by_text("Showing the first 96 of 200").wait_for(timeout=60_000)
    page.get_by_text("200 images selected").wait_for()
    drawn(page, "200 images selected")
    page.wait_for_selector(".js-plotly-plot .nsewdrag")
    page.mouse.click(*point_on_screen(page, 5))  # straight after the lasso, no clearing
    page.get_by_text("1 image selected").wait_for(timeout=60_000)
    drawn(page, "Nearest neighbours of")
    page.mouse.move(0, 0)
    page.wait_for_function("() => !document.querySelector('.js-plotly-plot .hoverlayer .hovertext')",
                           timeout=10_000)  # no hover label left behind
    page.get_by_role("button", name="Clear the selection").click()
    page.get_by_text("Select points").wait_for(timeout=60_000)
    page.wait_for_selector(".js-plotly-plot .nsewdrag")
    page.mouse.click(*point_on_screen(page, 5))
    page.get_by_text("1 image selected").wait_for(timeout=60_000)
    drawn(page, "Nearest neighbours of")
    page.mouse.move(0, 0)  # no hover label in the picture
