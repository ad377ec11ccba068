"""Datasets: add a dataset, see its classes, problem files and images, and embed it."""
import streamlit as st

from core import jobs
from core.data import catalog, sources
from core.embed import embeddings
from core.embed.backbones import DEFAULT_BACKBONE
from pages import widgets

widgets.route_through_app()

st.title("Datasets")

with st.expander("Add a dataset", expanded=catalog.list_datasets().empty):
    demo, own = st.tabs(["Fashion-MNIST demo", "Your images"])
    with demo:
        st.write("70,000 labelled 28x28 images in 10 classes (train 60,000 / test 10,000).")
        limit = st.number_input("Images per split (0 = all)", min_value=0, value=0, step=500, key="demo_limit")
        if st.button("Load the Fashion-MNIST demo", type="primary"):
            try:
                name = sources.register(sources.FASHION_MNIST, limit=int(limit) or None)
                jobs.launch("scan", name)
                st.session_state["dataset"] = name
                st.rerun()
            except catalog.DatasetError as exc:
                st.error(str(exc))
    with own:
        st.write("An image folder (`root/<class>/<image>`, optionally under `train/`, `val/`, `test/`), "
                 "or a CSV/Parquet manifest with columns `path,label[,split]`.")
        path = st.text_input("Folder or manifest path", key="source_path")
        name = st.text_input("Name (optional)", key="source_name")
        size = st.number_input("Working size in px (0 = native if <= 64, else 64)", min_value=0, value=0,
                               key="source_size")
        if st.button("Add and scan", disabled=not path):
            try:
                name = sources.register(path, name or None, image_size=int(size) or None)
                jobs.launch("scan", name)
                st.session_state["dataset"] = name
                st.rerun()
            except catalog.DatasetError as exc:
                st.error(str(exc))


def active_jobs(name: str) -> None:
    """This dataset's newest jobs, live while one is active (the fragment polls only then); reruns the
    page when one it watched ends."""
    first = [jobs.list_jobs(dataset=name, limit=5)]
    polling = any(j["status"] in jobs.ACTIVE for j in first[0])

    @st.fragment(run_every=widgets.poll_every(polling))
    def live() -> None:
        rows = first.pop() if first else jobs.list_jobs(dataset=name, limit=5)  # fresh on its own reruns
        active = {j["id"] for j in rows if j["status"] in jobs.ACTIVE}
        seen = st.session_state.setdefault("active_seen", set())
        if seen - active or (polling and not active):  # a watched job has ended: refresh the page
            st.session_state["active_seen"] = active
            st.rerun(scope="app")
        seen.update(active)
        for job in rows[:3]:
            widgets.job_status(job)

    live()


registered = catalog.list_datasets()
if registered.empty:
    st.stop()
names = list(registered.name)
current = st.session_state.get("dataset")
name = st.selectbox("Dataset", names, index=names.index(current) if current in names else 0)
st.session_state["dataset"] = name
active_jobs(name)

ds = catalog.get_dataset(name)
if ds["scanned_at"] is None:
    st.info("Scanning... the counts appear here when the scan job is done.")
    st.stop()

counts = catalog.class_counts(name)
problems = catalog.problems_table(name)
skipped = int((problems.severity == "skipped").sum())
c1, c2, c3, c4 = st.columns(4)
c1.metric("Images", f"{int(counts.total.sum()):,}")
c2.metric("Classes", len(counts))
c3.metric("Skipped files", skipped)
c4.metric("Working size", f"{ds['image_size']}px × {ds['channels']}")

left, right = st.columns([2, 3])
with left:
    st.subheader("Classes")
    st.dataframe(counts, hide_index=True)
with right:
    st.subheader(f"Problem files ({len(problems)})")
    if problems.empty:
        st.caption("Every file is a usable image.")
    else:
        st.caption("skipped = left out, with the reason; converted = kept after the conversion named.")
        st.dataframe(problems, hide_index=True, height=260)

st.subheader("Images by class")
table = catalog.images_table(name)
cls = st.selectbox("Class", sorted(table.label.unique()), key="grid_class")
per_page = 48
members = table[table.label == cls]
pages = max(1, -(-len(members) // per_page))
page = st.number_input(f"Page (of {pages})", 1, pages, 1, key="grid_page") - 1
shown = members.iloc[page * per_page:(page + 1) * per_page]
widgets.image_grid(catalog.load_pixels(name), shown.row.to_numpy())

st.subheader("Embeddings")
backs = embeddings.list_backbones(name)
if not backs.empty:
    st.dataframe(backs[["backbone_id", "dim", "embedded", "accuracy", "eval_split", "created_at"]], hide_index=True,
                 column_config={"accuracy": st.column_config.NumberColumn(format="%.4f",
                                                                          help="of the trained backbone")})
with st.form("embed"):
    spec = st.text_input("Backbone", DEFAULT_BACKBONE,
                         help="trained:<arch> trains a classifier on this dataset's train split (the paper's way);"
                              " timm:<name> uses pretrained timm weights from the local cache or a checkpoint.")
    epochs = st.number_input("Training epochs (0 = the recipe's default)", min_value=0, value=0)
    checkpoint = st.text_input("Checkpoint file (timm backbones, optional)")
    if st.form_submit_button("Embed all images", type="primary"):
        params = {"backbone": spec, "epochs": int(epochs) or None, "checkpoint": checkpoint or None}
        jobs.launch("embed", name, {k: v for k, v in params.items() if v})
        st.rerun()
