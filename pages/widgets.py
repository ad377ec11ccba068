"""Small Streamlit widgets shared by the pages (layout only; the data comes from `core`)."""
from __future__ import annotations

import numpy as np
import streamlit as st

from core import jobs
from core.data import catalog
from core.embed import embeddings


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


def dataset_picker(key: str = "dataset_picker", *, scanned_only: bool = True) -> str | None:
    """A select box of datasets (those with images, or every registered one); remembers the choice
    across pages (the session) and across reloads and shared links (the URL's ?dataset=). A choice whose
    dataset is gone (removed) falls back to the first one, and the URL says so."""
    df = catalog.list_datasets()
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


def upscale(img: np.ndarray, min_side: int = 84) -> np.ndarray:
    """Nearest-neighbour upscale of a small [H, W, C] image so it is visible (pixels stay sharp)."""
    factor = max(1, min_side // max(img.shape[0], 1))
    img = img.repeat(factor, axis=0).repeat(factor, axis=1)
    return img[:, :, 0] if img.shape[2] == 1 else img


def outlined(img: np.ndarray, color=(230, 40, 40), width: int = 4) -> np.ndarray:
    """An upscaled thumbnail [H, W, 3] with a coloured frame (the kept image of a group)."""
    img = upscale(img)
    rgb = np.repeat(img[:, :, None], 3, axis=2) if img.ndim == 2 else img.copy()
    rgb[:width], rgb[-width:], rgb[:, :width], rgb[:, -width:] = color, color, color, color
    return rgb


def image_grid(pixels: np.ndarray, rows: np.ndarray, captions: list[str] | None = None, columns: int = 12,
               highlight: set | None = None) -> None:
    """Thumbnails of the given pixel-cache rows; rows in `highlight` get a red frame."""
    if len(rows) == 0:
        st.caption("no images")
        return
    cols = st.columns(columns)
    for i, row in enumerate(rows):
        img = np.asarray(pixels[row])
        with cols[i % columns]:
            st.image(outlined(img) if highlight and row in highlight else upscale(img),
                     caption=md_text(captions[i]) if captions else None)  # captions are Markdown


def job_status(job: dict) -> None:
    """One job's progress bar and status line, with a cancel button while it is active.

    A queued job's line says what it waits for (e.g. 'waiting for: job 12 (train, run 3 of sweep 2 ...)')."""
    info = jobs.describe(job)
    label = md_text(f"#{job['id']} {job['kind']} · {info['text']}")  # may hold names and paths
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
    backs = embeddings.list_backbones(name)
    backs = backs[backs.embedded > 0]
    if backs.empty:
        st.info("No embeddings yet: start an embedding job on the **Datasets** page.")
        st.stop()
    bid = st.selectbox("Backbone", list(backs.backbone_id), key=backbone_key)
    return name, bid, int(backs[backs.backbone_id == bid].embedded.iloc[0])


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


def mosaic(pixels: np.ndarray, rows, *, kept=None, columns: int = 12, tile: int = 84,
           gap: int = 4) -> np.ndarray:
    """One RGB image [H, W, 3] of the thumbnails at pixel-cache `rows`, `columns` per line; the row
    `kept` (if any) comes first with a red frame. One image instead of one element per thumbnail
    keeps a page of groups cheap to draw."""
    rows = [int(r) for r in rows]
    if kept is not None and kept in rows:
        rows = [kept] + [r for r in rows if r != kept]
    lines = -(-len(rows) // columns)
    width = min(len(rows), columns)
    sheet = np.full((lines * (tile + gap) - gap, width * (tile + gap) - gap, 3), 255, np.uint8)
    for i, row in enumerate(rows):
        img = np.asarray(pixels[row])
        thumb = outlined(img) if row == kept else upscale(img)
        if thumb.ndim == 2:
            thumb = np.repeat(thumb[:, :, None], 3, axis=2)
        thumb = thumb[:tile, :tile]
        y, x = (i // columns) * (tile + gap), (i % columns) * (tile + gap)
        sheet[y:y + thumb.shape[0], x:x + thumb.shape[1]] = thumb
    return sheet


def chart_text(values):
    """User text for Plotly (legends, hover labels, axis ticks): Plotly renders a few HTML tags there
    (links, bold, line breaks), so `<` and `>` become entities and the text shows as written."""
    import pandas as pd

    text = pd.Series(values).astype(str)
    return text.str.replace("&", "&amp;", regex=False).str.replace("<", "&lt;", regex=False).str.replace(
        ">", "&gt;", regex=False).to_numpy()
