"""What the heatmap page and `redex ltrp show` draw: one image, its scores, kept patches, reconstruction."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core.data.catalog import (
    DatasetError,
    display_images,
    get_dataset,
    images_table,
    load_pixels,
)
from core.data.decode import (
    BadImage,
    content_id,
    decode,
    fit_square,
    load_square,
    open_bytes,
    read_file,
)
from core.store.db import Store, get_store

MASK_GREY = 110  # fill of the dropped patches in the "kept patches" view
DISPLAY_SIDE = 448  # the one-image view: the region the model sees, from the source file, at most this wide


# -- one image: resolving it and what is shown -------------------------------------------------
@dataclass(frozen=True)
class ImageRef:
    """One image to show: from the dataset (`row` set) or a file outside it (`row` None)."""
    pixels: np.ndarray            # uint8 [S, S, C] at the dataset's working size
    image_id: str
    path: str
    label: str | None
    row: int | None
    source: Path | None = None    # its file, read again at other resolutions (`model_input`, `display_image`)


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
        return ImageRef(decoded.pixels, decoded.image_id, str(file), None, None, file)
    raise DatasetError(f"no image {ref!r} in {name!r}: give a content id or a path relative to the dataset root"
                       f" (`redex info {name} --ids` lists them), or an image file")


def model_input(image: ImageRef, size: int) -> np.ndarray:
    """`image` as a model of input size `size` sees it: uint8 `[size, size, C]`.

    The working-size pixels when the model works at that size; else the source file decoded again at
    `size` (`core.data.decode.load_square`, as `core.ltrp.inputs` scores a dataset), or, if the file is
    gone or changed, the working-size pixels (the model resizes them)."""
    if image.pixels.shape[0] == size or image.source is None:
        return image.pixels
    try:
        return load_square(image.source, size, image.pixels.shape[2], image.image_id)
    except BadImage:
        return image.pixels


def display_image(image: ImageRef, side: int = DISPLAY_SIDE) -> np.ndarray:
    """The square region a model sees (short side, centre crop) at display resolution: from the source
    file, at most `side` px; the working-size pixels when they are as sharp (small images such as
    Fashion-MNIST) or the file cannot be read."""
    if image.source is None:
        return image.pixels
    from PIL import Image

    try:
        data = read_file(image.source)
        if content_id(data) != image.image_id:  # changed since the scan: not the image scored
            return image.pixels
        im = open_bytes(data, min_side=side)
    except BadImage:
        return image.pixels
    short = min(im.size)
    if short <= image.pixels.shape[0]:
        return image.pixels
    return fit_square(im, min(short, side), image.pixels.shape[2], Image.Resampling.LANCZOS)


def display_squares(name: str, rows, store: Store | None = None) -> list[np.ndarray]:
    """Grids of many images: the centre square (the region the models see) of each image's display
    thumbnail (`core.data.catalog.display_images`), or its pixel-cache row."""
    out = []
    for img in display_images(name, rows, store):
        h, w = img.shape[:2]
        s = min(h, w)
        out.append(img[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s])
    return out


@dataclass(frozen=True)
class PatchView:
    """What the page and `redex ltrp show` draw for one image at one keep ratio (model size S, display
    size D: the same region at display resolution, D = S unless a display image was given)."""
    original: np.ndarray          # uint8 [S, S, C]: what the model saw
    scores: np.ndarray            # float32 [L], row-major patches
    grid: int
    patch: int
    keep: np.ndarray              # int64 [K] kept patch indices, best first
    kept: np.ndarray              # uint8 [D, D, C]: kept patches, the others grey
    reconstruction: np.ndarray    # uint8 [S, S, C]: MAE from the kept patches only, kept ones pasted
    display: np.ndarray           # uint8 [D, D, C]: the image drawn under the heatmap

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


def patch_view(mae, pixels: np.ndarray, scores: np.ndarray, keep_ratio: float,
               display: np.ndarray | None = None) -> PatchView:
    """One image (`pixels` uint8 [H, W, C], ideally at the model's size) with its score map `[L]` kept at
    `keep_ratio`; the kept patches are drawn on `display` (the same region at display resolution; default:
    what the model sees)."""
    from core.ltrp import ranker
    from core.ltrp.mae import reconstruct

    grid, patch = mae.cfg.grid, mae.cfg.patch_size
    scores = np.asarray(scores, np.float32)
    if scores.shape != (grid * grid,):
        raise ValueError(f"score map of {scores.size} patches for an MAE with {grid * grid}")
    keep = ranker.top_k(scores, keep_ratio)
    original = model_pixels(mae, pixels[None])[0]
    display = original if display is None else display
    pasted, _ = reconstruct(mae, pixels[None], keep[None])
    return PatchView(original, scores, grid, patch, keep, kept_patches(display, keep, grid), pasted[0], display)


def image_view(mae, image: ImageRef, scores: np.ndarray, keep_ratio: float) -> PatchView:
    """`patch_view` of a dataset image (or file): the model's input at its own size (`model_input`), the
    heatmap and kept patches over the source at display resolution (`display_image`)."""
    return patch_view(mae, model_input(image, mae.cfg.img_size), scores, keep_ratio, display_image(image))


def patch_cells(shape: tuple[int, int], grid: int) -> np.ndarray:
    """int64 [H, W]: the row-major patch index under each pixel of an H x W rendering of the grid."""
    h, w = shape
    return (np.arange(h) * grid // h)[:, None] * grid + (np.arange(w) * grid // w)[None, :]


def kept_at(image: np.ndarray, scores: np.ndarray, grid: int, keep_ratio: float) -> np.ndarray:
    """uint8 [H, W, C]: `image` with only its top `keep_ratio` patches by `scores` [L] (`kept_patches`)."""
    from core.ltrp.ranker import top_k

    return kept_patches(image, top_k(np.asarray(scores), keep_ratio), grid)


def kept_patches(image: np.ndarray, keep: np.ndarray, grid: int) -> np.ndarray:
    """uint8 [H, W, C]: `image` with the patches not in `keep` grey."""
    mask = np.zeros(grid * grid, bool)
    mask[np.asarray(keep)] = True
    pixel_mask = mask[patch_cells(image.shape[:2], grid)][..., None]
    return np.where(pixel_mask, image, np.uint8(MASK_GREY)).astype(np.uint8)


def images_at(name: str, rows, store: Store | None = None) -> list[ImageRef]:
    """The dataset's images at these pixel-cache rows, in that order."""
    store = store or get_store()
    table = images_table(name, store).set_index("row")
    pixels = load_pixels(name, store)
    root = Path(get_dataset(name, store)["root"])
    return [ImageRef(np.asarray(pixels[int(r)]), table.image_id[r], table.path[r], table.label[r], int(r),
                     root / table.path[r]) for r in rows]


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
    """uint8 [H, W, C] image and scores [L] -> uint8 RGB [H, W, 3]: the image under the colour-mapped map."""
    level = (normalised(scores) * 255).round().astype(np.int64).ravel()
    colours = _colormap()[level[patch_cells(image.shape[:2], grid)]]
    rgb = image.repeat(3, axis=2) if image.shape[2] == 1 else image
    return np.round((1 - alpha) * rgb + alpha * colours).astype(np.uint8)


def _rgb(img: np.ndarray) -> np.ndarray:
    return img.repeat(3, axis=2) if img.shape[2] == 1 else img


def panels_png(view: PatchView, out: str | Path, min_side: int = 224) -> Path:
    """Write original | heatmap | kept patches | reconstruction side by side, labelled, as a PNG."""
    from PIL import Image, ImageDraw

    panels = [_rgb(view.display), heat_overlay(view.display, view.scores, view.grid), _rgb(view.kept),
              _rgb(view.reconstruction)]
    titles = ["original", "patch scores", f"kept {len(view.keep)}/{view.scores.size} patches",
              "MAE reconstruction"]
    factor = max(1, -(-min_side // panels[0].shape[0]))
    side, gap, head = panels[0].shape[0] * factor, 8, 18
    sheet = Image.new("RGB", (4 * side + 3 * gap, side + head), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (panel, title) in enumerate(zip(panels, titles)):
        x = i * (side + gap)
        shown = Image.fromarray(panel)  # nearest neighbours: small images and the MAE's output stay crisp
        sheet.paste(shown.resize((side, side), Image.Resampling.NEAREST) if panel.shape[0] != side else shown,
                    (x, head))
        draw.text((x + 2, 3), title, fill="black")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    return out
