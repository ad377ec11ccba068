"""Each page, headless through Streamlit's AppTest, against a real store with real data."""
import os

import pytest

from core import jobs
from core.data import catalog, scan, sources
from core.embed import embeddings, projection
from core.embed.backbones import DEFAULT_BACKBONE
from tests.conftest import ROOT, run_page


@pytest.fixture
def scanned(store, image_folder, fmnist_test):
    from tests.test_datasets import write_bad_files

    write_bad_files(image_folder, fmnist_test[0][0])
    name = sources.register(str(image_folder), "pages")
    scan.scan(name, store)
    return name


@pytest.fixture
def embedded(store, scanned):
    model, bid = embeddings.ensure_backbone(scanned, DEFAULT_BACKBONE, epochs=1, store=store)
    embeddings.embed_dataset(scanned, model, bid, store=store)
    return scanned, bid


def grid_caption(at) -> str:
    """The caption of the Datasets page's class grid (one sheet of the page's images)."""
    (element,) = at.get("image")
    (img,) = element.proto.imgs
    return img.caption


def test_datasets_page_empty_offers_the_demo(store):
    at = run_page("pages/datasets.py")
    assert not at.exception
    assert any(b.label == "Load the Fashion-MNIST demo" for b in at.button)


def test_datasets_page_demo_button_registers_and_scans(store):
    at = run_page("pages/datasets.py")
    at.number_input(key="demo_limit").set_value(50)
    next(b for b in at.button if b.label == "Load the Fashion-MNIST demo").click()
    at.run()
    assert not at.exception
    rows = jobs.list_jobs(store)
    assert rows[0]["kind"] == "scan" and rows[0]["dataset"] == "fashion-mnist-50"
    assert jobs.wait(rows[0]["id"], store)["status"] == "done"
    assert len(catalog.images_table("fashion-mnist-50", store)) == 100


def test_datasets_page_shows_counts_problems_and_images(scanned):
    at = run_page("pages/datasets.py", dataset=scanned)
    assert not at.exception
    metrics = {m.label: m.value for m in at.metric}
    root = os.geteuid() == 0  # root can read the chmod-0 file, so it is kept
    assert metrics["Images"] == ("65" if root else "64") and metrics["Skipped files"] == ("4" if root else "5")
    problems = at.dataframe[1].value
    bad = {"empty.png", "notes.png", "truncated.png", "bomb.png", "cmyk.jpg", "sixteen.png", "alpha.png",
           "palette.png"} | (set() if root else {"locked.png"})
    assert sorted(problems.path) == sorted(f"train/class0/{f}" for f in bad)  # every problem file, no other
    # The grid shows the first class, class0, whole: its 20 images and the 4 (5 as root) converted ones.
    n = 25 if root else 24
    assert grid_caption(at) == f"class0: images 1-{n} of {n}"  # one sheet


def test_datasets_page_reruns_read_no_image_list(scanned, monkeypatch):
    # A class picked in the grid reran the whole page, which read the whole image list twice (seconds at a
    # million images): now the grid is a fragment that reads one page of rows, and the counts, the problems
    # and the embedding estimate are read again only after a write to the store.
    import streamlit as st

    from core import estimates

    st.cache_data.clear()
    st.cache_resource.clear()
    calls = {}
    for module, fn in ((catalog, "images_table"), (catalog, "class_counts"), (estimates, "embed_estimate")):
        real = getattr(module, fn)

        def counted(*args, _real=real, _fn=fn, **kwargs):
            calls[_fn] = calls.get(_fn, 0) + 1
            return _real(*args, **kwargs)
        monkeypatch.setattr(module, fn, counted)
    at = run_page("pages/datasets.py", dataset=scanned)
    assert not at.exception
    first = dict(calls)
    assert "images_table" not in first and first["class_counts"] == 1 and first["embed_estimate"] == 1
    at.selectbox(key="grid_class").set_value("class1").run()
    assert not at.exception and grid_caption(at) == "class1: images 1-20 of 20"  # 15 train and 5 test images
    at.selectbox(key="grid_class").set_value("class0").run()
    assert grid_caption(at).startswith("class0: images 1-") and calls == first  # two picks: nothing read again


def test_the_server_freezes_what_the_first_datasets_page_imported(scanned, cache):
    # The Datasets page imports torch and timm into the server (its backbone choices): 370,000 objects that
    # Python's full garbage collections walked during later reruns (336 ms each here). The app freezes them.
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(f"""
        import gc, sys
        from streamlit.testing.v1 import AppTest
        assert "torch" not in sys.modules
        at = AppTest.from_file("app.py", default_timeout=120)
        at.session_state["dataset"] = {scanned!r}
        at.run()
        assert not at.exception, at.exception
        print("torch" in sys.modules, gc.get_freeze_count(), len(gc.get_objects()))
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "REDEX_CACHE": str(cache)})
    assert out.returncode == 0, out.stderr[-2000:]
    torch_imported, frozen, tracked = out.stdout.split()
    assert torch_imported == "True" and int(frozen) > 100_000 and int(tracked) < int(frozen) / 10


def test_training_count_is_the_training_splits_size(store, image_folder):
    from core.embed.embeddings import training_count, training_split

    name = sources.register(str(image_folder), "split")
    scan.scan(name, store)
    assert training_count(name, store) == len(training_split(name, store)[0]) == 45  # test split exists
    store.execute("UPDATE images SET split = 'train' WHERE dataset = ?", [name])  # no test or val: 10 % held out
    for seed in (0, 1, 2):
        assert training_count(name, store, seed) == len(training_split(name, store, seed)[0])


def test_datasets_page_bad_path_is_a_clear_error(store):
    at = run_page("pages/datasets.py")
    at.text_input(key="source_path").set_value("/no/such/folder").run()
    next(b for b in at.button if b.label == "Add and scan").click()
    at.run()
    assert any("no such file or folder" in e.value for e in at.error)


def test_embedding_map_without_and_with_a_map(embedded, store):
    name, bid = embedded
    at = run_page("pages/embedding_map.py", dataset=name)
    assert not at.exception
    assert any(b.label == "Compute the UMAP map" for b in at.button)
    projection.compute_projection(name, bid, store=store)
    at = run_page("pages/embedding_map.py", dataset=name)
    assert not at.exception
    assert len(at.get("plotly_chart")) == 1


def test_embedding_map_before_any_embedding(scanned):
    at = run_page("pages/embedding_map.py", dataset=scanned)
    assert not at.exception
    assert any("No embeddings yet" in i.value for i in at.info)


def test_jobs_page_lists_jobs_with_errors(store, scanned):
    failed = jobs.launch("embed", scanned, {"backbone": "timm:resnet18"}, store=store)
    jobs.wait(failed, store)
    at = run_page("pages/jobs.py")
    assert not at.exception
    table = at.dataframe[0].value
    assert list(table.id) == [failed] and list(table.status) == ["failed"]
    assert any("BackboneUnavailable" in e.value for e in at.error)
