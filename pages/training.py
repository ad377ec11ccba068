"""Training: semantic vs random vs full subsets. Being built."""
import streamlit as st

st.title("Training")
