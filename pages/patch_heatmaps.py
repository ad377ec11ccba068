"""Patch heatmaps (LTRP). Being built."""
import streamlit as st

st.title("Patch heatmaps")
