"""Training: the one loop every model uses (`loop`), optimisers and schedules (`optim`), checkpoint
files (`checkpoints`), image arrays as tensors (`pixels`), and the classifier recipe and training
(`recipe`, `classifier`) shared by the backbone and the subset runs."""
