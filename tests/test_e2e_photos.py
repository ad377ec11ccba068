"""End to end with real photos: register a folder of photos in the browser, look at a redundant group and
a patch heatmap, and check that what is shown is sharp (image pixels, not the 64-px working size)."""
import re

import pytest

from tests.conftest import e2e_marks
from tests.photos import photo_set, require_photos

pytestmark = e2e_marks

NATURAL_SIZE = "e => [e.naturalWidth, e.naturalHeight, e.getBoundingClientRect().width]"


def prepare_in_store(cache, monkeypatch, name: str, checkpoint) -> None:
    """In the server's store: embed (a one-epoch default backbone), cluster, and LTRP with a tiny 224-px
    MAE checkpoint in the official layout, every image scored from its file."""
    from core.embed import embeddings
    from core.embed.backbones import DEFAULT_BACKBONE
    from core.ltrp import models, scoring
    from core.redundancy import clusterings
    from core.store import db
    from tests.test_photos import TINY

    monkeypatch.setenv("REDEX_CACHE", str(cache))
    db._stores.clear()
    try:
        store = db.get_store()
        model, bid = embeddings.ensure_backbone(name, DEFAULT_BACKBONE, epochs=1, store=store)
        embeddings.embed_dataset(name, model, bid, store=store)
        clusterings.cluster(name, bid, store=store)
        rid = models.train_ltrp(name, models.LtrpSettings(**TINY), checkpoint=str(checkpoint),
                                store=store)["ranker_id"]
        scoring.score_dataset(name, rid, store=store)
    finally:
        db._stores.clear()


@pytest.fixture
def photos(tmp_path, one_thread):
    require_photos()
    return photo_set(tmp_path / "photos")


def test_photos_are_shown_sharp_in_groups_and_heatmaps(server, page, photos, tmp_path, monkeypatch):
    import torch

    from tests.test_photos import official_mae

    page.goto(server)
    page.get_by_role("tab", name="Your images").click(timeout=60_000)
    path = page.get_by_label("Folder or manifest path")
    path.fill(str(photos.root))
    path.press("Enter")
    page.get_by_label("Name (optional)").fill("photos")
    page.get_by_label("Name (optional)").press("Enter")
    page.get_by_role("button", name="Add and scan").click()
    page.get_by_text("Images by class").wait_for(timeout=120_000)  # the scan job is done

    checkpoint = tmp_path / "mae_visualize_tiny.pth"
    torch.save(official_mae(), checkpoint)
    prepare_in_store(tmp_path / "cache", monkeypatch, "photos", checkpoint)

    # Redundant groups: each group is one sheet of 176-px photo tiles (the 64-px cache gave 84-px tiles).
    page.get_by_role("link", name="Redundant groups").click()
    sheet = page.locator('[data-testid="stImage"] img').first
    sheet.wait_for(timeout=120_000)
    page.wait_for_function("e => e.complete && e.naturalWidth > 0", arg=sheet.element_handle(), timeout=30_000)
    width, height, shown = sheet.evaluate(NATURAL_SIZE)
    assert width >= 224 and height >= 176, (width, height)
    assert width >= shown  # at least one image pixel per screen pixel
    sheet.screenshot(path=str(tmp_path / "group.png"))

    # Patch heatmaps: the group's heatmaps, then one image over its source at display resolution.
    page.get_by_role("button", name="Patch heatmaps").first.click()
    page.get_by_role("heading", name=re.compile(r"Group \d+ · ")).wait_for(timeout=60_000)
    page.get_by_text("One image", exact=True).click()
    original = page.locator('[data-testid="stImage"]').filter(has_text="original").locator("img")
    original.wait_for(timeout=60_000)
    page.wait_for_function("e => e.complete && e.naturalWidth > 0", arg=original.element_handle(), timeout=30_000)
    width, height, _ = original.evaluate(NATURAL_SIZE)
    # Sharper than the 224 px the MAE sees (the pixel cache blown up would be 224 px of blur): the source's
    # centre square, 400-448 px here (every photo is at least 400 px on its short side).
    assert width >= 400 and height == width, (width, height)
    kept = page.locator('[data-testid="stMetric"]').filter(has_text="Kept patches").first
    assert "/ 196" in kept.inner_text()  # the 224-px MAE's 14 x 14 patches
    page.locator('[data-testid="stPlotlyChart"]').first.wait_for(timeout=30_000)
    page.screenshot(path=str(tmp_path / "heatmap.png"))
