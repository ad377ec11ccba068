"""Training: the one loop every model uses (`loop`), the optimiser factory and schedules (`optim`),
checkpoint files of every model (`checkpoints`), image arrays as tensors and the pixel normalisation
of models that take raw pixels (`pixels`), and the classifier recipe and training (`recipe`,
`classifier`) shared by the backbone and the subset runs."""
