"""The groups page opens from a memory-mapped snapshot of the clustering: the same cut as the store
gives, written by the cluster job, valid for one version only, and never trusted when damaged."""
import numpy as np

from core.data import sources
from core.redundancy import clusterings, snapshot
from core.redundancy.snapshot import LazyTable


def test_the_cluster_job_writes_a_snapshot_that_cuts_like_the_store_for_one_version_only(clustered):
    name, bid, _ = clustered
    version = clusterings.state_version(name, bid, "complete")
    fast = snapshot.load(name, bid, "complete", version)  # written by the cluster job
    assert fast is not None and isinstance(fast.table, LazyTable) and isinstance(fast.emb, np.memmap)
    slow = clusterings.load_clustering(name, bid)
    fast_index, slow_index = clusterings.cut_index(fast), clusterings.cut_index(slow)
    assert fast.index is not None and slow.index is None
    assert np.array_equal(fast.table.row.to_numpy(), slow.table.row.to_numpy())
    assert list(fast.table.label) == list(slow.table.label)
    for cut in ({"fraction": 0.3}, {"fraction": 0.8}, {"threshold": 0.05}):
        a, b = fast_index.cut(**cut), slow_index.cut(**cut)
        assert a.n_groups == b.n_groups and a.per_class().equals(b.per_class())
        for rule in ("nearest_mean", "farthest_mean", "random"):
            assert [a.representative(g, rule) for g in a.largest()] == [b.representative(g, rule) for g in b.largest()]
        s_fast = clusterings.subset_frame(fast, clusterings.subset(fast, **cut))
        s_slow = clusterings.subset_frame(slow, clusterings.subset(slow, **cut))
        assert s_fast.equals(s_slow)  # the table (paths) comes from the snapshot's Parquet file

    # one version only, and a damaged snapshot is never used
    assert snapshot.load(name, bid, "complete", version + "x") is None  # trees or embeddings changed since
    where = snapshot.folder(name, bid, "complete")
    (where / "index.rank.npy").write_bytes(b"\x93NUMPY truncated")
    assert snapshot.load(name, bid, "complete", version) is None
    again = clusterings.open_clustering(name, bid, "complete", version)  # from the store, snapshot rewritten
    assert isinstance(again.table, LazyTable) is False
    assert snapshot.load(name, bid, "complete", version) is not None

    # removing the dataset removes its snapshots
    removed = sources.remove_dataset(name)
    assert not where.exists() and any(str(where.parent) == f for f in removed["files"])
