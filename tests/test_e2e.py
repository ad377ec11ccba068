"""End to end: the real Streamlit server, driven in headless Debian chromium with Playwright."""
from tests.conftest import e2e_marks, slide_left

pytestmark = e2e_marks


def test_load_demo_and_embed_in_the_browser(server, page, tmp_path, monkeypatch):
    page.goto(server)
    page.get_by_text("Load the Fashion-MNIST demo").wait_for(timeout=60_000)
    limit = page.get_by_label("Images per split (0 = all)")
    limit.fill("300")
    limit.press("Enter")
    page.get_by_role("button", name="Load the Fashion-MNIST demo").click()
    # The scan job runs in the background; the page shows the counts when it is done.
    page.get_by_text("Images by class").wait_for(timeout=120_000)
    metric = page.locator('[data-testid="stMetric"]').filter(has_text="Images").first
    assert "600" in metric.inner_text()
    epochs = page.get_by_label("Training epochs (0 = the recipe's default)")
    epochs.fill("1")
    page.get_by_role("button", name="Embed all images").click()
    started = page.get_by_text("embeddings · running").or_(page.get_by_text("embeddings · queued"))
    started.first.wait_for(timeout=60_000)
    page.get_by_text("embeddings · done").wait_for(timeout=300_000)
    page.screenshot(path=str(tmp_path / "datasets.png"), full_page=True)
    table = page.locator('[data-testid="stDataFrame"]').last
    table.wait_for()
    # The embeddings table lists the new backbone with all 600 images embedded.
    page.get_by_text("Embeddings").first.wait_for()
    from core.embed import embeddings
    from core.store import db

    monkeypatch.setenv("REDEX_CACHE", str(tmp_path / "cache"))
    db._stores.clear()
    backs = embeddings.list_backbones("fashion-mnist-300")
    db._stores.clear()
    assert list(backs.embedded) == [600]

    # Redundant groups: build the trees, then move the fraction slider and watch the counts follow.
    page.get_by_role("link", name="Redundant groups").click()
    page.get_by_role("button", name="Build the merge trees").click()
    kept = page.locator('[data-testid="stMetric"]').filter(has_text="Kept").first
    kept.wait_for(timeout=120_000)
    before = kept.inner_text()
    assert "270" in before  # sum over classes of round(0.9 * n_c) for the first 300 train images
    slide_left(page, page.get_by_role("slider").first, 10, until_metric="240")
    page.screenshot(path=str(tmp_path / "groups.png"), full_page=True)
