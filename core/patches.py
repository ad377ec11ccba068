"""LTRP wired to the store: MAE and ranker jobs, resumable score maps, and what the heatmap page shows.

The models are `core.mae` (the MAE teacher) and `core.ltrp` (pseudo-scores, ranker); this module
trains or loads them per dataset, caches them, and scores every image.

Model ids are cache keys: everything that changes a model is in its id (kind, dataset, architecture,
recipe, and a ranker's parent MAE id; a user's MAE checkpoint by its content digest). Checkpoints
live under `<cache>/artifacts/ltrp`, one row per model in `ltrp_models`. Score maps are stored one
row per (ranker id, image content id) in `patch_scores`, so an unchanged image is never scored
twice, a changed file gets a new content id (only it is scored again), a scoring job killed
half-way resumes with the images that have no row yet, and a retrained ranker drops its old rows.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from core import config
from core.datasets import BadImage, DatasetError, decode, get_dataset, images_table, load_pixels
from core.embeddings import _file_digest, _safe, _train_message, training_split
from core.jobs import JobContext, task
from core.store import Store, get_store, to_json

SCORE_CHUNK = int(os.environ.get("REDEX_LTRP_CHUNK", "2048"))  # images per committed chunk (unit of resume)
MASK_GREY = 110  # fill of the dropped patches in the "kept patches" view


# -- settings and model ids --------------------------------------------------------------------
@dataclass(frozen=True)
class LtrpSettings:
    """How a dataset's MAE and ranker are made (everything here is part of the model ids).

    `mae_config` / `ranker_config` override fields of the default architectures (`MAEConfig.for_image`,
    `RankerConfig.for_mae`); tests use tiny ones. `ranker_images`: at most this many train images
    (a seeded random sample) for the ranker, whose steps cost one encoder and V + 1 decoder passes of
    the MAE per image (default 20,000: about 90 s on 2 CPU cores for Fashion-MNIST).
    `mask_ratio`: the ranker's pseudo-score mask ratio (default: `ltrp.default_mask_ratio`).
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
    return f"mae:file-{_file_digest(Path(checkpoint))}"


def ranker_model_id(dataset: str, cfg, recipe: dict, mae_id: str) -> str:
    return f"ranker:{_tag(cfg.to_dict())}@{dataset}#{_tag(recipe)}<{mae_id}"


def _checkpoint_path(model_id: str) -> Path:
    return config.artifacts_dir("ltrp") / f"{_safe(model_id)}.pt"


# -- the MAE -----------------------------------------------------------------------------------
def load_mae_checkpoint(path: str | Path):
    """An MAE from a user's file: a redex MAE checkpoint, or one in the official `models_mae` layout.

    Raises `MAEHasNoDecoder` for an encoder-only checkpoint and `ValueError` for anything else that
    cannot be used, both with the reason; never returns random weights.
    """
    import torch

    from core.mae import CHECKPOINT_FORMAT, MAEHasNoDecoder, load_mae, load_official_mae

    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"no such checkpoint file: {path}")
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


def ensure_mae(name: str, settings: LtrpSettings, *, checkpoint: str | None = None, retrain: bool = False,
               store: Store | None = None, ctx: JobContext | None = None):
    """Load (user checkpoint), reuse (cached) or train the dataset's MAE. Returns (mae, mae_id, fresh)."""
    from core.mae import MAEConfig, evaluate_mae, load_mae, save_mae, train_mae

    store = store or get_store()
    ds = get_dataset(name, store)
    if checkpoint:
        mae = load_mae_checkpoint(checkpoint)
        if mae.cfg.in_chans == 1 and ds["channels"] == 3:
            raise ValueError(f"{checkpoint}: a 1-channel MAE cannot take {name!r}'s RGB images")
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
                             **_callbacks(ctx))
    eval_rows = (held if len(held) else train).row.to_numpy()[:2000]
    metrics.update(eval_split=held_name, eval_masked_mse=evaluate_mae(mae, np.asarray(pixels[eval_rows])))
    save_mae(mae, ckpt, {"model_id": mid, "dataset": name})
    _record_model(store, mid, name, "mae", None, str(ckpt), {"source": "trained", **cfg.to_dict()}, metrics)
    if ctx:
        ctx.log(f"MAE trained in {metrics['seconds']:.0f} s, final loss {metrics['train_loss']:.4f}")
    return mae, mid, True


def _callbacks(ctx: JobContext | None) -> dict:
    if ctx is None:
        return {}
    return {"progress": lambda done, total, info: ctx.progress(done, total, _train_message(info)),
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
    from core import ltrp

    store = store or get_store()
    cfg = ltrp.RankerConfig.for_mae(mae, **settings.ranker_config)
    mask_ratio = settings.mask_ratio or ltrp.default_mask_ratio(mae.cfg.num_patches)
    recipe = settings.ranker_recipe(mask_ratio)
    rid = ranker_model_id(name, cfg, recipe, mae_id)
    ckpt = _checkpoint_path(rid)
    if ckpt.exists() and not retrain:
        if ctx:
            ctx.log(f"reusing the trained ranker {rid}")
        return ltrp.load_ranker(ckpt)[0], rid
    pixels = load_pixels(name, store)
    train, held, held_name = training_split(name, store, seed=settings.seed)
    rows = train.row.to_numpy()
    if settings.ranker_images and len(rows) > settings.ranker_images:
        rng = np.random.default_rng(settings.seed)
        rows = np.sort(rng.choice(rows, settings.ranker_images, replace=False))
    if ctx:
        ctx.phase(f"train the ranker on MAE pseudo-scores ({len(rows):,} images, mask ratio {mask_ratio})")
    ranker, metrics = ltrp.train_ranker(
        mae, np.asarray(pixels[rows]), cfg, epochs=settings.ranker_epochs, batch_size=settings.ranker_batch,
        lr=settings.ranker_lr, mask_ratio=mask_ratio, seed=settings.seed,
        eval_images=np.asarray(pixels[(held.row.to_numpy() if len(held) else rows)[:512]]), **_callbacks(ctx))
    metrics["eval_split"] = held_name
    ltrp.save_ranker(ranker, ckpt, {"model_id": rid, "dataset": name, "mae": mae_id})
    store.execute("DELETE FROM patch_scores WHERE ranker_id = ?", [rid])
    _record_model(store, rid, name, "ranker", mae_id, str(ckpt), cfg.to_dict(), metrics)
    if ctx:
        agree = metrics["agreement"]
        ctx.log(f"ranker trained in {metrics['seconds']:.0f} s; Spearman with the pseudo-scores on held-out"
                f" masks {metrics['agreement_before']['spearman']:.2f} -> {agree['spearman']:.2f}")
    return ranker, rid


def train_ltrp(name: str, settings: LtrpSettings | None = None, *, checkpoint: str | None = None,
               retrain: bool = False, store: Store | None = None, ctx: JobContext | None = None) -> dict:
    """MAE (trained here, cached, or from `checkpoint`), then the ranker. Returns their ids."""
    settings = settings or LtrpSettings()
    mae, mae_id, fresh = ensure_mae(name, settings, checkpoint=checkpoint, retrain=retrain, store=store, ctx=ctx)
    # A freshly trained MAE changed the teacher behind the same ranker id: train the ranker again too.
    _, rid = ensure_ranker(name, mae, mae_id, settings, retrain=retrain or fresh, store=store, ctx=ctx)
    return {"mae_id": mae_id, "ranker_id": rid}


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

    from core import ltrp

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
        maps = ltrp.score_maps(ranker, np.asarray(pixels[rows]), batch_size=batch_size)
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


# -- reading models and scores -----------------------------------------------------------------
def list_rankers(name: str, store: Store | None = None):
    """The dataset's rankers, newest first: model_id, parent (MAE id), metrics, created_at, scored."""
    store = store or get_store()
    return store.query_df(
        "SELECT m.model_id, m.parent, m.metrics, m.created_at, count(s.image_id) AS scored"
        " FROM ltrp_models m LEFT JOIN patch_scores s ON s.ranker_id = m.model_id"
        "  AND s.image_id IN (SELECT image_id FROM images WHERE dataset = ?)"
        " WHERE m.kind = 'ranker' AND m.dataset = ? GROUP BY ALL ORDER BY m.created_at DESC, m.model_id",
        [name, name])


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
    from core import ltrp

    return ltrp.load_ranker(_model_row(rid, store or get_store())["checkpoint"])[0]


def load_mae_model(rid: str, store: Store | None = None):
    """The MAE behind the ranker `rid` (the teacher whose reconstructions the page shows)."""
    from core.mae import load_mae

    store = store or get_store()
    row = _model_row(_model_row(rid, store)["parent"], store)
    if row["config"].get("source") == "file":
        return load_mae_checkpoint(row["checkpoint"])
    return load_mae(row["checkpoint"])[0]


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


# -- one image: resolving it and what is shown -------------------------------------------------
@dataclass(frozen=True)
class ImageRef:
    """One image to show: from the dataset (`row` set) or a file outside it (`row` None)."""
    pixels: np.ndarray            # uint8 [S, S, C] at the dataset's working size
    image_id: str
    path: str
    label: str | None
    row: int | None


def resolve_image(name: str, ref: str, store: Store | None = None) -> ImageRef:
    """An image by content id (or a unique prefix of 6+ characters), by path relative to the dataset
    root, by absolute path of a dataset image, or any image file (decoded at the working size)."""
    store = store or get_store()
    ds = get_dataset(name, store)
    table = images_table(name, store)
    ref = str(ref).strip()
    hit = table[table.image_id == ref]
    if hit.empty and len(ref) >= 6:
        hit = table[table.image_id.str.startswith(ref.lower())]
        if hit.image_id.nunique() > 1:
            raise DatasetError(f"{ref!r} is the start of {hit.image_id.nunique()} content ids: give more of it")
    if hit.empty:
        hit = table[table.path == ref]
    file = Path(ref).expanduser()
    if hit.empty and file.is_absolute():
        try:
            hit = table[table.path == file.resolve().relative_to(Path(ds["root"]).resolve()).as_posix()]
        except ValueError:
            pass
    if not hit.empty:
        return images_at(name, [int(hit.row.iloc[0])], store)[0]
    if file.is_file():
        try:
            decoded = decode(file.read_bytes(), ds["image_size"], ds["channels"])
        except BadImage as exc:
            raise DatasetError(f"{ref}: {exc}") from None
        return ImageRef(decoded.pixels, decoded.image_id, str(file), None, None)
    raise DatasetError(f"no image {ref!r} in {name!r}: give a content id or a path relative to the dataset root"
                       f" (`redex info {name} --ids` lists them), or an image file")


@dataclass(frozen=True)
class PatchView:
    """What the page and `redex ltrp show` draw for one image at one keep ratio (model size S)."""
    original: np.ndarray          # uint8 [S, S, C]
    scores: np.ndarray            # float32 [L], row-major patches
    grid: int
    patch: int
    keep: np.ndarray              # int64 [K] kept patch indices, best first
    kept: np.ndarray              # uint8 [S, S, C]: kept patches, the others grey
    reconstruction: np.ndarray    # uint8 [S, S, C]: MAE from the kept patches only, kept ones pasted

    @property
    def heat(self) -> np.ndarray:
        """float32 [grid, grid] scores."""
        return self.scores.reshape(self.grid, self.grid)

    @property
    def kept_mask(self) -> np.ndarray:
        """bool [grid, grid], True where a patch is kept."""
        mask = np.zeros(self.grid * self.grid, bool)
        mask[self.keep] = True
        return mask.reshape(self.grid, self.grid)


def model_pixels(mae, images: np.ndarray) -> np.ndarray:
    """uint8 `[N, H, W, C]` -> uint8 `[N, S, S, C']` at the model's size and channels (as it sees them)."""
    from core.mae import fit_input
    from core.training import pixels_view

    x = fit_input(pixels_view(images).float(), mae.cfg.img_size, mae.cfg.in_chans)
    return x.round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()


def patch_view(mae, pixels: np.ndarray, scores: np.ndarray, keep_ratio: float) -> PatchView:
    """One image (`pixels` uint8 [H, W, C]) with its score map `[L]` kept at `keep_ratio`."""
    from core import ltrp
    from core.mae import reconstruct

    grid, patch = mae.cfg.grid, mae.cfg.patch_size
    scores = np.asarray(scores, np.float32)
    if scores.shape != (grid * grid,):
        raise ValueError(f"score map of {scores.size} patches for an MAE with {grid * grid}")
    keep = ltrp.top_k(scores, keep_ratio)
    original = model_pixels(mae, pixels[None])[0]
    mask = np.zeros(grid * grid, bool)
    mask[keep] = True
    pixel_mask = np.kron(mask.reshape(grid, grid), np.ones((patch, patch), bool))[..., None]
    kept = np.where(pixel_mask, original, np.uint8(MASK_GREY))
    pasted, _ = reconstruct(mae, pixels[None], keep[None])
    return PatchView(original, scores, grid, patch, keep, kept.astype(np.uint8), pasted[0])


def images_at(name: str, rows, store: Store | None = None) -> list[ImageRef]:
    """The dataset's images at these pixel-cache rows, in that order."""
    store = store or get_store()
    table = images_table(name, store).set_index("row")
    pixels = load_pixels(name, store)
    return [ImageRef(np.asarray(pixels[int(r)]), table.image_id[r], table.path[r], table.label[r], int(r))
            for r in rows]


def image_scores(name: str, rid: str, image: ImageRef, ranker=None,
                 store: Store | None = None) -> tuple[np.ndarray, bool]:
    """`(scores float32 [L], stored)`: the stored score map of `image`, or (not stored yet, or a file
    outside the dataset) the ranker's, computed now and not stored."""
    from core import ltrp

    _, maps = load_scores(name, rid, image_ids=[image.image_id], store=store)
    if len(maps):
        return maps[0], True
    ranker = ranker if ranker is not None else load_ranker_model(rid, store)
    return ltrp.score_maps(ranker, image.pixels[None])[0], False


# -- drawing -----------------------------------------------------------------------------------
def _colormap(n: int = 256) -> np.ndarray:
    """Viridis as uint8 [n, 3], from plotly's colour list."""
    from plotly.colors import hex_to_rgb, sequential

    anchors = np.array([hex_to_rgb(c) for c in sequential.Viridis], np.float64)
    at = np.linspace(0, len(anchors) - 1, n)
    lo = np.floor(at).astype(int).clip(0, len(anchors) - 2)
    frac = (at - lo)[:, None]
    return np.round(anchors[lo] * (1 - frac) + anchors[lo + 1] * frac).astype(np.uint8)


def normalised(scores: np.ndarray) -> np.ndarray:
    """Scores -> 0..1 per image (ranker scores are logits: only their order within an image matters)."""
    scores = np.asarray(scores, np.float64)
    lo, hi = scores.min(axis=-1, keepdims=True), scores.max(axis=-1, keepdims=True)
    return ((scores - lo) / np.where(hi > lo, hi - lo, 1.0)).astype(np.float32)


def heat_overlay(image: np.ndarray, scores: np.ndarray, grid: int, alpha: float = 0.55) -> np.ndarray:
    """uint8 [S, S, C] image and scores [L] -> uint8 RGB [S, S, 3]: the image under the colour-mapped map."""
    size = image.shape[0]
    level = (normalised(scores) * 255).round().astype(np.int64).reshape(grid, grid)
    cell = -(-size // grid)
    colours = _colormap()[np.kron(level, np.ones((cell, cell), np.int64))[:size, :size]]
    rgb = image.repeat(3, axis=2) if image.shape[2] == 1 else image
    return np.round((1 - alpha) * rgb + alpha * colours).astype(np.uint8)


def _rgb(img: np.ndarray) -> np.ndarray:
    return img.repeat(3, axis=2) if img.shape[2] == 1 else img


def panels_png(view: PatchView, out: str | Path, min_side: int = 224) -> Path:
    """Write original | heatmap | kept patches | reconstruction side by side, labelled, as a PNG."""
    from PIL import Image, ImageDraw

    panels = [_rgb(view.original), heat_overlay(view.original, view.scores, view.grid), _rgb(view.kept),
              _rgb(view.reconstruction)]
    titles = ["original", "patch scores", f"kept {len(view.keep)}/{view.scores.size} patches",
              "MAE reconstruction"]
    factor = max(1, -(-min_side // panels[0].shape[0]))
    side, gap, head = panels[0].shape[0] * factor, 8, 18
    sheet = Image.new("RGB", (4 * side + 3 * gap, side + head), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (panel, title) in enumerate(zip(panels, titles)):
        x = i * (side + gap)
        sheet.paste(Image.fromarray(panel.repeat(factor, 0).repeat(factor, 1)), (x, head))
        draw.text((x + 2, 3), title, fill="black")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    return out
