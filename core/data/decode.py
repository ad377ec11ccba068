"""Decoding one image file: validation, mode conversion, the working size, content and pixel hashes."""
from __future__ import annotations

import hashlib
import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from core.paths import special_kind

MAX_PIXELS = int(os.environ.get("REDEX_MAX_PIXELS", str(64 * 1024 * 1024)))
SMALL_IMAGE_MAX = 64      # uniform images up to this size keep their native size
DEFAULT_WORKING_SIZE = 64  # otherwise images are resized (short side) and centre-cropped to this
GRAY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"}
DEFAULT_MAX_FILE_BYTES = 512 * 1024 * 1024


def max_file_bytes() -> int:
    """Largest file read as an image (`REDEX_MAX_FILE_BYTES`, default 512 MiB)."""
    return int(os.environ.get("REDEX_MAX_FILE_BYTES") or DEFAULT_MAX_FILE_BYTES)


# -- reading one file --------------------------------------------------------------------------
def check_file(path: Path) -> os.stat_result:
    """Refuse, before any read, what is not a regular file of at most `max_file_bytes()`.

    Raises `BadImage` with the reason: missing, unreadable, a device, FIFO, socket or folder (opening a
    FIFO would block, reading /dev/zero would never end), or too large.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise BadImage("file not found") from None
    except (OSError, ValueError) as exc:
        raise BadImage(f"unreadable: {getattr(exc, 'strerror', None) or exc}") from None
    kind = special_kind(st.st_mode)
    if kind:
        raise BadImage(f"not a regular file ({kind}): refused without reading it")
    limit = max_file_bytes()
    if st.st_size > limit:
        raise BadImage(f"file too large: {st.st_size:,} bytes (limit {limit:,}; REDEX_MAX_FILE_BYTES raises it)")
    return st


def read_file(path: Path) -> bytes:
    """The bytes of an image file, after `check_file`; never more than the size limit is read."""
    size, limit = check_file(path).st_size, max_file_bytes()
    try:
        with open(path, "rb") as f:
            data = f.read(size + 1)  # one byte more shows a file that grew (or reports size 0, as /proc does)
            if len(data) > size:
                data += f.read(limit + 1 - len(data))
    except FileNotFoundError:
        raise BadImage("file not found") from None
    except OSError as exc:
        raise BadImage(f"unreadable: {exc.strerror or exc}") from None
    if len(data) > limit:  # it grew since the check
        raise BadImage(f"file too large: over {limit:,} bytes (REDEX_MAX_FILE_BYTES raises it)")
    return data


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
    image_id = hashlib.blake2b(data, digest_size=16).hexdigest() if data else ""
    im = _open(data)
    mode, (w, h) = im.mode, im.size
    im, note = _normalise_mode(im)
    arr = np.asarray(im)
    pixel_hash = hashlib.blake2b(arr.tobytes() + str(arr.shape).encode(), digest_size=16).hexdigest()
    return Decoded(image_id, pixel_hash, _to_working(im, size, channels), w, h, mode, note)


def open_image(path: Path) -> Image.Image:
    """One source file as a full-resolution 8-bit L or RGB image, upright (EXIF orientation applied).

    The same checks as a scan (regular file, size limit, decompression bomb); raises `BadImage`.
    This is what consumers that read at their own resolution (pretrained backbones, LTRP at the
    MAE's size, display thumbnails) start from.
    """
    im = _open(read_file(Path(path)))
    try:
        im = ImageOps.exif_transpose(im)
    except (OSError, SyntaxError, ValueError, KeyError, TypeError):
        pass  # an unreadable EXIF block leaves the image as stored
    return _normalise_mode(im)[0]


def _open(data: bytes) -> Image.Image:
    """Open and fully load image bytes, refusing empty data, unknown formats, bombs and corrupt data."""
    if not data:
        raise BadImage("empty file (0 bytes)")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            im = Image.open(io.BytesIO(data))
            w, h = im.size
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
    return im


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
