"""Redundant groups: class-wise clusters, the subset at any fraction or threshold, and exports."""
import numpy as np
import plotly.express as px
import streamlit as st

from core import jobs
from core.data import catalog
from core.embed import projection
from core.redundancy import clusterings, export
from core.redundancy.cuts import REPRESENTATIVES, group_size_histogram
from core.redundancy.trees import LINKAGES
from core.subsets import results
from pages import widgets

widgets.route_through_app()

st.title("Redundant groups")
c1, c2 = st.columns(2)
with c1:
    name, bid, _ = widgets.embedded_dataset_picker("groups_backbone")
linkage = c2.selectbox("Linkage", LINKAGES, key="groups_linkage",
                       help="complete (default): every pair inside a group is similar. The paper's linkage is"
                            " not stated; average and single are offered too.")


@st.fragment(run_every="2s")
def cluster_job() -> None:
    widgets.watch_job(name, "cluster", {"backbone_id": bid, "linkage": linkage}, "trees_waiting")


status = clusterings.tree_status(name, bid, linkage)
if status["stale"]:
    st.write(f"{status['ready']} of {status['classes']} classes have an up-to-date {linkage}-linkage tree.")
    if st.button("Build the merge trees", type="primary"):
        jobs.launch("cluster", name, {"backbone_id": bid, "linkage": linkage})
        st.session_state["trees_waiting"] = True
        st.rerun()
    cluster_job()
    st.stop()


@st.cache_resource(max_entries=3, show_spinner="Loading the merge trees...")
def clustering(name: str, bid: str, linkage: str, version: str):
    return clusterings.load_clustering(name, bid, linkage)


c = clustering(name, bid, linkage, clusterings.trees_version(name, bid, linkage))
left, mid, right = st.columns([2, 2, 1])
mode = left.radio("Cut by", ["fraction", "threshold"], horizontal=True, key="cut_mode")
if mode == "fraction":
    fraction = mid.slider("Fraction kept", 0.01, 1.0, 0.9, 0.01, key="fraction",
                          help="Each class keeps max(1, round(f × n_c)) groups, one image each.")
    cut = {"fraction": fraction}
else:
    threshold = mid.slider("Cosine distance threshold", 0.0, 1.0, 0.05, 0.005, key="threshold", format="%.3f",
                           help="Images joined by merges at or below this distance form one group.")
    cut = {"threshold": threshold}
representative = right.selectbox("Representative", REPRESENTATIVES, key="representative",
                                 help="nearest_mean (default): the member closest to its group's mean embedding.")
s = clusterings.subset(c, representative=representative, **cut)
frame = clusterings.subset_frame(c, s)

n_kept, n_all = int(frame.kept.sum()), len(frame)
m1, m2, m3 = st.columns(3)
m1.metric("Kept", f"{n_kept:,}", help=f"of {n_all:,} {clusterings.SUBSET_SPLIT} images")
m2.metric("Removed as redundant", f"{n_all - n_kept:,}")
m3.metric("Kept fraction", f"{n_kept / n_all:.1%}")
if mode == "fraction":
    evidence = results.evidence(name, fraction, bid)
    st.caption(f"**Evidence:** {evidence}" if evidence else
               f"No training run at fraction {fraction:g} yet: the **Training** page trains the subset against"
               " random subsets and the full set.")
st.dataframe(clusterings.per_class_table(s), hide_index=True, key="per_class",
             column_config={"kept_fraction": st.column_config.NumberColumn(format="%.3f")})

tab_groups, tab_charts, tab_dups, tab_export = st.tabs(["Groups", "Charts", "Duplicates & label conflicts",
                                                        "Export"])
pixels = catalog.load_pixels(name)
with tab_groups:
    f1, f2, f3 = st.columns(3)
    label = f1.selectbox("Class", ["(all)"] + sorted(c.classes), key="group_class")
    by_size = clusterings.groups_by_size(frame, None if label == "(all)" else label)
    per_page = 8
    n_pages = max(1, -(-len(by_size) // per_page))
    page = f2.number_input(f"Page (of {n_pages})", 1, n_pages, 1, key="group_page") - 1
    f3.caption(f"{len(by_size):,} groups with 2 or more images, largest first. The kept image has a red frame.")
    kept_rows = set(frame.row[frame.kept])
    for g in by_size.iloc[page * per_page:(page + 1) * per_page].itertuples():
        members = frame[frame.group == g.group]
        st.markdown(f"**Group {g.group}** · {g.label} · {g.size} images")
        widgets.image_grid(pixels, members.row.to_numpy()[:36], highlight=kept_rows)
        if st.button("Patch heatmaps", key=f"heat-{g.group}", help="Open these images side by side on the"
                     " Patch heatmaps page (the first 12)"):
            st.session_state.update(heatmap_group={"dataset": name, "title": f"Group {g.group} · {g.label}",
                                                   "rows": [int(r) for r in members.row[:12]]},
                                    heatmap_group_new=True)
            st.switch_page("pages/patch_heatmaps.py")

with tab_charts:
    sizes, counts = group_size_histogram(s.group)
    fig = px.bar(x=sizes, y=counts, log_y=True, labels={"x": "group size (images)", "y": "groups"},
                 title="Number of groups by size")
    st.plotly_chart(fig, key="hist")
    proj = projection.projection(name, bid)
    if proj is None:
        st.caption("Compute the UMAP map on the Embedding map page to see kept and removed images on it.")
    else:
        shown = proj.merge(frame[["path", "kept"]], on="path")
        shown["status"] = np.where(shown.kept, "kept", "removed")
        fig = px.scatter(shown, x="x", y="y", color="status", hover_data=["path", "label"], render_mode="webgl",
                         color_discrete_map={"kept": "#1f77b4", "removed": "#d62728"}, height=560)
        fig.update_traces(marker={"size": 4 if len(shown) > 5000 else 6})
        fig.update_layout(xaxis_visible=False, yaxis_visible=False)
        st.plotly_chart(fig, key="kept_map")

with tab_dups:
    st.subheader("Exact duplicates")
    dups = clusterings.duplicates(name)
    st.caption("Files with identical bytes, or different files that decode to identical pixels.")
    st.dataframe(dups, hide_index=True) if len(dups) else st.caption("none")
    st.subheader("Near-identical images with different labels")
    conflict_t = st.number_input("Cosine distance at most", 0.0, 0.2, 0.01, 0.001, format="%.3f", key="conflict_t")
    conflicts = clusterings.label_conflicts(name, bid, conflict_t)
    st.caption(f"{len(conflicts):,} pairs: likely label errors or ambiguous images.")
    for r in conflicts.head(12).itertuples():
        widgets.image_grid(pixels, np.array([r.row_a, r.row_b]),
                           [f"{r.label_a}", f"{r.label_b} · {r.distance:.4f}"], columns=12)

with tab_export:
    st.write("One image is kept per group (the representative); the rest are listed as removed.")
    for which in ("kept", "removed", "all"):
        n_rows = len(export.export_rows(frame, which))
        for col, fmt in zip(st.columns(2), ("csv", "parquet")):
            col.download_button(f"{which} images ({n_rows:,}) as {fmt.upper()}",
                                # a callable: the file is made only when the button is clicked
                                lambda which=which, fmt=fmt: export.export_bytes(frame, which, fmt),
                                file_name=f"{name}-{which}.{fmt}", key=f"dl-{which}-{fmt}", on_click="ignore")
    st.caption("`redex export NAME --fraction F --imagefolder DIR` writes the kept images as a folder tree.")
