"""bench/synthetic.py: the synthetic benchmark dataset is a dataset the rest of redex can use as is."""
from __future__ import annotations

import numpy as np

from bench import synthetic
from core.data.catalog import get_dataset, load_pixels
from core.redundancy import clusterings, review

SPEC = synthetic.SyntheticSpec(classes=6, per_class=60, test_per_class=5, near_frac=0.05, dup_frac=0.02,
                               conflict_frac=0.01, chunk=150)  # 2 classes a chunk: pairs cross chunks


def test_synthetic_dataset_groups_what_was_planted(store):
    out = synthetic.generate(SPEC, "synth", store=store, log=lambda _: None)
    out = synthetic.generate(SPEC, "synth", store=store, log=lambda _: None)  # a rerun replaces it
    bid = out["backbone_id"]
    planted = synthetic.load_planted("synth")
    assert out["planted"] == {k: len(v) for k, v in planted.items()}
    assert len(planted["near_copies"]) == 18 and len(planted["exact_duplicates"]) == 7
    assert len(planted["label_conflicts"]) >= 2

    # What a scan and an embedding job would have written.
    ds = get_dataset("synth", store)
    assert (ds["kind"], ds["image_size"], ds["channels"], len(ds["classes"])) == ("synthetic", 16, 1, 6)
    counts = dict(store.query("SELECT split, count(*) FROM images WHERE dataset = 'synth' GROUP BY split"))
    assert counts == {"train": 360, "test": 30}
    assert store.query("SELECT count(DISTINCT path), count(DISTINCT image_id), max(row) FROM images"
                       " WHERE dataset = 'synth'")[0] == (390, 390 - 7, 389)
    assert store.query("SELECT count(*) FROM embeddings WHERE backbone_id = ?", [bid])[0][0] == 390 - 7
    backbone = store.query("SELECT spec, dim FROM backbones WHERE backbone_id = ?", [bid])
    assert backbone == [("synthetic:clustered64", 64)]
    pixels = load_pixels("synth", store)
    assert pixels.shape == (390, 16, 16, 1) and pixels.dtype == np.uint8
    near_diff = np.mean([np.abs(pixels[a].astype(int) - pixels[b]).mean() for a, b in planted["near_copies"]])
    other_diff = np.abs(pixels[:180].astype(int) - pixels[180:360]).mean()  # classes 0-2 against 3-5
    assert near_diff < 2 < 20 < other_diff  # close embeddings look alike, other classes do not
    for a, b in planted["exact_duplicates"]:
        assert np.array_equal(pixels[a], pixels[b])

    # The planted exact duplicates are what `duplicates` finds, and only those.
    dups = review.duplicates("synth", store)
    assert set(dups.kind) == {"identical bytes"}
    found = {frozenset(g.row) for _, g in dups.groupby("group")}
    assert found == {frozenset(pair) for pair in planted["exact_duplicates"]}

    # Trees build; at fraction 0.9 the near copies share a group with their original.
    assert clusterings.cluster("synth", bid, store=store)["built"] == 6
    c = clusterings.load_clustering("synth", bid, store=store)
    frame = clusterings.subset_frame(c, clusterings.subset(c, fraction=0.9))
    assert len(frame) == 360 and frame.kept.sum() == 6 * 54
    assert synthetic.grouped_share(frame, planted["near_copies"]) >= 0.9
    assert synthetic.grouped_share(frame, planted["exact_duplicates"]) == 1.0

    # The cross-class near copies are likely label errors (the cluster job's review found them).
    conflicts = review.label_conflicts("synth", bid, store=store)
    pairs = {frozenset(p) for p in zip(conflicts.row_a, conflicts.row_b)}
    assert {frozenset(p) for p in planted["label_conflicts"]} <= pairs
