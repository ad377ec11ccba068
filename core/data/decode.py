"""Decoding one image file: validation, EXIF orientation, mode conversion, the working size, the display
thumbnail, content and pixel hashes; and reading a source file again at another resolution (`load_square`)."""
from __future__ import annotations

import hashlib
import io
import math
import os
import signal
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
THUMB_SIDE = 256           # display thumbnails: long side in px (aspect kept), never upscaled
# WebP at quality 80, encoder effort 2 of 6: about 4 KB a thumbnail, half a JPEG's; effort 4 (the default)
# costs 40 % more time for 3 % fewer bytes (docs/benchmarks.md, "Per-image caches")
THUMB_FORMAT, THUMB_QUALITY, THUMB_METHOD = "WEBP", 80, 2


def max_file_bytes() -> int:
    """Largest file read as an image (`REDEX_MAX_FILE_BYTES`, default 512 MiB)."""
    return int(os.environ.get("REDEX_MAX_FILE_BYTES") or DEFAULT_MAX_FILE_BYTES)


def decode_workers(reserve: int = 0) -> int:
    """Worker processes for decoding many source files: `REDEX_DECODE_WORKERS` (0 or 1: decode in this
    process), else the CPUs this process may use less `reserve` (those kept for a model running beside
    the workers: the timm embedder reserves one), between 1 and 16."""
    value = os.environ.get("REDEX_DECODE_WORKERS")
    if value:
        return max(0, int(value))
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return min(16, max(1, cpus - reserve))


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
    width: int                  # upright (EXIF orientation applied)
    height: int
    mode: str
    note: str | None = None     # conversion made, if any
    thumbnail: Thumbnail | None = None  # when asked for and `needs_thumbnail`


@dataclass(frozen=True)
class Thumbnail:
    """A display thumbnail (`make_thumbnail`): WebP bytes and their size in px."""
    data: bytes
    width: int
    height: int


def decode(data: bytes, size: int, channels: int, thumbnail: bool = False) -> Decoded:
    """Validate and decode one file's bytes, upright. Raises `BadImage` with a user-facing reason.

    `thumbnail`: also make the display thumbnail if the working size does not hold the whole image
    (`needs_thumbnail`).
    """
    image_id = content_id(data)
    im = _open(data)
    mode = im.mode
    im = upright(im)
    w, h = im.size
    im, note = _normalise_mode(im)
    arr = np.asarray(im)
    pixel_hash = hashlib.blake2b(arr.tobytes() + str(arr.shape).encode(), digest_size=16).hexdigest()
    thumb = make_thumbnail(im) if thumbnail and needs_thumbnail(w, h, size) else None
    return Decoded(image_id, pixel_hash, fit_square(im, size, channels), w, h, mode, note, thumb)


def decode_files(paths: list[Path], size: int, channels: int) -> list[Decoded | str]:
    """`decode` (with thumbnails) of each file, or the reason it cannot be used: a scan's batch for one
    worker process."""
    out: list[Decoded | str] = []
    for path in paths:
        try:
            out.append(decode(read_file(path), size, channels, True))
        except BadImage as exc:
            out.append(str(exc))
    return out


def ignore_stop_signals() -> None:
    """Initializer of decoding worker processes: SIGTERM and SIGINT are for the job that owns them, which
    stops at its next progress report and takes its workers with it."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def content_id(data: bytes) -> str:
    """An image's content id: a hash of the file's bytes."""
    return hashlib.blake2b(data, digest_size=16).hexdigest() if data else ""


def upright(im: Image.Image) -> Image.Image:
    """The image as it is meant to be seen: its EXIF orientation applied (an unreadable tag is ignored)."""
    try:
        ImageOps.exif_transpose(im, in_place=True)  # no copy of an image without the tag
    except (OSError, SyntaxError, ValueError, KeyError, TypeError):
        pass  # an unreadable EXIF block leaves the image as stored
    return im


def open_image(path: Path, min_side: int | None = None) -> Image.Image:
    """One source file as a full-resolution 8-bit L or RGB image, upright (EXIF orientation applied).

    The same checks as a scan (regular file, size limit, decompression bomb); raises `BadImage`.
    This is what consumers that read at their own resolution (pretrained backbones, LTRP at the
    MAE's size, display renderings) start from. `min_side`: the caller needs only this many pixels
    on the short side, so a JPEG may be decoded at a reduced scale (DCT scaling; much faster).
    """
    return open_bytes(read_file(Path(path)), min_side)


def open_bytes(data: bytes, min_side: int | None = None) -> Image.Image:
    """`open_image` of bytes already read."""
    return _normalise_mode(upright(_open(data, min_side)))[0]


def load_square(path: Path, size: int, channels: int, image_id: str | None = None) -> np.ndarray:
    """A source file at `size` x `size` px as the working size is made (short side resized, centre crop),
    but from the full-resolution file: uint8 `[size, size, channels]`.

    Bicubic resampling (as the MAE and LTRP evaluation transforms). `image_id`: the content id the
    caller expects; a file that changed since (other bytes) raises `BadImage`, as a missing one does.
    """
    data = read_file(Path(path))
    if image_id is not None and content_id(data) != image_id:
        raise BadImage("the file changed since the scan (other bytes): scan the dataset again")
    im = open_bytes(data, min_side=size)
    return fit_square(im, size, channels, Image.Resampling.BICUBIC)


def needs_thumbnail(width: int, height: int, size: int) -> bool:
    """Whether an image needs a display thumbnail: the working-size pixel cache does not hold all of it
    at its own resolution (it is larger than the working size, or not square and so cropped there)."""
    return width != height or width > size


def make_thumbnail(im: Image.Image, side: int = THUMB_SIDE) -> Thumbnail:
    """A display thumbnail of an L or RGB image: at most `side` px on the long side (aspect kept, never
    upscaled), WebP."""
    w, h = im.size
    if max(w, h) > side:
        scale = side / max(w, h)
        im = im.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.LANCZOS,
                       reducing_gap=3.0)
    buf = io.BytesIO()
    im.save(buf, format=THUMB_FORMAT, quality=THUMB_QUALITY, method=THUMB_METHOD)
    return Thumbnail(buf.getvalue(), *im.size)


def read_thumbnail(data: bytes) -> np.ndarray:
    """Thumbnail bytes -> uint8 `[H, W, 3]`."""
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def _open(data: bytes, min_side: int | None = None) -> Image.Image:
    """Open and fully load image bytes, refusing empty data, unknown formats, bombs and corrupt data.

    `min_side`: a JPEG is decoded at the smallest DCT scale that keeps at least this many pixels on
    both sides (`Image.draft`)."""
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
            if min_side and im.format == "JPEG" and min(w, h) >= 2 * min_side:
                scale = min_side / min(w, h)  # libjpeg scales by 1/2, 1/4 or 1/8 and keeps at least this size
                im.draft(im.mode, (math.ceil(w * scale), math.ceil(h * scale)))
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


def fit_square(im: Image.Image, size: int, channels: int,
               resample: Image.Resampling = Image.Resampling.BILINEAR) -> np.ndarray:
    """Resize (short side) and centre-crop to size x size, with `channels` channels: [S, S, C]."""
    im = im.convert("L" if channels == 1 else "RGB")
    if im.size != (size, size):
        im = ImageOps.fit(im, (size, size), resample)
    arr = np.asarray(im, dtype=np.uint8)
    return arr[:, :, None] if arr.ndim == 2 else arr
