"""LTRP models per dataset: the MAE teacher and the patch ranker, trained or loaded, cached by id."""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from core import config, estimates, paths
from core.data.catalog import get_dataset, load_pixels
from core.embed.embeddings import progress_message, training_split
from core.jobs import JobContext
from core.ltrp.inputs import ModelImages, scratch_images
from core.store.db import Store, get_store, to_json
from core.store.vectors import VectorTable

PATCH_SCORES = VectorTable("patch_scores", key="ranker_id", column="scores")  # one map per (ranker, image)


# -- settings and model ids --------------------------------------------------------------------
@dataclass(frozen=True)
class LtrpSettings:
    """How a dataset's MAE and ranker are made (everything here is part of the model ids).

    `mae_config` / `ranker_config` override fields of the default architectures (`MAEConfig.for_image`,
    `RankerConfig.for_mae`); tests use tiny ones. `ranker_images`: at most this many train images
    (a seeded random sample) for the ranker, whose steps cost one encoder and V + 1 decoder passes of
    the MAE per image (default 20,000: about 90 s on 2 CPU cores for Fashion-MNIST).
    `mask_ratio`: the ranker's pseudo-score mask ratio (default: `ltrp_ranker.default_mask_ratio`).
    """

    mae_epochs: int = 2
    ranker_epochs: int = 1
    mask_ratio: float | None = None
    ranker_images: int | None = 20_000
    mae_batch: int = 128
    ranker_batch: int = 128
    mae_lr: float = 2e-3
    ranker_lr: float = 1e-3
    seed: int = 0
    mae_config: dict = field(default_factory=dict)
    ranker_config: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.mask_ratio is not None and not 0.0 < self.mask_ratio < 1.0:
            raise ValueError(f"mask ratio must lie in (0, 1), got {self.mask_ratio}")
        if self.mae_epochs < 1 or self.ranker_epochs < 1:
            raise ValueError("MAE and ranker epochs must be at least 1")

    @classmethod
    def from_params(cls, params: dict) -> LtrpSettings:
        """From a job's params (unknown keys ignored, None means the default)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in params.items() if k in names and v is not None})

    def mae_recipe(self) -> dict:
        return {"epochs": self.mae_epochs, "batch": self.mae_batch, "lr": self.mae_lr, "seed": self.seed}

    def ranker_recipe(self, mask_ratio: float) -> dict:
        return {"epochs": self.ranker_epochs, "batch": self.ranker_batch, "lr": self.ranker_lr, "seed": self.seed,
                "mask_ratio": mask_ratio, "images": self.ranker_images}


def _tag(value: Any) -> str:
    return hashlib.blake2b(to_json(value).encode(), digest_size=4).hexdigest()


def mae_model_id(dataset: str, cfg, recipe: dict) -> str:
    """An MAE trained here on `dataset`'s train split."""
    return f"mae:{_tag(cfg.to_dict())}@{dataset}#{_tag(recipe)}"


def checkpoint_mae_id(checkpoint: str | Path) -> str:
    """An MAE loaded from a user's checkpoint (the same file gives the same id on any dataset)."""
    return f"mae:file-{paths.file_digest(Path(checkpoint).expanduser(), 'checkpoint')}"


def ranker_model_id(dataset: str, cfg, recipe: dict, mae_id: str) -> str:
    return f"ranker:{_tag(cfg.to_dict())}@{dataset}#{_tag(recipe)}<{mae_id}"


def _checkpoint_path(model_id: str) -> Path:
    return config.model_file("ltrp", model_id)


# -- the MAE -----------------------------------------------------------------------------------
def load_mae_checkpoint(path: str | Path):
    """An MAE from a user's file: a redex MAE checkpoint, or one in the official `models_mae` layout.

    Raises `MAEHasNoDecoder` for an encoder-only checkpoint and `ValueError` for anything else that
    cannot be used, both with the reason; never returns random weights.
    """
    import torch

    from core.ltrp.mae import (
        CHECKPOINT_FORMAT,
        MAEHasNoDecoder,
        load_mae,
        load_official_mae,
    )

    path = Path(path).expanduser()
    paths.regular_file(path, "checkpoint file")  # missing, a folder, a FIFO, a device: refused unopened
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same clear message
        raise ValueError(f"{path}: not a PyTorch checkpoint that can be loaded safely ({exc})") from None
    if not isinstance(payload, dict):
        raise ValueError(f"{path}: not an MAE checkpoint (expected a dict of tensors)")
    if payload.get("format") == CHECKPOINT_FORMAT:
        return load_mae(path)[0]
    try:
        return load_official_mae(payload)
    except MAEHasNoDecoder:
        raise
    except (ValueError, KeyError, RuntimeError) as exc:
        raise ValueError(f"{path}: cannot be used as an MAE: {exc}") from None


def check_mae_checkpoint(name: str, checkpoint: str | Path, store: Store | None = None):
    """The MAE in a user's `checkpoint`, if it can serve dataset `name` (`load_mae_checkpoint`, then the
    channels); raises with the reason otherwise. Called before an `ltrp` job starts, and by the job."""
    mae = load_mae_checkpoint(checkpoint)
    if mae.cfg.in_chans == 1 and get_dataset(name, store)["channels"] == 3:
        raise ValueError(f"{checkpoint}: a 1-channel MAE cannot take {name!r}'s RGB images")
    return mae


def ensure_mae(name: str, settings: LtrpSettings, *, checkpoint: str | None = None, retrain: bool = False,
               store: Store | None = None, ctx: JobContext | None = None):
    """Load (user checkpoint), reuse (cached) or train the dataset's MAE. Returns (mae, mae_id, fresh)."""
    from core.ltrp.mae import MAEConfig, evaluate_mae, load_mae, save_mae, train_mae

    store = store or get_store()
    ds = get_dataset(name, store)
    if checkpoint:
        mae = check_mae_checkpoint(name, checkpoint, store)
        mid = checkpoint_mae_id(checkpoint)
        _record_model(store, mid, None, "mae", None, str(Path(checkpoint).expanduser().resolve()),
                      {"source": "file", **mae.cfg.to_dict()}, {})
        if ctx:
            ctx.log(f"MAE from {checkpoint} ({mae.cfg.img_size} px, {mae.cfg.num_patches} patches)")
        return mae, mid, False
    cfg = dataclasses.replace(MAEConfig.for_image(ds["image_size"], ds["channels"]), **settings.mae_config)
    mid = mae_model_id(name, cfg, settings.mae_recipe())
    ckpt = _checkpoint_path(mid)
    if ckpt.exists() and not retrain:
        if ctx:
            ctx.log(f"reusing the trained MAE {mid}")
        return load_mae(ckpt)[0], mid, False
    pixels = load_pixels(name, store)
    train, held, held_name = training_split(name, store, seed=settings.seed)
    if ctx:
        ctx.phase(f"train the MAE ({len(train):,} images, self-supervised)")
    mae, metrics = train_mae(np.asarray(pixels[train.row.to_numpy()]), cfg, epochs=settings.mae_epochs,
                             batch_size=settings.mae_batch, lr=settings.mae_lr, seed=settings.seed,
                             **_callbacks(ctx, min(settings.mae_batch, len(train))))
    eval_rows = (held if len(held) else train).row.to_numpy()[:2000]
    metrics.update(eval_split=held_name, eval_masked_mse=evaluate_mae(mae, np.asarray(pixels[eval_rows])))
    save_mae(mae, ckpt, {"model_id": mid, "dataset": name})
    _record_model(store, mid, name, "mae", None, str(ckpt), {"source": "trained", **cfg.to_dict()}, metrics)
    if ctx:
        ctx.log(f"MAE trained in {metrics['seconds']:.0f} s, final loss {metrics['train_loss']:.4f}")
    return mae, mid, True


def _callbacks(ctx: JobContext | None, batch: int = 1) -> dict:
    """Progress (in images: steps x `batch`, so the job's rate reads in images/s) and cancel for a job."""
    if ctx is None:
        return {}
    return {"progress": lambda done, total, info: ctx.progress(done * batch, total * batch, progress_message(info)),
            "should_stop": ctx.should_stop}


def _record_model(store: Store, mid: str, dataset: str | None, kind: str, parent: str | None, checkpoint: str,
                  cfg: dict, metrics: dict) -> None:
    with store.write() as con:
        con.execute("DELETE FROM ltrp_models WHERE model_id = ?", [mid])
        con.execute("INSERT INTO ltrp_models (model_id, dataset, kind, parent, checkpoint, config, metrics)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?)",
                    [mid, dataset, kind, parent, checkpoint, to_json(cfg), to_json(metrics)])


# -- the ranker --------------------------------------------------------------------------------
def ensure_ranker(name: str, mae, mae_id: str, settings: LtrpSettings, *, retrain: bool = False,
                  store: Store | None = None, ctx: JobContext | None = None):
    """Reuse or train the ranker of (dataset, MAE, settings). Returns (ranker, ranker_id).

    Training one drops the score maps stored under its id (they came from the old weights).
    """
    from core.ltrp import ranker as ltrp_ranker

    store = store or get_store()
    cfg = ltrp_ranker.RankerConfig.for_mae(mae, **settings.ranker_config)
    mask_ratio = settings.mask_ratio or ltrp_ranker.default_mask_ratio(mae.cfg.num_patches)
    recipe = settings.ranker_recipe(mask_ratio)
    inputs = ModelImages(name, mae.cfg.img_size, store, check=ctx.check_cancelled if ctx else None)
    if inputs.sources:  # trained on the files at the MAE's size (core.ltrp.inputs), not the pixel cache
        recipe["inputs"] = f"files@{mae.cfg.img_size}"
    rid = ranker_model_id(name, cfg, recipe, mae_id)
    ckpt = _checkpoint_path(rid)
    if ckpt.exists() and not retrain:
        if ctx:
            ctx.log(f"reusing the trained ranker {rid}")
        return ltrp_ranker.load_ranker(ckpt)[0], rid
    train, held, held_name = training_split(name, store, seed=settings.seed)
    rows = train.row.to_numpy()
    if settings.ranker_images and len(rows) > settings.ranker_images:
        rng = np.random.default_rng(settings.seed)
        rows = np.sort(rng.choice(rows, settings.ranker_images, replace=False))
    eval_rows = (held.row.to_numpy() if len(held) else rows)[:512]
    with scratch_images(len(rows), inputs) as images:
        if ctx and inputs.sources:
            ctx.phase(f"read {len(rows) + len(eval_rows):,} images from their files at {mae.cfg.img_size} px")
        images = inputs.images(rows, out=images)
        eval_images = inputs.images(eval_rows)
        if ctx:
            ctx.phase(f"train the ranker on MAE pseudo-scores ({len(rows):,} images, mask ratio {mask_ratio})")
        ranker, metrics = ltrp_ranker.train_ranker(
            mae, images, cfg, epochs=settings.ranker_epochs, batch_size=settings.ranker_batch,
            lr=settings.ranker_lr, mask_ratio=mask_ratio, seed=settings.seed, eval_images=eval_images,
            **_callbacks(ctx, min(settings.ranker_batch, len(rows))))
    metrics["eval_split"] = held_name
    ltrp_ranker.save_ranker(ranker, ckpt, {"model_id": rid, "dataset": name, "mae": mae_id})
    PATCH_SCORES.delete(rid, store)
    _record_model(store, rid, name, "ranker", mae_id, str(ckpt), cfg.to_dict(), metrics)
    if ctx:
        agree = metrics["agreement"]
        ctx.log(f"ranker trained in {metrics['seconds']:.0f} s; Spearman with the pseudo-scores on held-out"
                f" masks {metrics['agreement_before']['spearman']:.2f} -> {agree['spearman']:.2f}")
    return ranker, rid


def train_ltrp(name: str, settings: LtrpSettings | None = None, *, checkpoint: str | None = None,
               retrain: bool = False, store: Store | None = None, ctx: JobContext | None = None) -> dict:
    """MAE (trained here, cached, or from `checkpoint`), then the ranker. Returns their ids. Both trained
    here: their pace is recorded for the next estimate (`ltrp_estimate`)."""
    import time

    settings = settings or LtrpSettings()
    started = time.perf_counter()
    mae, mae_id, fresh = ensure_mae(name, settings, checkpoint=checkpoint, retrain=retrain, store=store, ctx=ctx)
    # A freshly trained MAE changed the teacher behind the same ranker id: train the ranker again too.
    _, rid = ensure_ranker(name, mae, mae_id, settings, retrain=retrain or fresh, store=store, ctx=ctx)
    if fresh and not checkpoint:
        key, work = _ltrp_work(name, settings, store or get_store())
        estimates.record("ltrp", key, work, time.perf_counter() - started)
    return {"mae_id": mae_id, "ranker_id": rid}


def _ltrp_work(name: str, settings: LtrpSettings, store: Store | None = None) -> tuple[str, float]:
    """(speed key, image-epochs) of training an MAE and its ranker on the dataset."""
    ds = get_dataset(name, store)
    train = training_split(name, store, seed=settings.seed)[0]
    return (estimates.speed_key("ltrp", ds["image_size"], ds["channels"]),
            len(train) * (settings.mae_epochs + settings.ranker_epochs))


def ltrp_estimate(name: str, settings: LtrpSettings | None = None, store: Store | None = None) -> estimates.Estimate:
    """How long training an MAE and its ranker would take here now, from the last one trained on this
    machine (same image size), scaled to the load now; `seconds` None before any."""
    key, work = _ltrp_work(name, settings or LtrpSettings(), store)
    return estimates.estimate("ltrp", key, work)


# -- reading models and scores -----------------------------------------------------------------
def list_rankers(name: str, store: Store | None = None):
    """The dataset's rankers, newest first: model_id, parent (MAE id), metrics, created_at, scored."""
    return PATCH_SCORES.with_coverage(
        name, "SELECT model_id, parent, metrics, created_at FROM ltrp_models WHERE kind = 'ranker' AND dataset = ?"
        " ORDER BY created_at DESC, model_id", [name], store or get_store(), key_column="model_id",
        count_column="scored")


def require_ranker(name: str, store: Store | None = None) -> str:
    """The newest ranker of the dataset; a clear error if there is none."""
    rankers = list_rankers(name, store)
    if rankers.empty:
        raise ValueError(f"no patch ranker for {name!r} yet: run `redex ltrp train {name}` first")
    return str(rankers.model_id.iloc[0])


def _model_row(mid: str, store: Store) -> dict:
    with store.read() as con:
        cur = con.execute("SELECT * FROM ltrp_models WHERE model_id = ?", [mid])
        row = cur.fetchone()
        if row is None:
            raise ValueError(f"no LTRP model {mid!r} (train one with `redex ltrp train NAME`)")
        out = dict(zip([d[0] for d in cur.description], row))
    out["config"] = json.loads(out["config"] or "{}")
    return out


def load_ranker_model(rid: str, store: Store | None = None):
    from core.ltrp import ranker as ltrp_ranker

    return ltrp_ranker.load_ranker(_model_row(rid, store or get_store())["checkpoint"])[0]


def load_mae_model(rid: str, store: Store | None = None):
    """The MAE behind the ranker `rid` (the teacher whose reconstructions the page shows)."""
    from core.ltrp.mae import load_mae

    store = store or get_store()
    row = _model_row(_model_row(rid, store)["parent"], store)
    if row["config"].get("source") == "file":
        return load_mae_checkpoint(row["checkpoint"])
    return load_mae(row["checkpoint"])[0]
