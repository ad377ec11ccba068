"""A small labelled set of real photos, built at run time from Debian's wallpapers (no download).

`make data` installs `gnome-backgrounds` (WebP, /usr/share/backgrounds/gnome) and `ukui-wallpapers`
(PNG and JPEG, /usr/share/backgrounds), 2400-4096 px images. `build_photo_set` takes a few of them,
one class per source image, and writes several variants of each (a random crop, rescaled to 600-1000 px
on the long side, re-encoded as JPEG, PNG or WebP) into `root/<split>/<class>/`. Variants of one source
are near-duplicates: the redundant groups of the set. One JPEG per class is stored rotated with an EXIF
orientation tag, so that only a reader that applies the tag sees it upright.

    from tests.photos import photo_set, require_photos
    photos = photo_set(tmp_path / "photos")   # 6 classes x 6 images: built once per process, then copied

Importable by any test; `require_photos()` skips the calling test when the packages are missing.
"""
from __future__ import annotations

import atexit
import copy
import io
import shutil
import tempfile
from dataclasses import dataclass, field
from functools import cache, lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

WALLPAPERS = Path("/usr/share/backgrounds")
# One class per source: four JPEGs and a PNG (ukui-wallpapers), a WebP (gnome-backgrounds).
SOURCES = {
    "city": "city.png",
    "default": "2004default.jpg",
    "generation": "firstgeneration.jpg",
    "mouse": "the-mouse.jpg",
    "string": "string.jpg",
    "symbolic": "gnome/symbolic-l.webp",
}
FORMATS = ("JPEG", "PNG", "WEBP")
EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
ORIENTATION = 0x0112       # EXIF tag
ROTATED_CW = 6             # "rotate 90 degrees clockwise to display": stored 90 degrees counter-clockwise


@dataclass
class PhotoSet:
    root: Path
    files: list[dict] = field(default_factory=list)  # path (relative), label, split, format, upright (w, h)

    @property
    def rotated(self) -> list[dict]:
        """The files stored rotated with an EXIF orientation tag."""
        return [f for f in self.files if f["exif_rotated"]]

    def upright(self, path: str) -> np.ndarray:
        """The variant as it is meant to be seen (uint8 [H, W, 3]), before it was encoded."""
        return next(f["pixels"] for f in self.files if f["path"] == path)


def missing_sources() -> list[str]:
    return [p for p in SOURCES.values() if not (WALLPAPERS / p).is_file()]


def require_photos() -> None:
    """Skip the calling test if the wallpapers are not installed (`make data` installs them)."""
    import pytest

    if missing_sources():
        pytest.skip("Debian's gnome-backgrounds and ukui-wallpapers are not installed (make data)")


@cache
def _source(name: str, side: int = 1200) -> Image.Image:
    """A wallpaper decoded once per process, at about `side` px on the long side (JPEGs by DCT scaling)."""
    with Image.open(WALLPAPERS / SOURCES[name]) as im:
        im.draft("RGB", (side, side))
        im = im.convert("RGB")
    im.thumbnail((side, side), Image.Resampling.LANCZOS)
    return im


def photo_set(root: Path, classes: int = 6, per_class: int = 6, seed: int = 0) -> PhotoSet:
    """`build_photo_set` into `root`: built once per process (a few seconds), then copied (same bytes, so
    the same content ids; new files, so a test may change or delete them)."""
    built = _built(classes, per_class, seed)
    shutil.copytree(built.root, root)
    out = copy.copy(built)
    out.root = Path(root)
    return out


@lru_cache(maxsize=4)
def _built(classes: int, per_class: int, seed: int) -> PhotoSet:
    folder = tempfile.mkdtemp(prefix="redex-photos-")
    atexit.register(shutil.rmtree, folder, True)
    return build_photo_set(Path(folder) / "photos", classes, per_class, seed)


def build_photo_set(root: Path, classes: int = 6, per_class: int = 6, seed: int = 0) -> PhotoSet:
    """Write `classes` x `per_class` photos under `root` (the last of each class in test/, the rest in
    train/); variant 1 of each class is a landscape JPEG stored rotated with an EXIF orientation tag."""
    rng = np.random.default_rng(seed)
    out = PhotoSet(Path(root))
    for c, label in enumerate(list(SOURCES)[:classes]):
        src = _source(label)
        for j in range(per_class):
            rotated = j == 1
            img = _variant(src, rng, landscape=rotated)
            fmt = "JPEG" if rotated else FORMATS[(c + j) % len(FORMATS)]
            split = "test" if j == per_class - 1 else "train"
            rel = f"{split}/{label}/{label}-{j}.{EXTENSIONS[fmt]}"
            path = out.root / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(_encode(img, fmt, rotated))
            out.files.append({"path": rel, "label": label, "split": split, "format": fmt, "size": img.size,
                              "exif_rotated": rotated, "pixels": np.asarray(img)})
    return out


def _variant(src: Image.Image, rng: np.random.Generator, landscape: bool) -> Image.Image:
    """A random crop (60-95 % of each side, aspect 0.7-1.5; wider than tall if `landscape`), rescaled to
    600-1000 px on its long side."""
    w, h = src.size
    cw, ch = int(w * rng.uniform(0.6, 0.95)), int(h * rng.uniform(0.6, 0.95))
    aspect = float(np.clip(cw / ch, 0.7, 1.5))
    if landscape:
        aspect = max(aspect, 1.25)
    ch = min(h, int(cw / aspect))
    cw = min(w, int(ch * aspect))
    x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    long_side = int(rng.integers(600, 1001))
    scale = long_side / max(cw, ch)
    return src.crop((x, y, x + cw, y + ch)).resize((round(cw * scale), round(ch * scale)),
                                                   Image.Resampling.BICUBIC)


def _encode(img: Image.Image, fmt: str, rotated: bool) -> bytes:
    buf = io.BytesIO()
    if rotated:  # stored turned 90 degrees counter-clockwise; the tag says to turn it back
        exif = Image.Exif()
        exif[ORIENTATION] = ROTATED_CW
        img.transpose(Image.Transpose.ROTATE_90).save(buf, format="JPEG", quality=90, exif=exif.tobytes())
    elif fmt == "JPEG":
        img.save(buf, format="JPEG", quality=90)
    elif fmt == "WEBP":
        img.save(buf, format="WEBP", quality=85, method=2)
    else:
        img.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()
