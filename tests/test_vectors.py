"""The per-image vector tables behind embeddings and score maps: one row per (key, content id),
filled chunk by chunk, resumable, read back by row. Real DuckDB file, hand-written images rows."""
import numpy as np
import pytest

from core.embed.embeddings import EMBEDDINGS
from core.jobs import JobContext
from core.ltrp.models import PATCH_SCORES
from core.store.vectors import VectorTable

# Six files, four contents: rows 2 and 5 repeat the contents of rows 0 and 1.
IMAGES = [(0, "a"), (1, "b"), (2, "a"), (3, "c"), (4, "d"), (5, "b")]


@pytest.fixture
def images(store):
    """Dataset `d` in the images table (no pixels: the compute functions below work on rows)."""
    with store.write() as con:
        for row, image_id in IMAGES:
            con.execute("INSERT INTO images (dataset, row, path, image_id, pixel_hash, label, split)"
                        " VALUES ('d', ?, ?, ?, ?, ?, 'train')",
                        [row, f"{row}.png", image_id, image_id, "x" if row < 3 else "y"])
    return "d"


def vector_of(rows: np.ndarray) -> np.ndarray:
    """A stand-in model: float [n, 3] that tells which row it came from."""
    return np.stack([rows, rows * 10, np.ones_like(rows)], axis=1).astype(np.float64)


class Recorder:
    """A compute function that remembers the rows it was given (and can fail on a given call)."""

    def __init__(self, fail_on: int | None = None):
        self.calls: list[list[int]] = []
        self.fail_on = fail_on

    def __call__(self, rows: np.ndarray) -> np.ndarray:
        self.calls.append(rows.tolist())
        if len(self.calls) == self.fail_on:
            raise RuntimeError("killed")
        return vector_of(rows)


def fill(images, store, compute, ctx=None, key="m1"):
    return EMBEDDINGS.compute_and_store(images, key, compute, store, chunk=2, ctx=ctx, phase="fill", verb="done")


def test_missing_is_one_row_per_content_id_the_first_by_row(store, images):
    rows, ids = EMBEDDINGS.missing(images, "m1", store)
    assert rows.tolist() == [0, 1, 3, 4] and rows.dtype == np.int64 and ids.tolist() == ["a", "b", "c", "d"]
    EMBEDDINGS.insert("m1", ["b", "d"], vector_of(np.array([1, 4])), store)
    rows, ids = EMBEDDINGS.missing(images, "m1", store)
    assert rows.tolist() == [0, 3] and ids.tolist() == ["a", "c"]
    assert EMBEDDINGS.missing(images, "m2", store)[0].tolist() == [0, 1, 3, 4]  # per key


def test_compute_and_store_computes_only_what_is_missing_in_chunks(store, images):
    EMBEDDINGS.insert("m1", ["b"], [[-1.0, -1.0, -1.0]], store)
    compute = Recorder()
    filled = fill(images, store, compute)
    assert (filled.computed, filled.reused, filled.total) == (3, 1, 4)
    assert compute.calls == [[0, 3], [4]]
    table, vecs = EMBEDDINGS.load(images, "m1", store)
    assert table.row.tolist() == [0, 1, 2, 3, 4, 5] and vecs.dtype == np.float32
    np.testing.assert_array_equal(vecs[[0, 2, 3, 4]], vector_of(np.array([0, 0, 3, 4])))
    assert (vecs[[1, 5]] == -1).all()  # the stored row was kept, and both files of `b` share it
    again = Recorder()
    assert fill(images, store, again) == type(filled)(computed=0, reused=4, total=4)
    assert again.calls == []


def test_a_failed_chunk_keeps_the_chunks_before_it_and_the_next_run_resumes(store, images):
    with pytest.raises(RuntimeError, match="killed"):
        fill(images, store, Recorder(fail_on=2))
    assert EMBEDDINGS.missing(images, "m1", store)[0].tolist() == [3, 4]  # the first chunk, [0, 1], stayed
    resumed = Recorder()
    filled = fill(images, store, resumed)
    assert (filled.computed, filled.reused, resumed.calls) == (2, 2, [[3, 4]])


def test_progress_is_reported_to_the_job(store, images):
    job_id = store.execute("INSERT INTO jobs (kind, dataset, status) VALUES ('test', ?, 'running') RETURNING id",
                           [images])[0][0]
    ctx = JobContext(job_id, "test", images, {}, store)
    EMBEDDINGS.insert("m1", ["a"], vector_of(np.array([0])), store)
    EMBEDDINGS.compute_and_store(images, "m1", vector_of, store, chunk=2, ctx=ctx, phase="fill with m1",
                                 verb="filled", note="model m1")
    job = store.query("SELECT phase, done, total, message FROM jobs WHERE id = ?", [job_id])[0]
    assert job == ("fill with m1", 4, 4, "filled 4 / 4")
    events = [m for (m,) in store.query("SELECT message FROM job_events WHERE job_id = ? ORDER BY ts", [job_id])]
    assert events == ["phase: fill with m1", "model m1", "resuming: 1 of 4 images already filled"]


def test_load_narrows_by_label_and_content_id(store, images):
    assert EMBEDDINGS.load(images, "m1", store)[1].shape == (0, 0)
    PATCH_SCORES.insert("r1", ["a", "b", "c", "d"], np.arange(8).reshape(4, 2), store)
    table, maps = PATCH_SCORES.load(images, "r1", store, label="x")
    assert table.row.tolist() == [0, 1, 2] and maps.tolist() == [[0, 1], [2, 3], [0, 1]]
    table, maps = PATCH_SCORES.load(images, "r1", store, image_ids=["b", "d"])
    assert table.path.tolist() == ["1.png", "4.png", "5.png"] and maps.tolist() == [[2, 3], [6, 7], [2, 3]]
    assert list(table.columns) == ["row", "path", "image_id", "label", "split"]


@pytest.mark.parametrize("batch", [1, 2, 65_536])
def test_load_streams_the_vectors_in_batches_each_by_its_own_row(store, images, monkeypatch, batch):
    # the vectors are read in batches into one array (1.28M vectors: a 2.0 GB peak when read in one piece):
    # whatever the batch, each image gets its own content id's vector, duplicates included, in row order
    from core.store import vectors

    monkeypatch.setattr(vectors, "LOAD_BATCH", batch)
    EMBEDDINGS.insert("m1", ["a", "b", "c"], vector_of(np.array([0, 1, 3])), store)  # d has none: left out
    table, vecs = EMBEDDINGS.load(images, "m1", store)
    assert table.row.tolist() == [0, 1, 2, 3, 5] and vecs.dtype == np.float32 and vecs.flags.c_contiguous
    assert vecs.tolist() == vector_of(np.array([0, 1, 0, 3, 1])).tolist()
    table, vecs = EMBEDDINGS.load(images, "m1", store, label="y")
    assert table.row.tolist() == [3, 5] and vecs.tolist() == vector_of(np.array([3, 1])).tolist()
    assert EMBEDDINGS.load(images, "m1", store, label="nothing")[1].shape == (0, 0)


def test_coverage_counts_content_ids_per_key_and_delete_drops_a_key(store, images):
    EMBEDDINGS.insert("m1", ["a", "b", "zz"], np.zeros((3, 2)), store)  # zz: an image of another dataset
    EMBEDDINGS.insert("m2", ["c"], np.zeros((1, 2)), store)
    assert EMBEDDINGS.coverage(images, ["m2", "m1", "m3"], store).tolist() == [1, 2, 0]
    EMBEDDINGS.delete("m1", store)
    assert EMBEDDINGS.coverage(images, ["m1", "m2"], store).tolist() == [0, 1]


def test_bad_input_is_refused(store, images):
    with pytest.raises(ValueError, match="identifier"):
        VectorTable("embeddings; DROP TABLE images", key="backbone_id", column="vec")
    with pytest.raises(ValueError, match="2 vectors"):
        EMBEDDINGS.insert("m1", ["a", "b"], np.zeros(2), store)
