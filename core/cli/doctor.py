"""`redex doctor [--repair]`: check the store and every file it points to; say how to rebuild what is gone.

Checks: the store file opens and every table reads; each dataset's source (folder, manifest, or the
Fashion-MNIST files) and pixel cache exist; each trained backbone's and LTRP model's checkpoint
exists. Each problem is printed with the command that rebuilds it. Exit code 0 when all is well,
1 otherwise.

A damaged store cannot be mended, only replaced. `--repair` moves it aside to
`<db>.corrupt-<time>`, starts a fresh store and registers again (and rescans, as background jobs)
the datasets whose sources still exist. What they were comes from the damaged file itself when its
`datasets` table still reads, else from `<cache>/datasets.json`, a record of the registered
datasets that the CLI rewrites after `datasets add|list|remove` and every healthy `doctor` run.
Embeddings, trees, runs and models are not recovered: the commands printed rebuild them.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shlex
import time
from pathlib import Path

from core import config
from core.cli.common import add_command
from core.store import db

RECORD = "datasets.json"


def add_parsers(sub) -> None:
    p = add_command(sub, "doctor", cmd_doctor, "check the store, sources, pixel caches and checkpoints;"
                    " --repair replaces a damaged store", dataset=False)
    p.add_argument("--repair", action="store_true",
                   help="move a damaged store aside, start a fresh one and register the datasets again")


# -- the record of registered datasets ---------------------------------------------------------
def record_path() -> Path:
    return config.cache_dir() / RECORD


def save_record(store: db.Store | None = None) -> None:
    """Write `<cache>/datasets.json`: name, kind, source and options of every registered dataset
    (best effort: a cache that cannot be written is not this command's failure)."""
    store = store or db.get_store()
    rows = store.query("SELECT name, kind, source, options FROM datasets ORDER BY name")
    record = [{"name": n, "kind": k, "source": s, "options": json.loads(o or "{}")} for n, k, s, o in rows]
    path = record_path()
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    with contextlib.suppress(OSError):
        tmp.write_text(json.dumps(record, indent=1))
        os.replace(tmp, path)


def _read_record(damaged: Path) -> tuple[list[dict], str]:
    """The registered datasets, from the damaged file's `datasets` table if it still reads, else the
    record file. Returns (datasets, where they came from)."""
    import duckdb

    with contextlib.suppress(Exception):
        with contextlib.closing(duckdb.connect(str(damaged), read_only=True)) as con:
            rows = con.execute("SELECT name, kind, source, options FROM datasets ORDER BY name").fetchall()
        return [{"name": n, "kind": k, "source": s, "options": json.loads(o or "{}")} for n, k, s, o in rows], \
            "the damaged store's own datasets table"
    with contextlib.suppress(OSError, ValueError):
        return json.loads(record_path().read_text()), f"the record {record_path()}"
    return [], "nowhere (no readable record)"


def add_command_for(ds: dict) -> str:
    """The `redex datasets add ...` command that registers `ds` again."""
    opts = ds.get("options") or {}
    words = ["redex", "datasets", "add", ds["source"], "--name", ds["name"]]
    if opts.get("limit"):
        words += ["--limit", str(opts["limit"])]
    if opts.get("image_size") and ds["kind"] != "fashion-mnist":
        words += ["--image-size", str(opts["image_size"])]
    return " ".join(shlex.quote(w) for w in words)


def _source_exists(ds: dict) -> bool:
    if ds["kind"] == "fashion-mnist":
        from core.data import sources

        try:
            sources.fashion_mnist_folder()
            return True
        except Exception:  # noqa: BLE001 - any reason the data cannot be had
            return Path(ds.get("root") or "").is_dir()
    return Path(ds["source"]).exists()


# -- the command -------------------------------------------------------------------------------
def cmd_doctor(args) -> int:
    path = config.db_path()
    try:
        store = db.get_store()
        _read_every_table(store)
    except db.StoreCorrupt as exc:
        print(f"store {path}: DAMAGED ({exc.detail})")
        return _repair(path) if args.repair else _advise(path)
    print(f"store {path}: ok")
    save_record(store)
    problems = _check_datasets(store) + _check_checkpoints(store)
    for what, fix in problems:
        print(f"  {what}\n    fix: {fix}")
    print(f"{len(problems)} problem(s) found" if problems else "everything redex points to is there")
    return 1 if problems else 0


def _read_every_table(store: db.Store) -> None:
    """Read every row of every table (a damaged block anywhere raises `StoreCorrupt`)."""
    with store.read() as con:
        tables = [r[0] for r in con.execute("SELECT table_name FROM information_schema.tables"
                                            " WHERE table_schema = current_schema()").fetchall()]
        for table in tables:
            con.execute(f'SELECT * FROM "{table}"').fetchall()


def _check_datasets(store: db.Store) -> list[tuple[str, str]]:
    cur = store.query("SELECT name, kind, source, root, options, pixels, scanned_at FROM datasets ORDER BY name")
    problems = []
    for name, kind, source, root, options, pixels, scanned in cur:
        ds = {"name": name, "kind": kind, "source": source, "root": root, "options": json.loads(options or "{}")}
        if not _source_exists(ds):
            problems.append((f"dataset {name!r}: its source {source} is gone",
                             f"put it back, or `redex datasets remove {shlex.quote(name)}`"))
        elif not scanned or not pixels or not Path(pixels).is_file():
            state = "was never scanned" if not scanned else f"pixel cache {pixels or '(none)'} is missing"
            problems.append((f"dataset {name!r}: {state}", f"`{add_command_for(ds)}` (rescans it)"))
        else:
            print(f"  dataset {name!r}: source and pixel cache ok")
    return problems


def _check_checkpoints(store: db.Store) -> list[tuple[str, str]]:
    problems = []
    for bid, dataset, spec, ckpt in store.query(
            "SELECT backbone_id, dataset, spec, checkpoint FROM backbones WHERE checkpoint IS NOT NULL ORDER BY 1"):
        if not Path(ckpt).is_file():
            problems.append((f"backbone {bid}: checkpoint {ckpt} is missing",
                             f"`redex embed {shlex.quote(dataset or 'NAME')} --backbone {shlex.quote(spec)}`"
                             " (trains it again; add --epochs N if it was trained with other epochs)"))
    for mid, dataset, kind, ckpt in store.query(
            "SELECT model_id, dataset, kind, checkpoint FROM ltrp_models ORDER BY 1"):
        if ckpt and not Path(ckpt).is_file():
            fix = (f"`redex ltrp train {shlex.quote(dataset)}` with the options it was trained with (trains it again)"
                   if dataset else "put the file back, or `redex ltrp train NAME --checkpoint FILE` with another")
            problems.append((f"LTRP {kind} {mid}: checkpoint {ckpt} is missing", fix))
    return problems


def _advise(path: Path) -> int:
    found, where = _read_record(path)
    print(f"  nothing was changed. `redex doctor --repair` moves it to {path.name}.corrupt-<time>, starts a"
          f" fresh store and registers again the datasets whose sources exist ({len(found)} known, from {where}):")
    for ds in found:
        print(f"    {add_command_for(ds)}" + ("" if _source_exists(ds) else "   # source gone"))
    return 1


def _repair(path: Path) -> int:
    from core import jobs
    from core.data import sources

    found, where = _read_record(path)
    with _exclusive(path):
        aside = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}")
        os.rename(path, aside)
        wal = path.with_name(path.name + ".wal")
        if wal.exists():
            os.rename(wal, aside.with_name(aside.name + ".wal"))
    print(f"moved the damaged store to {aside}; started a fresh one")
    db._stores.pop(path, None)
    store = db.get_store(path)
    print(f"datasets to register again: {len(found)} (from {where})")
    failed = 0
    for ds in found:
        if not _source_exists(ds):
            print(f"  {ds['name']}: source {ds['source']} is gone; not registered")
            failed += 1
            continue
        opts = ds.get("options") or {}
        try:
            name = sources.register(ds["source"], ds["name"], image_size=opts.get("image_size"),
                                    limit=opts.get("limit"), store=store)
        except ValueError as exc:
            print(f"  {ds['name']}: not registered: {' '.join(str(exc).split())}")
            failed += 1
            continue
        job = jobs.launch("scan", name, None, store)
        print(f"  {name}: registered; scanning in the background (job {job}: `redex follow {job}`)")
    print("embeddings, merge trees, training runs and LTRP models are rebuilt by running their commands again")
    return 1 if failed else 0


@contextlib.contextmanager
def _exclusive(path: Path):
    """Hold the store's write lock (no redex process is using the file) while it is moved."""
    fd = os.open(path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            from core.cli.common import CliError

            raise CliError(f"another redex process is using {path}; stop it (the app, a job) and run this again") \
                from None
        yield
    finally:
        os.close(fd)
