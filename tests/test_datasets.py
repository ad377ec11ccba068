"""Registering and scanning datasets: sources, bad files, content ids, incremental rescans, resume."""
import os

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from core.cli import main as cli
from core.data import catalog, decode, scan, sources
from core.data.idx import FASHION_MNIST_CLASSES
from tests.conftest import png_bytes


def test_imagefolder_with_splits(store, image_folder):
    name = sources.register(str(image_folder), "folder")
    report = scan.scan(name, store)
    assert (report.images, report.skipped) == (60, 0)
    counts = catalog.class_counts(name, store).set_index("label")
    assert counts.loc["class0", "train"] == 15 and counts.loc["class0", "test"] == 5
    pixels = catalog.load_pixels(name, store)
    table = catalog.images_table(name, store)
    assert pixels.shape == (60, 28, 28, 1) and pixels.dtype == np.uint8
    # The pixel cache holds exactly the decoded file of each row.
    first = table.iloc[7]
    assert np.array_equal(pixels[first.row, :, :, 0], np.asarray(Image.open(image_folder / first.path)))


def write_bad_files(folder, good: np.ndarray):
    """One of every kind of bad file, plus odd-mode images that must be converted and kept."""
    bad = folder / "train" / "class0"
    (bad / "empty.png").write_bytes(b"")
    (bad / "notes.png").write_bytes(b"this is not an image at all")
    data = png_bytes(good)
    (bad / "truncated.png").write_bytes(data[: len(data) // 2])
    Image.new("L", (9000, 9000)).save(bad / "bomb.png")  # 81 Mpx > the 64 Mpx default limit
    (bad / "locked.png").write_bytes(data)
    os.chmod(bad / "locked.png", 0)
    rgb = np.stack([good] * 3, axis=-1)
    Image.fromarray(rgb).convert("CMYK").save(bad / "cmyk.jpg")
    Image.fromarray((good.astype(np.uint16) * 257)).save(bad / "sixteen.png")
    rgba = np.concatenate([rgb, np.full(good.shape + (1,), 128, np.uint8)], axis=-1)
    Image.fromarray(rgba, mode="RGBA").save(bad / "alpha.png")
    Image.fromarray(rgb).convert("P").save(bad / "palette.png")


def test_bad_files_are_reported_and_skipped_never_fatal(store, image_folder, fmnist_test, capsys):
    write_bad_files(image_folder, fmnist_test[0][0])
    name = sources.register(str(image_folder), "bad")
    report = scan.scan(name, store)
    problems = catalog.problems_table(name, store).set_index("path")
    reasons = problems.reason.to_dict()
    root_is_god = os.geteuid() == 0  # root reads a chmod-0 file anyway
    assert reasons["train/class0/empty.png"] == "empty file (0 bytes)"
    assert reasons["train/class0/notes.png"].startswith("not an image")
    assert reasons["train/class0/truncated.png"].startswith("truncated or corrupt")
    assert reasons["train/class0/bomb.png"].startswith("decompression bomb")
    if not root_is_god:
        assert reasons["train/class0/locked.png"].startswith("unreadable")
    for kept in ("cmyk.jpg", "sixteen.png", "alpha.png", "palette.png"):
        assert problems.loc[f"train/class0/{kept}", "severity"] == "converted"
    skipped = set(problems[problems.severity == "skipped"].index)
    table = catalog.images_table(name, store)
    assert not skipped & set(table.path)
    assert report.images == 60 + 4 + (1 if root_is_god else 0)
    # The 16-bit image is rescaled, not clipped: same picture as the 8-bit original.
    row = table.set_index("path").loc["train/class0/sixteen.png", "row"]
    assert np.abs(catalog.load_pixels(name, store)[row, :, :, 0].astype(int) - fmnist_test[0][0]).max() <= 1
    # The CLI lists every problem file by name with its reason.
    assert cli(["info", name]) == 0
    out = capsys.readouterr().out
    for path, reason in reasons.items():
        assert f"{path}: {reason}" in out


def test_missing_path_and_empty_dataset_give_clear_messages(store, tmp_path):
    with pytest.raises(catalog.DatasetError, match="no such file or folder"):
        sources.register(str(tmp_path / "nope"))
    (tmp_path / "empty" / "classA").mkdir(parents=True)
    with pytest.raises(catalog.DatasetError, match="class folders? holds? no files"):  # refused at once
        sources.register(str(tmp_path / "empty"))
    image = tmp_path / "empty" / "classA" / "a.png"
    image.write_bytes(png_bytes(np.zeros((8, 8), np.uint8)))
    name = sources.register(str(tmp_path / "empty"))
    image.unlink()  # emptied after it was registered: the scan says so
    with pytest.raises(catalog.DatasetError, match="has no images"):
        scan.scan(name, store)
    assert cli(["info", "unknown-name"]) == 1


def test_content_ids_stable_and_rescan_reuses_unchanged_files(store, image_folder, fmnist_test):
    name = sources.register(str(image_folder), "inc")
    first = scan.scan(name, store)
    assert first.reused == 0
    before = catalog.images_table(name, store).set_index("path")
    changed = image_folder / before.index[3]
    changed.write_bytes(png_bytes(255 - fmnist_test[0][500]))
    again = scan.scan(name, store)
    after = catalog.images_table(name, store).set_index("path")
    assert again.reused == 59 and again.decoded == 1
    diff = (before.image_id != after.image_id)
    assert list(diff[diff].index) == [before.index[3]]  # only the changed file got a new content id
    # The same bytes under another path have the same content id.
    twin = image_folder / "train" / "class1" / "twin.png"
    twin.write_bytes((image_folder / before.index[0]).read_bytes())
    scan.scan(name, store)
    ids = catalog.images_table(name, store).set_index("path").image_id
    assert ids["train/class1/twin.png"] == ids[before.index[0]]


def test_interrupted_scan_resumes_from_finished_chunks(store, image_folder, monkeypatch):
    monkeypatch.setattr(scan, "CHUNK", 16)
    name = sources.register(str(image_folder), "resume")
    calls = {"n": 0}
    real_decode = decode.decode

    def dying_decode(*args):
        calls["n"] += 1
        if calls["n"] == 40:
            raise KeyboardInterrupt  # the process is stopped in the third chunk
        return real_decode(*args)

    monkeypatch.setattr(scan, "decode", dying_decode)
    with pytest.raises(KeyboardInterrupt):
        scan.scan(name, store)
    calls["n"] = -10_000
    scan.scan(name, store)
    assert calls["n"] == -10_000 + (60 - 32)  # the two finished chunks were not decoded again
    assert len(catalog.images_table(name, store)) == 60


def test_manifest_csv_and_parquet(store, image_folder, tmp_path):
    files = sorted(p.relative_to(image_folder).as_posix() for p in image_folder.rglob("*.png"))
    df = pd.DataFrame({"path": [str(image_folder / f) for f in files],
                       "label": [f.split("/")[1] for f in files], "split": [f.split("/")[0] for f in files]})
    df.to_csv(tmp_path / "m.csv", index=False)
    df.drop(columns="split").to_parquet(tmp_path / "m.parquet")
    csv = sources.register(str(tmp_path / "m.csv"), "csv")
    assert scan.scan(csv, store).images == 60
    assert set(catalog.images_table(csv, store).split) == {"train", "test"}
    pq = sources.register(str(tmp_path / "m.parquet"), "pq")
    assert scan.scan(pq, store).images == 60
    assert set(catalog.images_table(pq, store).split) == {"train"}
    pd.DataFrame({"file": ["a"]}).to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(catalog.DatasetError, match="path,label"):
        scan.scan(sources.register(str(tmp_path / "bad.csv"), "badcsv"), store)


def test_fashion_mnist_demo_keeps_its_split(store, fmnist_test):
    name = sources.register("fashion-mnist", limit=100)
    assert scan.scan(name, store).images == 200
    table = catalog.images_table(name, store)
    assert (table.split == "test").sum() == 100
    test_rows = table[table.split == "test"].sort_values("path")
    pixels = catalog.load_pixels(name, store)
    # test/<class>/00007.png is test image 7, with its label
    row = test_rows[test_rows.path.str.endswith("/00007.png")].iloc[0]
    assert np.array_equal(pixels[row.row, :, :, 0], fmnist_test[0][7])
    assert row.label == FASHION_MNIST_CLASSES[fmnist_test[1][7]]


def test_fashion_mnist_missing_everywhere_is_a_clear_error(store, tmp_path, monkeypatch):
    """No IDX files and no way to download them: the message says how to get the data."""
    monkeypatch.setenv("REDEX_DATA", str(tmp_path / "nowhere"))
    import torchvision.datasets

    def offline(*args, **kwargs):  # this machine is offline by design; make that instant
        raise OSError("network unreachable")

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", offline)
    with pytest.raises(catalog.DatasetError, match="dataset-fashion-mnist.*REDEX_DATA"):
        sources.register("fashion-mnist")
