"""End to end: launch a one-epoch sweep from the Training page, restart the app, see it finish."""
import pytest

from tests.conftest import e2e_marks, embedded_demo, start_server, stop_server, wait_until

pytestmark = e2e_marks


@pytest.fixture
def embedded(tmp_path, monkeypatch):
    """Fashion-MNIST (100 images per split) embedded in the cache the server will use."""
    from core.store import db

    _, name, _ = embedded_demo(tmp_path / "cache", monkeypatch)
    db._stores.clear()
    return name


def test_one_epoch_sweep_survives_an_app_restart(embedded, page, tmp_path):
    from core.data import catalog
    from core.redundancy.cuts import groups_for_fraction
    from core.store import db
    from core.subsets import results

    proc, url = start_server(tmp_path / "cache")
    try:
        page.goto(url + "/training")
        page.get_by_text("No training runs yet").wait_for(timeout=60_000)
        # Fractions: only 0.5 (clear the defaults, pick one); one seed; one epoch.
        fractions = page.locator('[data-testid="stMultiSelect"]').filter(has_text="Fractions")
        fractions.get_by_role("button", name="Clear all").click()
        fractions.get_by_role("combobox").fill("0.5")
        fractions.get_by_role("combobox").press("Enter")
        page.keyboard.press("Escape")
        for label, value in (("Seeds", "1"), ("Epochs", "1")):
            box = page.get_by_label(label, exact=True)
            box.fill(value)
            box.press("Enter")
        page.get_by_text("2 runs,").wait_for(timeout=30_000)  # semantic and random at 0.5, one seed
        page.get_by_role("button", name="Launch sweep").click()
        page.get_by_text("sweep 1 · running").wait_for(timeout=60_000)
        page.screenshot(path=str(tmp_path / "training-running.png"), full_page=True)
    finally:
        stop_server(proc)  # the app goes away; the sweep is a process of its own and goes on

    db._stores.clear()
    store = db.get_store()  # the server's store, read as the app would while the sweep goes on
    proc, url = start_server(tmp_path / "cache")
    try:
        page.goto(url + "/training")  # a deep link, the first visit of the new server
        nav = page.locator('[data-testid="stSidebarNav"]')
        nav.get_by_text("Redundant groups", exact=True).wait_for(timeout=60_000)  # routed by app.py, not the pages/ folder
        assert "widgets" not in nav.inner_text()
        # The sweep goes on without the app: wait until the store has both runs settled (a run whose job died
        # is settled as failed on this read, so the wait ends as soon as the outcome is known).
        def settled() -> bool:
            r = results.runs(embedded, store)
            return len(r) == 2 and not r.status.isin(["pending", "running"]).any()

        wait_until(settled, timeout=600, poll=1, what="the sweep's two runs to finish")
        # The page follows: the plot of the finished runs, and no sweep left running.
        page.get_by_text("Test accuracy vs subset size").wait_for(timeout=120_000)
        page.locator('[data-testid="stPlotlyChart"]').first.wait_for(timeout=30_000)
        page.get_by_text("sweep 1 ·").wait_for(state="detached", timeout=120_000)
        page.screenshot(path=str(tmp_path / "training-done.png"), full_page=True)
    finally:
        stop_server(proc)
    runs = results.runs(embedded, store)
    counts = catalog.images_table(embedded, store, split="train").label.value_counts()
    db._stores.clear()
    assert sorted(runs.method) == ["random", "semantic"]
    assert set(runs.status) == {"done"}, runs[["method", "status", "error"]].to_string()
    expected = sum(groups_for_fraction(int(n), 0.5) for n in counts)  # k_c = max(1, round(0.5 * n_c))
    assert set(runs.n_train) == {expected}
    assert set(runs.eval_split) == {"test"} and set(runs.n_eval) == {100}  # scored on every test image
