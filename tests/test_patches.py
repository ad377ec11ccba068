"""LTRP through the store, the jobs, the CLI and the page: cached models, resumable score maps, heatmaps.

Real components: a real DuckDB file, real Fashion-MNIST images (100 per split), tiny models.
"""
import base64
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from streamlit.testing.v1 import AppTest

from core import jobs
from core.cli import main as cli
from core.data import catalog, scan, sources
from core.ltrp import models as ltrp_models
from core.ltrp import scoring
from core.ltrp import view as ltrp_view
from core.ltrp.mae import MAEConfig, MaskedAutoencoder
from pages.widgets import md_text
from tests.conftest import run_page

TINY = {"mae_epochs": 1, "ranker_epochs": 1, "mae_batch": 64, "ranker_batch": 64,
        "mae_config": {"embed_dim": 32, "depth": 1, "heads": 2, "decoder_embed_dim": 32, "decoder_depth": 1,
                       "decoder_heads": 2},
        "ranker_config": {"embed_dim": 32, "depth": 1, "heads": 2}}
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: far faster on a busy 2-core machine


@pytest.fixture
def fmnist(store):
    """Fashion-MNIST, the first 100 images of each split, scanned into this test's store."""
    name = sources.register("fashion-mnist", limit=100, store=store)
    scan.scan(name, store)
    return name


@pytest.fixture
def scored(store, fmnist):
    """A tiny MAE and ranker trained in-process, every image scored."""
    rid = ltrp_models.train_ltrp(fmnist, ltrp_models.LtrpSettings(**TINY), store=store)["ranker_id"]
    scoring.score_dataset(fmnist, rid, store=store)
    return fmnist, rid


def stored_scores(name, rid, store) -> dict[str, np.ndarray]:
    table, maps = scoring.load_scores(name, rid, store=store)
    return dict(zip(table.image_id, maps))


# -- models, jobs and the score store ----------------------------------------------------------
def test_ltrp_job_trains_scores_and_reuses_its_models(store, fmnist):
    job = jobs.wait(jobs.launch("ltrp", fmnist, TINY, store=store), store, timeout=300)
    assert job["status"] == "done", job["error"]
    n_images = catalog.images_table(fmnist, store).image_id.nunique()
    assert job["result"]["scored"] == job["result"]["total"] == n_images
    models = store.query_df("SELECT model_id, kind, parent, checkpoint, metrics FROM ltrp_models ORDER BY kind")
    assert list(models.kind) == ["mae", "ranker"]
    mae_id, rid = models.model_id
    assert models.parent[1] == mae_id == job["result"]["mae_id"] and rid == job["result"]["ranker_id"]
    assert all(Path(p).exists() for p in models.checkpoint)
    assert ltrp_models.list_rankers(fmnist, store).scored.tolist() == [n_images]
    _, maps = scoring.load_scores(fmnist, rid, store=store)
    assert maps.shape == (n_images, 49) and np.isfinite(maps).all()

    mtimes = [Path(p).stat().st_mtime_ns for p in models.checkpoint]
    assert ltrp_models.train_ltrp(fmnist, ltrp_models.LtrpSettings(**TINY), store=store) == {"mae_id": mae_id,
                                                                                     "ranker_id": rid}
    assert [Path(p).stat().st_mtime_ns for p in models.checkpoint] == mtimes  # reused, not retrained
    assert scoring.score_dataset(fmnist, rid, store=store)["scored"] == 0
    # A different recipe is a different model (its own id), not the cached one.
    other = ltrp_models.train_ltrp(fmnist, ltrp_models.LtrpSettings(**{**TINY, "mask_ratio": 0.5}), store=store)
    assert other["mae_id"] == mae_id and other["ranker_id"] != rid


def test_a_resumed_scoring_job_does_not_recompute(store, scored):
    name, rid = scored
    before = stored_scores(name, rid, store)
    ids = sorted(before)
    sentinel, dropped = ids[:30], ids[30:90]
    with store.write() as con:  # as if a job had stopped after some chunks: 60 maps missing
        con.execute("UPDATE patch_scores SET scores = ? WHERE ranker_id = ? AND list_contains(?, image_id)",
                    [[-7.0] * 49, rid, sentinel])
        con.execute("DELETE FROM patch_scores WHERE ranker_id = ? AND list_contains(?, image_id)", [rid, dropped])

    job = jobs.wait(jobs.launch("ltrp_score", name, {"ranker_id": rid}, store=store), store, timeout=120)
    assert job["status"] == "done", job["error"]
    assert (job["result"]["scored"], job["result"]["reused"]) == (60, len(ids) - 60)
    after = stored_scores(name, rid, store)
    assert sorted(after) == ids
    for i in sentinel:  # existing rows were not recomputed
        assert (after[i] == -7.0).all()
    for i in dropped:  # the missing ones were, with the same ranker
        np.testing.assert_allclose(after[i], before[i], rtol=1e-5, atol=1e-6)


def test_score_maps_are_deterministic_for_a_fixed_seed(store, scored):
    name, rid = scored
    first = stored_scores(name, rid, store)
    again = ltrp_models.train_ltrp(name, ltrp_models.LtrpSettings(**TINY), retrain=True, store=store)
    assert again["ranker_id"] == rid
    assert store.query("SELECT count(*) FROM patch_scores WHERE ranker_id = ?", [rid]) == [(0,)]  # invalidated
    assert scoring.score_dataset(name, rid, store=store)["scored"] == len(first)
    second = stored_scores(name, rid, store)
    assert sorted(second) == sorted(first)
    for i in first:
        np.testing.assert_array_equal(second[i], first[i])

    other = ltrp_models.train_ltrp(name, ltrp_models.LtrpSettings(**{**TINY, "seed": 1}), store=store)["ranker_id"]
    scoring.score_dataset(name, other, store=store)
    third = stored_scores(name, other, store)
    assert not all(np.array_equal(third[i], first[i]) for i in first)


def _official_layout(cfg: MAEConfig) -> dict[str, torch.Tensor]:
    """An MAE with a decoder, saved under the official models_mae parameter names."""
    torch.manual_seed(0)
    state = MaskedAutoencoder(cfg).state_dict()
    return {k: v for k, v in state.items() if k not in ("pixel_mean", "pixel_std")}


def test_a_pretrained_mae_checkpoint_is_used_and_an_unusable_one_is_refused(store, fmnist, tmp_path, capsys):
    import timm

    encoder_only = tmp_path / "mae_pretrain_vit_tiny.pth"
    torch.save({"model": timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32,
                                           num_classes=0).state_dict()}, encoder_only)
    assert cli(["ltrp", "train", fmnist, "--checkpoint", str(encoder_only)]) == 1
    err = capsys.readouterr().err
    assert "only the MAE encoder" in err and "mae_visualize_vit_base.pth" in err
    assert jobs.list_jobs(store) == []  # refused before any job started

    failed = jobs.wait(jobs.launch("ltrp", fmnist, {**TINY, "checkpoint": str(encoder_only)}, store=store), store)
    assert failed["status"] == "failed" and "MAEHasNoDecoder" in failed["error"]
    garbage = tmp_path / "notes.pth"
    garbage.write_text("not a checkpoint")
    assert cli(["ltrp", "train", fmnist, "--checkpoint", str(garbage)]) == 1
    assert "not a PyTorch checkpoint" in capsys.readouterr().err
    assert cli(["ltrp", "train", fmnist, "--checkpoint", str(tmp_path / "missing.pth")]) == 1
    assert "no such checkpoint file" in capsys.readouterr().err
    assert store.query("SELECT count(*) FROM ltrp_models") == [(0,)]  # never random weights

    cfg = MAEConfig(img_size=28, patch_size=7, in_chans=3, embed_dim=32, depth=1, heads=1, decoder_embed_dim=32,
                    decoder_depth=1, decoder_heads=1)
    official = tmp_path / "mae_visualize_tiny.pth"
    torch.save({"model": _official_layout(cfg)}, official)
    ids = ltrp_models.train_ltrp(fmnist, ltrp_models.LtrpSettings(**TINY), checkpoint=str(official), store=store)
    assert ids["mae_id"].startswith("mae:file-")
    mae = ltrp_models.load_mae_model(ids["ranker_id"], store)
    assert mae.cfg.img_size == 28 and mae.cfg.grid == 4 and mae.cfg.in_chans == 3
    torch.testing.assert_close(mae.patch_embed.proj.weight, _official_layout(cfg)["patch_embed.proj.weight"])
    assert scoring.score_dataset(fmnist, ids["ranker_id"], store=store)["scored"] > 0
    _, maps = scoring.load_scores(fmnist, ids["ranker_id"], store=store)
    assert maps.shape[1] == 16  # the checkpoint's patch grid


# -- images, views and the CLI -----------------------------------------------------------------
def test_images_are_found_by_content_id_path_or_file(store, fmnist, tmp_path, fmnist_test):
    table = catalog.images_table(fmnist, store)
    r = table.iloc[7]
    by_id = ltrp_view.resolve_image(fmnist, r.image_id, store)
    assert (by_id.row, by_id.path, by_id.label) == (r.row, r.path, r.label)
    assert ltrp_view.resolve_image(fmnist, r.image_id[:10], store).row == r.row
    assert ltrp_view.resolve_image(fmnist, r.path, store).row == r.row
    root = Path(catalog.get_dataset(fmnist, store)["root"])
    assert ltrp_view.resolve_image(fmnist, str(root / r.path), store).row == r.row
    np.testing.assert_array_equal(by_id.pixels, catalog.load_pixels(fmnist, store)[r.row])

    outside = tmp_path / "mine.png"
    Image.fromarray(fmnist_test[0][9000]).save(outside)
    ext = ltrp_view.resolve_image(fmnist, str(outside), store)
    assert ext.row is None and ext.pixels.shape == (28, 28, 1)
    np.testing.assert_array_equal(ext.pixels[..., 0], fmnist_test[0][9000])
    with pytest.raises(catalog.DatasetError, match="redex info"):
        ltrp_view.resolve_image(fmnist, "0000nothing", store)


def test_patch_view_keeps_the_top_patches(store, scored):
    name, rid = scored
    image = ltrp_view.images_at(name, [3], store)[0]
    scores, stored = scoring.image_scores(name, rid, image, store=store)
    assert stored
    mae = ltrp_models.load_mae_model(rid, store)
    for ratio, k in ((0.25, 12), (0.5, 24), (0.75, 37)):
        view = ltrp_view.patch_view(mae, image.pixels, scores, ratio)
        assert len(view.keep) == k and set(view.keep) == set(np.argsort(-scores)[:k])
        cells = np.kron(view.kept_mask, np.ones((4, 4), bool))
        np.testing.assert_array_equal(view.kept[cells], view.original[cells])
        np.testing.assert_array_equal(view.reconstruction[cells], view.original[cells])
        assert (view.kept[~cells] == ltrp_view.MASK_GREY).all()
        assert not np.array_equal(view.reconstruction[~cells], view.original[~cells])


def test_cli_train_score_and_show(store, fmnist, tmp_path, capsys):
    assert cli(["ltrp", "show", fmnist, "x"]) == 1
    assert f"run `redex ltrp train {fmnist}` first" in capsys.readouterr().err
    assert cli(["ltrp", "train", fmnist, "--mae-epochs", "1", "--ranker-epochs", "1", "--mask-ratio", "0.8"]) == 0
    out = capsys.readouterr().out
    n_images = catalog.images_table(fmnist, store).image_id.nunique()
    assert f"{n_images:,} images scored" in out
    rid = ltrp_models.require_ranker(fmnist, store)
    assert '"mask_ratio": 0.8' in store.query("SELECT metrics FROM ltrp_models WHERE model_id = ?", [rid])[0][0]
    assert cli(["ltrp", "score", fmnist]) == 0
    assert jobs.list_jobs(store)[0]["result"]["reused"] == n_images

    image_id = catalog.images_table(fmnist, store).image_id[5]
    png = tmp_path / "heat.png"
    assert cli(["ltrp", "show", fmnist, image_id, "--keep", "0.25", "--out", str(png)]) == 0
    assert "kept 12 of 49 patches" in capsys.readouterr().out
    sheet = np.asarray(Image.open(png).convert("RGB"))
    assert sheet.shape == (224 + 18, 4 * 224 + 3 * 8, 3)
    original = sheet[18:, :224]
    np.testing.assert_array_equal(original[::8, ::8, 0], catalog.load_pixels(fmnist, store)[5][..., 0])
    assert cli(["ltrp", "show", fmnist, image_id, "--keep", "1.5", "--out", str(png)]) == 1
    assert "keep_ratio must lie in (0, 1]" in capsys.readouterr().err
    assert cli(["ltrp", "show", fmnist, "no/such.png"]) == 1
    assert "no image 'no/such.png'" in capsys.readouterr().err
    assert cli(["ltrp", "train", fmnist, "--mask-ratio", "1.2"]) == 1
    assert "mask ratio must lie in (0, 1)" in capsys.readouterr().err


# -- the page ----------------------------------------------------------------------------------
def metrics(at: AppTest) -> dict:
    return {m.label: m.value for m in at.metric}


def test_page_without_a_ranker_starts_the_job(store, fmnist):
    at = run_page("pages/patch_heatmaps.py", dataset=fmnist)
    assert not at.exception
    assert any("No patch ranker for this dataset yet" in i.value for i in at.info)
    next(b for b in at.button if b.label == "Train the patch ranker").click()
    at.run()
    assert not at.exception
    job = jobs.list_jobs(store)[0]
    assert (job["kind"], job["dataset"]) == ("ltrp", fmnist)
    assert job["params"] == {"mae_epochs": 2, "ranker_epochs": 1, "mask_ratio": None}  # the settings' defaults
    assert len(at.get("progress")) == 1  # the live status of the job
    jobs.cancel(job["id"], store)


def framed(at: AppTest) -> int:
    """How many patches the heatmap frames in red (one closed outline of 5 points per patch)."""
    spec = json.loads(at.get("plotly_chart")[0].proto.spec)
    x = next(t for t in spec["data"] if t.get("mode") == "lines")["x"]
    if isinstance(x, dict):  # Plotly 6 sends numeric arrays as base64 typed arrays
        x = np.frombuffer(base64.b64decode(x["bdata"]), dtype=x["dtype"])
    return int(np.isfinite(np.asarray(x, dtype=float)).sum()) // 5


def test_page_heatmap_slider_grid_and_group(store, scored):
    name, rid = scored
    at = run_page("pages/patch_heatmaps.py", dataset=name)
    assert not at.exception
    assert metrics(at)["Kept patches"] == "24 / 49" and metrics(at)["Score map"] == "stored"
    assert len(at.get("plotly_chart")) == 1
    assert framed(at) == 24
    at.slider(key="keep_ratio").set_value(0.25).run()
    assert metrics(at)["Kept patches"] == "12 / 49" and framed(at) == 12  # the frames follow the slider
    at.slider(key="keep_ratio").set_value(0.5).run()  # back: the view kept for 24 patches is shown again
    assert metrics(at)["Kept patches"] == "24 / 49" and framed(at) == 24

    at.radio(key="pick_by").set_value("content id or path").run()
    at.text_input(key="heat_ref").set_value("nope").run()
    assert any("no image 'nope'" in e.value for e in at.error)
    path = catalog.images_table(name, store).path[40]
    at.text_input(key="heat_ref").set_value(path).run()
    assert not at.exception and md_text(path) in at.caption[0].value  # shown as text: Markdown escaped

    at.radio(key="heat_mode").set_value("Class grid").run()
    at.slider(key="grid_count").set_value(8).run()
    assert not at.exception and len(at.get("image")) == 8

    # What the Redundant groups page's button leaves in the session: the group opens side by side.
    at = run_page("pages/patch_heatmaps.py", dataset=name,
                  heatmap_group={"dataset": name, "title": "Group 3 · Bag", "rows": [1, 2, 5]}, heatmap_group_new=True)
    assert not at.exception
    assert at.radio(key="heat_mode").value == "Redundant group" and at.subheader[0].value == "Group 3 · Bag"
    assert len(at.get("image")) == 6  # score maps, then kept patches


def test_the_ranker_button_says_how_long_training_takes_here(store, fmnist):
    # The page said "a few minutes on a CPU" whatever the machine: now the last ranker trained here (same
    # image size) gives the estimate, scaled to the load now; before any, it says there is none yet.
    from core import estimates

    at = run_page("pages/patch_heatmaps.py", dataset=fmnist)
    assert any("no measurement yet on this machine" in c.value for c in at.caption)
    key, work = ltrp_models._ltrp_work(fmnist, ltrp_models.LtrpSettings(), store)
    estimates.record("ltrp", key, 20_000, 40.0)  # 500 image-epochs/s, as a training job records it
    est = ltrp_models.ltrp_estimate(fmnist, store=store)
    assert est.seconds is not None and est.seconds == pytest.approx(work / est.rate)
    at = run_page("pages/patch_heatmaps.py", dataset=fmnist)
    assert any(c.value.startswith("About ") and "last run on this machine" in c.value for c in at.caption)
