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
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from core import config, estimates, paths, wording
from core.data.catalog import get_dataset, images_table, load_pixels
from core.jobs import JobContext, task
from core.store.db import Store, get_store, to_json
from core.store.vectors import ModelCompute, VectorTable

EMBED_CHUNK = int(os.environ.get("REDEX_EMBED_CHUNK", "4096"))  # images per committed chunk (unit of resume)
EMBEDDINGS = VectorTable("embeddings", key="backbone_id", column="vec")


# -- backbone ids and loading ------------------------------------------------------------------
def backbone_id(dataset: str, spec: str, *, recipe: dict | None = None, checkpoint: str | None = None,
                model=None, store: Store | None = None) -> str:
    """`trained:resnet8s2@<dataset>#<recipe hash>`; for a pretrained timm `model` (a `TimmBackbone`),
    `timm:<name>@<reads>-<input size>px.<hash>` where `<reads>` is `files` (source files) or `px<S>x<C>`
    (the pixel cache) and the hash covers the weights (HF repo and revision, or the file) and the
    pretrained data config; `#<file digest>` ends the id of weights from a `checkpoint`."""
    from core.embed.backbones import parse_spec

    parsed = parse_spec(spec)
    if parsed.kind == "trained":
        tag = hashlib.blake2b(to_json(recipe or {}).encode(), digest_size=4).hexdigest()
        return f"{spec}@{dataset}#{tag}"
    if model is None:
        raise ValueError(f"the id of pretrained backbone {spec} needs its loaded model (load_timm)")
    ds = get_dataset(dataset, store)
    reads = "files" if reads_source_files(ds) else f"px{ds['image_size']}x{ds['channels']}"
    # "decode": JPEGs are decoded at a reduced scale (`ImageReader`); ids from before it differ, so their
    # vectors (from full-resolution decodes) are never mixed with these
    what = to_json({"weights": model.weights, "data": model.data_config, "reads": reads, "decode": "jpeg-draft"})
    ident = (f"{spec}@{reads}-{model.input_size[-1]}px."
             f"{hashlib.blake2b(what.encode(), digest_size=4).hexdigest()}")
    if checkpoint:
        ident += "#" + paths.file_digest(checkpoint, "checkpoint")
    return ident


def reads_source_files(ds: dict) -> bool:
    """Whether a pretrained backbone reads this dataset's images from their source files (full resolution)
    rather than the pixel cache: every dataset but Fashion-MNIST, which is built from IDX arrays (its
    pixel cache holds every image whole, at its native 28 px) and has no source file of its own per image."""
    from core.data.sources import FASHION_MNIST

    return ds["kind"] != FASHION_MNIST


def check_embed_params(dataset: str, params: dict, store: Store | None = None) -> dict:
    """The params of an `embed` job, checked before the job starts (the CLI and the page call this):
    the dataset was scanned, the backbone spec is valid, and a `checkpoint` (timm backbones only) is a
    regular file holding a state dict that `torch.load(weights_only=True)` reads and whose tensor names
    and shapes fit the model (`timm_models.check_checkpoint`). A timm backbone without a checkpoint needs
    its default pretrained weights in the HF cache, or a download allowed and the Hub reachable
    (`timm_models.check_available`: no network call when cached, else one short probe). Returns the params,
    the checkpoint as an absolute path; raises `DatasetError`, `ValueError` or `BackboneUnavailable` with
    the reason."""
    from core.embed import backbones, timm_models

    load_pixels(dataset, store)  # fails if it was never scanned
    spec = backbones.parse_spec(params.get("backbone") or backbones.DEFAULT_BACKBONE)
    checkpoint = params.get("checkpoint")
    if not checkpoint:
        if spec.kind == "timm":
            timm_models.check_available(spec.name)  # offline and uncached, or no weights at all: refused here
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


def training_count(name: str, store: Store, seed: int = 0) -> int:
    """len(training_split(name, store, seed)[0]) from counts, without reading the image list (seconds at a
    million images): every train image when the dataset has a test or val split, else the 90 % held in."""
    by_split = dict(store.query("SELECT split, count(*) FROM images WHERE dataset = ? GROUP BY split", [name]))
    n = int(by_split.get("train", 0))
    if by_split.get("test") or by_split.get("val"):
        return n
    return n - int((np.random.default_rng(seed).random(n) < 0.1).sum())  # training_split's own draw


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
    from core.training.recipe import backbone_recipe

    store = store or get_store()
    parsed = backbones.parse_spec(spec)
    ds = get_dataset(name, store)
    if parsed.kind != "trained":
        model = timm_models.load_timm(parsed.name, checkpoint=checkpoint, log=ctx.log if ctx else None)
        bid = backbone_id(name, spec, checkpoint=checkpoint, model=model, store=store)
        if ctx:
            ctx.log(f"pretrained backbone {bid}: weights {model.weights}, reads images at {model.data_config}")
        _record_backbone(store, bid, None, spec, None, model.embed_dim, {})
        return model, bid
    recipe = backbone_recipe(ds["image_size"], arch=parsed.name)
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

    batch = recipe.batch_for(len(train))

    def report(done, total, info):  # in images (steps x batch), so the job's rate reads in images/s
        ctx.progress(done * batch, total * batch, progress_message(info))

    model, metrics = backbones.train_backbone(
        spec, np.asarray(pixels[train.row.to_numpy()]), label_indices(train.label, classes), len(classes),
        recipe=recipe, eval_images=np.asarray(pixels[held.row.to_numpy()]),
        eval_labels=label_indices(held.label, classes),
        progress=report if ctx else None, should_stop=ctx.should_stop if ctx else None)
    metrics = dict(metrics, eval_split=held_name, classes=classes)
    estimates.record("train", estimates.training_key(recipe.arch, ds["image_size"], ds["channels"]),
                     metrics["images_per_s"] * metrics["seconds"], metrics["seconds"])
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
                  batch_size: int | None = None, num_workers: int | None = None) -> dict:
    """Embed every image that has no embedding for `bid`, committing chunk by chunk.

    A backbone trained here reads the working-size pixel cache (batch 256); a pretrained timm backbone
    reads each image at its pretrained config (`_embed_pretrained`; batch 64, `num_workers` decode
    processes)."""
    store = store or get_store()
    if getattr(model, "transform", None) is not None:
        return _embed_pretrained(name, model, bid, store, ctx, batch_size or 64, num_workers)
    pixels = load_pixels(name, store)

    embed = ModelCompute(name, model, embed_pixels, batch_size or 256, pixels)  # here, or on a Ray cluster

    started = time.perf_counter()
    filled = EMBEDDINGS.compute_and_store(name, bid, embed, store, chunk=EMBED_CHUNK, ctx=ctx,
                                          phase=f"embed with {wording.plain(bid)}", verb="embedded")
    ds = get_dataset(name, store)
    estimates.record("embed", estimates.embedding_key(bid, ds["image_size"], ds["channels"]), filled.computed,
                     time.perf_counter() - started)
    return {"backbone_id": bid, "embedded": filled.computed, "reused": filled.reused, "total": filled.total}


def embed_pixels(model, pixels: np.ndarray, batch_size: int) -> np.ndarray:
    """uint8 [n, H, W, C] -> float32 [n, D]: the compute step of `embed_dataset`, here or on a Ray worker."""
    from core.embed.backbones import embed_batches

    return np.concatenate([f for _, _, f in embed_batches(model, pixels, batch_size=batch_size)])


NOT_EMBEDDED = "not embedded"  # `problems.severity` of an image a pretrained backbone could not read
LOGGED_PROBLEMS = 20           # unreadable images named one by one in a job's log; the rest are counted


@dataclasses.dataclass(frozen=True)
class _ReadRows(VectorTable):
    """A vector table that stores only finite rows: an image that could not be read comes back as a NaN
    row and gets no vector, so it stays missing and the next run tries it again."""

    def insert(self, key: str, image_ids, vectors: np.ndarray, store: Store) -> None:
        vectors = np.asarray(vectors, dtype=np.float32)
        keep = np.isfinite(vectors).all(axis=1)
        if keep.any():
            super().insert(key, np.asarray(list(image_ids), dtype=object)[keep], vectors[keep], store)


def _embed_pretrained(name: str, model, bid: str, store: Store, ctx: JobContext | None, batch_size: int,
                      num_workers: int | None) -> dict:
    """Embed with a pretrained timm backbone, each image through its eval transform (size, crop_pct,
    interpolation, mean/std of the pretrained config): decoded from its source file at full resolution,
    upright (`core.data.decode.open_image`), in `num_workers` DataLoader processes; for Fashion-MNIST from
    the pixel cache at native size (`reads_source_files`). With a Ray address, on the cluster instead:
    CPU tasks read each image the same way up to the transform's tensor step (`timm_models.input_reader`),
    the model's actors finish it and run the model (`timm_models.embed_inputs`); this process stores.
    An image that cannot be read is recorded in `problems` (severity 'not embedded', detail = the backbone
    id) and left without an embedding; the others are embedded."""
    from core.embed.timm_models import ImageReader, decode_workers, embed_images, embed_inputs, input_reader
    from core.scale import ray_address
    from core.scale.data import FileSource, pixel_source

    ds = get_dataset(name, store)
    table = images_table(name, store)
    path_of = dict(zip(table.row.to_numpy().tolist(), table.path))
    first = table.drop_duplicates("image_id")  # by row: a content id's first row, as `VectorTable.missing`
    path_of_id = dict(zip(first.image_id, first.path))
    root = Path(ds["root"])
    files = reads_source_files(ds)
    pixels = None if files else load_pixels(name, store)
    workers = decode_workers() if num_workers is None else num_workers
    failed: dict[str, str] = {}

    def unreadable(vectors: np.ndarray, bad: dict[int, str], path: Callable[[int], str]) -> np.ndarray:
        bad.update({int(i): "the backbone's features are not finite (NaN or infinite)"
                    for i in np.flatnonzero(~np.isfinite(vectors).all(axis=1)) if int(i) not in bad})
        for i, reason in sorted(bad.items()):
            failed[path(i)] = reason
            if ctx and len(failed) <= LOGGED_PROBLEMS:
                ctx.log(f"not embedded: {path(i)}: {reason}")
        return vectors

    def embed(rows: np.ndarray) -> np.ndarray:  # here
        if pixels is None:
            reader = ImageReader(model.transform, files=[root / path_of[int(r)] for r in rows],
                                 min_side=model.decode_side)
        else:
            reader = ImageReader(model.transform, pixels=np.asarray(pixels[rows]))
        vectors, bad = embed_images(model, reader, batch_size=batch_size, num_workers=workers)
        return unreadable(vectors, bad, lambda i: path_of[int(rows[i])])

    def returned(ids: np.ndarray, vectors: np.ndarray, reasons: np.ndarray) -> np.ndarray:  # from a cluster
        bad = {int(i): str(reasons[i]) for i in np.flatnonzero(reasons != "")}
        return unreadable(vectors, bad, lambda i: path_of_id[ids[i]])

    reader, shape, dtype = input_reader(model)
    source = FileSource(str(root), reader, shape, dtype, pixels=None if files else pixel_source(name, store))
    compute = ModelCompute(name, model, embed_inputs, batch_size, pixels, source=source, here=embed,
                           returned=returned)
    read = "source files at full resolution" if files else "the pixel cache at native size"
    where = (f"on the Ray cluster (CPU tasks read {'uint8 pixels' if dtype == 'uint8' else 'float inputs'}"
             f" at {shape}, the model's actors normalise and embed)" if ray_address(ctx.params if ctx else None)
             else f"({workers} decode worker processes)")
    note = f"reading {read}, through timm's eval transform at {model.input_size[-1]} px {where}"
    started = time.perf_counter()
    filled = _ReadRows(EMBEDDINGS.table, EMBEDDINGS.key, EMBEDDINGS.column).compute_and_store(
        name, bid, compute, store, chunk=EMBED_CHUNK, ctx=ctx, phase=f"embed with {bid}", verb="embedded",
        note=note)
    _record_not_embedded(store, name, bid, failed)
    embedded = filled.computed - len(failed)
    estimates.record("embed", estimates.embedding_key(bid, ds["image_size"], ds["channels"]), embedded,
                     time.perf_counter() - started)
    if ctx and failed:
        ctx.log(f"{wording.plural(len(failed), 'image')} could not be read and have no embedding (Datasets page: problem files)")
    return {"backbone_id": bid, "embedded": embedded, "reused": filled.reused, "total": filled.total,
            "unreadable": len(failed)}


def _record_not_embedded(store: Store, name: str, bid: str, failed: dict[str, str]) -> None:
    """Replace the dataset's 'not embedded' problems of `bid` with `failed` (path -> reason). A path that
    already has a problem row (a conversion note) keeps it; the job's log names it."""
    with store.write() as con:
        con.execute("DELETE FROM problems WHERE dataset = ? AND severity = ? AND detail = ?",
                    [name, NOT_EMBEDDED, bid])
        if failed:
            con.executemany("INSERT INTO problems (dataset, path, severity, reason, detail) VALUES (?, ?, ?, ?, ?)"
                            " ON CONFLICT DO NOTHING",
                            [[name, path, NOT_EMBEDDED, f"could not be read to embed with {bid}: {reason}", bid]
                             for path, reason in failed.items()])


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
