"""Subset training, the evidence behind a subset: planning runs and their keys (`plan`), sweeps and
runs as background jobs (`sweeps`), and reading their results (`results`)."""
