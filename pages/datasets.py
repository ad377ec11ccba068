"""Datasets: add a dataset, see its classes, problem files and images, and embed it."""
import streamlit as st

from core import estimates, jobs, wording
from core.cli.doctor import save_record
from core.data import catalog, sources
from core.embed import embeddings, timm_models
from core.embed.timm_models import BackboneUnavailable
from pages import widgets

widgets.route_through_app()

st.title("Datasets")


def added(name: str) -> None:
    """A dataset was registered: record it (`<cache>/datasets.json`, what `redex doctor --repair` rebuilds
    from), scan it in the background and select it."""
    save_record()
    jobs.launch("scan", name)
    st.session_state["dataset"] = name
    st.rerun()


report = st.session_state.pop("removed_report", None)
if report:
    st.success(report["text"])
    if report["files"]:
        st.caption("Deleted from the cache:")
        st.code("\n".join(report["files"]), language=None)

with st.expander("Add a dataset", expanded=widgets.datasets_now().empty):
    demo, own = st.tabs(["Fashion-MNIST demo", "Your images"])
    with demo:
        st.write("70,000 labelled 28x28 images in 10 classes (train 60,000 / test 10,000).")
        limit = st.number_input("Images per split (0 = all)", min_value=0, value=0, step=500, key="demo_limit")
        if st.button("Load the Fashion-MNIST demo", type="primary"):
            try:
                name = sources.register(sources.FASHION_MNIST, limit=int(limit) or None)
            except (ValueError, OSError) as exc:
                st.error(widgets.md_text(exc))
            else:
                added(name)
    with own:
        st.write("An image folder (`root/<class>/<image>`, optionally under `train/`, `val/`, `test/`), "
                 "or a CSV/Parquet manifest with columns `path,label[,split]`.")
        path = st.text_input("Folder or manifest path", key="source_path")
        name = st.text_input("Name (optional)", key="source_name")
        size = st.number_input("Working size in px (0 = native if <= 64, else 64)", min_value=0, max_value=sources.MAX_WORKING_SIZE,
                               value=0, key="source_size", help="Every image is decoded once to this size (short side"
                               " resized, centre crop) for the computations; at most 1,024 px.")
        if st.button("Add and scan", disabled=not path):
            try:
                # Refused at once (nothing recorded) when the name breaks the rule or no sampled file is an
                # image (e.g. /etc); the message names the path, so it is shown escaped.
                name = sources.register(path, name or None, image_size=int(size) or None)
            except (ValueError, OSError) as exc:
                st.error(widgets.md_text(exc))
            else:
                added(name)


def job_lines(name: str, kinds: tuple[str, ...], count: int, key: str) -> None:
    """The newest `count` jobs of `kinds` of this dataset, where their button is: live while one is active
    (the fragment polls only then); the page reruns when one it watched ends."""
    def newest() -> list[dict]:
        return [j for j in jobs.list_jobs(dataset=name, limit=30) if j["kind"] in kinds][:count]

    first = [newest()]
    polling = any(j["status"] in jobs.ACTIVE for j in first[0])

    @st.fragment(run_every=widgets.poll_every(polling))
    def live() -> None:
        rows = first.pop() if first else newest()  # fresh on its own reruns
        active = {j["id"] for j in rows if j["status"] in jobs.ACTIVE}
        seen = st.session_state.setdefault(key, set())
        if seen - active or (polling and not active):  # a watched job has ended: refresh the page
            st.session_state[key] = active
            st.rerun(scope="app")
        seen.update(active)
        for job in rows:
            widgets.job_status(job)

    live()


registered = widgets.datasets_now()
if registered.empty:
    st.stop()
name = widgets.dataset_picker(scanned_only=False)  # every registered dataset; ?dataset= in the URL


# -- the store's reads, again only after some process wrote to the store (`widgets.store_generation`) ----
# Every rerun of the page read the whole image list twice before (the grid, the embedding estimate): at
# 1.28 million images a class picked in the grid took 4 s to show and 10 s to settle.
@st.cache_data(max_entries=16, ttl=60, show_spinner=False)
def summary(name: str, generation: tuple):
    """The dataset's row, its class counts (label x split) and its problem files."""
    return catalog.get_dataset(name), catalog.class_counts(name), catalog.problems_table(name)


@st.cache_data(max_entries=64, ttl=60, show_spinner=False)
def grid_rows(name: str, label: str, offset: int, limit: int, generation: tuple) -> list[int]:
    """`catalog.class_page_rows`: one page of a class's images."""
    return catalog.class_page_rows(name, label, offset, limit)


@st.cache_data(max_entries=32, ttl=30, show_spinner=False)
def embed_estimate_now(name: str, spec: str, epochs: int, generation: tuple, speeds: tuple | None):
    """`estimates.embed_estimate`, made again after a write to the store or a speed recorded (`speeds`), or
    after 30 s (it follows the machine's load); None for a spec the form will refuse."""
    try:
        return estimates.embed_estimate(name, spec, int(epochs) or None)
    except (ValueError, OSError, BackboneUnavailable):
        return None


def remove_panel(name: str) -> None:
    """Remove the dataset and everything derived from it, after a confirmation; never its source files."""
    if st.session_state.get("confirm_remove") != name:
        if st.button("Remove this dataset...", key="remove_dataset"):
            st.session_state["confirm_remove"] = name
            st.rerun()
        return
    ds = catalog.get_dataset(name)
    st.warning(f"Remove the dataset {widgets.md_text(name)} and everything derived from it (pixel cache,"
               " embeddings, merge trees, training runs, models, finished jobs)? Its source files are kept:")
    st.code(str(ds["source"]), language=None)
    yes, no = st.columns(2)
    if yes.button("Yes, remove it and everything derived from it (not its source files)", type="primary",
                  key="remove_confirm"):
        st.session_state.pop("confirm_remove", None)
        try:
            removed = sources.remove_dataset(name)  # refused while one of its jobs is queued or running
        except (ValueError, OSError) as exc:
            st.error(widgets.md_text(exc))
            return
        save_record()
        rows = ", ".join(f"{table} {n:,}" for table, n in sorted(removed["tables"].items()))
        st.session_state["removed_report"] = {
            "text": widgets.md_text(f"Removed dataset {name}; rows deleted: {rows or 'none'}."
                                    f" Its source {ds['source']} was not touched."),
            "files": removed["files"]}
        widgets.forget_dataset(name)
        st.rerun()
    if no.button("Cancel", key="remove_cancel"):
        st.session_state.pop("confirm_remove", None)
        st.rerun()


remove_panel(name)
job_lines(name, ("scan",), 1, "scan_seen")  # the scan, by the dataset it belongs to; embedding: by its button

ds, counts, problems = summary(name, widgets.store_generation())
if ds["scanned_at"] is None:
    st.info("Scanning... the counts appear here when the scan job is done.")
    st.stop()

skipped = int((problems.severity == "skipped").sum())
c1, c2, c3, c4 = st.columns([2, 2, 2, 3])
c1.metric("Images", f"{int(counts.total.sum()):,}")
c2.metric("Classes", f"{len(counts):,}")
c3.metric("Skipped files", skipped)
size, colour = wording.image_format(ds["image_size"], ds["channels"]).split(", ", 1)
c4.metric("Working size", size, help="Every image is decoded once to this size and colour mode, and every"
          " computation uses it.")
c4.caption(colour)
st.caption("Source:")
st.code(str(ds["source"]), language=None)

left, right = st.columns([2, 3])
with left:
    st.subheader("Classes")
    st.dataframe(counts, hide_index=True, key="class_counts", column_config={
        "label": st.column_config.TextColumn("class"),
        **{c: st.column_config.NumberColumn(c, format="localized") for c in counts.columns if c != "label"}})
with right:
    st.subheader(f"Problem files ({len(problems)})")
    if problems.empty:
        st.caption("Every file is a usable image.")
    else:
        st.caption("skipped = left out, with the reason; converted = kept after the conversion named.")
        st.dataframe(problems, hide_index=True, height=260)

st.subheader("Images by class")


@st.fragment
def class_grid(name: str, counts) -> None:
    """A fragment: the class picker and the page stepper rerun only the grid, which reads one page of rows
    and shows it as one sheet (one element: 48 images in 12 columns were about 100 elements to re-send and
    redraw on each pick, 260 / 355 ms p50 / p95 at 1.28 million images)."""
    if counts.empty:
        st.caption("no images")
        return
    sizes = dict(zip(counts.label, counts.total))
    cls = st.selectbox("Class", sorted(sizes), key="grid_class")
    per_page, n = 48, int(sizes[cls])
    pages = max(1, -(-n // per_page))
    page = min(st.number_input(f"Page (of {pages:,})", 1, pages, 1, key="grid_page"), pages) - 1
    rows = grid_rows(name, cls, page * per_page, per_page, widgets.store_generation())
    shown = f"{widgets.md_text(cls)}: images {page * per_page + 1:,}-{page * per_page + len(rows):,} of {n:,}"
    widgets.show_sheets(widgets.gallery(name, str(ds["scanned_at"])), [(rows, None)], [shown])


widgets.sheet_style()
class_grid(name, counts)

st.subheader("Embeddings")
backs = widgets.backbones_now(name)
if not backs.empty:
    labels = wording.plain_labels(backs.backbone_id)
    shown_backs = backs.assign(backbone=backs.backbone_id.map(labels), accuracy=100 * backs.accuracy)
    st.dataframe(shown_backs[["backbone", "embedded", "dim", "accuracy", "eval_split", "created_at", "backbone_id"]],
                 hide_index=True, key="backbones_table", column_config={
                     "backbone": st.column_config.TextColumn("backbone", width=290),
                     "embedded": st.column_config.NumberColumn("images embedded", format="localized", width=115),
                     "dim": st.column_config.NumberColumn("dimensions", width=80),
                     "accuracy": st.column_config.NumberColumn("accuracy %", format="%.2f", width=85,
                                                               help="of the trained backbone, on the split named"
                                                                    " next (pretrained backbones: none)"),
                     "eval_split": st.column_config.TextColumn("measured on", width=90),
                     "created_at": st.column_config.DatetimeColumn("created", format="MMM D, HH:mm", width=105),
                     "backbone_id": st.column_config.TextColumn("id (for the command line)", width=170,
                                                                help="the id `redex project --backbone-id` and"
                                                                     " `redex sweep --backbone-id` take")})
@st.cache_data(ttl=120, show_spinner=False)
def backbone_choices() -> list:
    """What can run here now and why not (HF cache, HF_HUB_OFFLINE, one short Hub probe), for 2 minutes."""
    return timm_models.backbone_choices()


choices = backbone_choices()
reasons = {c.spec: c.reason for c in choices}
blocked = [c for c in choices if not c.can_run]
if blocked:
    with st.expander(f"Backbones that cannot run here now ({len(blocked)})"):
        for c in blocked:
            st.caption(f"**{widgets.md_text(c.spec)}**: {widgets.md_text(c.reason)}")
with st.form("embed"):
    picked = st.selectbox("Backbone", [c.spec for c in choices if c.can_run],
                          format_func=lambda s: f"{wording.plain(s)}: {reasons[s]} ({s})" if s.startswith("timm:")
                          else f"{wording.plain(s)}, trained on this dataset ({s})",
                          help="Backbones that can run here now. trained:<arch> trains a classifier on this dataset's"
                               " train split (the paper's way); timm:<name> uses pretrained timm weights from the"
                               " Hugging Face cache (or downloads them) and reads each image at its pretrained size.")
    other = st.text_input("Other backbone (optional)", placeholder="timm:NAME",
                          help="Any trained:<arch> or timm:<name>; with a checkpoint file below, any timm model.")
    spec = other.strip() or picked
    epochs = st.number_input("Training epochs (0 = the recipe's default)", min_value=0, max_value=500, value=0,
                             key="embed_epochs")
    checkpoint = st.text_input("Checkpoint file (timm backbones, optional)")
    if st.form_submit_button("Embed all images", type="primary"):
        params = {"backbone": spec, "epochs": int(epochs) or None, "checkpoint": checkpoint or None}
        try:  # a bad spec or checkpoint is refused here, before a job exists (the CLI does the same)
            params = embeddings.check_embed_params(name, {k: v for k, v in params.items() if v})
        except (ValueError, OSError, BackboneUnavailable) as exc:
            st.error(widgets.md_text(exc))
        else:
            jobs.launch("embed", name, params)
            st.rerun()


est = embed_estimate_now(name, spec, int(epochs), widgets.store_generation(), estimates.speeds_version())
if est is not None:  # how long the embedding job would take here (a bad spec is said when the form is submitted)
    st.caption(f"{widgets.md_text(wording.plain(spec))}: {est.text()}")
job_lines(name, ("embed",), 1, "embed_seen")  # the embedding job's progress, by its button
