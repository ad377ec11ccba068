"""Each consumer reads at its own resolution: display thumbnails made by the scan, EXIF orientation,
LTRP at a pretrained MAE's 224 px read from the source files, heatmaps over the full-resolution image.

Real components: real photos (Debian's wallpapers, `tests/photos.py`), a real DuckDB file, decoding
worker processes, a tiny MAE checkpoint in the official layout at 224 px.
"""
import io

import numpy as np
import pytest
import torch
from PIL import Image
from streamlit.testing.v1 import AppTest

from core.data import catalog, decode, scan, sources
from core.ltrp import inputs, scoring
from core.ltrp import models as ltrp_models
from core.ltrp import ranker as ltrp_ranker
from core.ltrp import view as ltrp_view
from core.ltrp.mae import MAEConfig, MaskedAutoencoder
from pages import widgets
from tests.photos import photo_set, require_photos

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def photos(tmp_path):
    require_photos()
    return photo_set(tmp_path / "photos")


def thumbnails(store) -> dict:
    return {r[0]: r[1:] for r in store.query("SELECT image_id, format, width, height, data FROM thumbnails")}


def test_scan_stores_upright_thumbnails_and_a_rescan_reuses_them(store, photos, monkeypatch):
    monkeypatch.setenv("REDEX_DECODE_WORKERS", "2")  # 36 files: decoded by 2 worker processes
    name = sources.register(str(photos.root), "photos", store=store)
    report = scan.scan(name, store)
    assert (report.images, report.skipped, report.decoded) == (36, 0, 36)
    ds = catalog.get_dataset(name, store)
    assert (ds["image_size"], ds["channels"]) == (64, 3)  # the pixel cache stays at the working size
    table = catalog.images_table(name, store).set_index("path")

    thumbs = thumbnails(store)
    assert set(thumbs) == set(table.image_id)  # one per content id
    for f in photos.files:
        fmt, w, h, data = thumbs[table.image_id[f["path"]]]
        uw, uh = f["size"]
        assert fmt == "WEBP" and data[:4] == b"RIFF" and data[8:12] == b"WEBP" and len(data) < 40_000
        assert max(w, h) == decode.THUMB_SIDE and abs(w / h - uw / uh) < 0.02  # aspect kept, upright
        assert (table.width[f["path"]], table.height[f["path"]]) == (uw, uh)

    # A file stored turned by 90 degrees with an EXIF orientation tag is upright in the thumbnail and the
    # pixel cache: it matches the picture before it was encoded, not the stored (turned) one.
    for f in photos.rotated:
        row = int(table.row[f["path"]])
        shown = catalog.display_images(name, [row], store)[0]
        assert shown.shape[1] > shown.shape[0]  # landscape, as meant
        expected = np.asarray(Image.fromarray(f["pixels"]).resize(shown.shape[1::-1], Image.Resampling.LANCZOS))
        assert np.abs(shown.astype(int) - expected).mean() < 8
        working = decode.fit_square(Image.fromarray(f["pixels"]), 64, 3)
        assert np.abs(catalog.load_pixels(name, store)[row].astype(int) - working).mean() < 8

    # A rescan decodes nothing and keeps every thumbnail.
    again = scan.scan(name, store)
    assert (again.reused, again.decoded) == (36, 0)
    assert thumbnails(store) == thumbs

    # A cache from before thumbnails: the pages show the pixel cache; the next scan (in this process
    # now) decodes the files again to fill them in, with the same bytes as the workers made.
    with store.write() as con:
        con.execute("DELETE FROM thumbnails")
    assert catalog.display_images(name, [0, 1], store)[1].shape == (64, 64, 3)
    monkeypatch.setenv("REDEX_DECODE_WORKERS", "1")
    filled = scan.scan(name, store)
    assert (filled.reused, filled.decoded) == (0, 36)
    assert thumbnails(store) == thumbs

    # The groups' sheet: photos in 176 px tiles, 8 a line, sharp where the pixel cache was 64 px.
    rows = table.row.to_numpy()[:10]
    sheet = widgets.mosaic(widgets.Gallery(name, "v1"), rows, kept=int(rows[3]))
    assert sheet.shape == (2 * widgets.PHOTO_TILE + 4, 8 * (widgets.PHOTO_TILE + 4) - 4, 3)
    red = np.all(sheet == (230, 40, 40), axis=2)
    assert red[:widgets.PHOTO_TILE, :widgets.PHOTO_TILE].sum() > 2000 and red.sum() == red[:176, :176].sum()
    old = widgets.mosaic(catalog.load_pixels(name, store), rows)  # what a cache without thumbnails shows
    assert old.shape[0] == 64  # the 64-px cache at its own size (the browser scales it)
    # The Embedding map's grid of selected images draws the thumbnails (one query for the rows).
    at = AppTest.from_function(_grid, args=(name, [int(r) for r in rows[:5]]), default_timeout=60).run()
    assert not at.exception and len(at.get("image")) == 5
    # Removing a dataset's files drops their thumbnails at the next scan, unless another dataset has them.
    for f in photos.files[6:]:
        (photos.root / f["path"]).unlink()
    scan.scan(name, store)
    assert len(thumbnails(store)) == 6
    # Removing the dataset removes the thumbnails no other dataset shares.
    sources.remove_dataset(name, store)
    assert thumbnails(store) == {}


def _grid(name: str, rows: list[int]) -> None:
    from pages import widgets

    widgets.image_grid(widgets.Gallery(name), rows, [str(r) for r in rows])


def official_mae(img_size: int = 224, patch: int = 16) -> dict[str, torch.Tensor]:
    """A tiny MAE with its decoder, saved under the official models_mae parameter names."""
    cfg = MAEConfig(img_size=img_size, patch_size=patch, in_chans=3, embed_dim=32, depth=1, heads=1,
                    decoder_embed_dim=32, decoder_depth=1, decoder_heads=1)
    torch.manual_seed(0)
    state = MaskedAutoencoder(cfg).state_dict()
    return {"model": {k: v for k, v in state.items() if k not in ("pixel_mean", "pixel_std")}}


TINY = {"ranker_epochs": 1, "ranker_batch": 8, "ranker_images": 8,  # 224 px: 20 decodings of 196 patches an image
        "ranker_config": {"embed_dim": 32, "depth": 1, "heads": 2}}


def test_ltrp_with_a_224_px_mae_reads_the_source_files_at_224(store, photos, tmp_path, monkeypatch):
    monkeypatch.setenv("REDEX_DECODE_WORKERS", "2")
    monkeypatch.setattr(inputs, "PARALLEL_MIN", 8)  # the DataLoader's worker processes, even for 36 files
    name = sources.register(str(photos.root), "photos", store=store)
    scan.scan(name, store)
    checkpoint = tmp_path / "mae_visualize_tiny.pth"
    torch.save(official_mae(), checkpoint)
    ids = ltrp_models.train_ltrp(name, ltrp_models.LtrpSettings(**TINY), checkpoint=str(checkpoint), store=store)
    assert scoring.score_dataset(name, ids["ranker_id"], store=store)["scored"] == 36
    table, maps = scoring.load_scores(name, ids["ranker_id"], store=store)
    assert maps.shape == (36, 196)  # ViT-B/16's grid: 14 x 14 patches of 16 px

    # The maps are the ranker's on each file decoded at 224 px (upright, short side, centre crop), not on
    # the 64-px pixel cache blown up to 224.
    ranker = ltrp_models.load_ranker_model(ids["ranker_id"], store)
    root = photos.root
    at_224 = np.stack([decode.load_square(root / p, 224, 3, i) for p, i in zip(table.path, table.image_id)])
    np.testing.assert_allclose(maps, ltrp_ranker.score_maps(ranker, at_224), rtol=1e-4, atol=1e-4)
    cache = catalog.load_pixels(name, store)[table.row.to_numpy()]
    assert np.abs(maps - ltrp_ranker.score_maps(ranker, cache)).max() > 1e-2
    assert not inputs.ModelImages(name, 64, store).sources  # a MAE trained here keeps the working size

    # The heatmap is drawn over the source at display resolution, the model sees 224 px.
    mae = ltrp_models.load_mae_model(ids["ranker_id"], store)
    image = ltrp_view.images_at(name, [int(table.row[0])], store)[0]
    view = ltrp_view.image_view(mae, image, maps[0], 0.25)
    assert view.original.shape == (224, 224, 3) and view.reconstruction.shape == (224, 224, 3)
    short = min(Image.open(root / image.path).size)
    assert view.display.shape == (min(short, ltrp_view.DISPLAY_SIDE),) * 2 + (3,)
    assert view.kept.shape == view.display.shape and (view.kept == ltrp_view.MASK_GREY).any()
    png = ltrp_view.panels_png(view, tmp_path / "heat.png")
    assert Image.open(png).size[1] == view.display.shape[0] + 18

    # A file gone or changed since the scan is scored from the pixel cache (counted), never skipped.
    gone, changed = table.path[1], table.path[2]
    (root / gone).unlink()
    buf = io.BytesIO()
    Image.new("RGB", (700, 500), "red").save(buf, format="JPEG")
    (root / changed).write_bytes(buf.getvalue())
    with store.write() as con:
        con.execute("DELETE FROM patch_scores WHERE list_contains(?, image_id)", [list(table.image_id[:3])])
    again = scoring.score_dataset(name, ids["ranker_id"], store=store)
    assert (again["scored"], again["from_pixel_cache"]) == (3, 2)
    _, rescored = scoring.load_scores(name, ids["ranker_id"], store=store)
    fallback = inputs.resize_square(np.asarray(catalog.load_pixels(name, store)[int(table.row[1])]), 224)
    np.testing.assert_allclose(rescored[1], ltrp_ranker.score_maps(ranker, fallback[None])[0], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(rescored[0], maps[0], rtol=1e-4, atol=1e-4)


def test_a_large_jpeg_is_decoded_at_the_smallest_scale_that_keeps_what_the_reader_needs(tmp_path):
    # `open_image(path, min_side)` promised a reduced-scale JPEG decode and never asked libjpeg for one: a
    # 3-9 Mpx photo was decoded whole for a 235 px model input (3.8x the CPU of the reduced decode).
    require_photos()
    from tests.photos import WALLPAPERS, SOURCES

    path = WALLPAPERS / SOURCES["default"]  # a large JPEG
    full = decode.open_image(path)
    assert min(full.size) >= 4 * 235
    small = decode.open_image(path, 235)
    assert 235 <= min(small.size) < 2 * 235  # 1/2, 1/4 or 1/8 of the file, never below what was asked
    assert abs(small.size[0] / small.size[1] - full.size[0] / full.size[1]) < 0.01
    near = np.asarray(full.resize(small.size, Image.Resampling.BOX), np.float32)
    assert np.abs(np.asarray(small, np.float32) - near).mean() < 4  # the same picture, on a 0-255 scale
    png = tmp_path / "same.png"
    full.save(png)
    assert decode.open_image(png, 235).size == full.size  # other formats have no reduced decode: whole
