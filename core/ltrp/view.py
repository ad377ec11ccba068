"""What the heatmap page and `redex ltrp show` draw: one image, its scores, kept patches, reconstruction."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core.data.catalog import DatasetError, get_dataset, images_table, load_pixels
from core.data.decode import BadImage, decode
from core.store.db import Store, get_store

MASK_GREY = 110  # fill of the dropped patches in the "kept patches" view


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
    from core.ltrp.vit import fit_input
    from core.training.pixels import pixels_view

    x = fit_input(pixels_view(images).float(), mae.cfg.img_size, mae.cfg.in_chans)
    return x.round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()


def patch_view(mae, pixels: np.ndarray, scores: np.ndarray, keep_ratio: float) -> PatchView:
    """One image (`pixels` uint8 [H, W, C]) with its score map `[L]` kept at `keep_ratio`."""
    from core.ltrp import ranker
    from core.ltrp.mae import reconstruct

    grid, patch = mae.cfg.grid, mae.cfg.patch_size
    scores = np.asarray(scores, np.float32)
    if scores.shape != (grid * grid,):
        raise ValueError(f"score map of {scores.size} patches for an MAE with {grid * grid}")
    keep = ranker.top_k(scores, keep_ratio)
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
