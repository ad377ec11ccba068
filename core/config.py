"""Where redex keeps things. Every location can be overridden by an environment variable."""
from __future__ import annotations

import os
from pathlib import Path

from core import paths

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
    """A folder under `<cache>/artifacts`, created on demand. Each part is one folder name, checked by
    `paths.safe_join` (`UnsafePathError` for `..`, `/`, an absolute path...)."""
    path = cache_dir() / "artifacts"
    if parts:
        path = paths.safe_join(path, *parts, what="artifact folder")
    path.mkdir(parents=True, exist_ok=True)
    return path


def model_file(kind: str, model_id: str) -> Path:
    """The checkpoint file of a model trained here: `<cache>/artifacts/<kind>/<id as a file name>.pt`
    (`paths.id_file_name`: the same names as before for ids of letters, digits and `-_.:@#<`)."""
    return paths.safe_join(artifacts_dir(kind), paths.id_file_name(model_id, ".pt"), what="model id")


def fashion_mnist_dir() -> Path:
    """Folder holding the four Fashion-MNIST IDX files (`REDEX_DATA`, else Debian's package)."""
    return Path(os.environ.get("REDEX_DATA") or FASHION_MNIST_DEBIAN).expanduser()
