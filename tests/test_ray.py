"""The heavy stages on a Ray cluster (core.scale): a local cluster started here (2 CPUs, stopped at the end of
the module), real images, a real DuckDB file, real jobs and the real Jobs page; the app's Ray setting checked
against it and used by a launched job (the setting without a cluster: tests/test_ray_setting.py)."""
import dataclasses
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import ray
import torch

from core import jobs
from core.data import catalog, scan, sources
from core.embed import embeddings
from core.embed.backbones import DEFAULT_BACKBONE, build_model
from core.redundancy import clusterings, trees
from core.scale import cluster as ray_cluster
from core.scale import data as ray_data
from core.scale import setting, where_text
from core.store.vectors import ModelCompute
from core.subsets import plan, results, sweeps
from tests.conftest import run_page, wait_until


@pytest.fixture(scope="module")
def ray_address(tmp_path_factory):
    """A local Ray cluster of 2 CPUs for the module; its address, which job processes join too. Its workers
    write their pids to the file in REDEX_RAY_PID_FILE (the workers inherit the environment set here)."""
    pid_file = tmp_path_factory.mktemp("ray") / "worker-pids"
    os.environ["REDEX_RAY_PID_FILE"] = str(pid_file)
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()
        os.environ.pop("REDEX_RAY_PID_FILE", None)


@pytest.fixture
def folder(store, image_folder):
    """60 real Fashion-MNIST images (3 classes x 15 train + 5 test), scanned, and an untrained backbone."""
    name = sources.register(str(image_folder), "rayset")
    scan.scan(name, store)
    return name, build_model(DEFAULT_BACKBONE, 3, 1, 28)


@pytest.mark.slow
def test_embedding_on_ray_survives_a_killed_worker_and_equals_the_local_one(ray_address, folder, store,
                                                                             monkeypatch):
    name, model = folder
    pid_file = Path(os.environ["REDEX_RAY_PID_FILE"])
    pid_file.write_text("")
    monkeypatch.setenv("REDEX_RAY_ADDRESS", ray_address)
    monkeypatch.setattr(ray_data, "BLOCK_ROWS", 8)  # 8 blocks, back in any order

    def slow_embed(model, pixels, batch_size):  # pickled by value: 0.2 s a block, time to kill the worker
        time.sleep(0.2)
        return embeddings.embed_pixels(model, pixels, batch_size)

    killed = []

    def kill_after_first_chunk():
        wait_until(lambda: store.query("SELECT count(*) FROM embeddings WHERE backbone_id = 'ray'")[0][0] > 0,
                   timeout=120, what="the first chunk", poll=0.05)
        pid = int(pid_file.read_text().split()[0])
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)

    killer = threading.Thread(target=kill_after_first_chunk, daemon=True)
    killer.start()
    compute = ModelCompute(name, model, slow_embed, 64, catalog.load_pixels(name, store))
    filled = embeddings.EMBEDDINGS.compute_and_store(name, "ray", compute, store, chunk=8, phase="embed",
                                                     verb="embedded")
    killer.join(5)
    assert killed, "the worker must be killed while the embedding runs for this test to mean anything"
    pids = [int(p) for p in pid_file.read_text().split()]
    assert killed[0] in pids and len(pids) >= 2  # Ray started a new worker, which finished the job
    assert (filled.computed, filled.total) == (60, 60)
    monkeypatch.delenv("REDEX_RAY_ADDRESS")
    assert embeddings.embed_dataset(name, model, "local", store=store)["embedded"] == 60
    table, local = embeddings.load_embeddings(name, "local", store)
    ray_table, on_ray = embeddings.load_embeddings(name, "ray", store)
    assert list(ray_table.image_id) == list(table.image_id)
    np.testing.assert_allclose(on_ray, local, rtol=1e-5, atol=1e-6)


def test_workers_without_the_pixel_cache_decode_the_same_pixels_from_the_files(folder, store):
    name, _ = folder
    source = ray_data.pixel_source(name, store)
    rows = np.array([0, 7, 31, 59])
    paths = ray_data.paths_by_row(name, store)[rows]
    cached = source.read(rows, paths)
    decoded = dataclasses.replace(source, use_cache=False).read(rows, paths)
    missing = dataclasses.replace(source, cache="/nowhere/pixels.npy").read(rows, paths)
    np.testing.assert_array_equal(cached, np.asarray(catalog.load_pixels(name, store)[rows]))
    np.testing.assert_array_equal(decoded, cached)
    np.testing.assert_array_equal(missing, cached)


def test_a_pretrained_backbones_inputs_from_the_pixel_cache_on_a_worker_are_the_local_ones(store):
    """Fashion-MNIST has no file per image: a pretrained backbone reads its pixel cache at native size, and a
    cluster's CPU task (`FileSource` over the pixels) with the model's actor gives the local features."""
    import timm

    from core.embed import timm_models

    name = sources.register("fashion-mnist", limit=3, store=store)
    scan.scan(name, store)
    torch.manual_seed(0)
    model = timm_models.TimmBackbone(timm.create_model("test_resnet", pretrained=False, num_classes=0),
                                     "test_resnet").eval()
    reader, shape, dtype = timm_models.input_reader(model)
    assert (shape, dtype) == ((160, 160, 3), "uint8")  # the transform's PIL steps on the worker, uint8
    rows = np.array([0, 2, 5])
    source = ray_data.FileSource("", reader, shape, dtype, pixels=ray_data.pixel_source(name, store))
    batch = source.load({"row": rows, "image_id": np.array(["a", "b", "c"]),
                         "path": ray_data.paths_by_row(name, store)[rows]})
    assert list(batch["error"]) == ["", "", ""]
    here, bad = timm_models.embed_images(model, timm_models.ImageReader(
        model.transform, pixels=np.asarray(catalog.load_pixels(name, store)[rows])), num_workers=0)
    assert not bad
    np.testing.assert_allclose(timm_models.embed_inputs(model, batch["pixels"], 2), here, rtol=1e-5, atol=1e-6)


def test_merge_trees_on_ray_are_the_local_ones(ray_address, folder, store, monkeypatch):
    name, model = folder
    embeddings.embed_dataset(name, model, "local", store=store)
    monkeypatch.setenv("REDEX_RAY_ADDRESS", ray_address)
    with monkeypatch.context() as here:  # no tree may be built in this process: one Ray task per class
        here.setattr(trees, "build_class_tree", lambda *a, **k: pytest.fail("a tree was built on the driver"))
        out = clusterings.cluster(name, "local", store=store, near_copies=False)  # the search on Ray: below
    assert (out["built"], out["reused"]) == (3, 0)
    c = clusterings.load_clustering(name, "local", store=store)
    for tree, emb, _ in c.classes.values():
        np.testing.assert_array_equal(tree.linkage, trees.build_class_tree(emb, "complete").linkage)
    # A big class's parts as tasks of their own: the same tree as the parts one after the other here.
    emb = c.classes[next(iter(c.classes))][1]
    small = {"exact_limit": 6, "part_size": 6}
    fanned = trees.build_class_tree(emb, "complete", map_parts=ray_cluster.map_ordered, **small)
    assert fanned.meta["n_parts"] >= 3
    np.testing.assert_array_equal(fanned.linkage, trees.build_class_tree(emb, "complete", **small).linkage)


class CancelAfterFirstClass(jobs.JobContext):
    """A job context whose user presses Cancel as soon as the first class reports progress (what the job's
    SIGTERM handler, `JobContext._on_cancel`, does), so the cancel lands at a known point."""

    def progress(self, *args, **kwargs):
        self._cancelled = True
        return super().progress(*args, **kwargs)


def _copy_results(name, store) -> dict:
    """label -> (fingerprint, computed_at, pairs) of each class's stored near-copy search."""
    return {r[0]: r[1:] for r in store.query("SELECT label, fingerprint, computed_at, pairs FROM copy_classes"
                                             " WHERE dataset = ?", [name])}


def test_near_copy_search_on_ray_is_the_local_one_and_resumes_after_a_cancel(ray_address, image_folder, store):
    """One Ray task per class, the same pairs as the search here; a search cancelled after its first class
    keeps that class and, run again, searches only the others; a changed class is searched again alone."""
    from PIL import Image

    for cls in (0, 1, 2):  # a moved copy of two images of each class: pairs to find
        for src in sorted((image_folder / "train" / f"class{cls}").iterdir())[:2]:
            moved = np.roll(np.array(Image.open(src)), (1, -1), axis=(0, 1))
            Image.fromarray(moved).save(src.with_name(f"copy-{src.name}"))
    name = sources.register(str(image_folder), "raycopies")
    scan.scan(name, store)
    here = clusterings.ensure_copy_pairs(name, store=store)  # the local path, uninterrupted
    here_dist = store.query("SELECT distance FROM copy_pairs WHERE dataset = ? ORDER BY row_a, row_b", [name])
    assert len(here) >= 3 and not clusterings.copy_pairs_pending(name, store=store)
    with store.write() as con:  # forget it: the search on Ray starts from nothing
        for table in ("copy_state", "copy_pairs", "copy_classes"):
            con.execute(f"DELETE FROM {table} WHERE dataset = ?", [name])

    job_id = store.execute("INSERT INTO jobs (kind, dataset, status) VALUES ('cluster', ?, 'running') RETURNING id",
                           [name])[0][0]
    params = {"ray": ray_address}
    with pytest.raises(jobs.JobCancelled):
        clusterings.ensure_copy_pairs(name, store=store, ctx=CancelAfterFirstClass(job_id, "cluster", name, params,
                                                                                   store))
    first = _copy_results(name, store)
    assert len(first) == 1 and clusterings.copy_pairs_pending(name, store=store)  # kept; the pairs not yet
    assert clusterings.copy_state(name, store)["pairs"] is None and not len(clusterings.stored_copy_pairs(name, store))
    ran_on = jobs.get_job(job_id, store)["ran_on"]
    assert ran_on["address"] == ray_address and ran_on["workers"] == 2

    on_ray = clusterings.ensure_copy_pairs(name, store=store, ctx=jobs.JobContext(job_id, "cluster", name, params,
                                                                                  store))
    resumed = _copy_results(name, store)
    label = next(iter(first))
    assert resumed[label] == first[label] and len(resumed) == 3  # the finished class was not searched again
    np.testing.assert_array_equal(on_ray, here)
    dist = store.query("SELECT distance FROM copy_pairs WHERE dataset = ? ORDER BY row_a, row_b", [name])
    np.testing.assert_allclose(np.array(dist), np.array(here_dist), rtol=0, atol=1e-6)
    events = [m for (m,) in store.query("SELECT message FROM job_events WHERE job_id = ?", [job_id])]
    assert "resuming: 1 of 3 classes already searched" in events
    assert jobs.get_job(job_id, store)["ran_on"]["workers"] == 2  # the two classes left, at once

    # One image's pixels change: its class alone is searched again; nothing to search joins no cluster.
    changed = store.query("SELECT label, min(row) FROM images WHERE dataset = ? AND split = 'train' AND label <> ?"
                          " GROUP BY label ORDER BY label LIMIT 1", [name, label])[0]
    store.execute("UPDATE images SET pixel_hash = 'changed' WHERE dataset = ? AND row = ?", [name, changed[1]])
    store.execute("UPDATE jobs SET ran_on = NULL WHERE id = ?", [job_id])
    again = clusterings.ensure_copy_pairs(name, store=store, ctx=jobs.JobContext(job_id, "cluster", name, params,
                                                                                 store))
    after = _copy_results(name, store)
    assert [c for c in after if after[c][1] != resumed[c][1]] == [changed[0]]
    np.testing.assert_array_equal(again, here)  # the pixels themselves did not change
    assert jobs.get_job(job_id, store)["ran_on"]["workers"] == 1
    store.execute("UPDATE jobs SET ran_on = NULL WHERE id = ?", [job_id])
    store.execute("UPDATE copy_state SET fingerprint = 'older' WHERE dataset = ?", [name])  # every class current
    assert clusterings.copy_pairs_pending(name, store=store)
    clusterings.ensure_copy_pairs(name, store=store, ctx=jobs.JobContext(job_id, "cluster", name, params, store))
    assert jobs.get_job(job_id, store)["ran_on"] is None and _copy_results(name, store) == after
    assert not clusterings.copy_pairs_pending(name, store=store)


def test_the_apps_setting_is_checked_saved_and_a_launched_job_goes_there(ray_address, folder, store, monkeypatch):
    """The sidebar's "Check and save" (`setting.start_check(save=True)`: a probe process joins the cluster) against
    this module's cluster, then a cluster job launched as the pages launch one: it runs there and says so."""
    name, model = folder
    embeddings.embed_dataset(name, model, "local", store=store)
    monkeypatch.delenv("REDEX_RAY_ADDRESS", raising=False)
    check = setting.start_check(ray_address, store, save=True)
    wait_until(lambda: check.finished, timeout=120, what="the check of the cluster")
    assert check.saved and check.result["ok"] and check.result["cpus"] == 2, check.result
    assert setting.saved(store) == ray_address and setting.effective(store).source == "setting"
    job = jobs.wait(jobs.launch("cluster", name, {"backbone_id": "local"}, store=store), store, timeout=300)
    assert job["status"] == "done", jobs.log_tail(job)
    assert job["params"]["ray"] == ray_address and job["result"]["built"] == 3
    assert where_text(job["ran_on"]).startswith(f"ray {ray_address} · ")


@pytest.mark.slow
def test_a_training_run_on_ray_shows_where_it_runs_and_cancels_from_the_app(ray_address, folder, store):
    name, _ = folder
    spec = plan.SweepSpec(fractions=(0.5,), methods=("random",), seeds=1, recipe={"epochs": 400, "batch_size": 8})
    sweep_id, sweep_job = sweeps.launch_sweep(name, spec, store, ray=ray_address)

    def training():  # the run's job, once its Ray task has reported progress back
        df = results.runs(name, store)
        live = df[(df.status == "running") & df.done.fillna(0).gt(0)]
        return int(live.job_id.iloc[0]) if len(live) else None

    train_job = wait_until(training, timeout=180, what="the run to train on the cluster")
    job = jobs.get_job(train_job, store)
    assert job["lane"] == "light" and job["ran_on"]["workers"] == 1 and job["ran_on"]["cpus"] == 2
    assert ray.available_resources().get("CPU", 0) <= 1  # the task holds a CPU of the cluster

    # The app stays responsive while the run trains on the cluster: the Jobs page renders, says where.
    started = time.monotonic()
    at = run_page("pages/jobs.py")
    assert not at.exception and time.monotonic() - started < 30
    table = at.dataframe[0].value.set_index("id")
    assert table.loc[train_job, "ran on"].startswith(f"ray {ray_address} · 1 worker")
    assert table.loc[sweep_job, "ran on"] == "local"
    at.selectbox(key="job_detail").set_value(train_job).run()
    at.button(key=f"cancel-{train_job}").click().run()
    assert not at.exception
    job = jobs.get_job(train_job, store)
    assert job["status"] == "cancelled", jobs.log_tail(job)
    wait_until(lambda: results.get_run(results.runs(name, store).run_key.iloc[0], store)["status"] == "cancelled",
               what="the run to be cancelled")
    wait_until(lambda: ray.available_resources().get("CPU", 0) == 2, timeout=60,
               what="the cluster to free the cancelled task's CPU")
    assert jobs.wait(sweep_job, store, timeout=60)["status"] == "done"
    assert sweeps.active_sweeps(name, store) == [] and sweep_id


def test_a_pretrained_backbone_reads_the_source_files_on_ray_as_it_does_here(ray_address, store, tmp_path,
                                                                              monkeypatch):
    """A pretrained timm backbone (timm's tiny test_resnet: 160 px, bilinear, crop 0.95; weights from a local
    checkpoint) on real photos, one stored turned with an EXIF tag and one damaged after the scan: on the
    cluster, CPU tasks decode the files and the model's actor embeds them (nothing decoded on the driver), equal
    to the local path; the damaged file is a problem row and the others are embedded; the job says where."""
    import timm

    from core.data.decode import BadImage
    from core.embed import timm_models
    from tests.photos import photo_set, require_photos

    require_photos()
    photos = photo_set(tmp_path / "photos", classes=2, per_class=3)  # 600-1000 px JPEG, PNG, WebP
    name = sources.register(str(photos.root), "rayphotos", store=store)
    scan.scan(name, store)
    broken = photos.root / next(f["path"] for f in photos.files if f["format"] == "PNG")
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)  # damaged after the scan
    checkpoint = tmp_path / "test_resnet.pth"
    torch.manual_seed(0)
    torch.save(timm.create_model("test_resnet", pretrained=False).state_dict(), checkpoint)
    model, bid = embeddings.ensure_backbone(name, "timm:test_resnet", checkpoint=str(checkpoint), store=store)

    job_id = store.execute("INSERT INTO jobs (kind, dataset, status) VALUES ('embed', ?, 'running') RETURNING id",
                           [name])[0][0]
    ctx = jobs.JobContext(job_id, "embed", name, {"ray": ray_address}, store)
    with monkeypatch.context() as here:  # nothing is decoded nor embedded on the driver
        here.setattr(timm_models, "embed_images", lambda *a, **k: pytest.fail("embedded on the driver"))
        here.setattr(timm_models.InputReader, "file", lambda *a: pytest.fail("decoded on the driver"))
        out = embeddings.embed_dataset(name, model, bid, store=store, ctx=ctx)
    assert (out["embedded"], out["unreadable"], out["total"]) == (5, 1, 6), out
    ran_on = jobs.get_job(job_id, store)["ran_on"]
    assert ran_on["address"] == ray_address and ran_on["workers"] == 1 and ran_on["cpus"] == 2
    problems = catalog.problems_table(name, store)
    row = problems[problems.severity == embeddings.NOT_EMBEDDED]
    assert list(row.path) == [str(broken.relative_to(photos.root))] and "truncated or corrupt" in row.reason.iloc[0]
    with pytest.raises(BadImage, match="truncated or corrupt"):  # the reason the local reader gives
        timm_models.input_reader(model)[0].file(broken)
    on_ray, ray_vecs = embeddings.load_embeddings(name, bid, store)

    embeddings.EMBEDDINGS.delete(bid, store)  # the same images embedded here (no address): the same vectors
    local = embeddings.embed_dataset(name, model, bid, store=store, num_workers=0)
    assert (local["embedded"], local["unreadable"]) == (5, 1)
    here_table, here_vecs = embeddings.load_embeddings(name, bid, store)
    assert list(on_ray.path) == list(here_table.path) and len(here_vecs) == 5
    np.testing.assert_allclose(ray_vecs, here_vecs, rtol=1e-5, atol=1e-5)


def test_ltrp_scoring_with_a_224_px_mae_reads_the_source_files_on_ray_as_it_does_here(ray_address, store,
                                                                                         tmp_path, monkeypatch):
    """A 224-px MAE's ranker (the official checkpoint layout, tiny) scores real photos on the cluster: CPU tasks
    read each file at 224 px as the local path does, the ranker's actor scores them (no file decoded on the
    driver), equal to the local path; a file changed since the scan is read from the pixel cache and scored on
    the driver, as here, and counted."""
    import io

    from PIL import Image

    from core.ltrp import inputs, scoring
    from core.ltrp import models as ltrp_models
    from tests.photos import photo_set, require_photos
    from tests.test_photos import TINY, official_mae

    require_photos()
    photos = photo_set(tmp_path / "photos", classes=2, per_class=3)
    name = sources.register(str(photos.root), "rayltrp", store=store)
    scan.scan(name, store)
    checkpoint = tmp_path / "mae_visualize_tiny.pth"
    torch.save(official_mae(), checkpoint)
    rid = ltrp_models.train_ltrp(name, ltrp_models.LtrpSettings(**TINY), checkpoint=str(checkpoint),
                                 store=store)["ranker_id"]
    changed = photos.root / photos.files[2]["path"]
    buf = io.BytesIO()
    Image.new("RGB", (700, 500), "red").save(buf, format="JPEG")
    changed.write_bytes(buf.getvalue())  # other bytes than its content id

    job_id = store.execute("INSERT INTO jobs (kind, dataset, status) VALUES ('ltrp_score', ?, 'running')"
                           " RETURNING id", [name])[0][0]
    ctx = jobs.JobContext(job_id, "ltrp_score", name, {"ray": ray_address}, store)
    with monkeypatch.context() as here:  # no file is decoded on the driver
        here.setattr(inputs.ModelImages, "images", lambda *a, **k: pytest.fail("read on the driver"))
        here.setattr(inputs.SquareReader, "file", lambda *a: pytest.fail("decoded on the driver"))
        out = scoring.score_dataset(name, rid, store=store, ctx=ctx)
    assert (out["scored"], out["total"], out["from_pixel_cache"]) == (6, 6, 1), out
    assert jobs.get_job(job_id, store)["ran_on"]["address"] == ray_address
    table, on_ray = scoring.load_scores(name, rid, store=store)
    assert on_ray.shape == (6, 196)

    ltrp_models.PATCH_SCORES.delete(rid, store)  # scored here (no address): the same maps
    again = scoring.score_dataset(name, rid, store=store)
    assert (again["scored"], again["from_pixel_cache"]) == (6, 1)
    _, here_maps = scoring.load_scores(name, rid, store=store)
    np.testing.assert_allclose(on_ray, here_maps, rtol=1e-4, atol=1e-5)
