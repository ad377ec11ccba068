"""redex: the Streamlit entry point. A router, and the one control every page's sidebar shares: where heavy
jobs run (here, or a Ray cluster: `core.scale.setting`). Pages lay things out, `core/` computes."""
import streamlit as st

from core.scale import setting as ray_setting
from core.store.db import get_store
from pages.widgets import freeze_imports, md_text

st.set_page_config(page_title="redex · redundancy explorer", page_icon=":material/explore:", layout="wide")

PAGES = [
    st.Page("pages/datasets.py", title="Datasets", icon=":material/folder_open:", default=True),
    st.Page("pages/embedding_map.py", title="Embedding map", icon=":material/scatter_plot:"),
    st.Page("pages/redundant_groups.py", title="Redundant groups", icon=":material/filter_alt:"),
    st.Page("pages/training.py", title="Training", icon=":material/model_training:"),
    st.Page("pages/patch_heatmaps.py", title="Patch heatmaps", icon=":material/grid_on:"),
    st.Page("pages/jobs.py", title="Jobs", icon=":material/manufacturing:"),
]
PRECEDENCE = ("Order: `--ray` on a CLI command, then `REDEX_RAY_ADDRESS` where the app or CLI was started, then"
              " this setting. A job keeps the address it was launched with.")


def _code(text: str) -> str:
    """An address from outside as inline code (a backtick would end it)."""
    return "`" + str(text).replace("`", "'") + "`"


@st.fragment
def heavy_jobs() -> None:
    """Where jobs launched now run, what the cluster holds, and the Ray address to send them to. Reruns
    only itself; a check of an address runs in the background (a small poller waits for it)."""
    store = get_store()
    where = ray_setting.effective(store, max_age_s=ray_setting.READ_TTL_S)
    saving = st.session_state.get("ray_saving")  # the address this session asked to check and save
    busy = False
    if where.address is None:
        note = " (REDEX\\_RAY\\_ADDRESS says local)" if where.source == "env" else ""
        st.caption(f":material/computer: **Heavy jobs run here**, on this machine{note}.")
    else:
        check = ray_setting.status(where.address)
        known, busy = check.known, check.result is None
        origin = "REDEX\\_RAY\\_ADDRESS" if where.source == "env" else "the setting below"
        line = f":material/hub: **Heavy jobs run on Ray** at {_code(where.address)} ({origin})"
        if known is None:
            st.caption(line + ": asking the cluster what it holds…")
        elif known.get("ok"):
            st.caption(line + f": {ray_setting.describe(known)}.")
        else:
            st.caption(line + ".")
            st.warning(f"It does not answer: {md_text(known['error'])}. Jobs sent there fail; clear the setting to run"
                       " them here.", icon=":material/cloud_off:")
    if where.source == "env":
        st.caption(f"REDEX\\_RAY\\_ADDRESS={_code(where.address or 'local')} was set where the app started: it"
                   " wins over this setting.")
    current = ray_setting.saved(store, max_age_s=ray_setting.READ_TTL_S)
    typed = st.text_input("Ray address", value=current or "", placeholder="auto or HOST:PORT",
                          key="ray_address_input",
                          help="`auto`: the cluster this machine belongs to; `HOST:PORT`: the head's GCS port"
                               " (e.g. 10.0.0.5:6379); `ray://HOST:PORT`: Ray Client. Empty or `local`: here.")
    if st.button("Check and save", key="ray_save", icon=":material/network_check:"):
        saving = _submit(typed, store)
    if current and st.button("Clear: run here", key="ray_clear", icon=":material/computer:"):
        ray_setting.clear(store)
        st.session_state.pop("ray_saving", None)
        st.session_state["ray_said"] = ("info", "Cleared: jobs launched from now on run here.")
        st.rerun(scope="fragment")
    if saving:
        done = ray_setting.state(saving)
        if done is None or done.finished is None:
            busy = True
            st.caption(f"Checking {_code(saving)}… (up to {ray_setting.PROBE_TIMEOUT_S:.0f} s; the app stays"
                       " usable)")
        else:
            st.session_state.pop("ray_saving", None)
            st.session_state["ray_said"] = (
                ("success", f"Saved {_code(saving)}: jobs launched from now on go there"
                            f" ({ray_setting.describe(done.result)}).") if done.saved else
                ("error", f"Not saved: {md_text(done.result['error'])}"))
    said = st.session_state.get("ray_said")
    if said:
        getattr(st, said[0])(said[1])
    st.caption(PRECEDENCE)
    if busy:
        _poll(tuple(a for a in (saving, where.address) if a))


def _submit(typed: str, store) -> str | None:
    """Start the check (and save) of what was typed; an address that means here clears the setting."""
    st.session_state.pop("ray_said", None)
    try:
        address = ray_setting.normalize(typed)
    except ValueError as exc:
        st.session_state["ray_said"] = ("error", f"Not saved: {md_text(exc)}")
        return None
    if address is None:
        ray_setting.clear(store)
        st.session_state["ray_said"] = ("info", "Cleared: jobs launched from now on run here.")
        return None
    ray_setting.start_check(address, store, save=True)
    st.session_state["ray_saving"] = address
    return address


@st.fragment(run_every=1.0)
def _poll(addresses: tuple[str, ...]) -> None:
    """While a check runs: look each second (in memory: no store read); rerun the page once they all ended."""
    if all((c := ray_setting.state(a)) is not None and c.finished is not None for a in addresses):
        st.rerun()


nav = st.navigation(PAGES)
with st.sidebar:
    heavy_jobs()
try:
    nav.run()
finally:
    freeze_imports()  # after the run that first imports torch: the collector no longer walks its objects
