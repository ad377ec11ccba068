"""Small Streamlit widgets shared by the pages (layout only; the data comes from `core`)."""
from __future__ import annotations

import gc
import sys

import numpy as np
import streamlit as st

from core import jobs
from core.data import catalog
from core.embed import embeddings
from core.store import readahead
from core.store.db import get_store


def route_through_app() -> None:
    """Call first in every page: make a deep link opened first on a fresh server go through app.py.

    Streamlit (1.67) starts in its legacy `pages/`-folder mode whenever a `pages/` folder sits beside
    the entry script, and leaves it only once `st.navigation` has run. A first visit to e.g. /training
    therefore ran that page file alone: no page config, and a sidebar listing every file in pages/.
    Leave that mode and rerun: the rerun executes app.py, whose `st.navigation` routes the same URL.
    """
    from streamlit.runtime.pages_manager import PagesManager

    if PagesManager.uses_pages_directory:
        PagesManager.uses_pages_directory = False
        st.rerun()


_modules_frozen = 0


def freeze_imports(min_new: int = 200) -> None:
    """Call after each run (app.py does): after a run that imported many modules, such as the first visit of
    the Datasets page (torch and timm: 370,000 objects), take every object alive now out of the cyclic
    garbage collector's walks (`gc.freeze`, once the garbage of the moment is collected). Python's full
    collections come now and then during reruns and walked them all while holding the GIL: 336 ms for one
    here with torch and timm imported, 3 ms without them, 0 ms once frozen. Frozen objects stay
    reference-counted; only cycles among them are never collected, once per such import."""
    global _modules_frozen
    if len(sys.modules) - _modules_frozen >= min_new:
        gc.collect()
        gc.freeze()
        _modules_frozen = len(sys.modules)


# -- store reads keyed by the store's generation ------------------------------------------------
# A full rerun of a page (the first load, a picker change) would otherwise open the store several
# times (20-200 ms each on a busy machine) and count images (seconds at a million images). These read
# again only after some process committed to the store (`Store.generation`, two stat calls); the ttl
# bounds what a write inside one file-time tick could leave unseen.
def store_generation() -> tuple:
    return get_store().generation()


@st.cache_data(max_entries=8, ttl=60, show_spinner=False)
def _datasets(generation: tuple):
    return catalog.list_datasets()


@st.cache_data(max_entries=32, ttl=60, show_spinner=False)
def _backbones(name: str, generation: tuple):
    return embeddings.list_backbones(name)


def datasets_now():
    """`catalog.list_datasets()`, read again only when the store changed."""
    return _datasets(store_generation())


def backbones_now(name: str):
    """`embeddings.list_backbones(name)`, read again only when the store changed."""
    return _backbones(name, store_generation())


def dataset_picker(key: str = "dataset_picker", *, scanned_only: bool = True) -> str | None:
    """A select box of datasets (those with images, or every registered one); remembers the choice
    across pages (the session) and across reloads and shared links (the URL's ?dataset=). A choice whose
    dataset is gone (removed) falls back to the first one, and the URL says so."""
    df = datasets_now()
    if scanned_only:
        names = [n for n, imgs in zip(df.name, df.images) if imgs] if len(df) else []
    else:
        names = list(df.name)
    if not names:
        st.info("No dataset yet. Add one on the **Datasets** page (one click loads the Fashion-MNIST demo).")
        return None
    current = st.session_state.get("dataset") or st.query_params.get("dataset")
    if current not in names:
        current = st.query_params.get("dataset")
    index = names.index(current) if current in names else 0
    if key in st.session_state and st.session_state[key] not in names:  # a removed dataset's name
        del st.session_state[key]
    name = st.selectbox("Dataset", names, index=index, key=key)  # options are shown as plain text
    st.session_state["dataset"] = name
    if st.query_params.get("dataset") != name:
        st.query_params["dataset"] = name
    return name


def forget_dataset(name: str) -> None:
    """After `name` was removed: it is no longer the selected dataset, in the session or the URL."""
    if st.session_state.get("dataset") == name:
        st.session_state.pop("dataset", None)
    if st.query_params.get("dataset") == name:
        del st.query_params["dataset"]


def upscale_factor(side: int, min_side: int = 84) -> int:
    """The whole factor `upscale` enlarges an image `side` pixels high by (1 for large images)."""
    return max(1, min_side // max(side, 1))


def upscale(img: np.ndarray, min_side: int = 84) -> np.ndarray:
    """Nearest-neighbour upscale of a small [H, W, C] image so it is visible (pixels stay sharp)."""
    factor = upscale_factor(img.shape[0], min_side)
    img = img.repeat(factor, axis=0).repeat(factor, axis=1)
    return img[:, :, 0] if img.shape[2] == 1 else img


def image_format(img: np.ndarray, min_side: int = 84) -> str:
    """`st.image`'s `output_format` for an image as `upscale` shows it: PNG for a small image (Streamlit's
    default, "auto", sends any image without an alpha channel as JPEG: its blocks, drawn 3-6x, smeared the
    pixels of 28-px images); larger ones keep the default."""
    return "PNG" if upscale_factor(img.shape[0], min_side) > 1 else "auto"


def crisp(img: np.ndarray, min_side: int = 84) -> dict:
    """`st.image` arguments for an image as `upscale` shows it, in its `image_format`."""
    return {"image": upscale(img, min_side), "output_format": image_format(img, min_side)}


def outlined(img: np.ndarray, color=(230, 40, 40), width: int = 4) -> np.ndarray:
    """An upscaled thumbnail [H, W, 3] with a coloured frame (the kept image of a group)."""
    img = upscale(img)
    return framed(np.repeat(img[:, :, None], 3, axis=2) if img.ndim == 2 else img, width, color)


class Gallery:
    """A dataset's images as the pages show them, by pixel-cache row (`gallery[row]`, `gallery.get(rows)`):
    the display thumbnails the scan stored (sharp on high-density screens, aspect kept), else the pixel
    cache's rows (small images such as Fashion-MNIST, and caches scanned before thumbnails existed).

    `version`: anything that changes when the dataset is scanned again (default: its scan time); the
    group sheets (`sheets`, shown by `show_sheets`) are kept per version. Keep one Gallery per (dataset, version) (`gallery`): it
    holds the memory-mapped pixel cache, whether the dataset has any thumbnail, and the latest sheets,
    so a slider move reads the store once for all the groups it shows, or not at all."""

    SHEETS_KEPT = 256

    def __init__(self, name: str, version: str | None = None):
        import threading
        from collections import OrderedDict

        self.name = name
        self.version = version if version is not None else str(catalog.get_dataset(name)["scanned_at"])
        self._lock = threading.Lock()
        self._pixels = None
        self._has_thumbnails: bool | None = None
        self._sheets: OrderedDict = OrderedDict()

    def get(self, rows) -> list[np.ndarray]:
        rows = [int(r) for r in rows]
        if self._has_thumbnails is None:
            self._has_thumbnails = catalog.has_thumbnails(self.name)
        if self._has_thumbnails:
            return catalog.display_images(self.name, rows)
        if self._pixels is None:
            self._pixels = catalog.load_pixels(self.name)
            readahead.read_ahead(self._pixels)  # a page of groups reads rows all over the cache
        return list(np.asarray(self._pixels[np.asarray(rows, dtype=np.int64)]))  # one gather, not a read per row

    def __getitem__(self, row) -> np.ndarray:
        return self.get([row])[0]

    def sheets(self, groups: list[tuple[list, int | None]]) -> list[bytes]:
        """The encoded `mosaic` (PNG; JPEG for photos) of each (rows, kept): the images of the sheets not made
        yet are read in one go."""
        keys = [(tuple(int(r) for r in rows), None if kept is None else int(kept)) for rows, kept in groups]
        with self._lock:
            missing = list(dict.fromkeys(k for k in keys if k not in self._sheets))
            if missing:
                wanted = list(dict.fromkeys(r for rows, _ in missing for r in rows))
                images = dict(zip(wanted, self.get(wanted)))
                for rows, kept in missing:
                    self._sheets[(rows, kept)] = _encode_sheet(*_compose(images, rows, kept))
            for k in keys:
                self._sheets.move_to_end(k)
            while len(self._sheets) > self.SHEETS_KEPT:
                self._sheets.popitem(last=False)
            return [self._sheets[k] for k in keys]


@st.cache_resource(max_entries=8, show_spinner=False)
def gallery(name: str, version: str) -> Gallery:
    """The page's `Gallery` of `name` at `version` (e.g. its scan time, or a clustering's state version)."""
    return Gallery(name, version)


def data_uri(img: np.ndarray) -> str:
    """An [H, W, C] (or [H, W]) uint8 image as a data URI (PNG), e.g. for a Plotly image's `source`: a few hundred KB
    where a `z` array of a 448 px image would be megabytes of JSON."""
    import base64
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img[:, :, 0] if img.ndim == 3 and img.shape[2] == 1 else img).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def image_grid(pixels: np.ndarray | Gallery, rows: np.ndarray, captions: list[str] | None = None,
               columns: int = 12, highlight: set | None = None) -> None:
    """Thumbnails of the given pixel-cache rows (of `pixels`, the pixel cache or a `Gallery`); rows in
    `highlight` get a red frame."""
    if len(rows) == 0:
        st.caption("no images")
        return
    images = _images(pixels, rows)
    for i, (row, img) in enumerate(zip(rows, images)):
        if i % columns == 0:  # one st.columns per line: a caption on two lines never shifts a column down
            cols = st.columns(columns)
        with cols[i % columns]:
            # width="stretch": every thumbnail as wide as its column (at "content", an image grew with
            # the length of its caption, so neighbours came out at different sizes)
            st.image(outlined(img) if highlight and row in highlight else upscale(img), width="stretch",
                     caption=md_text(captions[i]) if captions else None,  # captions are Markdown
                     output_format=image_format(img))


def job_status(job: dict) -> None:
    """One job's progress bar and status line, with a cancel button while it is active.

    A queued job's line says what it waits for (e.g. 'waiting for: job 12 (train, run 3 of sweep 2 ...)')."""
    info = jobs.describe(job)
    from core import wording

    label = md_text(f"#{job['id']} {wording.job_kind(job['kind'])} · {info['text']}")  # may hold names and paths
    if job["status"] in jobs.ACTIVE:
        st.progress(info["fraction"] or 0.0, text=label)
        if st.button("Cancel", key=f"cancel-{job['id']}"):
            jobs.cancel(job["id"])
            st.rerun()
    elif job["status"] == "done":
        st.success(label)
    elif job["status"] == "failed":
        st.error(label)
    else:
        st.warning(label)


POLL_EVERY = "2s"


def poll_every(active: bool) -> str | None:
    """`run_every` for a fragment that watches jobs: poll only while something is active.

    Decided on each full run of the page; the fragment must rerun the app (`st.rerun(scope="app")`)
    once nothing is active any more, so that the page is idle again and costs the server nothing."""
    return POLL_EVERY if active else None


def embedded_dataset_picker(backbone_key: str) -> tuple[str, str, int]:
    """Dataset and backbone pickers for pages that need embeddings; stops the page if there are none.

    Returns (dataset, backbone id, number of embedded images).
    """
    name = dataset_picker()
    if name is None:
        st.stop()
    backs = backbones_now(name)
    backs = backs[backs.embedded > 0]
    if backs.empty:
        if not embeddings_in_progress(name, f"{backbone_key}_embed_waiting"):
            st.info("No embeddings yet: start an embedding job on the **Datasets** page.")
        st.stop()
    bid = backbone_picker(list(backs.backbone_id), backbone_key)
    return name, bid, int(backs[backs.backbone_id == bid].embedded.iloc[0])


def backbone_picker(ids: list[str], key: str, label: str = "Backbone") -> str:
    """A select box of backbone ids shown in plain words (`core.wording.plain_labels`); returns the id."""
    from core import wording

    labels = wording.plain_labels(ids)
    return st.selectbox(label, ids, key=key, format_func=labels.get, help="Newest first.")


def jobs_page_link() -> None:
    """A link to the Jobs page (plain text where the page runs alone, as in AppTest: no navigation)."""
    from streamlit.errors import StreamlitPageNotFoundError

    try:
        st.page_link("pages/jobs.py", label="Open the Jobs page", icon=":material/manufacturing:")
    except StreamlitPageNotFoundError:
        st.caption("Every job is on the Jobs page.")


def embeddings_in_progress(name: str, waiting_key: str) -> bool:
    """If an embedding job of `name` is queued or running: say so where embeddings are missing, with its
    live progress and a link to the Jobs page (the page reruns when it ends). True if one is."""
    active = jobs.active_jobs(dataset=name, kinds=("embed",))
    if not active and not st.session_state.get(waiting_key):
        return False
    if active:
        st.info("The embeddings of this dataset are being computed. This page fills in when the job is done;"
                " its progress is below and on the **Jobs** page.")
        jobs_page_link()
    watch_jobs(name, [("embed", {}, waiting_key)])
    return bool(active)


def watch_job(dataset: str, kind: str, params: dict, waiting_key: str, recent: list[dict] | None = None) -> bool:
    """Live status of the newest `kind` job of `dataset` whose params include `params`. True while it is active.

    Call from a fragment (`watch_jobs` makes one that polls only while needed); when a job this session
    was waiting for ends, the whole page reruns so it shows the new results. `recent`: the dataset's
    newest jobs, if the caller has read them already."""
    if recent is None:
        recent = jobs.list_jobs(dataset=dataset, limit=20)
    mine = _newest(recent, kind, params)
    if mine and mine["status"] in jobs.ACTIVE:
        job_status(mine)
        st.session_state[waiting_key] = True
        return True
    if st.session_state.pop(waiting_key, False):
        st.rerun(scope="app")
    elif mine and mine["status"] == "failed":
        job_status(mine)
    return False


def watch_jobs(dataset: str, watches: list[tuple[str, dict, str]]) -> None:
    """`watch_job` for each (kind, params, waiting key) in `watches`, in one fragment that polls only while
    one of those jobs is active or awaited by this session: an idle page runs nothing between reruns.

    Call it where the statuses should appear (not from inside another fragment)."""
    first = [jobs.list_jobs(dataset=dataset, limit=20)]
    polling = any((m := _newest(first[0], kind, params)) is not None and m["status"] in jobs.ACTIVE
                  or st.session_state.get(key) for kind, params, key in watches)

    @st.fragment(run_every=poll_every(polling))
    def _watch() -> None:
        recent = first.pop() if first else jobs.list_jobs(dataset=dataset, limit=20)  # fresh on its own reruns
        active = [watch_job(dataset, kind, params, key, recent) for kind, params, key in watches]
        if polling and not any(active):
            st.rerun(scope="app")  # nothing left to watch: stop polling

    _watch()


def _newest(recent: list[dict], kind: str, params: dict) -> dict | None:
    return next((j for j in recent if j["kind"] == kind
                 and all((j["params"] or {}).get(k) == v for k, v in params.items())), None)


def md_text(text) -> str:
    """User text (a label, a file or dataset name) made literal inside Markdown: every character
    Markdown or Streamlit would interpret (links, images, emphasis, LaTeX, HTML) is escaped."""
    specials = set("\\`*_{}[]()<>#+-.!|~$:&")
    return "".join("\\" + ch if ch in specials else ch for ch in str(text)).replace("\n", " ")


# Group sheets: small images (at most SMALL_TILE px: digits, Fashion-MNIST, CIFAR) at their own size, 12 a
# line, drawn crisp by the browser (`show_sheets`: `image-rendering: pixelated` as it scales the sheet to
# the column), so a sheet is a few hundred bytes and a millisecond to make (84-px upscaled tiles took
# 28 ms a sheet at load 8); photos (display thumbnails) 8 a line in PHOTO_TILE px tiles: with Streamlit's
# 1,460 px cap on an image's width, 8 x 176 px tiles show at 1.4-2 image pixels per screen pixel in the
# usual 700-1,000 px wide content column, so they stay sharp on high-density screens. Every sheet has a
# full line's width (white beyond a small group's images), so all are drawn at one scale.
SMALL_TILE, SMALL_COLUMNS, PHOTO_TILE, PHOTO_COLUMNS = 84, 12, 176, 8
SHEET_GAP, PHOTO_FRAME = 4, 6
KEPT_COLOR = (230, 40, 40)
PIXELATED_CSS = ("<style>.st-key-group_sheets img { image-rendering: pixelated; }"
                 " .st-key-group_sheets [data-testid=stImageCaption] { text-align: left; }</style>")


def mosaic(pixels: np.ndarray | Gallery, rows, *, kept=None) -> np.ndarray:
    """One RGB image [H, W, 3] of the thumbnails at pixel-cache `rows` (of the pixel cache or a `Gallery`);
    the row `kept` (if any) comes first with a red frame. One image instead of one element per thumbnail
    keeps a page of groups cheap to draw. Small images (at most SMALL_TILE px) keep their own size,
    SMALL_COLUMNS a line; photos get `PHOTO_TILE` px tiles, `PHOTO_COLUMNS` a line, each scaled to fit
    with its aspect kept."""
    return _compose(pixels, rows, kept)[0]


def _compose(pixels, rows, kept) -> tuple[np.ndarray, bool]:
    """`mosaic`, and whether it used the photo layout."""
    from PIL import Image

    rows = [int(r) for r in rows]
    if kept is not None and kept in rows:
        rows = [kept] + [r for r in rows if r != kept]
    images = _images(pixels, rows)
    photos = any(max(img.shape[:2]) > SMALL_TILE for img in images)
    if photos:
        tile, columns, gap = PHOTO_TILE, PHOTO_COLUMNS, SHEET_GAP
    else:  # the browser scales the sheet ~3x for 28-px images: a 1-px gap and frame read as 3 px
        tile, columns = max(max(img.shape[:2]) for img in images), SMALL_COLUMNS
        gap = max(1, round(tile * SHEET_GAP / SMALL_TILE))
    lines = -(-len(rows) // columns)
    sheet = np.full((lines * (tile + gap) - gap, columns * (tile + gap) - gap, 3), 255, np.uint8)
    for i, (row, img) in enumerate(zip(rows, images)):
        if img.ndim == 2:
            img = img[:, :, None]
        if photos:
            h, w = img.shape[:2]
            scale = min(tile / h, tile / w)
            fitted = Image.fromarray(img[:, :, 0] if img.shape[2] == 1 else img).convert("RGB")
            thumb = np.asarray(fitted.resize((max(1, round(w * scale)), max(1, round(h * scale))),
                                             Image.Resampling.BICUBIC))
        else:
            thumb = np.repeat(img, 3, axis=2) if img.shape[2] == 1 else img
        if row == kept:
            thumb = framed(thumb, PHOTO_FRAME if photos else gap)
        y = (i // columns) * (tile + gap) + (tile - thumb.shape[0]) // 2
        x = (i % columns) * (tile + gap) + (tile - thumb.shape[1]) // 2
        sheet[y:y + thumb.shape[0], x:x + thumb.shape[1]] = thumb
    return sheet, photos


def framed(rgb: np.ndarray, width: int, color=KEPT_COLOR) -> np.ndarray:
    """A copy of an RGB image [H, W, 3] with a `width`-px frame inside its border."""
    rgb = rgb.copy()
    rgb[:width], rgb[-width:], rgb[:, :width], rgb[:, -width:] = color, color, color, color
    return rgb


def sheet_style() -> None:
    """The style `show_sheets` needs (crisp pixels, left-aligned captions), once per page outside any
    fragment: each element a slider move re-sends costs the browser about 1.4 ms at load 2 here."""
    st.html(PIXELATED_CSS)


def show_sheets(images: Gallery, groups: list[tuple[list, int | None]], captions: list[str]) -> None:
    """The sheets of (rows, kept) groups as ONE image list (one element: each element costs the browser
    a re-render of the page while a rerun streams in), each as wide as the column, small images scaled
    by the browser with crisp pixels (`sheet_style`, called once by the page)."""
    sheets = images.sheets(groups)
    # The sheets' own format (PNG, or JPEG for photos): with the default ("auto") Streamlit decoded every
    # PNG sheet and encoded it again as JPEG on each rerun, blurring the pixels and costing the rerun time.
    formats = {"PNG" if s.startswith(b"\x89PNG") else "JPEG" for s in sheets}
    with st.container(key="group_sheets"):
        st.image(sheets, caption=captions if any(captions) else None, width="stretch",
                 output_format=formats.pop() if len(formats) == 1 else "auto")


def _images(pixels, rows) -> list[np.ndarray]:
    """The images at `rows` of a `Gallery`, the pixel cache, or a dict of images by row."""
    if isinstance(pixels, Gallery):
        return pixels.get(rows)
    return [np.asarray(pixels[int(r)]) for r in rows]


def _encode_sheet(img: np.ndarray, photos: bool) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    # PNG at zlib level 1: half the time of the default 6 and no larger for these few-colour sheets
    how = {"format": "JPEG", "quality": 92} if photos else {"format": "PNG", "compress_level": 1}
    Image.fromarray(img).save(buf, **how)
    return buf.getvalue()


def chart_text(values):
    """User text for Plotly (legends, hover labels, axis ticks): Plotly renders a few HTML tags there
    (links, bold, line breaks), so `<` and `>` become entities and the text shows as written."""
    import pandas as pd

    text = pd.Series(values).astype(str)
    return text.str.replace("&", "&amp;", regex=False).str.replace("<", "&lt;", regex=False).str.replace(
        ">", "&gt;", regex=False).to_numpy()
