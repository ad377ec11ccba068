"""LTRP wired to the store: MAE and ranker jobs, score maps. Being built."""
