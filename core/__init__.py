"""redex core: all computation and storage. Pages and the CLI only call into this package."""
