"""Embedding map: UMAP of a dataset's embeddings, coloured by class; select points to see images."""
import plotly.express as px
import streamlit as st

from core import jobs, wording
from core.embed import embeddings, projection
from pages import widgets

widgets.route_through_app()

st.title("Embedding map")
name, bid, n_embedded = widgets.embedded_dataset_picker("map_backbone")


@st.cache_data(max_entries=4, show_spinner="Loading embeddings...")
def load(name: str, bid: str, embedded: int):
    """Embeddings of (dataset, backbone); `embedded` is in the key so new rows refresh it."""
    return embeddings.load_embeddings(name, bid)


table, emb = load(name, bid, n_embedded)
proj = projection.projection(name, bid, table=table)


if proj is None:
    st.write(f"{len(table):,} embeddings, no up-to-date map yet.")
    if st.button("Compute the UMAP map", type="primary"):
        jobs.launch("project", name, {"backbone_id": bid})
        st.session_state["map_waiting"] = True
        st.rerun()
    widgets.watch_jobs(name, [("project", {"backbone_id": bid}, "map_waiting")])
    st.stop()

proj = proj.assign(label=widgets.chart_text(proj.label), path=widgets.chart_text(proj.path))
fig = px.scatter(proj, x="x", y="y", color="label", hover_data=["path", "split"], custom_data=["row"],
                 render_mode="webgl", height=620)
fig.update_traces(marker={"size": 4 if len(proj) > 5000 else 7})
# No dragmode of our own: Streamlit's default (pan) lets a click select a point; the toolbar's box and lasso
# select many, and while one of them is the tool a click selects nothing (Streamlit sets clickmode so). So the
# page keeps the selection itself (`ROWS`), and after a box or lasso selection it draws the map afresh (a new
# key: back on the pan tool), so the next click selects the point clicked. (Marking the kept selection on the
# fresh map with `selectedpoints` left later maps deaf to clicks in Streamlit 1.67: not done.)
fig.update_layout(legend_title_text="class", xaxis_visible=False, yaxis_visible=False,
                  margin={"t": 40})  # room for the toolbar above the legend's title
ROWS = f"map_rows:{name}:{bid}"  # this dataset's and backbone's selection
key = f"map-{st.session_state.get('map_reset', 0)}"
event = st.plotly_chart(fig, on_select="rerun", selection_mode=("points", "box", "lasso"), key=key)
selection = event.selection if event and event.selection else {}
picked = tuple(p["customdata"][0] for p in selection.get("points", []))
seen = st.session_state.get("map_seen")
if (key, picked) != seen:  # something new happened on this chart
    st.session_state["map_seen"] = (key, picked)
    if picked:
        st.session_state[ROWS] = list(picked)
        if selection.get("box") or selection.get("lasso"):  # back to the pan tool, selection kept
            st.session_state["map_reset"] = st.session_state.get("map_reset", 0) + 1
            st.rerun()
    elif seen and seen[0] == key and seen[1]:  # deselected (a double click) on this same chart
        st.session_state[ROWS] = []


def distance(d: float) -> str:
    """A cosine distance as a caption: '0.012', '< 0.001' (a near-copy; never '0.000' for another image), '0'."""
    return "0" if d <= 0 else f"{d:.3f}" if d >= 0.0005 else "< 0.001"


def short(label, width: int = 12) -> str:
    """A thumbnail caption that fits its column on one line (the full label is in the map's legend)."""
    label = str(label)
    return label if len(label) <= width else label[:width - 1] + "…"


rows = list(st.session_state.get(ROWS) or [])
pixels = widgets.Gallery(name)  # display thumbnails, else the pixel cache
by_row = table.reset_index(drop=True)
position = {r: i for i, r in enumerate(by_row.row)}
if not rows:
    st.caption("Select points to see their images: click one (it shows its nearest neighbours too), or pick the"
               " box or lasso tool in the map's toolbar and draw round many.")
    st.stop()

SHOWN = 96
head, clear = st.columns([4, 1], vertical_alignment="bottom")
head.subheader(f"{wording.plural(len(rows), 'image')} selected")
if clear.button("Clear the selection", key="map_clear", help="Deselect every point; a click on the map selects"
                " one again, the toolbar's box and lasso select many."):
    st.session_state["map_reset"] = st.session_state.get("map_reset", 0) + 1
    st.session_state[ROWS] = []
    st.rerun()
if len(rows) > SHOWN:
    st.caption(f"Showing the first {SHOWN} of {len(rows):,}. Select fewer points (box, lasso or a click) to see"
               " others.")
labels = by_row.set_index("row").label
widgets.image_grid(pixels, rows[:SHOWN], [short(labels[r]) for r in rows[:SHOWN]], columns=8)
focus = rows[0] if len(rows) == 1 else st.selectbox("Nearest neighbours of", rows[:96],
                                                     format_func=lambda r: f"{by_row.path[position[r]]}")
idx, dist = projection.nearest_neighbours(emb, position[focus], k=12)
st.subheader(f"Nearest neighbours of {widgets.md_text(by_row.path[position[focus]])}"
             f" ({widgets.md_text(labels[focus])})")
neighbour_rows = by_row.row.to_numpy()[idx]
widgets.image_grid(pixels, neighbour_rows,
                   [f"{short(labels[r], 10)} · {distance(d)}" for r, d in zip(neighbour_rows, dist)], columns=6)
st.caption("Under each neighbour: its class and its cosine distance to the chosen image (0 = the same direction).")
