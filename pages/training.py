"""Training: semantic vs random vs full subsets, launched from here, with the paper's Figure 2."""
import json

import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
import streamlit as st

from core import jobs, wording
from core.data import catalog
from core.embed import embeddings
from core.embed.backbones import list_archs
from core.redundancy.cuts import REPRESENTATIVES
from core.redundancy.trees import LINKAGES
from core.subsets import plan, results, sweeps
from core.training.recipe import AUGMENTATIONS, OPTIMIZERS, default_recipe
from pages import widgets

widgets.route_through_app()

st.title("Training")
st.caption("Does the subset train a model as good as the full set? Every run trains a classifier from scratch and"
           " is evaluated on the test split (else val). Random subsets keep the same per-class counts.")
name = widgets.dataset_picker()
if name is None:
    st.stop()
ds = catalog.get_dataset(name)
all_runs = results.runs(name)

with st.expander("New sweep", expanded=all_runs.empty):
    c1, c2, c3 = st.columns([3, 2, 1])
    fractions = c1.multiselect("Fractions", [1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1],
                               default=list(plan.DEFAULT_FRACTIONS), key="sweep_fractions",
                               help="1.0 is the full train split (one run per seed, whatever the methods).")
    methods = c2.multiselect("Methods", plan.METHODS, default=list(plan.METHODS), key="sweep_methods",
                             help="semantic: one representative per redundant group (the Redundant groups page);"
                                  " random: the same number of images per class, drawn at random.")
    seeds = c3.number_input("Seeds", 1, 20, plan.DEFAULT_SEEDS, key="sweep_seeds")
    base = default_recipe(ds["image_size"])
    st.markdown("**Recipe** (saved with every run)")
    r1, r2, r3, r4 = st.columns(4)
    arch = r1.selectbox("Architecture", list_archs(), index=list_archs().index(base.arch), key="sweep_arch",
                        format_func=wording.arch_name)
    epochs = r2.number_input("Epochs", 1, 500, base.epochs, key="sweep_epochs")
    batch = r3.number_input("Batch size", 8, 4096, base.batch_size, key="sweep_batch")
    lr = r4.number_input("Peak learning rate", 1e-5, 10.0, base.lr, format="%.4f", key="sweep_lr")
    r5, r6, r7 = st.columns(3)
    optimizer = r5.selectbox("Optimiser", OPTIMIZERS, index=OPTIMIZERS.index(base.optimizer), key="sweep_opt",
                             format_func=wording.plain)
    augmentation = r6.selectbox("Augmentation", AUGMENTATIONS, index=AUGMENTATIONS.index(base.augmentation),
                                key="sweep_aug", format_func=wording.plain)
    budget = r7.radio("Budget", plan.BUDGET_RULES, horizontal=True, key="sweep_budget",
                      help="epochs: every run trains the same number of epochs (smaller subsets take fewer steps);"
                           " steps: every run takes as many optimisation steps as the full run.")
    selection = None
    if "semantic" in methods and any(f < 1.0 for f in fractions):
        st.markdown("**Semantic subset**")
        backs = embeddings.list_backbones(name)
        backs = backs[backs.embedded > 0]
        if backs.empty:
            if not widgets.embeddings_in_progress(name, "sweep_embed_waiting"):
                st.warning("The semantic subset needs embeddings: start an embedding job on the **Datasets** page.")
        else:
            s1, s2, s3 = st.columns([3, 2, 2])
            with s1:
                bid = widgets.backbone_picker(list(backs.backbone_id), "sweep_backbone")
            linkage = s2.selectbox("Linkage", LINKAGES, key="sweep_linkage", format_func=wording.plain,
                                   index=LINKAGES.index(st.session_state.get("groups_linkage", "complete")))
            rep = s3.selectbox("Kept image of each group", REPRESENTATIVES, key="sweep_rep", format_func=wording.plain,
                               index=REPRESENTATIVES.index(st.session_state.get("representative", "nearest_mean")))
            selection = {"backbone_id": bid, "linkage": linkage, "representative": rep}
    force = st.checkbox("Train identical runs again", key="sweep_force",
                        help="By default a run with the same recipe, seed and images as a finished one is reused.")
    recipe = {"arch": arch, "epochs": int(epochs), "batch_size": int(batch), "lr": float(lr),
              "optimizer": optimizer, "augmentation": augmentation}
    try:
        spec = plan.SweepSpec(fractions=tuple(sorted(fractions, reverse=True)), methods=tuple(methods),
                                 seeds=int(seeds), recipe=recipe, budget=budget, selection=selection, force=force)
        est = plan.estimate(name, spec)
        took = (f"about **{wording.duration(est['seconds'])}** ({est['speed_source']})" if est["seconds"] is not None
                else f"time unknown: {est['speed_source']}")
        st.info(f"{wording.plural(est['runs'], 'run')}, {wording.plural(est['images'], 'training image')} to"
                f" process: {took}; {wording.plural(est['parallel'], 'run')} at once (REDEX_MAX_JOBS)."
                " Identical finished runs are reused and take no time.")
        if st.button("Launch sweep", type="primary", key="launch_sweep"):
            sweep_id, job_id = sweeps.launch_sweep(name, spec)
            st.session_state["launched_sweep"] = {"dataset": name, "sweep_id": sweep_id, "job_id": job_id}
            st.rerun()
    except (plan.SubsetTrainingError, ValueError) as exc:
        st.error(widgets.md_text(exc))


def launched_sweep() -> None:
    """What became of the sweep this session launched, by the button: planning, how many runs it trains and
    how many identical finished runs it reused (all of them: nothing to train), then its outcome."""
    mine = st.session_state.get("launched_sweep")
    if not mine or mine["dataset"] != name:
        return
    first = [jobs.get_job(mine["job_id"])]
    polling = first[0] is not None and first[0]["status"] in jobs.ACTIVE

    @st.fragment(run_every=widgets.poll_every(polling))
    def outcome() -> None:
        job = first.pop() if first else jobs.get_job(mine["job_id"])
        if job is None:
            return
        if polling and job["status"] not in jobs.ACTIVE:
            st.rerun(scope="app")  # it has ended: show the outcome and the new results, stop polling
        head = f"Sweep {mine['sweep_id']}"
        if job["status"] in jobs.ACTIVE:
            st.info(widgets.md_text(f"{head} started: {jobs.describe(job)['text']}. Its runs are listed under Runs."))
            return
        r = job.get("result") or {}
        reused, trained = int(r.get("reused") or 0), int(r.get("done") or 0)
        if job["status"] == "done" and not r.get("runs"):
            st.info(f"{head}: every run ({wording.plural(reused, 'identical finished run')}) was reused; nothing"
                    " was trained. Tick *Train identical runs again* to train them anew.")
        elif job["status"] == "done":
            st.success(f"{head} finished: {wording.plural(trained, 'run')} trained"
                       + (f", {wording.plural(reused, 'identical finished run')} reused" if reused else "")
                       + (f", {r.get('failed')} failed" if r.get("failed") else "") + ".")
        else:
            widgets.job_status(job)

    outcome()


launched_sweep()


def live_runs() -> None:
    """Sweeps, training jobs (running, or waiting for a slot and saying for what) and the runs table;
    polls every 2 s only while a sweep or a training job of this dataset is active."""
    first = [(all_runs, jobs.active_jobs(dataset=name, kinds=("sweep", "train")))]
    polling = bool(first[0][1])

    @st.fragment(run_every=widgets.poll_every(polling))
    def live() -> None:
        # The page's own reads on the first run, fresh ones (read-only unless a run must be settled) after.
        df, active = first.pop() if first else (results.runs(name),
                                                jobs.active_jobs(dataset=name, kinds=("sweep", "train")))
        if polling and not active:
            st.rerun(scope="app")  # everything has ended: redraw the results, and stop polling
        for sweep in (j for j in active if j["kind"] == "sweep"):
            sweep_id = (sweep["params"] or {}).get("sweep_id")
            c1, c2 = st.columns([5, 1])
            info = jobs.describe(sweep)
            c1.progress(info["fraction"] or 0.0, text=widgets.md_text(f"sweep {sweep_id} · {info['text']}"))
            if c2.button("Cancel sweep", key=f"cancel-sweep-{sweep_id}"):
                sweeps.cancel_sweep(sweep_id)
                st.rerun(scope="app")
        for job in sorted((j for j in active if j["kind"] == "train"), key=lambda j: j["id"]):
            widgets.job_status(job)  # its phase names the run; a queued one says what it waits for
        if df.empty:
            st.caption("No training runs yet.")
            st.caption("Choose fractions and methods under *New sweep* above and launch one (a quick first try:"
                       " fractions 1.0 and 0.5, one seed, 1 epoch).")
        else:
            done, total = (pd.to_numeric(df[c], errors="coerce").astype(float) for c in ("done", "total"))
            progress = (done / total.where(total > 0)).where(df.status != "done", 1.0)  # NaN: no job yet
            shown = df.assign(progress=progress, test_top1=df.test_top1 * 100, error=df.error.fillna(""),
                              time=[wording.duration(x) if pd.notna(x) else "" for x in df.seconds])
            # The columns a person reads fit the page; the ids (for the CLI and the Jobs page) come last.
            st.dataframe(shown, hide_index=True, key="runs_table", column_order=[
                "method", "fraction", "seed", "n_train", "status", "progress", "test_top1", "time", "device", "error",
                "sweep_id", "job_id", "run_key"], column_config={
                    "method": st.column_config.TextColumn("subset", width=80),
                    "fraction": st.column_config.NumberColumn("fraction", width=65),
                    "seed": st.column_config.NumberColumn("seed", width=45),
                    "n_train": st.column_config.NumberColumn("training images", format="localized", width=100),
                    "status": st.column_config.TextColumn("status", width=75),
                    "progress": st.column_config.ProgressColumn("progress", min_value=0.0, max_value=1.0, width=90),
                    "test_top1": st.column_config.NumberColumn("test top-1 %", format="%.2f", width=85),
                    "time": st.column_config.TextColumn("time", width=65),
                    "device": st.column_config.TextColumn("device", width=55),
                    "error": st.column_config.TextColumn("error", width=70),
                    "sweep_id": st.column_config.NumberColumn("sweep", width=55),
                    "job_id": st.column_config.NumberColumn("job", width=45),
                    "run_key": st.column_config.TextColumn("run key", width=80)})
            if (df.status.isin(["failed", "cancelled"])).any() and st.button("Retry failed runs", key="retry"):
                sweeps.retry(name)
                st.rerun(scope="app")
        finished = int((df.status == "done").sum())
        if st.session_state.setdefault("runs_finished", finished) != finished:
            st.session_state["runs_finished"] = finished
            st.rerun(scope="app")  # new results: redraw the plot

    live()


st.subheader("Runs")
live_runs()

done = all_runs[all_runs.status == "done"]
if done.empty:
    st.stop()
st.subheader("Test accuracy vs subset size")
tags = list(dict.fromkeys(done.recipe_tag))
described = {t: json.loads(done[done.recipe_tag == t].recipe.iloc[0]) for t in tags}


def describe_recipe(tag: str) -> str:
    r = described[tag]
    budget = f"{r['steps']} steps" if r.get("budget") == "steps" else f"{r['epochs']} epochs"
    augmentation = "no augmentation" if r["augmentation"] == "none" else wording.plain(r["augmentation"])
    return (f"{wording.arch_name(r['arch'])}, {budget}, batch {r['batch_size']}, {wording.plain(r['optimizer'])}"
            f" peak learning rate {r['lr']:g}, {augmentation}")


def results_overlap(curves: dict) -> list[tuple[int, float]]:
    """(subset size, mean top-1) where semantic and random (below the full set) have the same mean to 0.01
    points: the points a reader would otherwise take for one."""
    if len(curves) < 2:
        return []
    sem, rnd = (curves[m][curves[m].method == m] for m in ("semantic", "random"))
    pairs = sem.merge(rnd, on="fraction", suffixes=("_s", "_r"))
    return [(int(round(r.n_train_s)), float(r.top1_mean_s)) for r in pairs.itertuples()
            if abs(r.top1_mean_s - r.top1_mean_r) < 5e-5]


tag = st.selectbox("Recipe", tags, format_func=describe_recipe, key="results_recipe") if len(tags) > 1 else tags[0]
table = results.summary(all_runs, tag)
fig = go.Figure()
full = table[table.method == "full"]
if not full.empty:
    f = full.iloc[0]
    fig.add_hrect(y0=100 * (f.top1_mean - f.top1_std), y1=100 * (f.top1_mean + f.top1_std), line_width=0,
                  fillcolor="gray", opacity=0.15)
    fig.add_hline(y=100 * f.top1_mean, line_dash="dash", line_color="gray",
                  annotation_text=f"full set {results.format_pm(f.top1_mean, f.top1_std, f.seeds)}")
# Random is drawn first, wide and with large open diamonds, and semantic over it, narrow with small filled
# circles: where the two are equal (at the full set, which both curves end at, or with identical means) the
# diamond still shows round the circle and the wide line beside the narrow one, so neither hides the other.
STYLE = {"random": {"color": "#1f77b4", "line": 5, "symbol": "diamond-open", "size": 15, "opacity": 0.55},
         "semantic": {"color": "#d62728", "line": 2, "symbol": "circle", "size": 8, "opacity": 1.0}}
curves = {}
for method in ("random", "semantic"):
    style = STYLE[method]
    rows = table[table.method == method].sort_values("n_train")
    if rows.empty:
        continue
    if not full.empty:
        rows = pd.concat([rows, full])  # both curves end at the full set
    curves[method] = rows
    fig.add_trace(go.Scatter(
        x=rows.n_train, y=100 * rows.top1_mean, error_y={"type": "data", "array": 100 * rows.top1_std},
        mode="lines+markers", name=method, opacity=style["opacity"],
        line={"color": style["color"], "width": style["line"]},
        marker={"symbol": style["symbol"], "size": style["size"], "line": {"width": 2, "color": style["color"]}},
        text=[f"fraction {fr:g}, {wording.plural(int(s), 'seed')}" for fr, s in zip(rows.fraction, rows.seeds)],
        hovertemplate="%{x:,.0f} images: %{y:.2f} %<br>%{text}<extra>" + method + "</extra>"))
sizes = sorted({int(n) for n in table.n_train.round()})
fig.update_layout(xaxis_title="training images (subset size)", yaxis_title="test top-1 accuracy (%)",
                  legend_title="subset", legend_traceorder="reversed", height=420, margin={"t": 30, "b": 10})
# Ticks at the subset sizes themselves, whole images in one format (no '5,999.5' between two sizes).
fig.update_xaxes(tickvals=sizes, ticktext=[f"{n:,}" for n in sizes], tickformat=",d")
st.plotly_chart(fig, key="accuracy_plot")
notes = []
if same := [f"{n:,} images ({100 * v:.2f} %)" for n, v in results_overlap(curves)]:
    notes.append(f"Semantic and random are equal at {', '.join(same)}: the red circle sits inside the blue diamond.")
if not full.empty and len(curves) == 2:
    notes.append("Both curves end at the full-set run (the same runs), where the two markers always coincide.")
if notes:
    st.caption(" ".join(notes))
shown_summary = results.with_top1_text(table)
shown_summary["backbone"] = [wording.plain(b) if b else "" for b in shown_summary.backbone_id]
st.dataframe(shown_summary[["method", "fraction", "n_train", "seeds", "top1", "backbone", "backbone_id"]],
             hide_index=True, key="summary_table", column_config={
                 "method": st.column_config.TextColumn("subset", width=80),
                 "fraction": st.column_config.NumberColumn("fraction", width=65),
                 "n_train": st.column_config.NumberColumn("training images", format="localized", width=110),
                 "seeds": st.column_config.NumberColumn("seeds", width=55),
                 "top1": st.column_config.TextColumn("test top-1 %", help="mean ± std over the seeds", width=95),
                 "backbone": st.column_config.TextColumn("backbone (semantic subsets)", width=270),
                 "backbone_id": st.column_config.TextColumn("backbone id (command line)", width=180)})

st.subheader("Per-class accuracy against the full set")
choices = done[(done.recipe_tag == tag) & (done.method != "full")]
if choices.empty:
    st.caption("Train a subset to compare it class by class with the full set.")
else:
    run_names = {r.run_key: f"{r.method} {r.fraction:g} seed {r.seed} · {100 * r.test_top1:.2f} %"
                 for r in choices.itertuples()}
    key = st.selectbox("Run", list(choices.run_key), key="delta_run", format_func=run_names.get)
    deltas = results.per_class_deltas(name, key)
    if "delta" not in deltas:
        st.info("No full-set run with this recipe yet, so there is nothing to compare with: below is this run's own"
                " accuracy per class. Launch a sweep with fraction 1.0 (and this recipe) to see the differences.")
    else:
        deltas = deltas.assign(label=widgets.chart_text(deltas.label))
        fig = px.bar(deltas, x="label", y=100 * deltas.delta,
                     labels={"y": "accuracy − full (points)", "label": "class"},
                     color=deltas.delta > 0, color_discrete_map={True: "#2ca02c", False: "#d62728"})
        fig.update_layout(showlegend=False, height=360)
        fig.update_xaxes(categoryorder="array", categoryarray=list(deltas.label))  # classes in order, not by colour
        st.plotly_chart(fig, key="delta_plot")
    percent = {c: 100 * deltas[c] for c in ("accuracy", "full_accuracy", "delta") if c in deltas}
    st.dataframe(deltas.assign(**percent), hide_index=True, key="delta_table", column_config={
        "label": "class", "accuracy": st.column_config.NumberColumn("this run %", format="%.1f"),
        "full_accuracy": st.column_config.NumberColumn("full set %", format="%.1f"),
        "delta": st.column_config.NumberColumn("difference (points)", format="%+.1f")})
