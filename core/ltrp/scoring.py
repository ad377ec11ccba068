"""Score maps of every image, stored one row per (ranker, content id); the ltrp jobs."""
from __future__ import annotations

import os

import numpy as np

from core.data.catalog import get_dataset, load_pixels
from core.jobs import JobContext, task
from core.ltrp.inputs import ModelImages, reads_sources
from core.ltrp.models import (
    PATCH_SCORES,
    LtrpSettings,
    load_ranker_model,
    require_ranker,
    train_ltrp,
)
from core.ltrp.view import ImageRef, model_input
from core.store.db import Store, get_store
from core.store.vectors import ModelCompute

SCORE_CHUNK = int(os.environ.get("REDEX_LTRP_CHUNK", "2048"))  # images per committed chunk (unit of resume)


# -- score maps --------------------------------------------------------------------------------
def unscored_rows(name: str, rid: str, store: Store) -> np.ndarray:
    """Pixel-cache rows of the images with no score map for `rid` yet (one per content id), ascending."""
    return PATCH_SCORES.missing(name, rid, store)[0]


def score_dataset(name: str, rid: str | None = None, *, store: Store | None = None,
                  ctx: JobContext | None = None, batch_size: int = 256) -> dict:
    """Score every image of `name` that has no score map for the ranker `rid` (default: the newest),
    one committed chunk at a time. Returns how many were scored and reused."""
    from core.ltrp import ranker as ltrp_ranker

    store = store or get_store()
    rid = rid or require_ranker(name, store)
    ranker = load_ranker_model(rid, store)
    size = ranker.cfg.img_size
    if reads_sources(get_dataset(name, store), size):
        # A model at another size than the working size (a pretrained MAE's 224 px) reads the source files
        # at its own size (core.ltrp.inputs): here decoded by DataLoader workers; on a Ray cluster by its CPU
        # tasks, a file they cannot use read here from the pixel cache and scored here, as here.
        inputs = ModelImages(name, size, store, check=ctx.check_cancelled if ctx else None)

        def here(rows: np.ndarray) -> np.ndarray:
            return ltrp_ranker.score_maps(ranker, inputs.images(rows), batch_size=batch_size)

        def returned(ids: np.ndarray, maps: np.ndarray, reasons: np.ndarray) -> np.ndarray:
            bad = np.flatnonzero(reasons != "")
            if len(bad):
                maps = np.array(maps, dtype=np.float32)
                maps[bad] = ltrp_ranker.score_maps(ranker, inputs.from_cache(ids[bad]), batch_size=batch_size)
            return maps
        score = ModelCompute(name, ranker, ltrp_ranker.score_maps, batch_size, inputs.pixels,
                             source=inputs.file_source(), here=here, returned=returned)
        note = f"ranker {rid}; images read from their files at {size} px"
    else:
        inputs = None
        score = ModelCompute(name, ranker, ltrp_ranker.score_maps, batch_size,
                             load_pixels(name, store))  # here, or on a Ray cluster
        note = f"ranker {rid}"

    filled = PATCH_SCORES.compute_and_store(name, rid, score, store, chunk=SCORE_CHUNK, ctx=ctx,
                                            phase="score every image's patches", verb="scored", note=note)
    out = {"ranker_id": rid, "scored": filled.computed, "reused": filled.reused, "total": filled.total}
    if inputs is not None and inputs.fallbacks:
        out["from_pixel_cache"] = inputs.fallbacks
        if ctx:
            ctx.log(f"{inputs.fallbacks:,} images were read from the pixel cache: their files are gone or changed"
                    " since the scan (scan the dataset again)", level="warning")
    return out


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
    return PATCH_SCORES.load(name, rid, store or get_store(), label=label, image_ids=image_ids)


def image_scores(name: str, rid: str, image: ImageRef, ranker=None,
                 store: Store | None = None) -> tuple[np.ndarray, bool]:
    """`(scores float32 [L], stored)`: the stored score map of `image`, or (not stored yet, or a file
    outside the dataset) the ranker's, computed now and not stored."""
    from core.ltrp import ranker as ltrp_ranker

    _, maps = load_scores(name, rid, image_ids=[image.image_id], store=store)
    if len(maps):
        return maps[0], True
    ranker = ranker if ranker is not None else load_ranker_model(rid, store)
    return ltrp_ranker.score_maps(ranker, model_input(image, ranker.cfg.img_size)[None])[0], False
