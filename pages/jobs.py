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
        kinds = {j["id"]: f"{j['kind']} · {j['status']}" for j in rows}
        table = pd.DataFrame([{
            "id": j["id"], "kind": j["kind"], "lane": j.get("lane") or "",
            "dataset": j["dataset"], "status": j["status"], "progress": d["fraction"], "detail": detail(j, d),
            "ran on": where_text(j.get("ran_on")),
            "created": j["created_at"], "finished": j["finished_at"]} for j, d in zip(rows, described)])
        # What a person looks for first, with the detail wide enough to read; dataset, times and lane after it.
        first_cols = ["id", "kind", "status", "ran on", "progress", "detail"]
        order = [c for c in first_cols if c in table.columns] + [c for c in table.columns if c not in first_cols]
        st.dataframe(table, hide_index=True, column_order=order, column_config={
            "id": st.column_config.NumberColumn("id", width="small"),
            "kind": st.column_config.TextColumn("kind", width="small"),
            "lane": st.column_config.TextColumn("lane", width="small"),
            "status": st.column_config.TextColumn("status", width="small"),
            "progress": st.column_config.ProgressColumn("progress", min_value=0.0, max_value=1.0, width="small"),
            "detail": st.column_config.TextColumn("detail", width="large", help="the whole line is below, under"
                                                  " Details of job"),
            "created": st.column_config.DatetimeColumn("created", format="MMM D, HH:mm:ss"),
            "finished": st.column_config.DatetimeColumn("finished", format="HH:mm:ss")})
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
        st.caption("Parameters")
        st.json(job["params"] or {}, expanded=False)
        if job["result"]:
            st.caption("Result")
            st.json(job["result"], expanded=False)
        st.caption("Log (tail)")
        st.code(jobs.log_tail(job, 40) or "(empty)", language=None, wrap_lines=True)

    live()


job_table(jobs.list_jobs(limit=500))
