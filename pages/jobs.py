"""Jobs: every background job with its lane, status, progress, what it waits for, log and a cancel button."""
import pandas as pd
import streamlit as st

from core import jobs
from pages import widgets

widgets.route_through_app()

st.title("Jobs")
st.caption("Quick jobs (the UMAP map, merge trees, scoring new images) have compute slots of their own and never"
           f" wait behind a training run: {jobs.max_quick()} quick slot(s) (REDEX_QUICK_JOBS) besides"
           f" {jobs.max_parallel()} heavy one(s) (REDEX_MAX_JOBS). Scans and sweep schedulers take none.")


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
        table = pd.DataFrame([{
            "id": j["id"], "kind": j["kind"], "lane": j.get("lane") or "",
            "dataset": j["dataset"], "status": j["status"], "progress": d["fraction"], "detail": d["text"],
            "created": j["created_at"], "finished": j["finished_at"]} for j, d in zip(rows, described)])
        st.dataframe(table, hide_index=True, column_config={
            "progress": st.column_config.ProgressColumn("progress", min_value=0.0, max_value=1.0)})
        ids = [j["id"] for j in rows]
        chosen = st.selectbox("Details of job", ids, key="job_detail")
        job = next(j for j in rows if j["id"] == chosen)
        widgets.job_status(job)
        if job["error"]:
            st.error(widgets.md_text(job["error"]))  # it may name a dataset, a path or a label
        st.caption("Parameters")
        st.json(job["params"] or {}, expanded=False)
        if job["result"]:
            st.caption("Result")
            st.json(job["result"], expanded=False)
        st.caption("Log (tail)")
        st.code(jobs.log_tail(job, 40) or "(empty)", language=None)

    live()


job_table(jobs.list_jobs(limit=500))
