"""Embeddings of a dataset's images: backbone (trained here or pretrained), resumable embedding, UMAP.

Backbone ids are cache keys: everything that changes the features is in them (spec, the dataset
and recipe a backbone was trained with, or the checkpoint and working size of a pretrained one).
Embeddings are stored one row per (backbone, image content id), so an image that did not change
is never embedded twice, a changed file gets a new content id (and only it is embedded again),
and a job killed half-way resumes: it embeds only the images that have no row yet.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path

import numpy as np

from core import config, paths
from core.data.catalog import get_dataset, images_table, load_pixels
from core.jobs import JobContext, task
from core.store.db import Store, get_store, to_json
from core.store.vectors import VectorTable

EMBED_CHUNK = int(os.environ.get("REDEX_EMBED_CHUNK", "4096"))  # images per committed chunk (unit of resume)
EMBEDDINGS = VectorTable("embeddings", key="backbone_id", column="vec")


# -- backbone ids and loading ------------------------------------------------------------------
def backbone_id(dataset: str, spec: str, *, recipe: dict | None = None, checkpoint: str | None = None,
                store: Store | None = None) -> str:
    from core.embed.backbones import parse_spec

    parsed = parse_spec(spec)
    if parsed.kind == "trained":
        tag = hashlib.blake2b(to_json(recipe or {}).encode(), digest_size=4).hexdigest()
        return f"{spec}@{dataset}#{tag}"
    ds = get_dataset(dataset, store)
    ident = f"{spec}@{ds['image_size']}x{ds['channels']}"
    if checkpoint:
        ident += "#" + paths.file_digest(checkpoint, "checkpoint")
    return ident


def check_embed_params(dataset: str, params: dict, store: Store | None = None) -> dict:
    """The params of an `embed` job, checked before the job starts (the CLI and the page call this):
    the dataset was scanned, the backbone spec is valid, and a `checkpoint` (timm backbones only) is a
    regular file holding a state dict that `torch.load(weights_only=True)` reads and whose tensor names
    and shapes fit the model (`timm_models.check_checkpoint`). Returns the params, the checkpoint as an
    absolute path; raises `DatasetError`, `ValueError` or `BackboneUnavailable` with the reason."""
    from core.embed import backbones, timm_models

    load_pixels(dataset, store)  # fails if it was never scanned
    spec = backbones.parse_spec(params.get("backbone") or backbones.DEFAULT_BACKBONE)
    checkpoint = params.get("checkpoint")
    if not checkpoint:
        return dict(params)
    if spec.kind != "timm":
        raise ValueError(f"a checkpoint is for timm backbones; {spec} is trained here on the dataset")
    timm_models.check_checkpoint(spec.name, checkpoint)
    return dict(params, checkpoint=str(Path(checkpoint).expanduser().resolve()))


def list_backbones(dataset: str, store: Store | None = None):
    """Backbones with embeddings for this dataset, newest first, with how many images they cover."""
    return EMBEDDINGS.with_coverage(
        dataset, "SELECT backbone_id, spec, dim, TRY_CAST(metrics->>'test_top1' AS DOUBLE) AS accuracy,"
        " metrics->>'eval_split' AS eval_split, metrics, created_at FROM backbones"
        " WHERE dataset = ? OR dataset IS NULL ORDER BY created_at DESC", [dataset], store or get_store(),
        key_column="backbone_id", count_column="embedded")


def label_indices(labels, classes: list[str]) -> np.ndarray:
    index = {c: i for i, c in enumerate(classes)}
    return np.array([index[label] for label in labels], dtype=np.int64)


def training_split(name: str, store: Store, seed: int = 0):
    """(train rows, eval rows, eval name): test split, else val, else 10% of train held out."""
    table = images_table(name, store)
    train = table[table.split == "train"]
    for split in ("test", "val"):
        held = table[table.split == split]
        if len(held):
            return train, held, split
    rng = np.random.default_rng(seed)
    mask = rng.random(len(train)) < 0.1
    return train[~mask], train[mask], "held-out 10% of train"


def ensure_backbone(name: str, spec: str, *, epochs: int | None = None, checkpoint: str | None = None,
                    retrain: bool = False, store: Store | None = None, ctx: JobContext | None = None):
    """Load (or train, for `trained:` specs) the backbone. Returns (model, backbone_id)."""
    from core.embed import backbones, timm_models
    from core.training.recipe import default_recipe

    store = store or get_store()
    parsed = backbones.parse_spec(spec)
    ds = get_dataset(name, store)
    if parsed.kind != "trained":
        model = timm_models.load_timm(parsed.name, checkpoint=checkpoint)
        bid = backbone_id(name, spec, checkpoint=checkpoint, store=store)
        _record_backbone(store, bid, None, spec, None, model.embed_dim, {})
        return model, bid
    recipe = dataclasses.replace(default_recipe(ds["image_size"]), arch=parsed.name)
    if epochs:
        recipe = dataclasses.replace(recipe, epochs=int(epochs))
    bid = backbone_id(name, spec, recipe=recipe.to_dict())
    ckpt = config.model_file("backbones", bid)
    if ckpt.exists() and not retrain:
        model, _meta = backbones.load_checkpoint(ckpt)
        if ctx:
            ctx.log(f"reusing trained backbone {bid}")
        return model, bid
    model, metrics = _train(name, spec, recipe, store, ctx)
    backbones.save_checkpoint(model, ckpt, {"backbone_id": bid, "dataset": name, "recipe": recipe.to_dict()})
    _record_backbone(store, bid, name, spec, str(ckpt), model.embed_dim, metrics)
    EMBEDDINGS.delete(bid, store)  # a retrained backbone makes the old embeddings stale
    return model, bid


def _train(name: str, spec: str, recipe, store: Store, ctx: JobContext | None):
    from core.embed import backbones

    ds = get_dataset(name, store)
    pixels = load_pixels(name, store)
    train, held, held_name = training_split(name, store, seed=recipe.seed)
    classes = list(ds["classes"])
    if ctx:
        ctx.phase(f"train backbone {spec} ({len(train):,} images, eval on {held_name})")
        ctx.log(f"recipe: {to_json(recipe.to_dict())}")

    def report(done, total, info):
        ctx.progress(done, total, progress_message(info))

    model, metrics = backbones.train_backbone(
        spec, np.asarray(pixels[train.row.to_numpy()]), label_indices(train.label, classes), len(classes),
        recipe=recipe, eval_images=np.asarray(pixels[held.row.to_numpy()]),
        eval_labels=label_indices(held.label, classes),
        progress=report if ctx else None, should_stop=ctx.should_stop if ctx else None)
    metrics = dict(metrics, eval_split=held_name, classes=classes)
    if ctx:
        ctx.log(f"backbone trained in {metrics['seconds']:.0f} s: {held_name} accuracy {metrics['test_top1']:.4f}")
    return model, metrics


def progress_message(info: dict) -> str:
    parts = [f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in info.items()]
    return "training: " + ", ".join(parts)


def _record_backbone(store: Store, bid: str, dataset: str | None, spec: str, checkpoint: str | None,
                     dim: int, metrics: dict) -> None:
    with store.write() as con:
        con.execute("DELETE FROM backbones WHERE backbone_id = ?", [bid])
        con.execute("INSERT INTO backbones (backbone_id, dataset, spec, checkpoint, dim, metrics)"
                    " VALUES (?, ?, ?, ?, ?, ?)", [bid, dataset, spec, checkpoint, dim, to_json(metrics)])


# -- embedding ---------------------------------------------------------------------------------
def missing_rows(name: str, bid: str, store: Store) -> np.ndarray:
    """Pixel-cache rows of images with no embedding yet (one row per content id), ascending."""
    return EMBEDDINGS.missing(name, bid, store)[0]


def embed_dataset(name: str, model, bid: str, *, store: Store | None = None, ctx: JobContext | None = None,
                  batch_size: int = 256) -> dict:
    """Embed every image that has no embedding for `bid`, committing chunk by chunk."""
    from core.embed.backbones import embed_batches

    store = store or get_store()
    pixels = load_pixels(name, store)

    def embed(rows: np.ndarray) -> np.ndarray:
        return np.concatenate([f for _, _, f in embed_batches(model, np.asarray(pixels[rows]),
                                                              batch_size=batch_size)])

    filled = EMBEDDINGS.compute_and_store(name, bid, embed, store, chunk=EMBED_CHUNK, ctx=ctx,
                                          phase=f"embed with {bid}", verb="embedded")
    return {"backbone_id": bid, "embedded": filled.computed, "reused": filled.reused, "total": filled.total}


def load_embeddings(name: str, bid: str, store: Store | None = None):
    """(images DataFrame, float32 [N, D]) for the dataset's images that have an embedding, by row."""
    return EMBEDDINGS.load(name, bid, store or get_store())


@task("embed")
def _embed_task(ctx: JobContext) -> dict:
    from core.embed.backbones import DEFAULT_BACKBONE

    p = ctx.params
    model, bid = ensure_backbone(ctx.dataset, p.get("backbone") or DEFAULT_BACKBONE, epochs=p.get("epochs"),
                                 checkpoint=p.get("checkpoint"), retrain=bool(p.get("retrain")),
                                 store=ctx.store, ctx=ctx)
    return embed_dataset(ctx.dataset, model, bid, store=ctx.store, ctx=ctx)
