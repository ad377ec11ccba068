"""The baseline of `bench/ui_latency.py`: a bare Streamlit page (a slider and a metric, nothing else),
served the same way as the app. Its load and slider latency are Streamlit's own floor on this machine:
the browser booting the frontend, the WebSocket round trip, a script run and the re-render."""
import streamlit as st

st.title("Baseline")
value = st.slider("Value", 0.0, 1.0, 0.5, 0.01, key="bare")
st.metric("Shown", f"{value:.2f}")
