"""redex: the Streamlit entry point. A router only; pages lay things out, `core/` computes."""
import streamlit as st

st.set_page_config(page_title="redex · redundancy explorer", page_icon=":material/explore:", layout="wide")

PAGES = [
    st.Page("pages/datasets.py", title="Datasets", icon=":material/folder_open:", default=True),
    st.Page("pages/embedding_map.py", title="Embedding map", icon=":material/scatter_plot:"),
    st.Page("pages/redundant_groups.py", title="Redundant groups", icon=":material/filter_alt:"),
    st.Page("pages/training.py", title="Training", icon=":material/model_training:"),
    st.Page("pages/patch_heatmaps.py", title="Patch heatmaps", icon=":material/grid_on:"),
    st.Page("pages/jobs.py", title="Jobs", icon=":material/manufacturing:"),
]
st.navigation(PAGES).run()
