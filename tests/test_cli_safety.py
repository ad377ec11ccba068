"""Safe by construction, the CLI part (issue 11, finding 6 and what it asks for): every error is one line.

Expected errors print `redex: error: <one line>` and exit 1; a damaged store names its file and what to
do, and `redex doctor --repair` replaces it; checkpoints are refused before a job exists; a closed pipe
ends quietly; `datasets remove` and `export --skip-missing`. Real processes (`python -m core.cli`) where
the process boundary is the point (pipes, terminals, a damaged file), `core.cli.main` with capsys
elsewhere; real DuckDB files and real image folders throughout.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from core import config, jobs
from core.cli import main
from core.data import catalog, scan, sources
from core.store import db
from tests.test_safety import all_kept, make_folder

REPO = Path(__file__).resolve().parents[1]


def redex(*args: str, stdin=subprocess.DEVNULL, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m core.cli ARGS` in a real process on this test's cache."""
    return subprocess.run([sys.executable, "-m", "core.cli", *args], cwd=REPO, env=dict(os.environ),
                          stdin=stdin, capture_output=True, text=True, timeout=timeout)


def one_error_line(err: str) -> str:
    """The stderr of a failed command: exactly one line `redex: error: ...`, no traceback."""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("redex: error: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture
def scanned(store, tmp_path):
    """A registered, scanned image folder dataset 'demo' (2 classes x 3 tiny PNGs)."""
    root = make_folder(tmp_path / "src")
    scan.scan(sources.register(str(root), "demo"), store)
    return root


@pytest.fixture
def subset_of_all(monkeypatch, store):
    """`redex subset|export` cut a subset that keeps every image (no embeddings or trees needed)."""
    from core.cli import groups

    monkeypatch.setattr(groups, "_subset", lambda args: all_kept(args.name, store))


# -- --out and --imagefolder -------------------------------------------------------------------
def test_out_pointing_at_a_folder_is_one_line(scanned, subset_of_all, tmp_path, capsys):
    folder = tmp_path / "subset.csv"  # a folder named like the file it should be
    folder.mkdir()
    assert main(["subset", "demo", "--fraction", "1", "--out", str(folder)]) == 1
    assert "is a folder" in one_error_line(capsys.readouterr().err)


def test_an_unwritable_out_is_one_line(scanned, subset_of_all, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    out = locked / "subset.csv"
    if os.access(locked, os.W_OK):  # root writes anywhere: a read-only file system instead
        out = Path("/sys/redex-subset.csv")
        if os.access("/sys", os.W_OK) and not _write_fails(out):
            pytest.skip("no unwritable folder for this user")
    assert main(["subset", "demo", "--fraction", "1", "--out", str(out)]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert str(out.parent) in line and not out.exists()


def _write_fails(path: Path) -> bool:
    try:
        path.write_bytes(b"")
    except OSError:
        return True
    path.unlink()
    return False


def test_imagefolder_pointing_at_a_file_is_one_line(scanned, subset_of_all, tmp_path, capsys):
    target = tmp_path / "a-file"
    target.write_text("mine")
    assert main(["export", "demo", "--fraction", "1", "--imagefolder", str(target)]) == 1
    assert "is a file" in one_error_line(capsys.readouterr().err)
    assert target.read_text() == "mine"


# -- registering ---------------------------------------------------------------------------------
def test_datasets_add_refuses_a_folder_of_empty_class_folders_in_one_line(store, tmp_path, capsys):
    # Before: registered, recorded in datasets.json, and a scan job started that failed ("has no images").
    folder = tmp_path / "photos"
    for cls in ("cats", "dogs"):
        (folder / cls).mkdir(parents=True)
    assert main(["datasets", "add", str(folder), "--detach"]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert f"{folder}: its 2 class folders hold no files" in line and "nothing was registered" in line
    assert catalog.list_datasets(store).empty and not jobs.list_jobs(store)
    assert not (config.cache_dir() / "datasets.json").exists()


# -- a damaged store ---------------------------------------------------------------------------
def test_a_corrupt_store_names_the_file_and_the_fix_and_doctor_repairs_it(scanned, store, cache):
    assert redex("datasets", "list").returncode == 0  # also writes the record doctor reads later
    db._stores.clear()
    path = config.db_path()
    path.write_bytes(os.urandom(64 * 1024))  # garbage where the store was
    for args in (["jobs"], ["info", "demo"]):
        run = redex(*args)
        assert run.returncode == 1
        line = one_error_line(run.stderr)
        assert str(path) in line and "redex doctor" in line and "damaged" in line

    run = redex("doctor")  # says what is wrong and what --repair would do; changes nothing
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert "DAMAGED" in run.stdout and f"redex datasets add {scanned} --name demo" in run.stdout
    assert sorted(p.name for p in cache.glob("redex.duckdb.corrupt-*")) == []

    run = redex("doctor", "--repair")
    assert run.returncode == 0, run.stdout + run.stderr
    assert len(list(cache.glob("redex.duckdb.corrupt-*"))) == 1
    fresh = db.get_store()
    (job,) = jobs.list_jobs(fresh)
    assert jobs.wait(job["id"], fresh, timeout=300)["status"] == "done"
    assert catalog.get_dataset("demo", fresh)["source"] == str(scanned)
    assert len(catalog.images_table("demo", fresh)) == 6
    run = redex("doctor")
    assert run.returncode == 0 and "everything redex points to is there" in run.stdout


def test_a_truncated_store_is_one_line(scanned, store):
    path = config.db_path()
    data = path.read_bytes()
    db._stores.clear()
    path.write_bytes(data[: len(data) // 3])
    run = redex("info", "demo")
    assert run.returncode == 1
    assert str(path) in one_error_line(run.stderr)


def test_doctor_lists_what_is_missing_with_the_command_that_rebuilds_it(scanned, store, capsys):
    pixels = Path(catalog.get_dataset("demo", store)["pixels"])
    pixels.unlink()
    ckpt = config.model_file("backbones", "trained:resnet8s2@demo#abcd")
    store.execute("INSERT INTO backbones (backbone_id, dataset, spec, checkpoint, dim) VALUES"
                  " ('trained:resnet8s2@demo#abcd', 'demo', 'trained:resnet8s2', ?, 64)", [str(ckpt)])
    assert main(["doctor"]) == 1
    out = capsys.readouterr().out
    assert f"pixel cache {pixels} is missing" in out and f"redex datasets add {scanned} --name demo" in out
    assert f"checkpoint {ckpt} is missing" in out and "redex embed demo --backbone trained:resnet8s2" in out


def damage_blocks(path: Path, tables: list[str]) -> None:
    """Overwrite a few bytes inside each storage block that holds `tables` (found with DuckDB's
    `pragma_storage_info`): their checksums fail, as after a disk error; the other tables still read."""
    import duckdb

    with duckdb.connect(str(path), read_only=True) as con:
        block_size = con.execute("PRAGMA database_size").fetchone()[2]
        blocks = {b for t in tables for (b,) in con.execute(
            f"SELECT DISTINCT block_id FROM pragma_storage_info('{t}') WHERE block_id >= 0").fetchall()}
    assert blocks, f"no storage block found for {tables}"
    data = bytearray(path.read_bytes())
    for block in blocks:
        start = 3 * 4096 + block * block_size + 64  # after DuckDB's three 4 KiB headers
        data[start:start + 64] = b"x" * 64
    path.write_bytes(bytes(data))


def test_repair_links_surviving_checkpoints_and_lists_what_to_recompute(scanned, store, cache, capsys, one_thread):
    # Before: the repair registered the datasets again and nothing else ("embeddings, merge trees ... are
    # rebuilt by running their commands again"): no command named what was lost (the first assertion on
    # the output failed), and no backbone or ranker was known to the fresh store.
    from core.embed import embeddings
    from core.embed.backbones import DEFAULT_BACKBONE
    from core.ltrp import models
    from core.redundancy import clusterings
    from core.store.db import to_json
    from core.subsets import plan
    from tests.test_patches import TINY

    settings = models.LtrpSettings(**TINY, mask_ratio=0.5)  # 8 px images: 4 patches, of which 2 stay visible
    model, bid = embeddings.ensure_backbone("demo", DEFAULT_BACKBONE, epochs=1, store=store)
    embeddings.embed_dataset("demo", model, bid, store=store)
    clusterings.cluster("demo", bid, store=store)
    ids = models.train_ltrp("demo", settings, store=store)
    grid = plan.SweepSpec(fractions=(0.5,), methods=("semantic",), seeds=1, recipe={"epochs": 1},
                          selection={"backbone_id": bid, "linkage": "complete", "representative": "nearest_mean"})
    store.execute("INSERT INTO sweeps (dataset, spec) VALUES ('demo', ?)", [to_json({"grid": grid.to_dict()})])
    accuracy = embeddings.list_backbones("demo", store).accuracy.iloc[0]
    assert main(["datasets", "list"]) == 0  # writes the record the repair falls back on
    files = {p: p.stat().st_mtime_ns for p in (config.cache_dir() / "artifacts").rglob("*.pt")}
    assert len(files) == 3  # the backbone, the MAE and the ranker
    store.execute("CHECKPOINT")
    db._stores.clear()
    damage_blocks(config.db_path(), ["datasets", "embeddings"])  # the datasets come from the record
    capsys.readouterr()

    expected = [f"embeddings: `redex embed demo --backbone {DEFAULT_BACKBONE} --epochs 1`  (its checkpoint survives",
                f"merge trees: `redex cluster demo --backbone-id '{bid}'`",
                f"LTRP scores: `redex ltrp score demo --ranker-id '{ids['ranker_id']}'`  (its ranker and MAE survive",
                (f"training runs: `redex sweep demo --fractions 0.5 --methods semantic --seeds 1 --epochs 1"
                 f" --backbone-id '{bid}' --linkage complete --representative nearest_mean`")]
    assert main(["doctor"]) == 1  # what --repair would do, and what would be left to run; nothing changes
    out = capsys.readouterr().out
    assert "DAMAGED" in out and all(line in out for line in expected), out
    assert not list(cache.glob("redex.duckdb.corrupt-*"))

    assert main(["doctor", "--repair"]) == 0
    out = capsys.readouterr().out
    assert "linked again 1 backbone checkpoint and 2 LTRP checkpoints" in out and all(line in out for line in expected), out
    fresh = db.get_store()
    assert list(models.list_rankers("demo", fresh).model_id) == [ids["ranker_id"]]  # before anything runs
    (job,) = jobs.list_jobs(fresh)
    assert jobs.wait(job["id"], fresh, timeout=300)["status"] == "done"
    # The printed commands load the checkpoints: nothing is trained again (the files are not rewritten).
    model, again = embeddings.ensure_backbone("demo", DEFAULT_BACKBONE, epochs=1, store=fresh)
    embeddings.embed_dataset("demo", model, again, store=fresh)
    assert models.train_ltrp("demo", settings, store=fresh) == ids
    assert {p: p.stat().st_mtime_ns for p in files} == files
    backs = embeddings.list_backbones("demo", fresh)
    assert (list(backs.backbone_id), list(backs.embedded), backs.accuracy.iloc[0]) == ([bid], [6], accuracy)


def test_doctor_marks_jobs_left_running_by_a_dead_process_failed(scanned, store, capsys):
    # Before: `redex doctor` never looked at the jobs; the row stayed 'running' until a page or
    # `redex jobs` happened to look.
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], check=True, capture_output=True,
                          text=True)
    job = store.execute("INSERT INTO jobs (kind, dataset, params, status, pid, lane) VALUES"
                        " ('embed', 'demo', '{}', 'running', ?, 'heavy') RETURNING id", [int(gone.stdout)])[0][0]
    assert main(["doctor"]) == 0
    assert f"job {job} (embed of 'demo') was left running by a process that is gone: marked failed" in \
        capsys.readouterr().out
    assert store.query("SELECT status FROM jobs WHERE id = ?", [job]) == [("failed",)]


def test_repair_is_refused_while_a_job_process_uses_the_store(scanned, store, cache, capsys):
    # Before: the store was moved aside under a running job, whose next write went to the fresh store
    # (where its job id may belong to another job).
    path = config.db_path()
    db._stores.clear()
    job = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "core.jobs", "7", str(path)])
    try:
        path.write_bytes(os.urandom(64 * 1024))
        assert main(["doctor", "--repair"]) == 1
        line = one_error_line(capsys.readouterr().err)
        assert f"job process(es) {job.pid} still use {path}" in line and "nothing was changed" in line
        assert not list(cache.glob("redex.duckdb.corrupt-*"))
    finally:
        job.kill()
        job.wait()
        path.unlink()  # the garbage would fail the fixture's clean-up


# -- checkpoints are checked before a job exists -----------------------------------------------
def test_a_bad_embed_checkpoint_is_refused_before_any_job(scanned, store, tmp_path, capsys):
    import timm
    import torch

    good = tmp_path / "resnet18.pth"
    torch.save(timm.create_model("resnet18", pretrained=False, num_classes=0).state_dict(), good)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[:100_000])
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"this is not a checkpoint at all\n" * 100)
    pickled = tmp_path / "objects.pth"
    torch.save({"model": Path("an object")}, pickled)  # an object a weights-only load refuses
    fifo = tmp_path / "fifo.pth"
    os.mkfifo(fifo)
    cases = {garbage: "not a weights file", truncated: "not a weights file", pickled: "weights_only",
             fifo: "FIFO", tmp_path / "missing.pth": "no such checkpoint", tmp_path: "a folder"}
    for path, reason in cases.items():
        assert main(["embed", "demo", "--backbone", "timm:resnet18", "--checkpoint", str(path)]) == 1
        line = one_error_line(capsys.readouterr().err)
        assert reason in line and str(path) in line
    assert main(["embed", "demo", "--backbone", "timm:resnet34", "--checkpoint", str(good)]) == 1
    assert "does not hold weights for timm model 'resnet34'" in one_error_line(capsys.readouterr().err)
    assert main(["embed", "demo", "--checkpoint", str(good)]) == 1  # trained backbones take none
    assert "timm backbones" in one_error_line(capsys.readouterr().err)
    assert jobs.list_jobs(store) == []  # no job row was ever made


def test_a_special_file_as_ltrp_checkpoint_is_refused_before_any_job(scanned, store, tmp_path, capsys):
    fifo = tmp_path / "mae.pth"
    os.mkfifo(fifo)  # opening it would block forever
    assert main(["ltrp", "train", "demo", "--checkpoint", str(fifo)]) == 1
    assert "FIFO" in one_error_line(capsys.readouterr().err)
    assert jobs.list_jobs(store) == []


# -- the error boundary ------------------------------------------------------------------------
def test_a_closed_pipe_ends_quietly(store):
    with store.write() as con:
        con.execute("INSERT INTO jobs (kind, dataset, params, status) SELECT 'scan', 'demo', '{}', 'done'"
                    " FROM range(3000)")  # more output than a pipe holds
    run = subprocess.run(f"{sys.executable} -m core.cli jobs --all | head -1", shell=True, cwd=REPO,
                         env=dict(os.environ), capture_output=True, text=True, timeout=300)
    assert run.stderr == "" and len(run.stdout.splitlines()) == 1


def test_an_unexpected_error_is_one_line_and_a_traceback_file(store, monkeypatch, capsys):
    from core.cli import jobs as cli_jobs

    def broken(args):
        raise RuntimeError("something\nunforeseen")

    monkeypatch.setattr(cli_jobs, "cmd_jobs", broken)
    assert main(["jobs"]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith("redex: error: RuntimeError: something unforeseen (full traceback in ")
    log = Path(line.rsplit("full traceback in ", 1)[1].rstrip(")"))
    assert log.parent == config.cache_dir() / "logs" and "Traceback" in log.read_text()


# -- datasets remove, export --skip-missing ----------------------------------------------------
def test_datasets_remove_asks_or_refuses_without_yes(scanned, store, monkeypatch, capsys):
    run = redex("datasets", "remove", "demo")  # no terminal, no --yes: refused
    assert run.returncode == 1 and "--yes" in one_error_line(run.stderr)
    assert catalog.get_dataset("demo", store)

    monkeypatch.setattr(sys.stdin, "isatty", lambda: True)  # a terminal: asks
    monkeypatch.setattr("builtins.input", lambda prompt: "n")
    assert main(["datasets", "remove", "demo"]) == 1
    assert "nothing removed" in capsys.readouterr().out and catalog.get_dataset("demo", store)
    monkeypatch.setattr("builtins.input", lambda prompt: "y")
    assert main(["datasets", "remove", "demo"]) == 0
    assert "removed dataset 'demo'" in capsys.readouterr().out
    with pytest.raises(catalog.DatasetError):
        catalog.get_dataset("demo", store)
    assert len(list(scanned.rglob("*.png"))) == 6  # the sources are untouched


def test_datasets_remove_with_yes(scanned, store):
    pixels = catalog.get_dataset("demo", store)["pixels"]
    run = redex("datasets", "remove", "demo", "--yes")
    assert run.returncode == 0, run.stderr
    assert "removed dataset 'demo'" in run.stdout and f"deleted {pixels}" in run.stdout
    assert not Path(pixels).exists() and len(list(scanned.rglob("*.png"))) == 6
    assert "no dataset named 'demo'" in one_error_line(redex("info", "demo").stderr)


def test_export_skip_missing(scanned, subset_of_all, tmp_path, capsys):
    next(scanned.rglob("*.png")).unlink()
    out = tmp_path / "exported"
    assert main(["export", "demo", "--fraction", "1", "--imagefolder", str(out)]) == 1
    assert "--skip-missing" in one_error_line(capsys.readouterr().err) and not out.exists()
    assert main(["export", "demo", "--fraction", "1", "--imagefolder", str(out), "--skip-missing"]) == 0
    printed = capsys.readouterr().out
    assert "wrote 5 symlinks" in printed and "skipped 1 kept image" in printed
    assert len(list(out.rglob("*.png"))) == 5


# -- checkpoint file names ---------------------------------------------------------------------
def test_checkpoint_files_keep_their_names_and_stay_in_the_cache(cache):
    from core.paths import UnsafePathError

    def legacy(model_id: str) -> str:  # how the names were made before (`safe_name(id) + ".pt"`)
        return "".join(c if c.isalnum() or c in "-_." else "_" for c in model_id) + ".pt"

    ids = ["trained:resnet8s2@fashion-mnist#0a1b2c3d", "mae:1a2b3c4d@demo_x.y#deadbeef", "mae:file-0123456789ab",
           "ranker:1a2b3c4d@" + "d" * 64 + "#deadbeef<mae:1a2b3c4d@" + "d" * 64 + "#deadbeef"]
    for model_id in ids:  # existing caches find their checkpoints under the same names
        assert config.model_file("ltrp", model_id).name == legacy(model_id)
    long_id = "trained:resnet8s2@" + "x" * 400
    assert len(config.model_file("backbones", long_id).name) < 256  # no longer than a file name may be
    assert config.model_file("backbones", "../../../etc/passwd").parent == config.artifacts_dir("backbones")
    for bad in ("..", "/etc", "a/b", ""):
        with pytest.raises(UnsafePathError):
            config.artifacts_dir(bad)
