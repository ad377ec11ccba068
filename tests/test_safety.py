"""Safe by construction (issue 11, data layer): no name, path, label or file can delete, escape or abort.

One test per finding of the issue, each against real files, a real DuckDB store and real scans, and a
property test over hostile names and labels: nothing is ever written outside the cache or the export
target. `core.paths` is imported inside the tests that use it, so that each test of a finding fails
on the code before the fix for its own reason, not for a missing module.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core import config
from core.data import catalog, scan, sources
from core.redundancy import export
from tests.conftest import png_bytes


# -- helpers -----------------------------------------------------------------------------------
def tiny_png(i: int, size: int = 8) -> bytes:
    """A distinct small grayscale PNG for each i."""
    rng = np.random.default_rng(i)
    return png_bytes(rng.integers(0, 256, (size, size), dtype=np.uint8))


def make_folder(root: Path, classes: int = 2, per_class: int = 3, start: int = 0) -> Path:
    """root/cls<k>/img<i>.png: `classes` x `per_class` tiny PNGs."""
    for k in range(classes):
        for j in range(per_class):
            path = root / f"cls{k}" / f"img{j}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(tiny_png(start + k * per_class + j))
    return root


def write_manifest(path: Path, rows: list[tuple[str, str]]) -> Path:
    """A CSV manifest `path,label`, cells written as given (no quoting of numbers)."""
    path.write_text("path,label\n" + "".join(f"{p},{label}\n" for p, label in rows))
    return path


def snapshot(top: Path, skip: tuple[Path, ...] = ()) -> set[tuple[str, bool]]:
    """Every file, folder and link under `top` (not following links), except the `skip` subtrees."""
    out = set()
    for dirpath, dirnames, filenames in os.walk(top):
        here = Path(dirpath)
        dirnames[:] = [d for d in dirnames if here / d not in skip]
        for n in dirnames + filenames:
            p = here / n
            if p not in skip:
                out.add((os.fsencode(p.relative_to(top)).decode("utf-8", "backslashreplace"), p.is_symlink()))
    return out


def problems(name: str, store) -> dict[str, str]:
    return catalog.problems_table(name, store).set_index("path").reason.to_dict()


def all_kept(name: str, store) -> pd.DataFrame:
    """A subset frame that keeps every image (what `export_imagefolder` takes)."""
    table = catalog.images_table(name, store)
    return table.assign(kept=True, group=np.arange(len(table)))


# -- 1: dataset names --------------------------------------------------------------------------
def test_1_names_like_dotdot_are_refused_at_register_with_the_rule(store, tmp_path):
    good = sources.register(str(make_folder(tmp_path / "good")), "good")
    scan.scan(good, store)
    pixels = Path(catalog.get_dataset(good, store)["pixels"])
    other = make_folder(tmp_path / "other", start=100)
    for bad in ("..", ".", ".hidden", "", "a/b", "../x", "x" * 65, "a\nb", "a\x00b", "caf\udce9"):
        with pytest.raises(catalog.DatasetError, match=r"not starting with a dot, 1 to 64 characters"):
            sources.register(str(other), bad)
    assert list(catalog.list_datasets(store).name) == ["good"]
    assert pixels.exists() and (config.cache_dir() / "artifacts").is_dir()
    assert sources.register(str(other), "x" * 64) == "x" * 64  # the longest allowed
    # A folder whose own name breaks the rule gets a name made from it.
    assert sources.register(str(make_folder(tmp_path / ".my photos", start=200))) == "my_photos"


# -- 2: export labels --------------------------------------------------------------------------
def test_2_export_refuses_labels_that_would_write_outside_the_target(store, tmp_path):
    src = make_folder(tmp_path / "src")
    files = sorted(str(p) for p in src.rglob("*.png"))
    labels = ["../../../escaped", str(tmp_path / "absolute"), "fine", "fine", "ok", "ok"]
    name = sources.register(str(write_manifest(tmp_path / "m.csv", list(zip(files, labels)))), "m")
    scan.scan(name, store)
    assert set(catalog.images_table(name, store).label) == set(labels)  # labels kept as written
    out = tmp_path / "a" / "b" / "out"
    before = snapshot(tmp_path, skip=(config.cache_dir(),))
    for copy in (False, True):
        with pytest.raises(ValueError, match="label or file name"):
            export.export_imagefolder(name, all_kept(name, store), out, copy=copy)
    assert not out.exists()
    after = snapshot(tmp_path, skip=(config.cache_dir(),))
    assert before <= after and after - before <= {("a", False), ("a/b", False)}


# -- 3: file names that are not UTF-8 ----------------------------------------------------------
def test_3_a_file_name_that_is_not_utf8_is_a_problem_row_not_an_abort(store, tmp_path):
    root = make_folder(tmp_path / "f")
    with open(os.fsencode(root / "cls0") + b"/caf\xe9.png", "wb") as f:
        f.write(tiny_png(50))
    os.mkdir(os.fsencode(root) + b"/cl\xff")
    with open(os.fsencode(root) + b"/cl\xff/x.png", "wb") as f:
        f.write(tiny_png(51))
    name = sources.register(str(root), "utf")
    report = scan.scan(name, store)
    assert (report.images, report.skipped) == (6, 2)
    reasons = problems(name, store)
    assert "not valid UTF-8" in reasons["cls0/caf\\xe9.png"]
    assert "not valid UTF-8" in reasons["cl\\xff/x.png"]
    assert set(catalog.class_counts(name, store).label) == {"cls0", "cls1"}


# -- 4: manifests ------------------------------------------------------------------------------
def test_4a_duplicate_manifest_rows_are_dropped_and_counted(store, tmp_path):
    files = sorted(str(p) for p in make_folder(tmp_path / "src").rglob("*.png"))
    rows = [(files[0], "a"), (files[1], "a"), (files[0], "a"), (files[0], "b"), (files[2], "b")]
    name = sources.register(str(write_manifest(tmp_path / "m.csv", rows)), "dups")
    report = scan.scan(name, store)
    assert report.images == 3
    table = catalog.images_table(name, store).set_index("path")
    assert table.loc[files[0], "label"] == "a"  # the first row wins
    reason = problems(name, store)[f"{files[0]} (duplicate rows)"]
    assert reason.startswith("2 duplicate rows dropped (rows 3, 4)") and "'b'" in reason


def test_4b_an_empty_label_is_a_problem_row(store, tmp_path):
    files = sorted(str(p) for p in make_folder(tmp_path / "src").rglob("*.png"))
    rows = [(files[0], "a"), (files[1], ""), (files[2], "b"), (files[3], "  ")]
    name = sources.register(str(write_manifest(tmp_path / "m.csv", rows)), "empty-label")
    report = scan.scan(name, store)
    assert (report.images, report.skipped) == (2, 2)
    reasons = problems(name, store)
    assert reasons[files[1]] == reasons[files[3]] == "empty label"
    assert sorted(catalog.get_dataset(name, store)["classes"]) == ["a", "b"]


def test_4c_labels_are_kept_exactly_as_written(store, tmp_path):
    files = sorted(str(p) for p in make_folder(tmp_path / "src").rglob("*.png"))
    rows = [(files[0], "01"), (files[1], "1"), (files[2], "1.0"), (files[3], "NA"), (files[4], "nan")]
    name = sources.register(str(write_manifest(tmp_path / "m.csv", rows)), "labels")
    scan.scan(name, store)
    labels = catalog.images_table(name, store).set_index("path").label
    assert [labels[f] for f, _ in rows] == ["01", "1", "1.0", "NA", "nan"]
    assert sorted(catalog.get_dataset(name, store)["classes"]) == ["01", "1", "1.0", "NA", "nan"]


@pytest.mark.timeout(30)  # before the fix the scan blocked forever opening the FIFO
def test_4d_special_files_are_refused_before_reading(store, tmp_path):
    files = sorted(str(p) for p in make_folder(tmp_path / "src").rglob("*.png"))
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    rows = [(str(fifo), "a"), ("/dev/zero", "a"), (str(tmp_path / "src"), "a"), (files[0], "a"), (files[1], "b")]
    name = sources.register(str(write_manifest(tmp_path / "m.csv", rows)), "special")
    report = scan.scan(name, store)
    assert (report.images, report.skipped) == (2, 3)
    reasons = problems(name, store)
    assert reasons[str(fifo)].startswith("not a regular file (a FIFO")
    assert reasons["/dev/zero"].startswith("not a regular file (a character device")
    assert reasons[str(tmp_path / "src")].startswith("not a regular file (a folder")


def test_4e_files_over_the_size_limit_are_never_read(store, tmp_path, monkeypatch):
    root = make_folder(tmp_path / "src")
    big = root / "cls0" / "big.png"
    big.write_bytes(tiny_png(99, size=64))  # random pixels: a few KB
    monkeypatch.setenv("REDEX_MAX_FILE_BYTES", "2000")
    name = sources.register(str(root), "sizes")
    report = scan.scan(name, store)
    assert (report.images, report.skipped) == (6, 1)
    assert problems(name, store)["cls0/big.png"].startswith(f"file too large: {big.stat().st_size:,} bytes")


def test_4f_an_empty_manifest_is_a_clear_error(store, tmp_path):
    (tmp_path / "empty.csv").write_bytes(b"")
    with pytest.raises(catalog.DatasetError, match="the manifest is empty"):
        scan.scan(sources.register(str(tmp_path / "empty.csv"), "empty"), store)


# -- 7: export after source files were deleted; export into a dataset --------------------------
def test_7_export_is_all_or_nothing_and_lists_missing_sources(store, tmp_path):
    root = make_folder(tmp_path / "src")
    name = sources.register(str(root), "exp")
    scan.scan(name, store)
    frame = all_kept(name, store)
    gone = frame.path.iloc[0]
    (root / gone).unlink()
    out = tmp_path / "out"
    for copy in (False, True):
        with pytest.raises(ValueError, match="1 of the 6 source files no longer exist") as err:
            export.export_imagefolder(name, frame, out, copy=copy)
        assert gone in str(err.value)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "src"]  # no partial folder left
    assert export.export_imagefolder(name, frame, out, copy=True, skip_missing=True) == 5
    written = [p for p in out.rglob("*") if p.is_file()]
    assert len(written) == 5 and not any(p.is_symlink() for p in written)
    # An (empty) export folder inside the dataset's root is refused: a rescan would count its files.
    inside = root / "exported"
    inside.mkdir()
    with pytest.raises(ValueError, match="inside the folder of dataset 'exp'"):
        export.export_imagefolder(name, frame, inside, skip_missing=True)
    assert not any(inside.iterdir())
    assert scan.scan(name, store).images == 5


# -- 8: symlinks in an image folder ------------------------------------------------------------
def test_8_dangling_links_and_links_out_of_the_root_are_problem_rows(store, tmp_path):
    root = make_folder(tmp_path / "src")
    outside = tmp_path / "elsewhere" / "secret.png"
    outside.parent.mkdir()
    outside.write_bytes(tiny_png(77))
    (root / "cls0" / "dangling.png").symlink_to(tmp_path / "nothing.png")
    (root / "cls0" / "outside.png").symlink_to(outside)
    (root / "cls1" / "inside.png").symlink_to(root / "cls0" / "img0.png")
    (root / "cls2").symlink_to(outside.parent, target_is_directory=True)  # a class folder linked out
    name = sources.register(str(root), "links")
    report = scan.scan(name, store)
    reasons = problems(name, store)
    assert reasons["cls0/dangling.png"].startswith("dangling symlink")
    assert reasons["cls0/outside.png"].startswith("links outside the dataset folder")
    assert reasons["cls2/secret.png"].startswith("links outside the dataset folder")
    paths = set(catalog.images_table(name, store).path)
    assert "cls1/inside.png" in paths and not paths & {"cls0/outside.png", "cls2/secret.png"}
    assert (report.images, report.skipped) == (7, 3)


# -- 10: a folder of no images -----------------------------------------------------------------
def test_10_a_folder_without_images_is_refused_before_any_dataset_exists(store, tmp_path):
    etc = tmp_path / "etc"
    for sub, n in (("apt", 30), ("ssl", 30), ("x11", 10)):
        (etc / sub).mkdir(parents=True)
        for i in range(n):
            (etc / sub / f"file{i}.conf").write_text(f"key{i} = value\n")
    (etc / "x11" / "logo.png").write_text("not a png at all")
    (etc / "x11" / "passwd").symlink_to("/etc/passwd")  # out of the root: never opened
    os.mkfifo(etc / "apt" / "fifo.png")                 # never opened (it would block)
    with pytest.raises(catalog.DatasetError, match="no image among 50 sampled files"):
        sources.register(str(etc), "etc")
    assert catalog.list_datasets(store).empty
    # One image among the text files is enough.
    (etc / "ssl" / "a.png").write_bytes(tiny_png(1))
    assert sources.register(str(etc), "etc") == "etc"


def test_10b_a_source_whose_class_folders_hold_no_files_is_refused_at_register(store, tmp_path):
    # Before: `check_has_images` let a source with no file in any class folder through ("the scan says
    # what layout it expected"), so each of these registered and only the scan said "has no images".
    empty = tmp_path / "empty"
    empty.mkdir()
    hidden = tmp_path / "hidden"
    (hidden / ".git").mkdir(parents=True)
    (hidden / ".DS_Store").write_text("x")
    classes = tmp_path / "classes"
    for i in range(30):
        (classes / f"class{i}").mkdir(parents=True)
    (classes / "class3" / ".keep").write_text("")
    (classes / "loose.png").write_bytes(tiny_png(0))  # not in a class folder: the scan ignores it
    splits = tmp_path / "splits"
    for split in ("train", "test"):
        (splits / split / "a").mkdir(parents=True)
    gone = write_manifest(tmp_path / "gone.csv", [(f"gone{i}.png", "a") for i in range(5)])
    unusable = write_manifest(tmp_path / "unusable.csv", [("", "a"), ("x.png", "")])
    header = tmp_path / "header.csv"
    header.write_text("path,label\n")
    for source, said, fix in [
            (empty, "the folder is empty", "one folder per class"),
            (hidden, "it has no class folder; 2 hidden entries", "one folder per class"),
            (classes, "its 30 class folders hold no files; 1 file lies directly in it", "one folder per class"),
            (splits, "its 2 class folders hold no files", "one folder per class"),
            (gone, "no image among 5 sampled rows of the manifest (5 file not found)", "check its path column"),
            (unusable, "none of its 2 rows names a usable file (1 empty path, 1 empty label)", "one row per image"),
            (header, "the manifest has a header but no rows", "one row per image")]:
        with pytest.raises(catalog.DatasetError) as err:
            sources.register(str(source), "x")
        message = str(err.value)
        assert message.startswith(f"{source}: {said}") and fix in message, message
        assert message.endswith("nothing was registered") and "\n" not in message
    # A folder whose own path is not UTF-8 (before: DuckDB's "Python Conversion Failure" when the row was written).
    latin1 = Path(os.fsdecode(os.fsencode(tmp_path) + b"/caf\xe9"))
    make_folder(latin1)
    with pytest.raises(catalog.DatasetError, match=r"caf\\xe9: its path is not valid UTF-8 .* nothing was registered"):
        sources.register(str(latin1), "x")
    assert catalog.list_datasets(store).empty
    # One class folder of images among more empty ones than the sample looks at still registers.
    for i in range(sources.SAMPLE_FOLDERS + 50):
        (classes / f"class{i:03d}").mkdir()
    (classes / "zebra").mkdir()
    (classes / "zebra" / "a.png").write_bytes(tiny_png(1))
    assert sources.register(str(classes), "x") == "x"
    assert scan.scan("x", store).images == 1


# -- removing a dataset ------------------------------------------------------------------------
def test_remove_dataset_deletes_everything_derived_and_never_the_sources(store, tmp_path):
    from core.store.db import to_json

    src_a = make_folder(tmp_path / "a")
    src_b = make_folder(tmp_path / "b", start=0)  # the same images: shared content ids
    a, b = sources.register(str(src_a), "a"), sources.register(str(src_b), "b")
    scan.scan(a, store)
    scan.scan(b, store)
    fm = sources.register("fashion-mnist", limit=3)
    scan.scan(fm, store)
    ids = list(catalog.images_table(a, store).image_id)
    ckpt = config.artifacts_dir("backbones") / "trained_a.pt"
    ranker = config.artifacts_dir("ltrp") / "ranker_a.pt"
    log = config.cache_dir() / "jobs" / "job-1.log"
    log.parent.mkdir(exist_ok=True)
    for f in (ckpt, ranker, log):
        f.write_bytes(b"x")
    user_ckpt = tmp_path / "user-mae.pth"
    user_ckpt.write_bytes(b"user's own file")
    with store.write() as con:
        con.execute("INSERT INTO backbones (backbone_id, dataset, spec, checkpoint, dim) VALUES"
                    " ('bb-a', 'a', 'trained:r', ?, 2), ('timm', NULL, 'timm:x', NULL, 2)", [str(ckpt)])
        for image_id in ids:
            con.execute("INSERT INTO embeddings VALUES ('bb-a', ?, [1, 2]), ('timm', ?, [1, 2])", [image_id, image_id])
        con.execute("INSERT INTO embeddings VALUES ('timm', 'only-in-a', [1, 2])")
        con.execute("INSERT INTO images SELECT 'a', 99, 'extra.png', 'only-in-a', 'p', 'cls0', 'train', 8, 8, 'L', 1, 0")
        con.execute("INSERT INTO projections VALUES ('a', 'bb-a', 'umap', 'fp', 'cls0/img0.png', 0, 0)")
        con.execute("INSERT INTO trees (dataset, backbone_id, linkage, label, fingerprint, members, merges)"
                    " VALUES ('a', 'bb-a', 'complete', 'cls0', 'fp', ['x'], ''::BLOB)")
        con.execute("INSERT INTO ltrp_models (model_id, dataset, kind, parent, checkpoint) VALUES"
                    " ('ranker-a', 'a', 'ranker', 'mae-user', ?), ('mae-user', NULL, 'mae', NULL, ?)",
                    [str(ranker), str(user_ckpt)])
        con.execute("INSERT INTO patch_scores VALUES ('ranker-a', ?, [0.5])", [ids[0]])
        con.execute("INSERT INTO sweeps (dataset, spec) VALUES ('a', '{}')")
        con.execute("INSERT INTO train_runs (run_key, dataset, method, fraction, seed, selection, recipe, subset_fp,"
                    " n_train, status) VALUES ('k', 'a', 'full', 1, 0, '{}', '{}', 'fp', 6, 'done')")
        job = con.execute("INSERT INTO jobs (kind, dataset, params, status, log_path) VALUES"
                          " ('embed', 'a', ?, 'queued', ?) RETURNING id", [to_json({}), str(log)]).fetchone()[0]
        con.execute("INSERT INTO job_events (job_id, level, message) VALUES (?, 'info', 'hi')", [job])
    sources_before = snapshot(tmp_path, skip=(config.cache_dir(),))
    with pytest.raises(catalog.DatasetError, match="queued or running"):
        sources.remove_dataset(a, store)
    store.execute("UPDATE jobs SET status = 'done' WHERE id = ?", [job])
    pixels = Path(catalog.get_dataset(a, store)["pixels"])
    removed = sources.remove_dataset(a, store)
    # Embeddings: bb-a's six, and of the shared backbone only the one image no other dataset has.
    assert removed["tables"] == {"images": 7, "embeddings": 7, "backbones": 1, "ltrp_models": 1, "patch_scores": 1,
                                 "projections": 1, "trees": 1, "sweeps": 1, "train_runs": 1, "jobs": 1,
                                 "job_events": 1, "datasets": 1}
    for table in ("images", "projections", "trees", "sweeps", "train_runs", "jobs", "backbones", "ltrp_models"):
        assert store.query(f"SELECT count(*) FROM {table} WHERE dataset = 'a'")[0][0] == 0
    assert store.query("SELECT count(*) FROM embeddings WHERE backbone_id = 'timm'")[0][0] == 6  # b still has them
    assert not (ckpt.exists() or ranker.exists() or log.exists() or pixels.exists())
    assert str(pixels) in removed["files"]
    # Never a source file, nor a user's checkpoint; the other datasets are whole.
    assert snapshot(tmp_path, skip=(config.cache_dir(),)) == sources_before and user_ckpt.exists()
    assert len(catalog.load_pixels(b, store)) == 6 and sorted(catalog.list_datasets(store).name) == [b, fm]
    # The demo's PNG folder lives in the cache: it goes with the dataset.
    fm_root = Path(catalog.get_dataset(fm, store)["root"])
    assert fm_root.is_dir()
    sources.remove_dataset(fm, store)
    assert not fm_root.exists() and list(catalog.list_datasets(store).name) == [b]


# -- property: nothing is written outside the cache or the export target -----------------------
HOSTILE = ["..", ".", "/", "../x", "../../../../x", "a/../../b", "{ABS}", "{ABS}/sub", "", "\x00", "a\x00b",
           "x\ny", "\r", "a" * 300, "é" * 130, "caf\udce9", "\udcff", "~", ".hidden", "a/b", "ok", "-", "train"]
texts = st.one_of(st.sampled_from(HOSTILE), st.text(max_size=70),
                  st.text(alphabet=st.sampled_from("./\\\x00\n\udce9ab"), max_size=12),
                  st.from_regex(r"[A-Za-z0-9._-]{1,70}", fullmatch=True))


_scanned: dict[Path, tuple[Path, str]] = {}


@settings(max_examples=25, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(name=texts, labels=st.lists(texts, min_size=1, max_size=3), split=texts)
def test_property_nothing_is_written_outside_the_cache_or_the_target(store, tmp_path, name, labels, split):
    if tmp_path not in _scanned:  # one scanned dataset for all examples of this run
        base = sources.register(str(make_folder(tmp_path / "base", classes=1, per_class=3)), "base")
        scan.scan(base, store)
        _scanned[tmp_path] = (tmp_path / "base", base)
    src, base = _scanned[tmp_path]
    work = Path(tempfile.mkdtemp(dir=tmp_path))
    name, split, *labels = (t.replace("{ABS}", str(work / "abs")) for t in (name, split, *labels))
    out = work / "d1" / "d2" / "d3" / "d4" / "out"  # deep enough that '../../../../x' lands in `work`
    keep = (config.cache_dir(), out)
    before = snapshot(tmp_path, skip=keep)
    # A name reaches the scan's chunk folder, the pixel cache's file name and remove_dataset.
    try:
        registered = sources.register(str(src), name)
    except catalog.DatasetError:
        registered = None
    if registered and registered != base:
        scan.scan(registered, store)
        sources.remove_dataset(registered, store)
    # Labels and splits reach the export's folder names (surrogates too: a frame can hold anything).
    frame = all_kept(base, store).astype({"label": object, "split": object})
    frame["label"] = pd.Series([labels[i % len(labels)] for i in range(len(frame))], dtype=object)
    frame["split"] = pd.Series([split] * len(frame), dtype=object)
    try:
        assert export.export_imagefolder(base, frame, out) == 3
        assert len([p for p in out.rglob("*") if p.is_symlink()]) == 3
    except ValueError as exc:  # refused, with the reason, and nothing left
        assert "label or file name" in str(exc) and not out.exists()
    from core import paths

    for label in labels:
        try:
            assert paths.is_under(paths.safe_join(work, label, subdirs=True), work)
        except paths.UnsafePathError:
            pass
    after = snapshot(tmp_path, skip=keep)
    parents = {(out.parents[k].relative_to(tmp_path).as_posix(), False) for k in range(4)}  # d1 ... d4
    assert before <= after and after - before <= parents
