"""The 2-D map of a dataset's embeddings (UMAP, cached per embedding set) and nearest neighbours."""
from __future__ import annotations

import hashlib

import numpy as np

from core.embed.embeddings import load_embeddings
from core.jobs import JobContext, task
from core.store.db import Store, get_store


# -- 2-D map and neighbours --------------------------------------------------------------------
def fingerprint(table) -> str:
    return hashlib.blake2b("".join(table.image_id).encode(), digest_size=8).hexdigest()


def projection(name: str, bid: str, store: Store | None = None, table=None):
    """The cached UMAP of (dataset, backbone) if it matches the current embeddings, else None.

    `table`: the images table from `load_embeddings`, when the caller has it already.
    """
    store = store or get_store()
    if table is None:
        table, _ = load_embeddings(name, bid, store)
    if table.empty:
        return None
    df = store.query_df("SELECT path, x, y, fingerprint FROM projections WHERE dataset = ? AND backbone_id = ?"
                        " AND method = 'umap'", [name, bid])
    if df.empty or df.fingerprint.iloc[0] != fingerprint(table) or len(df) != len(table):
        return None
    return table.merge(df.drop(columns="fingerprint"), on="path")


def compute_projection(name: str, bid: str, *, seed: int = 0, n_neighbors: int = 15, min_dist: float = 0.1,
                       store: Store | None = None, ctx: JobContext | None = None) -> dict:
    """UMAP (cosine) of the embeddings to 2-D, stored in the projections table."""
    import pandas as pd
    import umap

    store = store or get_store()
    table, emb = load_embeddings(name, bid, store)
    if table.empty:
        raise ValueError(f"no embeddings for {name!r} with backbone {bid}: run an embedding job first")
    if ctx:
        ctx.phase(f"UMAP of {len(table):,} embeddings", total=1)
    n_neighbors = max(2, min(n_neighbors, len(table) - 1))
    reducer = umap.UMAP(n_neighbors=n_neighbors, min_dist=min_dist, metric="cosine", random_state=seed,
                        init="spectral" if len(table) > n_neighbors + 2 else "random")
    xy = reducer.fit_transform(emb) if len(table) > 2 else np.zeros((len(table), 2), np.float32)
    out = pd.DataFrame({"dataset": name, "backbone_id": bid, "method": "umap", "fingerprint": fingerprint(table),
                        "path": table.path, "x": xy[:, 0].astype(np.float32), "y": xy[:, 1].astype(np.float32)})
    with store.write() as con:
        con.execute("DELETE FROM projections WHERE dataset = ? AND backbone_id = ? AND method = 'umap'", [name, bid])
        con.register("proj", out)
        con.execute("INSERT INTO projections SELECT * FROM proj")
    if ctx:
        ctx.progress(1, 1, force=True)
    return {"points": len(out)}


@task("project")
def _project_task(ctx: JobContext) -> dict:
    return compute_projection(ctx.dataset, ctx.params["backbone_id"], seed=int(ctx.params.get("seed", 0)),
                              store=ctx.store, ctx=ctx)


def nearest_neighbours(emb: np.ndarray, index: int, k: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Indices and cosine distances of the k nearest neighbours of emb[index] (itself excluded)."""
    norm = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    dist = 1.0 - norm @ norm[index]
    dist[index] = np.inf
    k = min(k, len(emb) - 1)
    idx = np.argpartition(dist, k)[:k] if k < len(emb) - 1 else np.arange(len(emb))[np.isfinite(dist)]
    idx = idx[np.argsort(dist[idx])]
    return idx, dist[idx]
