"""Jobs: every background job with its lane, status, progress, what it waits for, log and a cancel button."""
import pandas as pd
import streamlit as st

from core import jobs, wording
from core.scale import where_text
from pages import widgets

widgets.route_through_app()

st.title("Jobs")
st.caption("Quick jobs (the UMAP map, merge trees, scoring new images) have compute slots of their own and never"
           f" wait behind a training run: {wording.plural(jobs.max_quick(), 'quick slot')} (REDEX_QUICK_JOBS)"
           f" besides {wording.plural(jobs.max_parallel(), 'heavy one')} (REDEX_MAX_JOBS)."
           " Scans and sweep schedulers take none.")


def detail(job: dict, described: dict) -> str:
    """A job's line for the table: `jobs.describe`'s text without the status (a column of its own)."""
    text = described["text"]
    return text[len(job["status"]) + 3:] if text.startswith(job["status"] + " · ") else text


def fields(title: str, kind: str, values: dict | None, empty: str) -> None:
    """A job's parameters or result as plain 'label: value' lines (`wording.job_fields`)."""
    st.markdown(f"**{title}**")
    lines = wording.job_fields(kind, values)
    if not lines:
        st.caption(empty)
        return
    st.markdown("\n".join(f"- {widgets.md_text(label)}: **{widgets.md_text(value)}**" for label, value in lines))


def job_table(rows: list[dict]) -> None:
    """The table and one job's details; polls every 2 s only while a job is active."""
    first = [rows]
    polling = any(j["status"] in jobs.ACTIVE for j in rows)

    @st.fragment(run_every=widgets.poll_every(polling))
    def live() -> None:
        rows = first.pop() if first else jobs.list_jobs(limit=500)  # fresh on its own reruns
        if polling and not any(j["status"] in jobs.ACTIVE for j in rows):
            st.rerun(scope="app")  # the last active job has ended: show it, and stop polling
        if not rows:
            st.info("No jobs yet. Scanning, training, embedding and mapping all run here as background jobs.")
            return
        described = [jobs.describe(j) for j in rows]
        kinds = {j["id"]: f"{wording.job_kind(j['kind'])} · {j['status']}" for j in rows}
        table = pd.DataFrame([{
            "id": j["id"], "job": wording.job_kind(j["kind"]), "dataset": j["dataset"] or "",
            "status": j["status"], "progress": d["fraction"], "detail": detail(j, d),
            "ran on": where_text(j.get("ran_on")), "finished": j["finished_at"]} for j, d in zip(rows, described)])
        # Every column fits a 1,400-px window beside the sidebar (about 940 px): what a person looks for first,
        # the detail as wide as what is left (its whole line is under Details of job), "ran on" only when some
        # job ran elsewhere than here; the lane and the raw kind are in the details.
        order = ["id", "job", "status", "progress", "detail", "dataset", "finished"]
        if set(table["ran on"]) - {"local", ""}:
            order.insert(4, "ran on")
        st.dataframe(table, hide_index=True, column_order=order, key="jobs_table", column_config={
            "id": st.column_config.NumberColumn("id", width=45),
            "job": st.column_config.TextColumn("job", width=115),
            "status": st.column_config.TextColumn("status", width=80),
            "ran on": st.column_config.TextColumn("ran on", width=80),
            "progress": st.column_config.ProgressColumn("progress", min_value=0.0, max_value=1.0, width=105),
            "detail": st.column_config.TextColumn("detail", width=300, help="the whole line is below, under"
                                                  " Details of job"),
            "dataset": st.column_config.TextColumn("dataset", width=130),
            "finished": st.column_config.DatetimeColumn("finished", format="MMM D, HH:mm", width=110)})
        ids = [j["id"] for j in rows]
        # Details open on the job that is running (else queued), not merely the newest one.
        active = [j["id"] for j in rows if j["status"] == "running"] or [j["id"] for j in rows
                                                                           if j["status"] in jobs.ACTIVE]
        chosen = st.selectbox("Details of job", ids, key="job_detail", index=ids.index(active[-1]) if active else 0,
                              format_func=lambda i: f"{i} · {kinds[i]}")
        job = next(j for j in rows if j["id"] == chosen)
        widgets.job_status(job)
        if job["error"]:
            st.error(widgets.md_text(job["error"]))  # it may name a dataset, a path or a label
        lane = job.get("lane") or ""
        st.caption(widgets.md_text(f"{wording.job_kind(job['kind'])} job (kind {job['kind']}"
                                   + (f", {lane} lane" if lane else "") + f") of dataset {job['dataset'] or '-'};"
                                   f" created {job['created_at']:%Y-%m-%d %H:%M:%S}"
                                   + (f", finished {job['finished_at']:%H:%M:%S}" if job["finished_at"] else "")
                                   + f"; ran on {where_text(job['ran_on']) if job.get('ran_on') else 'this machine'}."))
        settings, outcome = st.columns(2)
        with settings:
            fields("Parameters", job["kind"], job["params"], "the defaults")
        with outcome:
            if job["status"] in jobs.ACTIVE:
                st.markdown("**Result**")
                st.caption("when the job is done")
            else:
                fields("Result", job["kind"], job["result"], "none recorded")
        with st.expander("Parameters and result as raw JSON (for scripts and bug reports)"):
            st.json({"params": job["params"] or {}, "result": job["result"] or {}})
        st.caption("Log (tail)")
        st.code(jobs.log_tail(job, 40) or "(empty)", language=None, wrap_lines=True)

    live()


job_table(jobs.list_jobs(limit=500))
