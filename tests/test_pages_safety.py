"""The pages with hostile data (issue 11): labels, file names and paths are shown as text, never as
Markdown; a dataset is removed from the Datasets page after a confirmation; a folder without images is
refused at once; the URL's ?dataset= selects the dataset on every page. Real DuckDB, real images."""
import json
import re
import shutil
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from core import jobs
from core.cli import doctor
from core.data import catalog, scan, sources
from core.embed import embeddings
from core.embed.backbones import DEFAULT_BACKBONE
from core.redundancy import clusterings
from pages.widgets import md_text
from tests.conftest import CHROMIUM, ROOT, start_server, stop_server

# A label that Markdown would render as an image the browser fetches (a folder name cannot hold '/',
# so the URL is relative: the browser would fetch it from the app's own origin), and a file name that
# Markdown would render in italics.
LABEL = "![x](beacon.png)"
FILE = "a*b_c*.png"


def page(path: str, *, query: dict | None = None, **state) -> AppTest:
    at = AppTest.from_file(str(ROOT / path), default_timeout=120)
    for key, value in (query or {}).items():
        at.query_params[key] = value
    for key, value in state.items():
        at.session_state[key] = value
    return at.run()


def rendered(at: AppTest) -> list[str]:
    """Every string the page hands to Streamlit's Markdown renderer: markdown, captions, headings,
    alerts, toasts, metric labels and values, progress texts, image captions, button labels."""
    out = []
    for kind in ("markdown", "caption", "title", "header", "subheader", "info", "success", "warning", "error",
                 "toast", "latex"):
        out += [str(e.value) for e in getattr(at, kind, [])]
    out += [s for m in at.metric for s in (m.label, m.value)]
    out += [b.label for b in at.button]
    out += [e.proto.text for e in at.get("progress")]
    out += [i.caption for e in at.get("image") for i in e.proto.imgs]
    return out


def assert_all_escaped(at: AppTest) -> None:
    assert not at.exception, at.exception
    for value in rendered(at):
        assert "![" not in value, f"a label reaches Markdown unescaped: {value!r}"
        assert "*b_c*" not in value, f"a file name reaches Markdown unescaped: {value!r}"


@pytest.fixture
def hostile(store, image_folder):
    """The 60-image folder with its first class renamed to a Markdown image and one file to Markdown
    emphasis; registered and scanned."""
    for split in ("train", "test"):
        (image_folder / split / "class0").rename(image_folder / split / LABEL)
    first = min((image_folder / "train" / LABEL).iterdir())
    first.rename(first.with_name(FILE))
    name = sources.register(str(image_folder), "hostile")
    scan.scan(name, store)
    assert LABEL in set(catalog.images_table(name, store).label)
    return name


def test_registering_a_folder_without_images_is_refused_at_once_and_escaped(store, tmp_path):
    # Old page: st.error(str(exc)) put the path, with its '![', into Markdown as is (checked by running this
    # test against a copy of the old pages/datasets.py: it failed on assert_all_escaped); the refusal
    # itself comes from the data layer. A folder whose class folders are all empty used to register (and
    # start a scan that failed with "has no images"): "no refusal shown" for it.
    folder = tmp_path / LABEL
    (folder / "docs").mkdir(parents=True)
    (folder / "docs" / "notes.txt").write_text("not an image\n")
    empty = tmp_path / "empty"
    for cls in ("a", "b", "c"):
        (empty / "train" / cls).mkdir(parents=True)
    for source in (str(folder), "/etc", str(empty)):
        at = page("pages/datasets.py")
        at.text_input(key="source_path").set_value(source).run()
        next(b for b in at.button if b.label == "Add and scan").click()
        at.run()
        assert_all_escaped(at)
        assert any("nothing was registered" in e.value for e in at.error), f"no refusal shown for {source}"
        assert catalog.list_datasets(store).empty and not jobs.list_jobs(store)
        if source == str(folder):
            assert any(md_text(LABEL) in e.value for e in at.error)  # the path is in it, escaped


def test_embed_form_checks_the_checkpoint_before_a_job_exists(hostile, store, tmp_path):
    # Old page: jobs.launch("embed", ...) without check_embed_params, so an embed job was created and failed
    # later (checked by reading the old pages/datasets.py); the assertion on no job fails there.
    bad = tmp_path / f"{LABEL}.pt"
    bad.write_bytes(b"not a checkpoint")
    at = page("pages/datasets.py", dataset=hostile)
    next(t for t in at.text_input if t.label.startswith("Other backbone")).set_value("timm:resnet18")
    next(t for t in at.text_input if t.label.startswith("Checkpoint file")).set_value(str(bad))
    next(b for b in at.button if b.label == "Embed all images").click()
    at.run()
    assert_all_escaped(at)
    assert at.error
    assert not [j for j in jobs.list_jobs(store) if j["kind"] == "embed"]


def test_remove_button_asks_then_removes_the_dataset_but_not_its_files(hostile, store, image_folder):
    # Old page: there was no Remove button (the `next(...)` below raised StopIteration).
    before = sorted(p.relative_to(image_folder) for p in image_folder.rglob("*"))
    at = page("pages/datasets.py", query={"dataset": hostile})
    assert_all_escaped(at)
    next(b for b in at.button if b.key == "remove_dataset").click()
    at.run()
    assert_all_escaped(at)
    assert any("Remove the dataset" in w.value for w in at.warning)
    assert catalog.list_datasets(store).name.tolist() == [hostile]  # nothing removed before the confirmation
    next(b for b in at.button if b.key == "remove_confirm").click()
    at.run()
    assert not at.exception
    assert catalog.list_datasets(store).empty
    assert any("Removed dataset" in s.value for s in at.success)
    assert at.query_params.get("dataset") != hostile  # no longer selected, in the URL either
    assert "dataset" not in at.session_state or at.session_state["dataset"] != hostile
    assert sorted(p.relative_to(image_folder) for p in image_folder.rglob("*")) == before  # source untouched
    record = json.loads(doctor.record_path().read_text())  # save_record ran: the record forgets it too
    assert hostile not in [r["name"] for r in record]


def test_remove_is_refused_while_a_job_of_the_dataset_is_queued(hostile, store):
    # Old page: no Remove button. A queued job row without a process stands for one waiting for a slot.
    with store.write() as con:
        job = con.execute("INSERT INTO jobs (kind, dataset, params, status, message, lane)"
                          " VALUES ('embed', ?, '{}', 'queued', 'waiting', 'heavy') RETURNING id",
                          [hostile]).fetchone()[0]
    try:
        at = page("pages/datasets.py", dataset=hostile)
        next(b for b in at.button if b.key == "remove_dataset").click()
        at.run()
        next(b for b in at.button if b.key == "remove_confirm").click()
        at.run()
        assert_all_escaped(at)
        assert any("queued or running" in e.value for e in at.error), [e.value for e in at.error]
        assert catalog.list_datasets(store).name.tolist() == [hostile]
    finally:
        store.execute("UPDATE jobs SET status = 'cancelled' WHERE id = ?", [job])


def test_labels_and_paths_are_escaped_on_the_groups_and_jobs_pages(hostile, store):
    model, bid = embeddings.ensure_backbone(hostile, DEFAULT_BACKBONE, epochs=1, store=store)
    embeddings.embed_dataset(hostile, model, bid, store=store)
    clusterings.cluster(hostile, bid, store=store)
    at = page("pages/redundant_groups.py", dataset=hostile)
    assert_all_escaped(at)
    at.selectbox(key="group_class").set_value(LABEL).run()
    assert_all_escaped(at)
    at.slider(key="fraction").set_value(0.3).run()
    assert_all_escaped(at)
    headings = [i.caption for e in at.get("image") for i in e.proto.imgs]
    assert any(md_text(LABEL) in h for h in headings), "the group headings name the label, escaped"
    at.segmented_control(key="groups_section").set_value("Duplicates & label conflicts").run()
    assert_all_escaped(at)
    # A failed job whose error names a hostile path: the Jobs page and the Datasets page's job lines.
    # Old pages: st.error(job["error"]) and st.error(label) in widgets.job_status, both unescaped.
    job = jobs.launch("embed", hostile, {"backbone": "timm:resnet18", "checkpoint": f"/nonexistent/{LABEL}.pt"},
                      store=store)
    assert LABEL in (jobs.wait(job, store)["error"] or "")
    assert_all_escaped(page("pages/jobs.py"))
    assert_all_escaped(page("pages/datasets.py", dataset=hostile))
    assert_all_escaped(page("pages/embedding_map.py", dataset=hostile))


@pytest.fixture
def two(store, image_folder, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(image_folder, other)
    names = [sources.register(str(image_folder), "alpha"), sources.register(str(other), "beta")]
    for name in names:
        scan.scan(name, store)
    return names


@pytest.mark.parametrize("path", ["pages/datasets.py", "pages/training.py", "pages/embedding_map.py",
                                  "pages/patch_heatmaps.py"])
def test_the_url_selects_the_dataset_and_a_removed_one_is_not_selected(two, store, path):
    # Old Datasets page: its own select box ignored ?dataset= (no widget with key "dataset_picker").
    at = page(path, query={"dataset": "beta"})
    assert not at.exception
    assert at.selectbox(key="dataset_picker").value == "beta"
    sources.remove_dataset("beta", store)
    at = page(path, query={"dataset": "beta"})  # a link or a reload after the removal
    assert not at.exception
    assert at.selectbox(key="dataset_picker").value == "alpha"
    assert at.query_params["dataset"] == "alpha"  # the URL follows


# -- the Embedding map after a selection and the Patch heatmaps page, with hostile labels and names ---------
# A manifest can give any label: a Markdown image whose URL a browser would fetch (port 9: nothing
# listens), HTML, emphasis, LaTeX, dots, a line break. The file names are as hostile as a file name can be
# (one row reaches its file through '..'). Names that are not UTF-8 never get this far: they are problem
# rows of the scan (tests/test_safety.py, test_3).
BEACON = "http://127.0.0.1:9/beacon.png"
LABELS = [f"![x]({BEACON})", "<img src=x onerror=alert(1)>", "**bold**", "$x$", "../..", "line\nbreak"]
FILES = ["![y](beacon.png)", "<img src=y onerror=alert(2)>", "**b**", "$y$", "a..b", "n\nl"]
RAW = ["![", "](", "<img", "**b", "$x$", "$y"]  # what must never reach Markdown unescaped


def assert_literal(at: AppTest) -> None:
    """No hostile label or file name reaches Markdown unescaped (escaped pairs `\\c` removed first)."""
    assert not at.exception, at.exception
    for value in rendered(at):
        bare = re.sub(r"\\.", "", value)
        assert not [r for r in RAW if r in bare], f"reaches Markdown unescaped: {value!r}"


def store_map(name: str, bid: str, store) -> None:
    """A 2-D map of the embeddings in the store, as the `project` job writes it (the first two principal
    components stand in for UMAP, whose first run compiles for a minute)."""
    import numpy as np
    import pandas as pd

    from core.embed import projection

    table, emb = embeddings.load_embeddings(name, bid, store)
    centred = emb - emb.mean(axis=0)
    xy = centred @ np.linalg.svd(centred, full_matrices=False)[2][:2].T
    out = pd.DataFrame({"dataset": name, "backbone_id": bid, "method": "umap",
                        "fingerprint": projection.fingerprint(table), "path": table.path,
                        "x": xy[:, 0].astype(np.float32), "y": xy[:, 1].astype(np.float32)})
    with store.write() as con:
        con.register("proj", out)
        con.execute("INSERT INTO projections SELECT * FROM proj")


@pytest.fixture(scope="module")
def hostile_ready(tmp_path_factory, fmnist_test):
    """A cache holding the manifest dataset 'labels' (36 real 28 px images, 6 per hostile label): scanned,
    embedded by a one-epoch backbone, mapped, with a tiny patch ranker whose scores are stored."""
    import csv

    import torch

    from core.ltrp import models, scoring
    from core.store import db
    from tests.conftest import png_bytes
    from tests.test_patches import TINY

    tmp = tmp_path_factory.mktemp("hostile")
    (tmp / "src").mkdir()
    (tmp / "manifests").mkdir()
    rows = []
    for i in range(36):
        file = tmp / "src" / f"{FILES[i % 6]}{i}.png"
        file.write_bytes(png_bytes(fmnist_test[0][i]))
        rows.append((f"../src/{file.name}" if i % 6 == 4 else str(file), LABELS[i % 6]))
    with open(tmp / "manifests" / "labels.csv", "w", newline="") as f:
        csv.writer(f).writerows([("path", "label"), *rows])
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("REDEX_CACHE", str(tmp / "cache"))
        db._stores.clear()
        torch.set_num_threads(1)
        try:
            store = db.get_store()
            name = sources.register(str(tmp / "manifests" / "labels.csv"))
            scan.scan(name, store)
            assert sorted(set(catalog.images_table(name, store).label)) == sorted(LABELS)
            model, bid = embeddings.ensure_backbone(name, DEFAULT_BACKBONE, epochs=1, store=store)
            embeddings.embed_dataset(name, model, bid, store=store)
            store_map(name, bid, store)
            rid = models.train_ltrp(name, models.LtrpSettings(**TINY), store=store)["ranker_id"]
            scoring.score_dataset(name, rid, store=store)
        finally:
            torch.set_num_threads(threads)
            db._stores.clear()
    return tmp / "cache", name


@pytest.fixture
def hostile_labels(hostile_ready, monkeypatch):
    from core.store import db

    cache, name = hostile_ready
    monkeypatch.setenv("REDEX_CACHE", str(cache))
    db._stores.clear()
    yield name
    db._stores.clear()


def test_the_datasets_grid_shows_hostile_labels_as_text(hostile_labels):
    # The class grid's caption names the class (one sheet per page): each hostile label, picked, stays text.
    at = page("pages/datasets.py", dataset=hostile_labels)
    assert_literal(at)
    assert sorted(at.selectbox(key="grid_class").options) == sorted(LABELS)  # select boxes: plain text
    for label in LABELS:
        at.selectbox(key="grid_class").set_value(label).run()
        assert_literal(at)
        (element,) = at.get("image")
        assert element.proto.imgs[0].caption.startswith(md_text(label) + ": images 1-")


def test_patch_heatmaps_show_hostile_labels_and_names_as_text(hostile_labels):
    # Checked against a copy of pages/patch_heatmaps.py whose captions and metric skip `md_text`: fails there.
    name = hostile_labels
    table = catalog.images_table(name)
    at = page("pages/patch_heatmaps.py", dataset=name)
    assert_literal(at)
    assert sorted(at.selectbox(key="heat_class").options) == sorted(LABELS)  # select boxes: plain text
    assert at.metric[1].value == md_text(LABELS[0])  # the first class (sorted)
    for label in (LABELS[1], LABELS[3]):  # HTML, LaTeX
        at.selectbox(key="heat_class").set_value(label).run()
        assert_literal(at)
        assert at.metric[1].value == md_text(label)
    at.radio(key="pick_by").set_value("content id or path").run()
    at.text_input(key="heat_ref").set_value(next(p for p in table.path if "<img" in p)).run()  # HTML in a path
    assert_literal(at)
    at.radio(key="heat_mode").set_value("Class grid").run()
    assert_literal(at)
    at.selectbox(key="grid_class").set_value(LABELS[2]).run()  # emphasis
    assert_literal(at)
    rows = [int(r) for r in table.row[:6]]
    at = page("pages/patch_heatmaps.py", dataset=name, heatmap_group_new=True,
              heatmap_group={"dataset": name, "title": f"Group 0 · {LABELS[0]} · 6 images", "rows": rows})
    assert_literal(at)
    assert at.subheader[0].value == md_text(f"Group 0 · {LABELS[0]} · 6 images")


@pytest.mark.e2e
@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian chromium not installed")
def test_hostile_labels_stay_text_in_the_browser_after_a_map_selection_and_on_the_heatmaps(hostile_ready, request):
    # A real browser: no request to the beacon, no dialog, no <img> or emphasis made from a label, and the
    # labels read as written. Checked against copies of the pages whose captions skip `md_text`: the
    # beacon request and the <img src=x> appear there.
    cache, name = hostile_ready
    tab = request.getfixturevalue("page")  # Playwright's page in Debian's chromium (tests/conftest.py)
    asked, dialogs = [], []
    tab.on("request", lambda r: asked.append(r.url))
    tab.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    proc, url = start_server(cache)
    try:
        tab.goto(f"{url}/embedding_map?dataset={name}")
        lasso_every_point(tab)
        tab.get_by_text("Nearest neighbours of").first.wait_for(timeout=60_000)
        tab.locator('[data-testid="stImage"]').nth(40).wait_for(timeout=60_000)  # 36 selected + neighbours
        assert_text_in_browser(tab, [LABELS[0], f"{FILES[0]}0.png", "<img src=x", "**bold**", "$x$"])

        tab.goto(f"{url}/patch_heatmaps?dataset={name}")
        tab.locator('[data-testid="stMetric"]').filter(has_text="Class").first.wait_for(timeout=60_000)
        tab.locator('[data-testid="stImage"]').nth(2).wait_for(timeout=60_000)
        assert_text_in_browser(tab, [LABELS[0], f"{FILES[0]}0.png"])  # the first class, its first image
    finally:
        stop_server(proc)
    assert not [u for u in asked if "127.0.0.1:9/" in u or "beacon" in u], asked
    assert not dialogs, dialogs


def lasso_every_point(tab, tries: int = 3) -> None:
    """With the map's lasso tool, draw round the whole Embedding map, once the app is idle, until the page
    shows the 36 points selected (a rerun that redraws the chart while the lasso is drawn drops it)."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    selected = tab.get_by_text(re.compile(r"^36 .*selected"))
    for attempt in range(tries):
        plot = tab.locator('[data-testid="stPlotlyChart"] .nsewdrag').first
        plot.wait_for(timeout=60_000)
        tab.locator('[data-testid="stStatusWidget"]').wait_for(state="hidden", timeout=60_000)
        plot.hover()
        tab.locator('.modebar-btn[data-title="Lasso Select"]').first.click()  # the toolbar's lasso tool
        box = plot.bounding_box()
        x0, y0, x1, y1 = box["x"] + 2, box["y"] + 2, box["x"] + box["width"] - 2, box["y"] + box["height"] - 2
        tab.mouse.move(x0, y0)
        tab.mouse.down()
        for x, y in [(x1, y0), (x1, y1), (x0, y1), (x0, y0 + 1)]:
            tab.mouse.move(x, y, steps=8)
        tab.mouse.up()
        try:
            selected.wait_for(timeout=45_000)
            return
        except PlaywrightTimeout:
            if attempt == tries - 1:
                raise


def assert_text_in_browser(tab, shown: list[str]) -> None:
    """No <img>, emphasis or formula made from a label or file name, and the texts `shown` read as written."""
    html = tab.evaluate("""() => ({
        srcs: [...document.querySelectorAll('img')].map(i => i.getAttribute('src') || ''),
        emphasis: [...document.querySelectorAll('strong, em, b, i')].map(e => e.textContent),
        math: document.querySelectorAll('.katex, mjx-container').length,
        text: document.body.innerText})""")
    assert not [s for s in html["srcs"] if s in ("x", "y") or "beacon" in s], html["srcs"]
    assert not {"bold", "b", "x", "y"} & set(html["emphasis"]), html["emphasis"]
    assert html["math"] == 0
    for text in shown:
        assert text in html["text"], f"{text!r} is not shown as written"
