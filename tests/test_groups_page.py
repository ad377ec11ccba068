"""The Redundant groups page at interactive speed: a slider move reruns the cut, never the expensive
work behind it (trees, duplicates, label conflicts, the map), and what it shows is plain text."""
import pytest

from core.embed import projection
from core.redundancy import clusterings, review, snapshot
from tests.conftest import run_page

EXPENSIVE = [(clusterings, "load_clustering"), (snapshot, "load"), (clusterings, "tree_status"), (review, "duplicates"),
             (review, "label_conflicts"), (projection, "projection")]


@pytest.fixture
def calls(monkeypatch):
    """Counts calls of the expensive functions (the real ones still run), from empty Streamlit caches: the
    caches outlive a test in this process, and another test's copy of the same store has the same versions."""
    import streamlit as st

    st.cache_data.clear()
    st.cache_resource.clear()
    counts = {}
    for module, fn in EXPENSIVE:
        real = getattr(module, fn)

        def counted(*args, _real=real, _fn=fn, **kwargs):
            counts[_fn] = counts.get(_fn, 0) + 1
            return _real(*args, **kwargs)
        monkeypatch.setattr(module, fn, counted)
    return counts


def kept(at) -> int:
    return int({m.label: m.value for m in at.metric}["Kept"].replace(",", ""))


def test_slider_reruns_cost_no_expensive_call(clustered, calls):
    name, bid, _ = clustered
    at = run_page("pages/redundant_groups.py", dataset=name)
    assert not at.exception
    at.segmented_control(key="groups_section").set_value("Duplicates & label conflicts").run()
    assert not at.exception
    first = dict(calls)
    # the cluster job wrote a snapshot: the page maps it and never reads the trees from the store
    assert first["load"] == 1 and "load_clustering" not in first and "tree_status" not in first
    assert first["duplicates"] == 1 and first["label_conflicts"] == 1
    before = kept(at)
    for f in (0.3, 0.5, 0.7):
        at.slider(key="fraction").set_value(f).run()
        assert not at.exception
    assert kept(at) < before
    assert calls == first  # the cut changed three times; nothing behind it ran again
    at.segmented_control(key="groups_section").set_value("Per class").run()
    per_class = at.dataframe[0].value
    assert list(per_class.kept) == [max(1, round(0.7 * n)) for n in per_class.images]


def test_duplicates_section_shows_a_table_not_source_or_help(clustered):
    name, _, _ = clustered
    at = run_page("pages/redundant_groups.py", dataset=name)
    at.segmented_control(key="groups_section").set_value("Duplicates & label conflicts").run()
    assert not at.exception
    texts = " ".join(str(m.value) for m in list(at.markdown) + list(at.caption) + list(at.text))
    assert "DeltaGenerator" not in texts and "st.dataframe" not in texts
    dups = at.dataframe[0].value
    assert {"identical bytes", "identical pixels"} <= set(dups.kind)
    assert any("mislabelled.png" in t.value for t in at.text)  # the planted label conflict, listed


def test_group_sheets_of_small_images_go_to_the_browser_as_png(clustered):
    # Streamlit's default sends an image without an alpha channel as JPEG: it decoded each PNG sheet and
    # encoded it again on every rerun, and the browser then drew JPEG blocks 3x over 28-px images.
    name, _, _ = clustered
    at = run_page("pages/redundant_groups.py", dataset=name)
    assert not at.exception
    urls = [url for element in at.get("image") for url in element.value]  # /media/<hash>.<format>
    assert urls and all(u.endswith(".png") for u in urls), urls


def test_threshold_slider_scale_follows_the_merge_distances(clustered):
    # A fixed 0-1 scale in steps of 0.005 jumped from every image kept to 92 % in one step on Fashion-MNIST
    # (near copies are a few thousandths apart) and its default of 0.05 kept 9 %: the scale comes from the
    # clustering's own distances, and the default keeps about as much as the fraction slider's 0.9.
    name, _, _ = clustered
    at = run_page("pages/redundant_groups.py", dataset=name)
    at.radio(key="cut_mode").set_value("threshold").run()
    assert not at.exception
    slider = at.slider(key="threshold")
    index = clusterings.cut_index(clusterings.load_clustering(name))
    top, step = slider.max, slider.step
    assert index.cut(threshold=top).n_groups <= max(0.02 * index.n, len(index.labels))  # 1 % kept, rounded up
    assert top == float(f"{top:.0e}") and top / 1000 <= step <= top / 400  # 1-2-5 numbers, ~500 steps
    assert 0.8 <= kept(at) / index.n <= 0.95 and slider.value >= step  # about the fraction slider's 0.9
    at.slider(key="threshold").set_value(top).run()
    assert kept(at) == index.cut(threshold=top).n_groups


def test_near_copy_toggle_rebuilds_the_trees_without_the_pairs(clustered):
    # The page says how many near-copy pairs are joined and turns the pixel signal off (the paper's method
    # exactly) with a cluster job; the job stores the setting and the page's trees follow it.
    from core import jobs

    name, bid, _ = clustered
    assert clusterings.copy_state(name)["enabled"]  # on by default: the cluster job searched
    at = run_page("pages/redundant_groups.py", dataset=name)
    assert any("near-copy pairs joined" in c.value for c in at.caption)
    at.toggle(key=f"near_copies_{name}").set_value(False).run()
    assert not at.exception
    (job,) = [j for j in jobs.list_jobs() if j["kind"] == "cluster" and j["params"].get("near_copies") is False]
    assert jobs.wait(job["id"], timeout=300)["status"] == "done"
    assert not clusterings.copy_state(name)["enabled"] and not len(clusterings.stored_copy_pairs(name))
    clusterings.load_clustering(name, bid)  # every class's tree is current without the pairs
