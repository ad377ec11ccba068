"""Score maps of every image, stored one row per (ranker, content id); the ltrp jobs."""
from __future__ import annotations

import os

import numpy as np

from core.data.catalog import images_table, load_pixels
from core.jobs import JobContext, task
from core.ltrp.models import LtrpSettings, load_ranker_model, require_ranker, train_ltrp
from core.ltrp.view import ImageRef
from core.store.db import Store, get_store

SCORE_CHUNK = int(os.environ.get("REDEX_LTRP_CHUNK", "2048"))  # images per committed chunk (unit of resume)


# -- score maps --------------------------------------------------------------------------------
def unscored_rows(name: str, rid: str, store: Store) -> np.ndarray:
    """Pixel-cache rows of the images with no score map for `rid` yet (one per content id), ascending."""
    found = store.query(
        "SELECT min(i.row) AS r FROM images i LEFT JOIN patch_scores s ON s.ranker_id = ? AND s.image_id = i.image_id"
        " WHERE i.dataset = ? AND s.image_id IS NULL GROUP BY i.image_id ORDER BY r", [rid, name])
    return np.fromiter((r for (r,) in found), dtype=np.int64, count=len(found))


def score_dataset(name: str, rid: str | None = None, *, store: Store | None = None,
                  ctx: JobContext | None = None, batch_size: int = 256) -> dict:
    """Score every image of `name` that has no score map for the ranker `rid` (default: the newest),
    one committed chunk at a time. Returns how many were scored and reused."""
    import pyarrow as pa

    from core.ltrp import ranker as ltrp_ranker

    store = store or get_store()
    rid = rid or require_ranker(name, store)
    ranker = load_ranker_model(rid, store)
    ids = images_table(name, store).image_id.to_numpy()
    pixels = load_pixels(name, store)
    todo = unscored_rows(name, rid, store)
    total = len(set(ids))
    reused = total - len(todo)
    if ctx:
        ctx.phase("score every image's patches", total=total)
        ctx.log(f"ranker {rid}")
        ctx.resume_from(reused)
        if reused:
            ctx.log(f"resuming: {reused:,} of {total:,} images already scored")
    for lo in range(0, len(todo), SCORE_CHUNK):
        rows = todo[lo:lo + SCORE_CHUNK]
        maps = ltrp_ranker.score_maps(ranker, np.asarray(pixels[rows]), batch_size=batch_size)
        flat = pa.array(maps.astype(np.float32).ravel())
        chunk = pa.table({"image_id": pa.array(ids[rows]),
                          "scores": pa.FixedSizeListArray.from_arrays(flat, maps.shape[1])})
        with store.write() as con:
            con.register("chunk", chunk)
            con.execute("INSERT OR REPLACE INTO patch_scores SELECT ?, image_id, scores::FLOAT[] FROM chunk", [rid])
        if ctx:
            done = reused + lo + len(rows)
            ctx.progress(done, total, f"scored {done:,} / {total:,}", force=True)
    return {"ranker_id": rid, "scored": int(len(todo)), "reused": int(reused), "total": int(total)}


@task("ltrp")
def _ltrp_task(ctx: JobContext) -> dict:
    p = ctx.params
    ids = train_ltrp(ctx.dataset, LtrpSettings.from_params(p), checkpoint=p.get("checkpoint"),
                     retrain=bool(p.get("retrain")), store=ctx.store, ctx=ctx)
    if p.get("score", True):
        return {**ids, **score_dataset(ctx.dataset, ids["ranker_id"], store=ctx.store, ctx=ctx)}
    return ids


@task("ltrp_score")
def _score_task(ctx: JobContext) -> dict:
    return score_dataset(ctx.dataset, ctx.params.get("ranker_id"), store=ctx.store, ctx=ctx)


def load_scores(name: str, rid: str, *, label: str | None = None, image_ids: list[str] | None = None,
                store: Store | None = None):
    """(images DataFrame, float32 [N, L]) of the dataset's images that have a score map, by row.

    `label` or `image_ids` narrow the images; one row per image (duplicate files share a map).
    """
    store = store or get_store()
    sql = ("SELECT i.row, i.path, i.image_id, i.label, i.split, s.scores FROM images i"
           " JOIN patch_scores s ON s.image_id = i.image_id AND s.ranker_id = ? WHERE i.dataset = ?")
    params: list = [rid, name]
    if label is not None:
        sql += " AND i.label = ?"
        params.append(label)
    if image_ids is not None:
        sql += " AND list_contains(?, i.image_id)"
        params.append(list(image_ids))
    with store.read() as con:
        arrow = con.sql(sql + " ORDER BY i.row", params=params).to_arrow_table()
    table = arrow.drop(["scores"]).to_pandas()
    if len(table) == 0:
        return table, np.zeros((0, 0), np.float32)
    flat = arrow.column("scores").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    return table, flat.astype(np.float32, copy=False).reshape(len(table), -1)


def image_scores(name: str, rid: str, image: ImageRef, ranker=None,
                 store: Store | None = None) -> tuple[np.ndarray, bool]:
    """`(scores float32 [L], stored)`: the stored score map of `image`, or (not stored yet, or a file
    outside the dataset) the ranker's, computed now and not stored."""
    from core.ltrp import ranker as ltrp_ranker

    _, maps = load_scores(name, rid, image_ids=[image.image_id], store=store)
    if len(maps):
        return maps[0], True
    ranker = ranker if ranker is not None else load_ranker_model(rid, store)
    return ltrp_ranker.score_maps(ranker, image.pixels[None])[0], False
