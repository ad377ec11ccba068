"""`redex doctor [--repair]`: check the store and every file it points to; say how to rebuild what is gone.

Checks: the store file opens and every table reads; each dataset's source (folder, manifest, or the
Fashion-MNIST files) and pixel cache exist; each trained backbone's and LTRP model's checkpoint
exists. Jobs left queued or running by a process that is gone are marked failed. Each problem is
printed with the command that rebuilds it. Exit code 0 when all is well, 1 otherwise.

A damaged store cannot be mended, only replaced. `--repair` (refused while a job process still uses
the file) moves it aside to `<db>.corrupt-<time>`, starts a fresh store and rebuilds what survives:

- the datasets whose sources still exist are registered again and rescanned (background jobs). What
  they were comes from the damaged file itself when its `datasets` table still reads, else from
  `<cache>/datasets.json`, a record of the registered datasets that the CLI rewrites after
  `datasets add|list|remove` and every healthy `doctor` run;
- the checkpoints of models trained here that survive under `<cache>/artifacts` (backbones, MAEs,
  rankers of those datasets) are linked to the new store again, from the ids and settings they
  carry, so `redex embed` and `redex ltrp` load them instead of training again;
- for each dataset, the derived results that must be computed again (embeddings, the map, merge
  trees, LTRP scores, training runs) are listed with the exact commands, from what the damaged
  file still tells (its tables, read one by one) or else every kind.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path

from core import config, wording
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
    _fail_dead_jobs(store)
    problems = _check_datasets(store) + _check_checkpoints(store)
    for what, fix in problems:
        print(f"  {what}\n    fix: {fix}")
    print(f"{wording.plural(len(problems), 'problem')} found" if problems else "everything redex points to is there")
    return 1 if problems else 0


def _fail_dead_jobs(store: db.Store) -> None:
    """Mark failed the jobs left queued or running by a process that is gone (killed, a reboot), and say so."""
    from core import jobs

    dead = jobs.dead_jobs(store)
    if not dead:
        return
    rows = {i: (k, d, st) for i, k, d, st in store.query(
        "SELECT id, kind, dataset, status FROM jobs WHERE list_contains(?, id)", [dead])}
    jobs.mark_dead(store, dead)
    for job_id in dead:
        kind, dataset, status = rows.get(job_id, ("?", None, "running"))
        print(f"  job {job_id} ({kind}{' of ' + repr(dataset) if dataset else ''}) was left {status} by a process"
              " that is gone: marked failed" + (f"; `redex retry {shlex.quote(dataset)}` trains its failed runs again"
                                                if kind in ("train", "sweep") and dataset else ""))


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
                             (f"`redex embed {shlex.quote(dataset or 'NAME')} --backbone {shlex.quote(spec)}`"
                              " (trains it again; add --epochs N if it was trained with other epochs)")))
    for mid, dataset, kind, ckpt in store.query(
            "SELECT model_id, dataset, kind, checkpoint FROM ltrp_models ORDER BY 1"):
        if ckpt and not Path(ckpt).is_file():
            fix = (f"`redex ltrp train {shlex.quote(dataset)}` with the options it was trained with (trains it again)"
                   if dataset else "put the file back, or `redex ltrp train NAME --checkpoint FILE` with another")
            problems.append((f"LTRP {kind} {mid}: checkpoint {ckpt} is missing", fix))
    return problems


def _advise(path: Path) -> int:
    found, where = _read_record(path)
    old = _read_damaged(path)
    print(f"  nothing was changed. `redex doctor --repair` moves it to {path.name}.corrupt-<time>, starts a"
          f" fresh store, registers again the datasets whose sources exist ({len(found)} known, from {where}) and"
          " links again the checkpoints that survive; then these rebuild the rest:")
    survivors = _surviving_checkpoints({ds["name"] for ds in found}, old)
    for ds in found:
        if not _source_exists(ds):
            print(f"    {add_command_for(ds)}   # source gone")
            continue
        print(f"    {add_command_for(ds)}")
        for what, command, note in _rebuild_plan(ds["name"], survivors.linked.get(ds["name"], []), old):
            print(f"      {what}: `{command}`" + (f"  ({note})" if note else ""))
    return 1


def _repair(path: Path) -> int:
    from core import jobs
    from core.data import sources

    live = _job_processes(path)
    if live:
        from core.cli.common import CliError

        raise CliError(f"job process(es) {', '.join(map(str, live))} still use {path}; wait for them or stop them"
                       " (`kill PID`), then run this again; nothing was changed")
    found, where = _read_record(path)
    old = _read_damaged(path)
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
    failed, scans = 0, {}
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
        scans[name] = jobs.launch("scan", name, None, store)
    survivors = _surviving_checkpoints(set(scans), old)
    survivors.record(store)
    for name, job in scans.items():
        print(f"  {name}: registered; scanning in the background (job {job}: `redex follow {job}`); then:")
        for what, command, note in _rebuild_plan(name, survivors.linked.get(name, []), old):
            print(f"    {what}: `{command}`" + (f"  ({note})" if note else ""))
    return 1 if failed else 0


def _job_processes(path: Path) -> list[int]:
    """Pids of live job processes (`python -m core.jobs ID DB`) of the store at `path` (Linux: /proc)."""
    target = str(path).encode()
    pids = []
    for entry in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            args = (entry / "cmdline").read_bytes().split(b"\0")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            if b"core.jobs" in args and target in args and state not in ("Z", "X") and int(entry.name) != os.getpid():
                pids.append(int(entry.name))
    return sorted(pids)


# -- what survives a damaged store -------------------------------------------------------------
DAMAGED_QUERIES = {  # each read on its own: one damaged table does not hide the others
    "backbones": "SELECT backbone_id, dataset, spec, checkpoint, dim, metrics FROM backbones",
    "ltrp_models": "SELECT model_id, dataset, kind, parent, checkpoint, config, metrics FROM ltrp_models",
    "embeddings": "SELECT DISTINCT i.dataset, e.backbone_id FROM embeddings e JOIN images i USING (image_id)",
    "projections": "SELECT DISTINCT dataset, backbone_id FROM projections",
    "trees": "SELECT DISTINCT dataset, backbone_id, linkage FROM trees",
    "patch_scores": "SELECT DISTINCT i.dataset, p.ranker_id FROM patch_scores p JOIN images i USING (image_id)",
    "sweeps": "SELECT dataset, spec FROM sweeps ORDER BY id",
}


def _read_damaged(damaged: Path) -> dict[str, list[tuple] | None]:
    """What the damaged file still tells: the rows of each of `DAMAGED_QUERIES`, None where it does not read."""
    import duckdb

    out: dict[str, list[tuple] | None] = dict.fromkeys(DAMAGED_QUERIES)
    with contextlib.suppress(Exception), contextlib.closing(duckdb.connect(str(damaged), read_only=True)) as con:
        for key, sql in DAMAGED_QUERIES.items():
            with contextlib.suppress(Exception):
                out[key] = con.execute(sql).fetchall()
    return out


@dataclass
class Survivors:
    """Checkpoints under `<cache>/artifacts` to link to a fresh store: rows of `backbones` and
    `ltrp_models`, and per dataset what they are ({"kind", "id", "spec", "epochs"} or {"kind", "id"})."""
    backbones: list[list] = field(default_factory=list)
    models: list[list] = field(default_factory=list)
    linked: dict[str, list[dict]] = field(default_factory=dict)

    def record(self, store: db.Store) -> None:
        with store.write() as con:
            for r in self.backbones:
                con.execute("INSERT INTO backbones (backbone_id, dataset, spec, checkpoint, dim, metrics)"
                            " VALUES (?, ?, ?, ?, ?, ?)", r)
            for r in self.models:
                con.execute("INSERT INTO ltrp_models (model_id, dataset, kind, parent, checkpoint, config, metrics)"
                            " VALUES (?, ?, ?, ?, ?, ?, ?)", r)
        if self.backbones or self.models:
            print(f"linked again {wording.plural(len(self.backbones), 'backbone checkpoint')} and"
                  f" {wording.plural(len(self.models), 'LTRP checkpoint')} that"
                  f" survive under {config.artifacts_dir()}: they are loaded, not trained again")


def _surviving_checkpoints(datasets: set[str], old: dict) -> Survivors:
    """The checkpoints under `<cache>/artifacts` of models trained here on `datasets`: backbones, MAEs,
    and rankers whose MAE is known, read with `weights_only` loads. A file counts only under the id
    whose checkpoint name it has, so the code that looks for that id (`embeddings.ensure_backbone`,
    `ltrp.models.ensure_mae`/`ensure_ranker`) finds it. Metrics come from the damaged file's rows where
    they still read (else `{"relinked": true}`)."""
    from core.embed import backbones
    from core.ltrp import mae as ltrp_mae
    from core.ltrp import ranker as ltrp_ranker
    from core.training import checkpoints

    old_backbones = {r[0]: r for r in old.get("backbones") or []}
    old_models = {r[0]: r for r in old.get("ltrp_models") or []}
    lost = json.dumps({"relinked": True})
    out = Survivors()
    for file in sorted(config.artifacts_dir("backbones").glob("*.pt")):
        try:
            model, meta = backbones.load_checkpoint(file)
        except Exception as exc:  # noqa: BLE001 - a file that cannot be read is reported and left alone
            print(f"  {file}: not linked ({' '.join(str(exc).split())[:200]})")
            continue
        bid, dataset = meta.get("backbone_id"), meta.get("dataset")
        if dataset not in datasets or not bid or config.model_file("backbones", bid) != file:
            continue
        spec = bid.rsplit(f"@{dataset}#", 1)[0]
        out.backbones.append([bid, dataset, spec, str(file), int(model.embed_dim),
                              old_backbones[bid][5] if bid in old_backbones else lost])
        out.linked.setdefault(dataset, []).append({"kind": "backbone", "id": bid, "spec": spec,
                                                   "epochs": (meta.get("recipe") or {}).get("epochs")})
    maes, rankers = {}, []
    for file in sorted(config.artifacts_dir("ltrp").glob("*.pt")):
        try:
            payload = checkpoints.read_weights(file)
            fmt, meta, cfg = payload.get("format"), payload.get("meta") or {}, payload.get("config") or {}
        except Exception as exc:  # noqa: BLE001
            print(f"  {file}: not linked ({' '.join(str(exc).split())[:200]})")
            continue
        mid, dataset = meta.get("model_id"), meta.get("dataset")
        if dataset not in datasets or not mid or config.model_file("ltrp", mid) != file:
            continue
        if fmt == ltrp_mae.CHECKPOINT_FORMAT:
            maes[mid] = [mid, dataset, "mae", None, str(file), json.dumps({"source": "trained", **cfg})]
        elif fmt == ltrp_ranker.CHECKPOINT_FORMAT:
            rankers.append([mid, dataset, "ranker", meta.get("mae"), str(file), json.dumps(cfg)])
    for r in rankers:
        parent = old_models.get(r[3])
        if r[3] not in maes and parent and parent[4] and Path(parent[4]).is_file():  # an MAE from a user's file
            maes[r[3]] = list(parent[:6])
        if r[3] not in maes:
            print(f"  {r[4]}: not linked (its MAE {r[3]} is unknown: its checkpoint is gone)")
            continue
        out.models.append(r + [old_models[r[0]][6] if r[0] in old_models else lost])
        out.linked.setdefault(r[1], []).append({"kind": "ranker", "id": r[0]})
    out.models[:0] = [r + [old_models[r[0]][6] if r[0] in old_models else lost] for r in maes.values()]
    return out


def _rebuild_plan(name: str, linked: list[dict], old: dict) -> list[tuple[str, str, str]]:
    """(what, command, note) for each derived result of dataset `name` to compute again, in order, once
    its scan is done: from the damaged file's tables where they read, else one line per kind."""
    q = shlex.quote
    n = q(name)

    def mine(key: str) -> list[tuple] | None:
        rows = old.get(key)
        return None if rows is None else [r for r in rows if r[0] == name]

    plan = []
    backbones = {b["id"]: b for b in linked if b["kind"] == "backbone"}
    for b in backbones.values():
        plan.append(("embeddings", f"redex embed {n} --backbone {q(b['spec'])}"
                     + (f" --epochs {b['epochs']}" if b.get("epochs") else ""),
                     "its checkpoint survives: loaded, not trained again"))
    embedded = mine("embeddings")
    old_backbones = {r[0]: r for r in old.get("backbones") or []}
    maybe = embedded is None  # which backbones embedded this dataset is lost: list those that may have
    bids = [r[1] for r in embedded] if not maybe else [b for b, r in old_backbones.items() if r[1] in (name, None)]
    for bid in bids:
        if bid in backbones:
            continue
        spec, ckpt = (old_backbones[bid][2], old_backbones[bid][3]) if bid in old_backbones else (bid.split("@")[0], None)
        trained = spec.startswith("trained:")
        plan.append(("embeddings", f"redex embed {n} --backbone {q(spec)}"
                     + (f" --checkpoint {q(ckpt)}" if ckpt and not trained else ""),
                     "; ".join(filter(None, ["if it embedded this dataset" if maybe else "",
                                             "its checkpoint is gone: trained again" if trained else ""]))))
    if maybe and old.get("backbones") is None:
        plan.append(("embeddings", f"redex embed {n} --backbone SPEC",
                     "for each other backbone you used, with the --epochs or --checkpoint you used"
                     if backbones else "with the --backbone and --epochs you used before"))
    for what, key, command in (("UMAP map", "projections", "project"), ("merge trees", "trees", "cluster")):
        rows = mine(key)
        if rows is None:
            had = "one" if key == "projections" else "them"
            plan.append((what, f"redex {command} {n}", f"if you had {had}; --backbone-id picks the backbone"))
        for r in rows or []:
            extra = f" --linkage {q(r[2])}" if key == "trees" and r[2] != "complete" else ""
            plan.append((what, f"redex {command} {n} --backbone-id {q(r[1])}{extra}", ""))
    rankers = [m for m in linked if m["kind"] == "ranker"]
    for m in rankers:
        plan.append(("LTRP scores", f"redex ltrp score {n} --ranker-id {q(m['id'])}",
                     "its ranker and MAE survive: loaded, not trained again"))
    scored, models = mine("patch_scores"), old.get("ltrp_models")
    if not rankers and (scored is None or scored or models is None
                        or any(m[1] == name and m[2] == "ranker" for m in models)):
        plan.append(("LTRP", f"redex ltrp train {n}", "if you had one; with the options you used before"))
    sweeps = mine("sweeps")
    if sweeps is None:
        plan.append(("training runs", f"redex sweep {n}", "if you had any; with the options you used before"))
    for _, spec in sweeps or []:
        grid = json.loads(spec or "{}").get("grid")  # a retry ({"retry": run keys}) redoes runs of these
        if grid:
            plan.append(("training runs", _sweep_command(name, grid), "identical runs are trained once"))
    return plan


def _sweep_command(name: str, spec: dict) -> str:
    """The `redex sweep` command that plans the sweep `spec` (a stored `SweepSpec.to_dict()`) again."""
    words = ["redex", "sweep", name]
    if spec.get("fractions"):
        words += ["--fractions", ",".join(f"{f:g}" for f in spec["fractions"])]
    if spec.get("methods"):
        words += ["--methods", ",".join(spec["methods"])]
    if spec.get("seeds"):
        words += ["--seeds", str(spec["seeds"])]
    for key, value in (spec.get("recipe") or {}).items():
        words += [f"--{key.replace('_', '-')}", str(value)]
    if spec.get("budget") and spec["budget"] != "epochs":
        words += ["--budget", spec["budget"]]
    for key, value in (spec.get("selection") or {}).items():
        if value is not None:
            words += [f"--{key.replace('_', '-')}", str(value)]
    if spec.get("force"):
        words.append("--force")
    return " ".join(shlex.quote(w) for w in words)


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
