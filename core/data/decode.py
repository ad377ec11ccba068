"""Decoding one image file: validation, mode conversion, the working size, content and pixel hashes."""
from __future__ import annotations

import hashlib
import io
import os
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

MAX_PIXELS = int(os.environ.get("REDEX_MAX_PIXELS", str(64 * 1024 * 1024)))
SMALL_IMAGE_MAX = 64      # uniform images up to this size keep their native size
DEFAULT_WORKING_SIZE = 64  # otherwise images are resized (short side) and centre-cropped to this
GRAY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"}


# -- decoding one image ------------------------------------------------------------------------
@dataclass
class Decoded:
    image_id: str
    pixel_hash: str
    pixels: np.ndarray | None   # [S, S, C] uint8 at the working size
    width: int
    height: int
    mode: str
    note: str | None = None     # conversion made, if any


def decode(data: bytes, size: int, channels: int) -> Decoded:
    """Validate and decode one file's bytes. Raises `BadImage` with a user-facing reason."""
    if not data:
        raise BadImage("empty file (0 bytes)")
    image_id = hashlib.blake2b(data, digest_size=16).hexdigest()
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            im = Image.open(io.BytesIO(data))
            mode, (w, h) = im.mode, im.size
            if w * h > MAX_PIXELS:
                raise BadImage(f"decompression bomb: {w}x{h} = {w * h:,} pixels (limit {MAX_PIXELS:,};"
                               " REDEX_MAX_PIXELS raises it)")
            im.load()
        except BadImage:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise BadImage(f"decompression bomb: {exc}") from None
        except UnidentifiedImageError:
            raise BadImage("not an image (format not recognised)") from None
        except (OSError, SyntaxError, ValueError) as exc:
            raise BadImage(f"truncated or corrupt image data: {exc}") from None
    im, note = _normalise_mode(im)
    arr = np.asarray(im)
    pixel_hash = hashlib.blake2b(arr.tobytes() + str(arr.shape).encode(), digest_size=16).hexdigest()
    return Decoded(image_id, pixel_hash, _to_working(im, size, channels), w, h, mode, note)


class BadImage(Exception):
    """A file that cannot be used; the message is the reason shown to the user."""


def _normalise_mode(im: Image.Image) -> tuple[Image.Image, str | None]:
    """8-bit L or RGB. Returns the image and a note describing any conversion."""
    mode = im.mode
    if mode in ("L", "RGB"):
        return im, None
    if mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
        if im.mode == "RGB":
            return im, "palette image converted to RGB"
    if im.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        flat = Image.alpha_composite(background, rgba).convert("RGB")
        return flat, f"{mode} image: transparency flattened onto white"
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(im, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        scaled = np.zeros_like(arr) if hi == lo else (arr - lo) / (hi - lo) * 255.0
        return Image.fromarray(scaled.round().astype(np.uint8), mode="L"), f"{mode} image rescaled to 8-bit"
    if im.mode == "1":
        return im.convert("L"), "1-bit image converted to 8-bit grayscale"
    if im.mode == "CMYK":
        return im.convert("RGB"), "CMYK image converted to RGB"
    return im.convert("RGB"), f"{mode} image converted to RGB"


def _to_working(im: Image.Image, size: int, channels: int) -> np.ndarray:
    """Resize (short side) and centre-crop to size x size, with `channels` channels: [S, S, C]."""
    im = im.convert("L" if channels == 1 else "RGB")
    if im.size != (size, size):
        im = ImageOps.fit(im, (size, size), Image.Resampling.BILINEAR)
    arr = np.asarray(im, dtype=np.uint8)
    return arr[:, :, None] if arr.ndim == 2 else arr
