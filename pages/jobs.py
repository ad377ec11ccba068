"""Jobs: every background job with its status, progress, log and a cancel button."""
import pandas as pd
import streamlit as st

from core import jobs
from pages import widgets

widgets.route_through_app()

st.title("Jobs")


@st.fragment(run_every="2s")
def job_table() -> None:
    rows = jobs.list_jobs(limit=500)
    if not rows:
        st.info("No jobs yet. Scanning, training, embedding and mapping all run here as background jobs.")
        return
    table = pd.DataFrame([{
        "id": j["id"], "kind": j["kind"], "dataset": j["dataset"], "status": j["status"],
        "progress": jobs.describe(j)["fraction"], "detail": jobs.describe(j)["text"],
        "created": j["created_at"], "finished": j["finished_at"]} for j in rows])
    st.dataframe(table, hide_index=True, column_config={
        "progress": st.column_config.ProgressColumn("progress", min_value=0.0, max_value=1.0)})
    ids = [j["id"] for j in rows]
    chosen = st.selectbox("Details of job", ids, key="job_detail")
    job = next(j for j in rows if j["id"] == chosen)
    widgets.job_status(job)
    if job["error"]:
        st.error(job["error"])
    st.caption("Parameters")
    st.json(job["params"] or {}, expanded=False)
    if job["result"]:
        st.caption("Result")
        st.json(job["result"], expanded=False)
    st.caption("Log (tail)")
    st.code(jobs.log_tail(job, 40) or "(empty)", language=None)


job_table()
