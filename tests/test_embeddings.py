"""Embedding a dataset: a trained backbone, one row per image, resume after a kill, UMAP, neighbours."""
import os
import signal
import time

import numpy as np

from core import jobs
from core.cli import main as cli
from core.data import catalog, scan, sources
from core.embed import embeddings, projection
from core.embed.backbones import DEFAULT_BACKBONE


def test_embed_resumes_after_a_kill_and_matches_an_uninterrupted_run(store, monkeypatch):
    name = sources.register("fashion-mnist", limit=1000)
    scan.scan(name, store)
    # Train the backbone once (cached), so the killed job below is killed while embedding.
    model, bid = embeddings.ensure_backbone(name, DEFAULT_BACKBONE, epochs=1, store=store)
    monkeypatch.setenv("REDEX_EMBED_CHUNK", "100")  # 20 chunks: the kill lands between two of them
    job_id = jobs.launch("embed", name, {"epochs": 1}, store=store)
    deadline = time.monotonic() + 120
    while True:
        n = store.query("SELECT count(*) FROM embeddings WHERE backbone_id = ?", [bid])[0][0]
        if n > 0:
            break
        job = jobs.get_job(job_id, store)
        assert job["status"] in jobs.ACTIVE, job
        assert time.monotonic() < deadline, job
        time.sleep(0.02)
    job = jobs.get_job(job_id, store)
    os.killpg(job["pid"], signal.SIGKILL)
    partial = store.query("SELECT count(*) FROM embeddings WHERE backbone_id = ?", [bid])[0][0]
    assert 0 < partial < 2000, "the kill must land half-way for this test to mean anything"
    assert jobs.wait(job_id, store, timeout=30)["status"] == "failed"

    again = jobs.wait(jobs.launch("embed", name, {"epochs": 1}, store=store), store, timeout=300)
    assert again["status"] == "done", again
    assert again["result"]["reused"] >= partial and again["result"]["embedded"] == 2000 - again["result"]["reused"]
    table, emb = embeddings.load_embeddings(name, bid, store)
    assert emb.shape == (2000, model.embed_dim) and emb.dtype == np.float32
    # Resumed rows equal what one uninterrupted pass computes.
    fresh = embeddings.embed_dataset(name, model, "fresh", store=store)
    assert fresh["embedded"] == 2000
    _, emb_fresh = embeddings.load_embeddings(name, "fresh", store)
    np.testing.assert_allclose(emb, emb_fresh, rtol=1e-4, atol=1e-5)


def test_changed_file_invalidates_only_its_own_embedding(store, image_folder, fmnist_test):
    from tests.conftest import png_bytes

    name = sources.register(str(image_folder), "inv")
    scan.scan(name, store)
    model, bid = embeddings.ensure_backbone(name, DEFAULT_BACKBONE, epochs=1, store=store)
    assert embeddings.embed_dataset(name, model, bid, store=store)["embedded"] == 60
    path = catalog.images_table(name, store).path.iloc[0]
    (image_folder / path).write_bytes(png_bytes(255 - fmnist_test[0][0]))
    scan.scan(name, store)
    again = embeddings.embed_dataset(name, model, bid, store=store)
    assert (again["embedded"], again["reused"]) == (1, 59)
    # The cached backbone is reused, not trained again.
    _, bid2 = embeddings.ensure_backbone(name, DEFAULT_BACKBONE, epochs=1, store=store)
    assert bid2 == bid


def test_cli_embed_project_and_neighbours(store, image_folder, capsys):
    name = sources.register(str(image_folder), "cli")
    scan.scan(name, store)
    assert cli(["embed", name, "--epochs", "2"]) == 0
    backs = embeddings.list_backbones(name, store)
    assert list(backs.embedded) == [60] and backs.dim.iloc[0] == 64
    assert cli(["project", name]) == 0
    proj = projection.projection(name, backs.backbone_id.iloc[0], store)
    assert proj is not None and len(proj) == 60 and np.isfinite(proj[["x", "y"]].to_numpy()).all()
    table, emb = embeddings.load_embeddings(name, backs.backbone_id.iloc[0], store)
    idx, dist = projection.nearest_neighbours(emb, 0, k=5)
    assert 0 not in idx and len(idx) == 5 and np.all(np.diff(dist) >= 0)
    brute = 1 - (emb / np.linalg.norm(emb, axis=1, keepdims=True)) @ (emb[0] / np.linalg.norm(emb[0]))
    brute[0] = np.inf
    assert set(idx) == set(np.argsort(brute)[:5])
    assert cli(["embed", name, "--backbone", "timm:resnet18"]) == 1
    assert "checkpoint" in capsys.readouterr().err
