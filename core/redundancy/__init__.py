"""Semantic redundancy (Birodkar et al. 2019). Pure computation: merge trees per class (`trees`), their
cuts and representatives (`cuts`), duplicate and label-conflict checks (`checks`). Store wiring:
cached trees, subsets and checks of a dataset (`clusterings`), and exports (`export`)."""
