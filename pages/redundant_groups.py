"""Redundant groups: class-wise clusters, the subset at any fraction or threshold, and exports.

Structure (what a rerun costs): the pickers run with the page; the merge trees, the cut index and the
stored review lists are read once per version of their inputs (`clusterings.state_version`, one cheap
query) and kept in caches. Everything that depends on the cut lives in one fragment, so moving a
slider reruns only the fragment: a cut of the index (milliseconds, even at a million images) and only
the section on screen (a segmented control, not tabs, which would run every tab's body).
"""
import numpy as np
import plotly.express as px
import streamlit as st

from core import jobs, wording
from core.data.catalog import get_dataset
from core.embed import projection
from core.redundancy import clusterings, export, review
from core.redundancy.trees import LINKAGES
from core.subsets import results
from pages import widgets

widgets.route_through_app()

REPRESENTATIVE_WORDS = {
    "nearest_mean": "the image closest to its group's average",
    "random": "an image picked at random (seeded)",
    "farthest_mean": "the image farthest from its group's average",
}
SECTIONS = ["Groups", "Per class", "Group sizes", "Map", "Duplicates & label conflicts", "Export"]
GROUPS_PER_PAGE = 8
SHOWN_PER_GROUP = 24
PAIRS_PER_PAGE = 10

st.title("Redundant groups")
c1, c2 = st.columns(2)
with c1:
    name, bid, _ = widgets.embedded_dataset_picker("groups_backbone")
linkage = c2.selectbox("Linkage", LINKAGES, key="groups_linkage", format_func=wording.plain,
                       help="complete (default): every pair inside a group is similar. The paper's linkage is"
                            " not stated; average and single are offered too.")


@st.cache_data(max_entries=32, ttl=60, show_spinner=False)
def state_version(name: str, bid: str, linkage: str, generation: tuple) -> str:
    return clusterings.state_version(name, bid, linkage)


version = state_version(name, bid, linkage, widgets.store_generation())


@st.cache_data(max_entries=8, ttl=60, show_spinner=False)
def near_copies(name: str, version: str) -> dict:
    return clusterings.copy_state(name)


def switch_near_copies(key: str) -> None:
    """The toggle changed: rebuild the trees with near copies joined or not (the job stores the setting)."""
    jobs.launch("cluster", name, {"backbone_id": bid, "linkage": linkage, "near_copies": st.session_state[key]})
    st.session_state["trees_waiting"] = True


copy_setting = near_copies(name, version)
c2.toggle("Join near copies found by pixels", value=copy_setting["enabled"], key=f"near_copies_{name}",
          on_change=switch_near_copies, args=(f"near_copies_{name}",),
          help="Ours, beside the paper's method: images that are shifted, cropped or re-encoded copies of each"
               " other (by pixels, within a class) share a group at every cut, whatever the embedding says. Off:"
               " the paper's method exactly. A change rebuilds the merge trees (a job).")
if copy_setting["enabled"] and copy_setting["pairs"] is not None:
    c2.caption(f"{copy_setting['pairs']:,} near-copy pairs joined (searched in"
               f" {wording.duration(copy_setting['seconds'] or 0)}).")
elif copy_setting["enabled"]:  # trees built before the search existed, or the first pass of a job
    c2.caption("Not searched yet for this dataset: the trees join no pairs so far.")
    if c2.button("Search now", key="near_copies_search", help="A cluster job: it searches the near copies and"
                 " rebuilds the trees of the classes that have some; the groups stay usable meanwhile."):
        jobs.launch("cluster", name, {"backbone_id": bid, "linkage": linkage, "near_copies": True})
        st.session_state["trees_waiting"] = True


@st.cache_resource(max_entries=3, show_spinner="Loading the merge trees...")
def clustering(name: str, bid: str, linkage: str, version: str):
    """The trees with their embeddings (a memory-mapped snapshot once written), the cut index over
    them, and the image rows and labels by index. Raises ValueError (not cached) while a class has
    no up-to-date tree."""
    c = clusterings.open_clustering(name, bid, linkage, version)
    return c, clusterings.cut_index(c), c.table.row.to_numpy(), c.table.label.to_numpy()


try:
    c, index, image_rows, image_labels = clustering(name, bid, linkage, version)
except ValueError:
    status = clusterings.tree_status(name, bid, linkage)
    st.write(f"{status['ready']} of {status['classes']} classes have an up-to-date {linkage}-linkage tree.")
    if st.button("Build the merge trees", type="primary"):
        jobs.launch("cluster", name, {"backbone_id": bid, "linkage": linkage})
        st.session_state["trees_waiting"] = True
        st.rerun()
    widgets.watch_jobs(name, [("cluster", {"backbone_id": bid, "linkage": linkage}, "trees_waiting")])
    st.stop()


def nice(x: float) -> float:
    """The smallest of 1, 2, 5 x 10^k that is at least x (x > 0)."""
    e = 10.0 ** np.floor(np.log10(x))
    return float(next(m for m in (1, 2, 5, 10) if m * e >= x * (1 - 1e-9)) * e)


@st.cache_data(max_entries=8, show_spinner=False)
def threshold_scale(name: str, bid: str, linkage: str, version: str) -> tuple[float, float, float]:
    """(top, step, default) of the threshold slider, from this clustering's merge distances: cosine
    distances of near copies are a few thousandths on Fashion-MNIST and a few hundredths elsewhere, so a
    fixed 0-1 scale in steps of 0.005 jumped from all images to 92 % kept in one step."""
    top = nice(max(index.threshold_for(0.01), 1e-4))
    step = nice(top / 500)
    return top, step, min(top, round(index.threshold_for(0.9) / step) * step)


@st.cache_resource(max_entries=32, show_spinner=False)
def cut_of(name: str, bid: str, linkage: str, version: str, fraction: float | None, threshold: float | None):
    """The cut at these settings, kept with the representatives it has chosen so far (a class picker or
    page change at the same cut chooses only those of classes not shown before)."""
    return index.cut(fraction=fraction, threshold=threshold)


@st.cache_data(max_entries=4, show_spinner=False)
def run_summary(name: str, generation: tuple):
    """Finished training runs by (method, fraction): read again only after a write to the store. (It had a
    30 s time to live: the slider move that found it expired read the store, 20-200 ms here, the p95.)"""
    return results.summary(results.runs(name, refresh=False))


@st.cache_data(max_entries=4, show_spinner=False)
def duplicates(name: str, version: str):
    return review.duplicates(name)


@st.cache_data(max_entries=4, show_spinner=False)
def conflicts(name: str, bid: str, version: str):
    return review.conflict_state(name, bid), review.label_conflicts(name, bid)


pixels = widgets.gallery(name, version)  # display thumbnails, else the pixel cache's rows


@st.fragment
def cut_panel() -> None:
    # Rows are horizontal containers, not st.columns: one block per row instead of one plus one per column,
    # and every element here is re-sent and redrawn on each slider move (about 1.4 ms each in the browser).
    controls = st.container(horizontal=True, gap="medium")
    mode = controls.radio("Cut by", ["fraction", "threshold"], horizontal=True, key="cut_mode")
    if mode == "fraction":
        fraction = controls.slider("Fraction kept", 0.01, 1.0, 0.9, 0.01, key="fraction",
                                   help="Each class keeps max(1, round(f × n_c)) groups, one image each.")
        settings = {"fraction": fraction}
    else:
        top, step, default = threshold_scale(name, bid, linkage, version)
        if not 0.0 <= st.session_state.get("threshold", default) <= top:  # from another dataset's scale
            st.session_state["threshold"] = default
        threshold = controls.slider("Cosine distance threshold", 0.0, top, default, step, key="threshold",
                                    format=f"%.{max(3, -int(np.floor(np.log10(step))))}f",
                                    help="Images joined by merges at or below this distance form one group. The"
                                         " scale runs to the distance at which 1 % of the images would be kept, in"
                                         " 500 steps; it starts where about 90 % are kept.")
        settings = {"threshold": threshold}
    rule = controls.selectbox("Image kept per group", list(REPRESENTATIVE_WORDS), key="representative",
                              format_func=lambda r: REPRESENTATIVE_WORDS[r].capitalize(),
                              help="The paper keeps one image per group; which one is not stated. Default:"
                                   " the image closest to its group's average embedding.")
    cut = cut_of(name, bid, linkage, version, settings.get("fraction"), settings.get("threshold"))
    n_all, n_kept = index.n, cut.n_groups
    numbers = st.container(horizontal=True, gap="medium")
    numbers.metric("Kept", f"{n_kept:,}", help=f"of {n_all:,} {clusterings.SUBSET_SPLIT} images")
    numbers.metric("Removed as redundant", f"{n_all - n_kept:,}")
    numbers.metric("Kept fraction", f"{n_kept / max(n_all, 1):.1%}")
    if mode == "fraction":
        said = results.evidence_from(run_summary(name, widgets.store_generation()), fraction, bid)
        st.caption(f"**Evidence:** {said}" if said else
                   f"No training run at fraction {fraction:g} yet: the **Training** page trains the subset"
                   " against random subsets and the full set.")
    section = st.segmented_control("Show", SECTIONS, default=SECTIONS[0], key="groups_section") or SECTIONS[0]
    if section == "Groups":
        groups_section(cut, rule)
    elif section == "Per class":
        per_class_section(cut)
    elif section == "Group sizes":
        sizes_section(cut)
    elif section == "Map":
        map_section(settings, rule)
    elif section == "Duplicates & label conflicts":
        review_section()
    else:
        export_section(settings, rule)


@st.fragment
def groups_section(cut, rule: str) -> None:
    """A fragment of its own: the class picker and the page stepper rerun only this section (not the
    metrics above it), with the cut of the last slider position."""
    header = st.container(horizontal=True, gap="medium")
    label = header.selectbox("Class", ["(all)"] + list(index.labels), key="group_class")
    largest = cut.largest(None if label == "(all)" else label)
    n_pages = max(1, -(-len(largest) // GROUPS_PER_PAGE))
    page = min(header.number_input(f"Page (of {n_pages:,})", 1, n_pages, 1, key="group_page"), n_pages) - 1
    header.caption(f"{len(largest):,} groups with 2 or more images, largest first. The image kept is first,"
                   f" in a red frame: {REPRESENTATIVE_WORDS[rule]}.")
    shown_groups = [int(g) for g in largest[page * GROUPS_PER_PAGE:(page + 1) * GROUPS_PER_PAGE]]
    if not shown_groups:
        st.caption("No group of 2 or more images at this cut: every image is kept.")
        return
    # The page's groups as ONE image list (one element, captions as headings): each element costs the
    # browser a re-render of the page while a rerun streams in, so a slider move sends 3 elements, not 24.
    sizes, sheets, captions, heat = cut.group_sizes, [], [], {}
    for g in shown_groups:
        members = cut.members(g)
        kept = cut.representative(g, rule)
        head = members[:SHOWN_PER_GROUP]  # the kept image and 23 others (a group can hold thousands)
        shown = [kept] + [int(m) for m in head[head != kept][:SHOWN_PER_GROUP - 1]]
        more = int(sizes[g]) - len(shown)
        title = f"Group {g} · {image_labels[kept]} · {int(sizes[g]):,} images"
        captions.append(widgets.md_text(title + (f" (+{more:,} more not shown)" if more > 0 else "")))
        sheets.append((image_rows[shown], int(image_rows[kept])))
        heat[g] = (title, [int(r) for r in image_rows[shown[:12]]])
    widgets.show_sheets(pixels, sheets, captions)  # made once per group, the new ones in one read
    inside = st.container(horizontal=True, vertical_alignment="bottom", gap="medium")
    g = inside.selectbox("Look inside a group", list(heat), key="heat_group_pick",
                         format_func=lambda g: heat[g][0])  # a select box shows its options as plain text
    if inside.button("Patch heatmaps", key="heat_open", help="Open the group's images side by side on the Patch"
                     " heatmaps page (the first 12)"):
        st.session_state.update(heatmap_group={"dataset": name, "title": heat[g][0], "rows": heat[g][1]},
                                heatmap_group_new=True)
        st.switch_page("pages/patch_heatmaps.py")


def per_class_section(cut) -> None:
    """Images, kept and removed per class. A section of its own, not a table above every section: a data
    grid re-sent and redrawn on each slider move cost the browser 50-70 ms of the move (bench/ui_latency.py,
    with and without it)."""
    st.dataframe(cut.per_class().drop(columns="groups"), hide_index=True, key="per_class",  # groups = kept
                 height=min(400, 38 + 35 * len(index.labels)),
                 column_config={"label": "Class", "images": st.column_config.NumberColumn("Images", format="localized"),
                                "kept": st.column_config.NumberColumn("Kept", format="localized"),
                                "removed": st.column_config.NumberColumn("Removed", format="localized"),
                                "kept_fraction": st.column_config.NumberColumn("Kept fraction", format="percent")})


def sizes_section(cut) -> None:
    sizes, counts = cut.size_histogram()
    fig = px.bar(x=sizes, y=counts, log_y=True, labels={"x": "group size (images)", "y": "groups"},
                 title="Number of groups by size")
    # Whole numbers in one format: decades only on the log axis (Plotly's default labels the 2s and
    # 5s between them too, which read as "5, 2, 100, 5, 2, 10"), whole sizes on the other.
    fig.update_yaxes(dtick=1, tickformat=",d", minor={"showgrid": False})
    fig.update_xaxes(tickformat=",d", dtick=max(1, int(np.ceil((int(sizes.max()) if len(sizes) else 1) / 12))))
    st.plotly_chart(fig, key="hist")


@st.cache_data(max_entries=16, show_spinner="Choosing every group's image...")
def subset_frame(name: str, bid: str, linkage: str, version: str, settings: dict, rule: str):
    """Every train image with its group and whether it is kept (what the map and the exports need)."""
    return clusterings.subset_frame(c, clusterings.subset(c, representative=rule, **settings))


@st.cache_data(max_entries=2, show_spinner=False)
def umap_points(name: str, bid: str, version: str):
    return projection.projection(name, bid)


def map_section(settings: dict, rule: str) -> None:
    proj = umap_points(name, bid, version)
    if proj is None:
        st.caption("Compute the UMAP map on the **Embedding map** page to see kept and removed images on it.")
        return
    frame = subset_frame(name, bid, linkage, version, settings, rule)
    shown = proj.merge(frame[["path", "kept"]], on="path")
    shown["status"] = np.where(shown.kept, "kept", "removed")
    shown = shown.assign(label=widgets.chart_text(shown.label), path=widgets.chart_text(shown.path))
    fig = px.scatter(shown, x="x", y="y", color="status", hover_data=["path", "label"], render_mode="webgl",
                     color_discrete_map={"kept": "#1f77b4", "removed": "#d62728"}, height=560)
    fig.update_traces(marker={"size": 4 if len(shown) > 5000 else 6})
    fig.update_layout(xaxis_visible=False, yaxis_visible=False)
    st.plotly_chart(fig, key="kept_map")


@st.fragment
def review_section() -> None:
    """A fragment of its own: its slider and page stepper rerun only this section."""
    st.subheader("Exact duplicates")
    dups = duplicates(name, version)
    st.caption("Files with identical bytes, or different files that decode to identical pixels.")
    if len(dups):
        st.dataframe(dups, hide_index=True)
    else:
        st.caption("none")
    st.subheader("Near-identical images with different labels")
    state, pairs = conflicts(name, bid, version)
    if state is None:
        st.caption("Not searched yet for these embeddings: building the merge trees searches them.")
        if st.button("Search now", key="conflict_search"):
            jobs.launch("cluster", name, {"backbone_id": bid, "linkage": linkage})
            st.session_state["trees_waiting"] = True
            st.rerun(scope="app")  # the page (not this fragment) watches the job
        return
    if state["note"]:
        st.caption(state["note"])
        return
    if pairs.empty:
        st.caption(f"none within cosine distance {state['max_distance']:g}")
        return
    top = float(state["max_distance"])
    default = review.default_threshold(pairs.distance.to_numpy())
    t = st.slider("Cosine distance at most", 0.0, top, min(default, top), 0.001, format="%.3f", key="conflict_t",
                  help=f"Pairs up to {top:g} were searched ({len(pairs):,} found, the closest first). The"
                       f" default lists about {review.DEFAULT_LISTED}.")
    listed = pairs[pairs.distance <= t]
    st.caption(f"{len(listed):,} pairs within {t:.3f}: likely label errors or ambiguous images, closest first.")
    with st.expander("Pairs by class"):
        st.dataframe(review.pairs_by_class(listed), hide_index=True)
    n_pages = max(1, -(-len(listed) // PAIRS_PER_PAGE))
    page = min(st.number_input(f"Page (of {n_pages:,})", 1, n_pages, 1, key="conflict_page"), n_pages) - 1
    shown = listed.iloc[page * PAIRS_PER_PAGE:(page + 1) * PAIRS_PER_PAGE]
    images = pixels.get(list(shown.row_a) + list(shown.row_b))  # one read for the page's pairs
    for i, r in enumerate(shown.itertuples()):
        a, b, info = st.columns([1, 1, 4])
        a.image(**widgets.crisp(images[i]))
        b.image(**widgets.crisp(images[len(shown) + i]))
        info.text(f"{r.label_a}  vs  {r.label_b}   (cosine distance {r.distance:.4f})\n{r.path_a}\n{r.path_b}")


def export_section(settings: dict, rule: str) -> None:
    st.write("One image is kept per group; the rest are listed as removed.")
    how = (f"f{settings['fraction']:.2f}" if settings.get("fraction") is not None
           else f"t{settings['threshold']:.6g}")
    for which in ("kept", "removed", "all"):
        for col, fmt in zip(st.columns(2), ("csv", "parquet")):
            col.download_button(
                f"{which} images as {fmt.upper()}",
                # a callable: the subset and the file are made only when the button is clicked
                lambda which=which, fmt=fmt: export.export_bytes(
                    subset_frame(name, bid, linkage, version, settings, rule), which, fmt),
                file_name=f"{name}-{which}-{how}-{linkage}.{fmt}", key=f"dl-{which}-{fmt}", on_click="ignore")
    root = get_dataset(name)["root"]
    st.caption(f"Paths are relative to the dataset's folder, {widgets.md_text(root)}. `redex export NAME"
               " --fraction F --imagefolder DIR` writes the kept images as a folder tree.")


widgets.sheet_style()
if st.session_state.get("trees_waiting"):  # a label-conflict search started from the review section
    widgets.watch_jobs(name, [("cluster", {"backbone_id": bid, "linkage": linkage}, "trees_waiting")])
cut_panel()
