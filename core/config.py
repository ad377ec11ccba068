"""Where redex keeps things. Every location can be overridden by an environment variable."""
from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
FASHION_MNIST_DEBIAN = Path("/usr/share/datasets/fashion-mnist")


def cache_dir() -> Path:
    """Home of the DuckDB file and all artifacts (`REDEX_CACHE`, default `<repo>/cache`)."""
    path = Path(os.environ.get("REDEX_CACHE") or REPO_ROOT / "cache").expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


def db_path() -> Path:
    return cache_dir() / "redex.duckdb"


def artifacts_dir(*parts: str) -> Path:
    """A folder under `<cache>/artifacts`, created on demand."""
    path = cache_dir().joinpath("artifacts", *parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def fashion_mnist_dir() -> Path:
    """Folder holding the four Fashion-MNIST IDX files (`REDEX_DATA`, else Debian's package)."""
    return Path(os.environ.get("REDEX_DATA") or FASHION_MNIST_DEBIAN).expanduser()
