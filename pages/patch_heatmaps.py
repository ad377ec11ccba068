"""Patch heatmaps (LTRP): which patches of an image carry its information, and what a keep ratio leaves."""
import numpy as np
import plotly.graph_objects as go
import streamlit as st

from core import jobs, wording
from core.data import catalog
from core.ltrp import models as ltrp_models
from core.ltrp import ranker as ltrp_ranker
from core.ltrp import scoring
from core.ltrp import view as ltrp_view
from pages import widgets

widgets.route_through_app()

st.title("Patch heatmaps")
name = widgets.dataset_picker()
if name is None:
    st.stop()


def ltrp_jobs() -> None:
    """The training and scoring jobs' progress; polls only while one of them is active."""
    widgets.watch_jobs(name, [("ltrp", {}, "ltrp_waiting"), ("ltrp_score", {}, "ltrp_score_waiting")])


group = st.session_state.get("heatmap_group")
group = group if group and group.get("dataset") == name else None


def group_images() -> None:
    """The redundant group sent here from the Redundant groups page, as one picture (before any ranker)."""
    st.subheader(widgets.md_text(group.get("title", "Redundant group")))  # it holds the group's label
    st.caption(f"{wording.plural(len(group['rows']), 'image')} of the group (from the Redundant groups page),"
               " the kept one first in a red frame. Their patch heatmaps appear here once a patch ranker is"
               " trained (below).")
    widgets.sheet_style()
    widgets.show_sheets(widgets.Gallery(name), [(group["rows"], group.get("kept", group["rows"][0]))], [None])


@st.cache_data(max_entries=8, ttl=60, show_spinner=False)
def rankers_of(name: str, generation: tuple):
    return ltrp_models.list_rankers(name)


@st.cache_data(max_entries=4, ttl=300, show_spinner=False)
def images_of(name: str, generation: tuple):
    return catalog.images_table(name)


@st.cache_data(max_entries=256, ttl=300, show_spinner=False)
def image_at(name: str, row: int, generation: tuple) -> ltrp_view.ImageRef:
    return ltrp_view.images_at(name, [row])[0]


generation = widgets.store_generation()  # the reads below run again only after a write to the store
rankers = rankers_of(name, generation)
if rankers.empty:
    if group:
        group_images()
    st.info("No patch ranker for this dataset yet. Training one: an MAE learns to reconstruct the train images"
            " from a quarter of their patches, a small ViT ranker learns which patches the MAE's reconstruction"
            " depends on most (LTRP, Luo et al. 2024), and every image is scored. Command line (`--checkpoint`"
            " takes a pretrained MAE):")
    st.code(f"redex ltrp train {name}", language=None)
    with st.expander("Settings"):
        a, b, c = st.columns(3)
        mae_epochs = a.number_input("MAE epochs", 1, 200, ltrp_models.LtrpSettings.mae_epochs, key="ltrp_mae_epochs")
        ranker_epochs = b.number_input("Ranker epochs", 1, 200, ltrp_models.LtrpSettings.ranker_epochs,
                                       key="ltrp_ranker_epochs")
        mask_ratio = c.number_input(
            "Pseudo-score mask ratio (0 = default)", 0.0, 0.95, 0.0, 0.05, key="ltrp_mask_ratio",
            help="Share of patches hidden when the MAE's pseudo-scores are computed. The paper uses 0.9 (19 of"
                 " 196 patches visible); redex's default is 0.9 above 64 patches and 0.75 on small grids"
                 " (28 px images: 49 patches, of which 0.9 would leave 4 visible), where 0.75 ranked better.")
    settings = ltrp_models.LtrpSettings(mae_epochs=int(mae_epochs), ranker_epochs=int(ranker_epochs))
    est = ltrp_models.ltrp_estimate(name, settings)
    st.caption((f"About {wording.duration(est.seconds)} here now with these epochs ({est.text()})."
                if est.seconds is not None else f"Time: {est.text()}; the job's progress bar shows its pace."))
    if st.button("Train the patch ranker", type="primary"):
        jobs.launch("ltrp", name, {"mae_epochs": int(mae_epochs), "ranker_epochs": int(ranker_epochs),
                                   "mask_ratio": float(mask_ratio) or None})
        st.session_state["ltrp_waiting"] = True
        st.rerun()
    ltrp_jobs()
    st.stop()

ranker_labels = wording.plain_labels(rankers.model_id)
rid = st.selectbox("Ranker", list(rankers.model_id), key="ltrp_ranker", format_func=ranker_labels.get,
                   help="Newest first.")
ranker_row = rankers[rankers.model_id == rid].iloc[0]
table = images_of(name, generation)
unscored = table.image_id.nunique() - int(ranker_row.scored)
if unscored:
    st.write(f"{unscored:,} images have no stored score map yet (they are scored on the fly here).")
    if st.button("Score them"):
        jobs.launch("ltrp_score", name, {"ranker_id": rid})
        st.session_state["ltrp_score_waiting"] = True
        st.rerun()
ltrp_jobs()


@st.cache_resource(max_entries=2, show_spinner="Loading the ranker and its MAE...")
def models(rid: str, trained_at: str):
    return ltrp_models.load_ranker_model(rid), ltrp_models.load_mae_model(rid)


ranker, mae = models(rid, str(ranker_row.created_at))  # a retrained ranker (same id) is loaded again
grid, patch = mae.cfg.grid, mae.cfg.patch_size


def heat_figure(view: ltrp_view.PatchView, image: ltrp_view.ImageRef) -> go.Figure:
    """The image (at display resolution) with its score map on top; kept patches framed.

    The frames are one line trace, not a shape per patch: Plotly validates every `add_shape`, which
    cost about 4 ms a patch here (120 ms for 29 of 49 patches; 400 ms for half of a 224-px MAE's 196),
    on every move of the keep-ratio slider."""
    side = view.display.shape[0] * widgets.upscale_factor(view.display.shape[0], 360)  # as `display_uri` draws it
    cell = side / grid  # a patch, in display pixels
    centres = (np.arange(grid) + 0.5) * cell - 0.5
    r, c = np.divmod(np.asarray(view.keep, np.int64), grid)
    x0, y0 = c * cell - 0.5, r * cell - 0.5
    x1, y1 = x0 + cell, y0 + cell
    gap = np.full_like(x0, np.nan)  # breaks the line between two frames
    xs = np.stack([x0, x1, x1, x0, x0, gap], 1).ravel()
    ys = np.stack([y0, y0, y1, y1, y0, gap], 1).ravel()
    fig = go.Figure([
        go.Image(source=display_uri(image.image_id, image.path, view.display), hoverinfo="skip"),
        go.Heatmap(z=view.heat, x=centres, y=centres, colorscale="Viridis", opacity=0.55,
                   customdata=np.arange(grid * grid).reshape(grid, grid),
                   hovertemplate="patch %{customdata}<br>score %{z:.3f}<extra></extra>",
                   colorbar={"title": "score", "thickness": 12}),
        go.Scatter(x=xs, y=ys, mode="lines", line={"color": "#e62828", "width": 1.5}, hoverinfo="skip",
                   showlegend=False, connectgaps=False)])
    fig.update_layout(height=360, margin={"l": 0, "r": 0, "t": 0, "b": 0})
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    return fig


def thumbnails(images: list[np.ndarray], captions: list[str], columns: int = 8) -> None:
    cols = st.columns(columns)
    for i, (img, caption) in enumerate(zip(images, captions)):
        cols[i % columns].image(**widgets.crisp(img), caption=widgets.md_text(caption))  # captions are Markdown


def pick_one() -> ltrp_view.ImageRef:
    """The image of the 'One image' view: by class, by content id or path, at random, or from a group."""
    how = st.radio("Pick by", ["class", "content id or path", "random"] + (["redundant group"] if group else []),
                   horizontal=True, key="pick_by")
    if how == "class":
        a, b = st.columns(2)
        label = a.selectbox("Class", sorted(table.label.unique()), key="heat_class")
        rows = table.row[table.label == label].to_numpy()
        row = rows[b.number_input(f"Image (1 to {len(rows):,})", 1, len(rows), 1, key="heat_index") - 1]
    elif how == "content id or path":
        ref = st.text_input("Content id or path", key="heat_ref",
                            placeholder="a content id (or its first characters), or a path such as"
                                        f" {table.path.iloc[0]}")
        if not ref:
            st.stop()
        try:
            return ltrp_view.resolve_image(name, ref)
        except catalog.DatasetError as exc:
            st.error(widgets.md_text(exc))
            st.stop()
    elif how == "random":
        if st.button("Another random image"):
            st.session_state["heat_seed"] = st.session_state.get("heat_seed", 0) + 1
        row = table.row.iloc[int(np.random.default_rng(st.session_state.get("heat_seed", 0)).integers(len(table)))]
    else:
        paths = dict(zip(table.row, table.path))
        row = st.selectbox("Image of the group", group["rows"], format_func=paths.get, key="heat_group_pick")
    return image_at(name, int(row), generation)


@st.cache_data(max_entries=256, ttl=300, show_spinner=False)
def scores_of(rid: str, trained_at: str, image_id: str, generation: tuple, _image: ltrp_view.ImageRef):
    """The image's score map (stored, else computed now), read once per (ranker, image)."""
    return scoring.image_scores(name, rid, _image, ranker)


@st.cache_data(max_entries=64, ttl=300, show_spinner=False)
def model_and_display(image_id: str, path: str, size: int, _image: ltrp_view.ImageRef):
    """What the model sees and the same region at display resolution: read from the source file once."""
    return ltrp_view.model_input(_image, size), ltrp_view.display_image(_image)


@st.cache_data(max_entries=64, ttl=300, show_spinner=False)
def display_uri(image_id: str, path: str, _display: np.ndarray) -> str:
    return widgets.data_uri(widgets.upscale(_display, 360))  # small images: nearest neighbours, crisp


@st.cache_resource(max_entries=64, show_spinner=False)
def view_at(rid: str, trained_at: str, image_id: str, n_kept: int, _pixels, _scores, _display):
    """The image at this many kept patches, with the MAE's reconstruction from them (a forward pass of
    the MAE): computed once per (ranker, image, count), so moving the slider back costs nothing."""
    return ltrp_view.patch_view(mae, _pixels, _scores, n_kept / _scores.size, _display)


def one_image(keep_ratio: float) -> None:
    image = pick_one()
    scores, stored = scores_of(rid, str(ranker_row.created_at), image.image_id, generation, image)
    n_kept = len(ltrp_ranker.top_k(scores, keep_ratio))
    m1, m2, m3 = st.columns(3)  # first: the count is on screen before the reconstruction is computed
    m1.metric("Kept patches", f"{n_kept} / {scores.size}")
    m2.metric("Class", widgets.md_text(image.label) if image.label else "—")  # a metric's value is Markdown
    m3.metric("Score map", "stored" if stored else "computed now")
    st.caption(f"{widgets.md_text(image.path)} · content id {widgets.md_text(image.image_id)}")
    pixels, display = model_and_display(image.image_id, image.path, mae.cfg.img_size, image)
    view = view_at(rid, str(ranker_row.created_at), image.image_id, n_kept, pixels, scores, display)
    left, right = st.columns([3, 4])
    with left:
        st.plotly_chart(heat_figure(view, image), key="heatmap")
    with right:
        a, b, c = st.columns(3)
        a.image(**widgets.crisp(view.display, 168), caption="original")
        b.image(**widgets.crisp(view.kept, 168), caption="kept patches")
        c.image(**widgets.crisp(view.reconstruction, 168), caption="MAE reconstruction from the kept patches")
    st.caption("Brighter = more informative: removing that patch changes the MAE's reconstruction of the"
               " hidden patches most. Red frames: the patches kept at this ratio. The reconstruction shows the"
               " kept patches as they are and the MAE's prediction everywhere else.")


@st.cache_data(max_entries=16, ttl=300, show_spinner=False)
def class_scores(rid: str, label: str, generation: tuple):
    return scoring.load_scores(name, rid, label=label)


def class_grid() -> None:
    a, b = st.columns(2)
    label = a.selectbox("Class", sorted(table.label.unique()), key="grid_class")
    count = b.slider("Images", 4, 64, 24, 4, key="grid_count")
    shown, maps = class_scores(rid, label, generation)
    st.caption(f"The first {min(count, len(shown))} of {len(shown):,} scored images of {widgets.md_text(label)},"
               " each under its"
               " score map (brighter = more informative).")
    shown, maps = shown.head(count), maps[:count]
    originals = ltrp_view.display_squares(name, shown.row.to_numpy())  # display thumbnails, the model's region
    thumbnails([ltrp_view.heat_overlay(o, s, grid) for o, s in zip(originals, maps)], list(shown.path.str[-9:]))


@st.cache_data(max_entries=8, ttl=300, show_spinner=False)
def group_maps(rid: str, trained_at: str, rows: tuple, generation: tuple):
    """The group's display squares, score maps and file names: read and scored once per group."""
    refs = [image_at(name, r, generation) for r in rows]
    group_scores = [scores_of(rid, trained_at, r.image_id, generation, r)[0] for r in refs]
    squares = ltrp_view.display_squares(name, list(rows))  # display thumbnails, the model's region
    return squares, group_scores, [r.path.rsplit("/", 1)[-1] for r in refs]


def group_view(keep_ratio: float) -> None:
    st.subheader(widgets.md_text(group.get("title", "Redundant group")))  # it holds the group's label
    st.caption("The group's images side by side (from the Redundant groups page): score maps, then the patches"
               f" kept at {keep_ratio:.2f}.")
    squares, group_scores, captions = group_maps(rid, str(ranker_row.created_at),
                                                 tuple(int(r) for r in group["rows"]), generation)
    thumbnails([ltrp_view.heat_overlay(q, s, grid) for q, s in zip(squares, group_scores)], captions)
    thumbnails([ltrp_view.kept_at(q, s, grid, keep_ratio) for q, s in zip(squares, group_scores)], captions)


@st.fragment
def heatmaps() -> None:
    """The views in one fragment: the keep ratio, the view and the pickers rerun only this part (the
    pickers above it, the ranker and the job notices do not run again)."""
    views = ["One image", "Class grid"] + (["Redundant group"] if group else [])
    if group and st.session_state.pop("heatmap_group_new", False):
        st.session_state["heat_mode"] = "Redundant group"
    c1, c2 = st.columns([2, 3])
    mode = c1.radio("View", views, horizontal=True, key="heat_mode")
    keep_ratio = c2.slider("Keep ratio", 0.05, 1.0, 0.5, 0.05, key="keep_ratio",
                           help="The share of patches kept: the round(ratio × patches) highest-scoring ones.")
    if mode == "One image":
        one_image(keep_ratio)
    elif mode == "Class grid":
        class_grid()
    else:
        group_view(keep_ratio)


heatmaps()
