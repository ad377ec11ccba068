"""End to end: open a redundant group's patch heatmaps in the browser and move the keep-ratio slider."""
import re

import pytest

from tests.conftest import e2e_marks, embedded_demo, slide_left

pytestmark = e2e_marks


@pytest.fixture
def ready(tmp_path, monkeypatch, one_thread):
    """In the server's cache: Fashion-MNIST (100 per split), embedded, clustered, with a tiny ranker."""
    from core.ltrp import models, scoring
    from core.redundancy import clusterings
    from core.store import db
    from tests.test_patches import TINY

    try:
        store, name, bid = embedded_demo(tmp_path / "cache", monkeypatch)
        clusterings.cluster(name, bid, store=store)
        rid = models.train_ltrp(name, models.LtrpSettings(**TINY), store=store)["ranker_id"]
        scoring.score_dataset(name, rid, store=store)
    finally:
        db._stores.clear()
    return name


def kept_metric(page):
    return page.locator('[data-testid="stMetric"]').filter(has_text="Kept patches").first


def test_group_heatmaps_and_keep_ratio_in_the_browser(server, ready, page, tmp_path):
    page.goto(server)
    page.get_by_role("link", name="Redundant groups").click()

    # The duplicates section shows a table or "none": never Python source or Streamlit's help text
    # (a bare `x if c else y` expression once printed the DeltaGenerator's docstring there).
    page.locator(".st-key-groups_section").get_by_role("radio", name="Duplicates & label conflicts").click(
        timeout=60_000)
    page.get_by_role("heading", name="Near-identical images with different labels").wait_for(timeout=60_000)
    main = page.locator('[data-testid="stMain"]')
    after = main.inner_text().split("Exact duplicates", 1)[1].split("Near-identical images", 1)[0]
    assert "none" in after.split() or main.locator('[data-testid="stDataFrame"]').count() >= 1, after
    for leak in ("DeltaGenerator", "st.dataframe", "hide_index", "Parameters", "def "):
        assert leak not in main.inner_text()
    page.locator(".st-key-groups_section").get_by_role("radio", name="Groups", exact=True).click()

    page.get_by_role("button", name="Patch heatmaps").first.click(timeout=60_000)

    # The group opens side by side on the Patch heatmaps page: score maps, then kept patches.
    page.get_by_role("heading", name=re.compile(r"Group \d+ · ")).wait_for(timeout=60_000)
    page.locator('[data-testid="stImage"]').nth(3).wait_for(timeout=30_000)  # 2+ images: score maps, kept patches
    page.screenshot(path=str(tmp_path / "group.png"), full_page=True)

    # One image: the plotly heatmap, and the keep-ratio slider changes what survives.
    page.get_by_text("One image", exact=True).click()
    kept_metric(page).wait_for(timeout=60_000)
    assert "24 / 49" in kept_metric(page).inner_text()
    page.locator('[data-testid="stPlotlyChart"]').first.wait_for(timeout=30_000)
    slider = page.locator('[data-testid="stSlider"]').filter(has_text="Keep ratio").get_by_role("slider")
    slide_left(page, slider, 5, until_metric="12 / 49")
    page.screenshot(path=str(tmp_path / "heatmap.png"), full_page=True)
