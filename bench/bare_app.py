"""The baseline of `bench/ui_latency.py`: a bare Streamlit page (a slider and a metric; a select box and
a list of 8 small images), served the same way as the app. Its load and widget latencies are Streamlit's
own floor on this machine: the browser booting the frontend, the WebSocket round trip, a script run and
the re-render.

The same page is also routed at /deep (navigation hidden): a first load at a page's own URL, as the
bench opens the app's pages, costs the frontend a failed health check at that path before the root's."""
import numpy as np
import streamlit as st


def baseline() -> None:
    st.title("Baseline")
    value = st.slider("Value", 0.0, 1.0, 0.5, 0.01, key="bare")
    st.metric("Shown", f"{value:.2f}")
    choice = st.selectbox("Class", [f"class {i}" for i in range(10)], key="bare_class")
    shade = 25 * int(choice.split()[1])
    st.image([np.full((28, 28), shade + k, np.uint8) for k in range(8)],
             caption=[f"{choice}, image {k}" for k in range(8)])


st.navigation([st.Page(baseline, title="Baseline", default=True),
               st.Page(baseline, title="Deep link", url_path="deep")], position="hidden").run()
