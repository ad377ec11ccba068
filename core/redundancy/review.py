"""What a person reviews besides the groups: exact duplicates and likely label errors.

Both are computed where their inputs are made, not on a page rerun. Exact duplicates are one SQL
aggregate over the scanned images (identical bytes, or identical decoded pixels). Near-identical
images with different labels (`core.redundancy.checks.cross_class_conflicts`, O(N^2 D)) are found
once per (dataset, backbone) by the cluster job, up to `MAX_DISTANCE` and at most `MAX_PAIRS`, the
closest first, and stored with a fingerprint of the embedded images: the page reads and filters them.
"""
from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd

from core.embed.embeddings import load_embeddings
from core.jobs import JobContext
from core.redundancy import checks
from core.store.db import Store, get_store

MAX_DISTANCE = 0.05       # cosine distance: pairs closer than this are stored
MAX_PAIRS = 20_000        # the closest ones, at most
MAX_IMAGES = 300_000      # above this the all-pairs search is not run (hours on one machine)
DEFAULT_LISTED = 50       # the page's default threshold lists about this many pairs


# -- exact duplicates ----------------------------------------------------------------------------
def duplicates(name: str, store: Store | None = None) -> pd.DataFrame:
    """Exact duplicates over all images: identical bytes, or (other files) identical decoded pixels.

    Columns kind, group, row, path, label, split; a pixel group is listed only when it is not also a
    byte group (byte-identical files decode to identical pixels).
    """
    store = store or get_store()
    return store.query_df(
        "WITH bytes AS (SELECT image_id FROM images WHERE dataset = $name GROUP BY image_id HAVING count(*) > 1),"
        " pixels AS (SELECT pixel_hash FROM images WHERE dataset = $name GROUP BY pixel_hash"
        "   HAVING count(DISTINCT image_id) > 1),"
        " listed AS ("
        "   SELECT 'identical bytes' AS kind, 0 AS k, i.image_id AS key, i.row, i.path, i.label, i.split"
        "   FROM images i JOIN bytes USING (image_id) WHERE i.dataset = $name"
        "   UNION ALL SELECT 'identical pixels', 1, i.pixel_hash, i.row, i.path, i.label, i.split"
        "   FROM images i JOIN pixels USING (pixel_hash) WHERE i.dataset = $name)"
        " SELECT kind, (dense_rank() OVER (PARTITION BY k ORDER BY first_row) - 1)::INTEGER AS \"group\","
        "  row, path, label, split FROM ("
        "   SELECT *, min(row) OVER (PARTITION BY k, key) AS first_row FROM listed)"
        " ORDER BY k, first_row, row", params={"name": name})


# -- label conflicts -----------------------------------------------------------------------------
def _fingerprint(table: pd.DataFrame) -> str:
    text = "\n".join(f"{r}\t{i}\t{label}" for r, i, label in zip(table.row, table.image_id, table.label))
    return hashlib.blake2b(text.encode(), digest_size=12).hexdigest()


def find_label_conflicts(name: str, bid: str, *, store: Store | None = None, ctx: JobContext | None = None,
                         force: bool = False) -> dict:
    """Find and store the near-identical pairs with different labels (unless stored and current)."""
    store = store or get_store()
    table, emb = load_embeddings(name, bid, store)
    fp = _fingerprint(table)
    stored = store.query("SELECT fingerprint, pairs, note FROM review_state WHERE dataset = ? AND backbone_id = ?",
                         [name, bid])
    if stored and stored[0][0] == fp and not force:
        return {"label_conflicts": stored[0][1], "reused": True}
    if ctx:
        ctx.phase(f"near-identical images with different labels ({len(table):,} images)", total=1)
    note, pairs = None, np.empty(0, checks.CONFLICT_DTYPE)
    if len(table) > MAX_IMAGES:
        note = (f"not searched: {len(table):,} images is above the {MAX_IMAGES:,} the all-pairs search"
                " handles on one machine")
    elif len(table):
        pairs = checks.cross_class_conflicts(emb, table.label.to_numpy(), MAX_DISTANCE, max_pairs=MAX_PAIRS)
    rows = table.row.to_numpy()
    found = pd.DataFrame({"dataset": name, "backbone_id": bid, "row_a": rows[pairs["i"]].astype(np.int32),
                          "row_b": rows[pairs["j"]].astype(np.int32), "distance": pairs["distance"]})
    with store.write() as con:
        con.execute("DELETE FROM label_conflicts WHERE dataset = ? AND backbone_id = ?", [name, bid])
        con.register("found", found)
        con.execute("INSERT INTO label_conflicts SELECT * FROM found")
        con.execute("INSERT OR REPLACE INTO review_state (dataset, backbone_id, fingerprint, max_distance, pairs,"
                    " note) VALUES (?, ?, ?, ?, ?, ?)", [name, bid, fp, MAX_DISTANCE, len(found), note])
    if ctx:
        ctx.log(note or f"{len(found):,} pairs with different labels within cosine distance {MAX_DISTANCE}")
        ctx.progress(1, 1, force=True)
    return {"label_conflicts": len(found), "reused": False}


def conflict_state(name: str, bid: str, store: Store | None = None) -> dict | None:
    """{'max_distance', 'pairs', 'note', 'computed_at'} of the stored search, or None if never run."""
    store = store or get_store()
    df = store.query_df("SELECT max_distance, pairs, note, computed_at FROM review_state"
                        " WHERE dataset = ? AND backbone_id = ?", [name, bid])
    return None if df.empty else df.iloc[0].to_dict()


def label_conflicts(name: str, bid: str, threshold: float | None = None,
                    store: Store | None = None) -> pd.DataFrame:
    """Stored pairs within `threshold` (all stored if None), closest first: distance, then each side's
    row, path and label."""
    store = store or get_store()
    return store.query_df(
        "SELECT c.distance, a.path AS path_a, a.label AS label_a, a.row AS row_a,"
        " b.path AS path_b, b.label AS label_b, b.row AS row_b FROM label_conflicts c"
        " JOIN images a ON a.dataset = c.dataset AND a.row = c.row_a"
        " JOIN images b ON b.dataset = c.dataset AND b.row = c.row_b"
        " WHERE c.dataset = $name AND c.backbone_id = $bid AND c.distance <= coalesce($t, 1e9)"
        " ORDER BY c.distance, c.row_a, c.row_b", params={"name": name, "bid": bid, "t": threshold})


def default_threshold(distances: np.ndarray, listed: int = DEFAULT_LISTED) -> float:
    """The threshold that lists about `listed` pairs: the distance of the `listed`-th closest pair
    (all pairs if there are fewer), rounded up to 3 decimals."""
    distances = np.sort(np.asarray(distances, np.float64))
    if len(distances) == 0:
        return 0.0
    return float(np.ceil(distances[min(listed, len(distances)) - 1] * 1000) / 1000)


def pairs_by_class(conflicts: pd.DataFrame) -> pd.DataFrame:
    """How many pairs each (unordered) class pair has, most first: class_a, class_b, pairs."""
    if conflicts.empty:
        return pd.DataFrame(columns=["class_a", "class_b", "pairs"])
    a = np.minimum(conflicts.label_a.astype(str), conflicts.label_b.astype(str))
    b = np.maximum(conflicts.label_a.astype(str), conflicts.label_b.astype(str))
    counts = pd.DataFrame({"class_a": a, "class_b": b}).value_counts().rename("pairs").reset_index()
    return counts.sort_values(["pairs", "class_a", "class_b"], ascending=[False, True, True], ignore_index=True)
