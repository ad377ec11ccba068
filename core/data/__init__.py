"""Datasets: where images come from (`sources`), how one file is decoded (`decode`), how a dataset is
scanned into the store (`scan`), and what the store knows of it (`catalog`)."""
