"""What a newcomer sees: plain words and units, estimates from this machine's measured speed, running
work shown where it matters, charts that read right. Real store, real images, real jobs, pages in AppTest."""
import json

import pytest

from core import estimates, jobs, wording
from core.data import scan, sources
from core.embed import embeddings
from core.embed.backbones import DEFAULT_BACKBONE
from core.redundancy.cuts import groups_for_fraction
from core.subsets import sweeps
from tests.conftest import run_page, wait_until
from tests.test_pages import embedded  # noqa: F401  (the fixture: embeds this module's `scanned`)

CPU_KEY = estimates.speed_key("resnet8s2", 28, 1, "cpu")


@pytest.fixture
def scanned(store, image_folder):
    """60 real Fashion-MNIST images (3 classes x 15 train + 5 test), scanned."""
    name = sources.register(str(image_folder), "newcomer")
    scan.scan(name, store)
    return name


def in_order(at) -> list:
    """Every element of the page, in the order a reader meets it."""
    out = []

    def walk(node):
        children = getattr(node, "children", None)
        if isinstance(children, dict) and children:
            for k in sorted(children):
                walk(children[k])
        else:
            out.append(node)
    walk(at._tree)
    return out


def test_words_plurals_units_and_plain_names():
    assert [wording.plural(n, "training run") for n in (0, 1, 2)] == ["0 training runs", "1 training run",
                                                                      "2 training runs"]
    assert wording.plural(3635, "class") == "3,635 classes"
    assert wording.rate(102.4) == "102 images/s" and wording.rate(3.44, "files") == "3.4 files/s"
    assert wording.rate(0.4) == "24 images/min"  # never a bare '0.4/s'
    assert wording.duration(188) == "3 min 08 s" and wording.duration(4800) == "1 h 20 min"
    assert wording.image_format(28, 1) == "28 × 28 px, grayscale"
    assert wording.image_format(64, 3) == "64 × 64 px, colour (RGB)"
    assert wording.plain("nearest_mean") == "closest to the group's mean"
    assert wording.plain("farthest_mean") == "farthest from the group's mean"
    assert wording.plain("trained:resnet8s2@fashion-mnist#1a2b3c4d") == \
        "ResNet-8 (stride-2 stem), trained on fashion-mnist"
    assert wording.plain("ranker:ab@fm#cd<mae:ef@fm#01") == "patch ranker trained on fm"
    # Two ids with the same plain words stay apart; a lone one carries no hash.
    labels = wording.plain_labels(["trained:resnet8s2@fm#1a2b3c4d", "trained:resnet8s2@fm#99999999",
                                   "trained:resnet20@fm#00000000"])
    assert len(set(labels.values())) == 3 and labels["trained:resnet20@fm#00000000"] == "ResNet-20, trained on fm"


def test_job_parameters_and_results_read_as_plain_key_values():
    fields = dict(wording.job_fields("embed", {"backbone_id": "trained:resnet8s2@fm#1a2b3c4d", "embedded": 70000,
                                               "reused": 0, "epochs": None, "retrain": True}))
    assert fields == {"backbone": "ResNet-8 (stride-2 stem), trained on fm", "images embedded": "70,000",
                      "images already embedded": "0", "training epochs": "default", "train again": "yes"}
    fields = dict(wording.job_fields("train", {"run_key": "d500", "test_top1": 0.912, "seconds": 190.2}))
    assert fields == {"run key": "d500", "test top-1 accuracy": "91.20 %", "time": "3 min 10 s"}
    assert dict(wording.job_fields("sweep", {"runs": 3, "reused": 1}))["identical finished runs reused"] == "1"
    assert dict(wording.job_fields("cluster", {"linkage": "complete"}))["linkage"] == \
        "complete linkage (every pair close)"
    assert wording.job_kind("cluster") == "merge trees" and wording.job_kind("ltrp_score") == "patch scoring"


def test_cli_says_things_in_plain_words(store, scanned, capsys):
    """`redex info` and `redex jobs`: the format in words, plurals without '(s)', job kinds in plain words."""
    from core.cli import main as cli

    assert cli(["info", scanned]) == 0
    out = capsys.readouterr().out
    assert "working size 28 × 28 px, grayscale" in out and "px x" not in out and "(s)" not in out
    job = jobs.launch("scan", scanned, store=store)  # a rescan: nothing changed
    assert jobs.wait(job, store, timeout=120)["status"] == "done"
    assert cli(["jobs"]) == 0
    head, line = capsys.readouterr().out.splitlines()
    assert head.split() == ["id", "job", "dataset", "status", "detail"]
    assert line.split()[:3] == [str(job), "scan", "files"] and "(s)" not in line


def test_job_rates_have_units_and_the_time_left_reads_plainly():
    job = {"status": "running", "kind": "embed", "phase": "train backbone", "done": 2560, "total": 25600,
           "rate": 102.0}
    text = jobs.describe(job)["text"]
    assert "102 images/s" in text and "about 3 min 46 s left" in text
    assert "1.5 files/s" in jobs.describe({**job, "kind": "scan", "rate": 1.5})["text"]


def test_estimates_come_from_this_machines_measurement_under_its_load(cache, monkeypatch):
    nothing = estimates.estimate("train", CPU_KEY, 60_000)
    assert nothing.seconds is None and "no measurement yet on this machine" in nothing.text()
    m = estimates.record("train", CPU_KEY, 10_000, 100.0)  # 100 images/s, at the load of this moment
    alone = max(0.0, m.load - m.threads)  # the load it had beside its own threads
    est = estimates.estimate("train", CPU_KEY, 60_000, load=alone)
    assert est.seconds == pytest.approx(600)
    assert est.text().startswith("estimated from the last run on this machine: 100 images/s")
    busier = estimates.estimate("train", CPU_KEY, 60_000, load=alone + 4 * m.cores)
    # a busier machine is promised less speed: the job's share of the cores, min(1, C / (T + other load))
    slower = max(m.cores, m.threads + alone + 4 * m.cores) / max(m.cores, m.threads + alone)
    assert slower > 1.2 and busier.seconds == pytest.approx(est.seconds * slower)
    # Training a backbone records its speed (any length counts here).
    assert estimates.record("train", CPU_KEY, 100, 1e-3) is None  # too small to measure a speed




def test_training_and_embedding_record_their_speed(store, scanned, monkeypatch):
    monkeypatch.setattr(estimates, "MIN_SECONDS", 0.0)  # any length and size counts here
    monkeypatch.setattr(estimates, "MIN_IMAGES", 0)
    model, bid = embeddings.ensure_backbone(scanned, DEFAULT_BACKBONE, epochs=1, store=store)
    embeddings.embed_dataset(scanned, model, bid, store=store)
    assert estimates.measured("train", estimates.training_key("resnet8s2", 28, 1)).rate > 0
    assert estimates.measured("embed", estimates.embedding_key(bid, 28, 1)).rate > 0


def test_datasets_page_says_the_format_and_the_embedding_time(store, scanned):
    at = run_page("pages/datasets.py", dataset=scanned)
    assert not at.exception
    assert {m.label: m.value for m in at.metric}["Working size"] == "28 × 28 px"
    assert "grayscale" in [c.value for c in at.caption]
    said = [c.value for c in at.caption if "image" in c.value and "process" in c.value]
    assert len(said) == 1 and "no measurement yet on this machine" in said[0]
    estimates.record("train", estimates.training_key("resnet8s2", 28, 1), 30_000, 30.0)
    estimates.record("embed", estimates.embedding_key(DEFAULT_BACKBONE, 28, 1), 30_000, 10.0)
    at = run_page("pages/datasets.py", dataset=scanned)
    said = next(c.value for c in at.caption if "process" in c.value)
    assert "About" in said and "estimated from the last run on this machine" in said
    assert "no measurement" not in said


def test_running_embedding_is_shown_where_it_matters(store, scanned):
    """An embedding job in progress: the pages that need embeddings say so (not 'No embeddings yet'), the
    Datasets page shows it by its button, and the Jobs page opens the details of the running job."""
    running = jobs.launch("embed", scanned, {"epochs": 5000}, store=store)
    newer = jobs.launch("scan", scanned, store=store)  # a newer job that ends at once (a rescan: no change)
    wait_until(lambda: jobs.get_job(running, store)["status"] == "running", what="the embed job to start")
    assert jobs.wait(newer, store, timeout=120)["status"] == "done"

    for page in ("pages/embedding_map.py", "pages/training.py"):
        at = run_page(page, dataset=scanned)
        assert not at.exception
        assert not any("No embeddings yet" in i.value for i in at.info), page
        if page.endswith("embedding_map.py"):
            assert any("being computed" in i.value for i in at.info)
            assert len(at.get("progress")) == 1

    at = run_page("pages/datasets.py", dataset=scanned)
    order = in_order(at)
    button = next(i for i, e in enumerate(order) if getattr(e, "label", None) == "Embed all images")
    bars = [i for i, e in enumerate(order) if e.type == "progress"]
    assert bars and all(i > button for i in bars)  # by its button, not at the top of the page

    at = run_page("pages/jobs.py")
    assert not at.exception
    assert at.selectbox(key="job_detail").value == running  # not the newest (failed) one
    # The table: plain job names, no internal lane column; the details: parameters as readable lines,
    # the raw JSON only inside an expander.
    table = next(d.value for d in at.dataframe if "job" in d.value.columns)
    assert set(table.job) == {"embeddings", "scan files"} and "lane" not in table.columns
    said = "\n".join(m.value for m in at.markdown)
    assert "training epochs: **5,000**" in said and '"epochs"' not in said
    assert any("raw JSON" in e.label for e in at.expander)
    jobs.cancel(running, store)


def test_training_page_reuse_axis_and_per_class_without_full_run(store, embedded):  # noqa: F811
    name, _ = embedded
    at = run_page("pages/training.py", dataset=name)
    estimate = next(i.value for i in at.info if "runs" in i.value)
    assert "no measurement yet on this machine" in estimate and "2,000" not in estimate
    at.multiselect(key="sweep_fractions").set_value([0.5])
    at.multiselect(key="sweep_methods").set_value(["random"])
    at.number_input(key="sweep_seeds").set_value(1)
    at.number_input(key="sweep_epochs").set_value(1)
    at.number_input(key="sweep_batch").set_value(16)
    at.run()
    at.button(key="launch_sweep").click()
    at.run()
    first = sweeps.active_sweeps(name, store)[0]
    assert jobs.wait(first["id"], store, timeout=300)["result"]["done"] == 1
    # The same sweep again: every run is reused, and the page says so by the button.
    at.button(key="launch_sweep").click()
    at.run()
    job_id = at.session_state["launched_sweep"]["job_id"]
    assert jobs.wait(job_id, store, timeout=120)["result"]["reused"] == 1
    at.run()
    assert not at.exception
    assert any("was reused; nothing was trained" in i.value for i in at.info)
    # The accuracy chart ticks whole images at the subset sizes, in one format; random's markers are large open
    # diamonds drawn under semantic's small circles, so equal points never hide one another.
    fig = json.loads(at.get("plotly_chart")[0].proto.spec)
    (trace,) = fig["data"]
    assert trace["name"] == "random" and trace["marker"]["symbol"] == "diamond-open" and trace["marker"]["size"] > 8
    assert "ResNet-8 (stride-2 stem)" in at.selectbox(key="sweep_arch").options  # not 'resnet8s2'
    assert "SGD with momentum" in at.selectbox(key="sweep_opt").options
    xaxis = fig["layout"]["xaxis"]
    n = 3 * groups_for_fraction(15, 0.5)
    assert xaxis["tickvals"] == [n] and xaxis["ticktext"] == [f"{n:,}"]
    # No full-set run: the per-class section says so instead of an unexplained table.
    assert any("No full-set run with this recipe yet" in i.value for i in at.info)
    assert "full_accuracy" not in at.dataframe[-1].value


def test_patch_heatmaps_without_a_ranker_shows_the_group_sent_to_it(scanned):
    group = {"dataset": scanned, "title": "Group 7 · class0", "rows": [0, 1, 2, 3]}
    at = run_page("pages/patch_heatmaps.py", dataset=scanned, heatmap_group=group, heatmap_group_new=True)
    assert not at.exception
    assert [s.value for s in at.subheader] == ["Group 7 · class0"]
    assert len(at.get("image")) == 1  # the group's images, one picture
    assert any(b.label == "Train the patch ranker" for b in at.button)
