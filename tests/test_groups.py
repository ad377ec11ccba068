"""Redundant groups through the store, the CLI and the page: trees cached, cut, exported, invalidated."""

import numpy as np
import pandas as pd
import pytest
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import pdist

from core.cli import main as cli
from core.data import scan
from core.embed import embeddings
from core.embed.backbones import DEFAULT_BACKBONE
from core.redundancy import clusterings, review
from tests.conftest import build_clustered, run_page


def test_subset_counts_and_export(clustered, tmp_path, capsys):
    name, bid, _ = clustered
    c = clusterings.load_clustering(name, bid)
    assert sorted(c.classes) == ["class0", "class1", "class2"]
    s = clusterings.subset(c, fraction=0.5)
    for row in s.per_class:
        assert row["kept"] == max(1, round(0.5 * row["images"]))
    frame = clusterings.subset_frame(c, s)
    assert set(frame.split) == {"train"}  # the test split is not part of the subset
    assert (frame.groupby("group").kept.sum() == 1).all()  # exactly one kept per group
    assert cli(["subset", name, "--fraction", "0.5", "--out", str(tmp_path / "s.parquet")]) == 0
    out = pd.read_parquet(tmp_path / "s.parquet")
    assert list(out.columns) == ["path", "label", "split", "group", "kept"] and out.kept.sum() == frame.kept.sum()
    assert cli(["export", name, "--fraction", "0.5", "--imagefolder", str(tmp_path / "tree")]) == 0
    files = [p for p in (tmp_path / "tree").rglob("*") if p.is_symlink()]
    assert len(files) == frame.kept.sum() and all(p.resolve().exists() for p in files)
    assert cli(["export", name, "--fraction", "0.5", "--imagefolder", str(tmp_path / "tree")]) == 1  # not empty


def scipy_cluster_counts(emb: np.ndarray, labels: np.ndarray, threshold: float) -> dict:
    """label -> how many complete-linkage clusters scipy finds in that class at cosine distance `threshold`."""
    counts = {}
    for label in sorted(set(labels)):
        z = linkage(pdist(emb[labels == label].astype(np.float64), "cosine"), "complete")
        counts[label] = len(np.unique(fcluster(z, threshold, "distance")))
    return counts


def test_threshold_mode_reports_the_fraction(clustered, store):
    name, bid, _ = clustered
    c = clusterings.load_clustering(name, bid)
    nothing = clusterings.subset(c, threshold=2.0)
    assert len(nothing.representatives) == len(c.classes)  # one group per class at distance 2
    # The cached trees cut at a threshold keep as many images per class as scipy's complete-linkage clusters
    # of the stored embeddings at that cosine distance, and the fraction reported is kept / train images.
    table, emb = embeddings.load_embeddings(name, bid, store)
    train = (table.split == "train").to_numpy()
    for threshold in (0.05, 0.2):
        s = clusterings.subset(c, threshold=threshold)
        expected = scipy_cluster_counts(emb[train], table.label.to_numpy()[train], threshold)
        assert {row["label"]: row["kept"] for row in s.per_class} == expected
        assert s.kept_fraction == pytest.approx(sum(expected.values()) / train.sum())


def test_trees_are_reused_and_invalidated_by_new_embeddings(store, image_folder, fmnist_test):
    from tests.conftest import png_bytes

    name, bid, _ = build_clustered(store, image_folder)  # its own: the test adds an image to the folder
    assert clusterings.cluster(name, bid, store=store) == {"backbone_id": bid, "linkage": "complete", "built": 0,
                                                     "reused": 3, "images": 48}
    (image_folder / "train" / "class2" / "new.png").write_bytes(png_bytes(fmnist_test[0][900]))
    scan.scan(name, store)
    model, _ = embeddings.ensure_backbone(name, DEFAULT_BACKBONE, epochs=2, store=store)
    embeddings.embed_dataset(name, model, bid, store=store)
    with pytest.raises(ValueError, match="class2.*out of date"):
        clusterings.load_clustering(name, bid)
    result = clusterings.cluster(name, bid, store=store)
    assert (result["built"], result["reused"]) == (1, 2)  # only the changed class


def test_duplicates_and_label_conflicts(clustered):
    name, bid, original = clustered
    dups = review.duplicates(name)
    by_kind = {k: set(g.path) for k, g in dups.groupby("kind")}
    assert by_kind["identical bytes"] == {original, "train/class0/bytecopy.png", "train/class1/mislabelled.png"}
    assert "train/class0/recoded.bmp" in by_kind["identical pixels"]
    conflicts = review.label_conflicts(name, bid, threshold=1e-4)
    pairs = {frozenset((a, b)) for a, b in zip(conflicts.path_a, conflicts.path_b)}
    assert frozenset((original, "train/class1/mislabelled.png")) in pairs
    assert (conflicts.label_a != conflicts.label_b).all()


def test_page_slider_changes_the_counts(clustered):
    name, _, _ = clustered
    at = run_page("pages/redundant_groups.py", dataset=name)
    assert not at.exception
    kept = {m.label: m.value for m in at.metric}["Kept"]
    at.slider(key="fraction").set_value(0.3).run()
    assert not at.exception
    assert int({m.label: m.value for m in at.metric}["Kept"]) < int(kept)
    assert not at.dataframe  # the per-class table is a section of its own (not redrawn on every move)
    at.segmented_control(key="groups_section").set_value("Per class").run()
    per_class = at.dataframe[0].value
    assert list(per_class.kept) == [max(1, round(0.3 * n)) for n in per_class.images]
    at.segmented_control(key="groups_section").set_value("Groups").run()
    at.radio(key="cut_mode").set_value("threshold").run()
    threshold = at.slider(key="threshold")
    assert not at.exception and 0 < threshold.value < threshold.max  # on the clustering's own scale
    at.slider(key="threshold").set_value(threshold.max).run()
    assert int({m.label: m.value for m in at.metric}["Kept"]) < int(kept)
