"""`redex`: the command line. Calls the same core functions as the pages.

Long work runs as a background job (the same as from the app); the CLI follows it with a
progress bar. Ctrl-C stops following, not the job: it keeps running (`redex jobs`,
`redex cancel ID`). `--detach` returns at once.
"""
from __future__ import annotations

import argparse
import sys
import time

from core import jobs
from core.data import catalog, sources
from core.store.db import get_store


class CliError(Exception):
    pass


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args) or 0
    except (CliError, catalog.DatasetError, ValueError, FileNotFoundError) as exc:
        print(f"redex: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nredex: interrupted", file=sys.stderr)
        return 130


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="redex", description="redex, the redundancy explorer")
    sub = p.add_subparsers(title="commands")

    ds = sub.add_parser("datasets", help="register and list datasets").add_subparsers(title="datasets commands")
    add = ds.add_parser("add", help="register a dataset (image folder, CSV/Parquet manifest, or fashion-mnist)"
                        " and scan it")
    add.add_argument("source", help="folder, manifest file, or 'fashion-mnist'")
    add.add_argument("--name", help="dataset name (default: from the path)")
    add.add_argument("--limit", type=int, help="fashion-mnist only: first N images of each split")
    add.add_argument("--image-size", type=int, help="working size in pixels (default: native if <= 64, else 64)")
    _follow_flags(add)
    add.set_defaults(func=cmd_datasets_add)
    ls = ds.add_parser("list", help="list registered datasets")
    ls.set_defaults(func=cmd_datasets_list)

    info = sub.add_parser("info", help="counts per class and split, and every problem file")
    info.add_argument("name")
    info.add_argument("--ids", action="store_true", help="list every image's content id")
    info.set_defaults(func=cmd_info)

    emb = sub.add_parser("embed", help="embed every image (training the backbone first if needed)")
    emb.add_argument("name")
    emb.add_argument("--backbone", help="spec: trained:resnet8s2 (default; also resnet8, resnet14, resnet20, resnet14s2) or timm:NAME")
    emb.add_argument("--epochs", type=int, help="trained backbones: epochs (default: the recipe's)")
    emb.add_argument("--checkpoint", help="timm backbones: local weights file")
    emb.add_argument("--retrain", action="store_true", help="train the backbone again even if cached")
    _follow_flags(emb)
    emb.set_defaults(func=cmd_embed)

    proj = sub.add_parser("project", help="UMAP map of a dataset's embeddings")
    proj.add_argument("name")
    proj.add_argument("--backbone-id", help="default: the newest backbone with embeddings")
    _follow_flags(proj)
    proj.set_defaults(func=cmd_project)

    cl = sub.add_parser("cluster", help="class-wise agglomerative merge trees (cached; a job)")
    cl.add_argument("name")
    cl.add_argument("--linkage", default="complete", choices=("complete", "average", "single"))
    cl.add_argument("--backbone-id", help="default: the newest backbone with embeddings")
    _follow_flags(cl)
    cl.set_defaults(func=cmd_cluster)

    for cmd, help_ in (("subset", "write the subset table (path,label,split,group,kept) as CSV or Parquet"),
                       ("export", "write the kept images as an image folder (symlinks, or --copy)")):
        sp = sub.add_parser(cmd, help=help_)
        sp.add_argument("name")
        how = sp.add_mutually_exclusive_group(required=True)
        how.add_argument("--fraction", type=float, help="keep max(1, round(f * n_c)) groups per class")
        how.add_argument("--threshold", type=float, help="cut every tree at this cosine distance")
        sp.add_argument("--linkage", default="complete", choices=("complete", "average", "single"))
        sp.add_argument("--representative", default="nearest_mean",
                        choices=("nearest_mean", "random", "farthest_mean"))
        sp.add_argument("--seed", type=int, default=0)
        sp.add_argument("--backbone-id")
        if cmd == "subset":
            sp.add_argument("--out", required=True, help="file.csv or file.parquet")
            sp.add_argument("--which", default="all", choices=("all", "kept", "removed"))
            sp.set_defaults(func=cmd_subset)
        else:
            sp.add_argument("--imagefolder", required=True, help="output folder (must be new or empty)")
            sp.add_argument("--copy", action="store_true", help="copy files instead of symlinking")
            sp.set_defaults(func=cmd_export)

    _training_parsers(sub)
    _ltrp_parsers(sub)

    jl = sub.add_parser("jobs", help="list jobs")
    jl.add_argument("--all", action="store_true", help="all jobs, not only the last 20")
    jl.set_defaults(func=cmd_jobs)
    jc = sub.add_parser("cancel", help="cancel a job")
    jc.add_argument("job_id", type=int)
    jc.set_defaults(func=cmd_cancel)
    jw = sub.add_parser("follow", help="follow a job until it ends")
    jw.add_argument("job_id", type=int)
    jw.set_defaults(func=lambda a: follow(a.job_id))
    return p


def _follow_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--detach", action="store_true", help="start the job and return at once")


# -- commands ----------------------------------------------------------------------------------
def cmd_datasets_add(args) -> int:
    name = sources.register(args.source, args.name, image_size=args.image_size, limit=args.limit)
    job_id = jobs.launch("scan", name)
    print(f"dataset {name!r}: scanning (job {job_id})")
    return _run_or_detach(args, job_id, after=lambda: _print_summary(name))


def cmd_datasets_list(args) -> int:
    df = catalog.list_datasets()
    print(df.to_string(index=False) if len(df) else "no datasets yet: `redex datasets add fashion-mnist`")
    return 0


def cmd_info(args) -> int:
    catalog.get_dataset(args.name)
    _print_summary(args.name)
    problems = catalog.problems_table(args.name)
    if len(problems):
        print(f"\nproblems ({len(problems)}):")
        for r in problems.itertuples():
            print(f"  [{r.severity}] {r.path}: {r.reason}")
    else:
        print("\nno problem files")
    if args.ids:
        print("\nimage ids:")
        for r in catalog.images_table(args.name).itertuples():
            print(f"  {r.image_id}  {r.split:5}  {r.label}  {r.path}")
    return 0


def _print_summary(name: str) -> None:
    ds = catalog.get_dataset(name)
    counts = catalog.class_counts(name)
    print(f"dataset {name} ({ds['kind']}: {ds['source']}), working size {ds['image_size']}px x {ds['channels']}ch")
    print(counts.to_string(index=False) if len(counts) else "no images")
    skipped = (catalog.problems_table(name).severity == "skipped").sum()
    if skipped:
        print(f"{skipped} file(s) skipped: `redex info {name}` lists them with their reasons")


def cmd_embed(args) -> int:
    catalog.load_pixels(args.name)  # fail fast if it was never scanned
    params = {k: v for k, v in {"backbone": args.backbone, "epochs": args.epochs,
                                "checkpoint": args.checkpoint, "retrain": args.retrain}.items() if v}
    job_id = jobs.launch("embed", args.name, params)
    print(f"embedding {args.name!r} (job {job_id})")
    return _run_or_detach(args, job_id)


def cmd_project(args) -> int:
    from core.embed.embeddings import list_backbones

    bid = args.backbone_id
    if not bid:
        backs = list_backbones(args.name)
        backs = backs[backs.embedded > 0]
        if backs.empty:
            raise CliError(f"no embeddings for {args.name!r} yet: run `redex embed {args.name}` first")
        bid = backs.backbone_id.iloc[0]
    job_id = jobs.launch("project", args.name, {"backbone_id": bid})
    print(f"UMAP of {args.name!r} with {bid} (job {job_id})")
    return _run_or_detach(args, job_id)


def cmd_cluster(args) -> int:
    from core.redundancy import clusterings

    bid = args.backbone_id or clusterings.default_backbone(args.name)
    job_id = jobs.launch("cluster", args.name, {"backbone_id": bid, "linkage": args.linkage})
    print(f"{args.linkage}-linkage trees of {args.name!r} with {bid} (job {job_id})")
    return _run_or_detach(args, job_id)


def _subset(args):
    from core.redundancy import clusterings

    clustering = clusterings.load_clustering(args.name, args.backbone_id, args.linkage)
    s = clusterings.subset(clustering, fraction=args.fraction, threshold=args.threshold,
                      representative=args.representative, seed=args.seed)
    print(clusterings.per_class_table(s).to_string(index=False))
    print(f"kept {len(s.representatives):,} of {len(s.group):,} {clusterings.SUBSET_SPLIT} images "
          f"({s.kept_fraction:.1%})")
    return clusterings.subset_frame(clustering, s)


def cmd_subset(args) -> int:
    from core.redundancy import export

    out = export.export_table(_subset(args), args.out, which=args.which)
    print(f"wrote {out}")
    return 0


def cmd_export(args) -> int:
    from core.redundancy import export

    n = export.export_imagefolder(args.name, _subset(args), args.imagefolder, copy=args.copy)
    print(f"wrote {n:,} {'files' if args.copy else 'symlinks'} under {args.imagefolder}")
    return 0


def cmd_jobs(args) -> int:
    rows = jobs.list_jobs(limit=10_000 if args.all else 20)
    if not rows:
        print("no jobs yet")
    for j in rows:
        prog = f"{j['done']}/{j['total']}" if j["total"] else ""
        extra = j["error"] if j["status"] == "failed" else (j["message"] or "")
        print(f"{j['id']:>5}  {j['kind']:<8} {j['dataset'] or '':<20} {j['status']:<10} {prog:>13}  {extra}")
    return 0


def cmd_cancel(args) -> int:
    if jobs.cancel(args.job_id):
        print(f"job {args.job_id} cancelled")
        return 0
    job = jobs.get_job(args.job_id)
    raise CliError(f"job {args.job_id} " + ("does not exist" if job is None else f"is already {job['status']}"))


# -- subset training: train, sweep, results ---------------------------------------------------
def _training_parsers(sub) -> None:
    from core.subsets import plan

    def recipe_flags(sp) -> None:
        sp.add_argument("--seeds", type=int, default=plan.DEFAULT_SEEDS, help="runs per setting (seeds 0..N-1)")
        sp.add_argument("--epochs", type=int, help="default: the recipe's (10 for 28-32 px images)")
        sp.add_argument("--arch", help="classifier architecture (default resnet8s2)")
        sp.add_argument("--batch-size", type=int)
        sp.add_argument("--lr", type=float, help="peak learning rate")
        sp.add_argument("--optimizer", choices=("sgd", "adamw"))
        sp.add_argument("--augmentation", choices=("none", "flip_crop"))
        sp.add_argument("--budget", choices=plan.BUDGET_RULES, default="epochs",
                        help="epochs: same epochs as the full run; steps: same optimisation steps")
        sp.add_argument("--backbone-id", help="semantic subset: default the newest backbone with embeddings")
        sp.add_argument("--linkage", default="complete", choices=("complete", "average", "single"))
        sp.add_argument("--representative", default="nearest_mean",
                        choices=("nearest_mean", "random", "farthest_mean"))
        sp.add_argument("--force", action="store_true", help="train identical finished runs again")
        _follow_flags(sp)

    tr = sub.add_parser("train", help="train on one subset (semantic, random or full), several seeds")
    tr.add_argument("name")
    tr.add_argument("--fraction", type=float, required=True)
    tr.add_argument("--method", default="semantic", choices=plan.METHODS)
    recipe_flags(tr)
    tr.set_defaults(func=cmd_train)
    sw = sub.add_parser("sweep", help="fractions x methods x seeds, one training job at a time")
    sw.add_argument("name")
    sw.add_argument("--fractions", default=",".join(f"{f:g}" for f in plan.DEFAULT_FRACTIONS))
    sw.add_argument("--methods", default=",".join(plan.METHODS))
    recipe_flags(sw)
    sw.set_defaults(func=cmd_sweep)
    rs = sub.add_parser("results", help="test accuracy by method and fraction (mean ± std over seeds)")
    rs.add_argument("name")
    rs.add_argument("--runs", action="store_true", help="every run, not the summary")
    rs.add_argument("--csv", action="store_true", help="CSV on standard output")
    rs.set_defaults(func=cmd_results)
    rt = sub.add_parser("retry", help="train the failed and cancelled runs again")
    rt.add_argument("name")
    _follow_flags(rt)
    rt.set_defaults(func=cmd_retry)


def _sweep_spec(args, fractions, methods):
    from core.subsets import plan

    recipe = {k: v for k, v in {"epochs": args.epochs, "arch": args.arch, "batch_size": args.batch_size,
                                "lr": args.lr, "optimizer": args.optimizer,
                                "augmentation": args.augmentation}.items() if v is not None}
    selection = {"linkage": args.linkage, "representative": args.representative}
    if args.backbone_id:
        selection["backbone_id"] = args.backbone_id
    return plan.SweepSpec(fractions=tuple(fractions), methods=tuple(methods), seeds=args.seeds, recipe=recipe,
                             budget=args.budget, selection=selection, force=args.force)


def _launch_sweep(args, spec) -> int:
    from core.subsets import plan, sweeps

    est = plan.estimate(args.name, spec)
    sweep_id, job_id = sweeps.launch_sweep(args.name, spec)
    print(f"sweep {sweep_id} (job {job_id}): {est['runs']} runs, about {jobs.format_seconds(est['seconds'])}"
          f" ({est['speed_source']}); identical finished runs are reused")
    return _run_or_detach(args, job_id, after=lambda: _print_results(args.name))


def cmd_train(args) -> int:
    return _launch_sweep(args, _sweep_spec(args, [args.fraction], [args.method]))


def cmd_sweep(args) -> int:
    try:
        fractions = [float(f) for f in args.fractions.split(",") if f.strip()]
    except ValueError:
        raise CliError(f"--fractions must be numbers separated by commas, got {args.fractions!r}") from None
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    return _launch_sweep(args, _sweep_spec(args, fractions, methods))


def _print_results(name: str, csv: bool = False, every_run: bool = False) -> None:
    from core.subsets import results

    df = results.runs(name)
    if every_run:
        table = df[["method", "fraction", "seed", "n_train", "status", "test_top1", "test_loss", "seconds",
                    "device", "recipe_tag", "backbone_id", "error", "run_key"]]
    else:
        table = results.summary(df)
        if not csv:
            table = results.with_top1_text(table)[["method", "fraction", "n_train", "seeds", "top1", "recipe_tag"]]
    if csv:
        sys.stdout.write(table.to_csv(index=False))
    elif table.empty:
        print(f"no finished training runs for {name!r} yet: `redex sweep {name}`")
    else:
        print(table.to_string(index=False))


def cmd_results(args) -> int:
    catalog.get_dataset(args.name)
    _print_results(args.name, csv=args.csv, every_run=args.runs)
    return 0


def cmd_retry(args) -> int:
    from core.subsets import sweeps

    started = sweeps.retry(args.name)
    if started is None:
        print(f"no failed or cancelled runs for {args.name!r}")
        return 0
    print(f"sweep {started[0]} (job {started[1]}) trains the failed and cancelled runs again")
    return _run_or_detach(args, started[1], after=lambda: _print_results(args.name))


# -- LTRP patch ranking: ltrp train, ltrp score, ltrp show --------------------------------------
def _ltrp_parsers(sub) -> None:
    lt = sub.add_parser("ltrp", help="LTRP patch ranking: train, score every image, draw heatmaps")
    cmds = lt.add_subparsers(title="ltrp commands")
    tr = cmds.add_parser("train", help="train the MAE (or load --checkpoint) and the patch ranker, then score"
                         " every image (cached; a job)")
    tr.add_argument("name")
    tr.add_argument("--checkpoint", help="pretrained MAE with its decoder (official models_mae layout, e.g."
                    " mae_visualize_vit_base.pth) instead of training one on the dataset")
    tr.add_argument("--mae-epochs", type=int, help="MAE training epochs (default 2)")
    tr.add_argument("--ranker-epochs", type=int, help="ranker training epochs (default 1)")
    tr.add_argument("--mask-ratio", type=float, help="pseudo-score mask ratio (default 0.75 on grids of at most"
                    " 64 patches, else the paper's 0.9)")
    tr.add_argument("--retrain", action="store_true", help="train again even if cached (drops its scores)")
    tr.add_argument("--no-score", action="store_true", help="train only; `redex ltrp score` scores later")
    _follow_flags(tr)
    tr.set_defaults(func=cmd_ltrp_train)
    sc = cmds.add_parser("score", help="score the patches of every image not scored yet (resumable; a job)")
    sc.add_argument("name")
    sc.add_argument("--ranker-id", help="default: the dataset's newest ranker")
    _follow_flags(sc)
    sc.set_defaults(func=cmd_ltrp_score)
    sh = cmds.add_parser("show", help="write original | heatmap | kept patches | reconstruction as a PNG")
    sh.add_argument("name")
    sh.add_argument("image", help="content id (or a unique prefix), path relative to the dataset root,"
                    " or an image file")
    sh.add_argument("--keep", type=float, default=0.5, help="keep ratio, 0 < r <= 1 (default 0.5)")
    sh.add_argument("--out", default="heatmap.png", help="PNG file to write (default heatmap.png)")
    sh.add_argument("--ranker-id", help="default: the dataset's newest ranker")
    sh.set_defaults(func=cmd_ltrp_show)


def cmd_ltrp_train(args) -> int:
    from pathlib import Path

    from core.ltrp import models

    catalog.load_pixels(args.name)  # fail fast if it was never scanned
    params = {"checkpoint": args.checkpoint, "mae_epochs": args.mae_epochs, "ranker_epochs": args.ranker_epochs,
              "mask_ratio": args.mask_ratio, "retrain": args.retrain or None, "score": False if args.no_score else None}
    params = {k: v for k, v in params.items() if v is not None}
    models.LtrpSettings.from_params(params)  # bad values fail here, before a job starts
    if args.checkpoint:
        models.load_mae_checkpoint(args.checkpoint)  # an unusable file fails here, with the reason
        params["checkpoint"] = str(Path(args.checkpoint).expanduser().resolve())
    job_id = jobs.launch("ltrp", args.name, params)
    print(f"LTRP for {args.name!r}: MAE, ranker{'' if args.no_score else ', score maps'} (job {job_id})")
    return _run_or_detach(args, job_id, after=lambda: _print_ranker(args.name))


def _print_ranker(name: str) -> None:
    from core.ltrp import models

    r = models.list_rankers(name).iloc[0]
    print(f"ranker {r.model_id}: {r.scored:,} images scored")


def cmd_ltrp_score(args) -> int:
    from core.ltrp import models

    rid = args.ranker_id or models.require_ranker(args.name)
    job_id = jobs.launch("ltrp_score", args.name, {"ranker_id": rid})
    print(f"scoring {args.name!r} with {rid} (job {job_id})")
    return _run_or_detach(args, job_id)


def cmd_ltrp_show(args) -> int:
    from core.ltrp import models, scoring
    from core.ltrp import view as ltrp_view

    rid = args.ranker_id or models.require_ranker(args.name)
    image = ltrp_view.resolve_image(args.name, args.image)
    scores, stored = scoring.image_scores(args.name, rid, image)
    view = ltrp_view.patch_view(models.load_mae_model(rid), image.pixels, scores, args.keep)
    out = ltrp_view.panels_png(view, args.out)
    print(f"{image.path} ({image.label or 'not in the dataset'}, score map {'stored' if stored else 'computed now'}):"
          f" kept {len(view.keep)} of {view.scores.size} patches; wrote {out}")
    return 0


# -- following a job ---------------------------------------------------------------------------
def _run_or_detach(args, job_id: int, after=None) -> int:
    if args.detach:
        print(f"running in the background: `redex follow {job_id}`, `redex cancel {job_id}`")
        return 0
    code = follow(job_id)
    if code == 0 and after:
        after()
    return code


def follow(job_id: int, poll: float = 0.5) -> int:
    """Show a job's progress until it ends; exit code 0 if done, 1 if failed/cancelled."""
    from tqdm import tqdm

    store = get_store()
    bar, phase = None, None
    try:
        while True:
            job = jobs.get_job(job_id, store)
            if job is None:
                raise CliError(f"no job {job_id}")
            if job["phase"] != phase or bar is None:
                if bar is not None:
                    bar.close()
                phase = job["phase"]
                bar = tqdm(total=job["total"] or None, desc=phase or job["status"], unit="it",
                           dynamic_ncols=True, file=sys.stderr)
            if job["total"] and bar.total != job["total"]:
                bar.total = job["total"]
            bar.n = job["done"] or 0
            if job["message"]:
                bar.set_postfix_str(job["message"][:60], refresh=False)
            bar.refresh()
            if job["status"] in jobs.FINAL:
                bar.close()
                break
            time.sleep(poll)
    except KeyboardInterrupt:
        if bar is not None:
            bar.close()
        print(f"\nstopped following; job {job_id} keeps running (`redex cancel {job_id}` stops it)",
              file=sys.stderr)
        return 130
    if job["status"] == "done":
        return 0
    detail = job["error"] or job["message"] or ""
    print(f"redex: job {job_id} {job['status']}: {detail}", file=sys.stderr)
    tail = jobs.log_tail(job, 15)
    if job["status"] == "failed" and tail:
        print(tail, file=sys.stderr)
    return 1

