"""`redex train|sweep|results|retry`: train classifiers on subsets, and compare them."""
from __future__ import annotations

import sys

from core import wording
from core.cli.common import (CliError, add_command, add_detach_flag, add_linkage_flag, add_ray_flag,
                             add_representative_flag, run_or_detach)
from core.data import catalog
from core.scale import check_address


def add_parsers(sub) -> None:
    from core.subsets import plan

    tr = add_command(sub, "train", cmd_train, "train on one subset (semantic, random or full), several seeds")
    tr.add_argument("--fraction", type=float, required=True)
    tr.add_argument("--method", default="semantic", choices=plan.METHODS)
    _recipe_flags(tr)
    sw = add_command(sub, "sweep", cmd_sweep, "fractions x methods x seeds, one training job at a time")
    sw.add_argument("--fractions", default=",".join(f"{f:g}" for f in plan.DEFAULT_FRACTIONS))
    sw.add_argument("--methods", default=",".join(plan.METHODS))
    _recipe_flags(sw)
    rs = add_command(sub, "results", cmd_results, "test accuracy by method and fraction (mean ± std over seeds)")
    rs.add_argument("--runs", action="store_true", help="every run, not the summary")
    rs.add_argument("--csv", action="store_true", help="CSV on standard output")
    rt = add_command(sub, "retry", cmd_retry, "train the failed and cancelled runs again")
    add_ray_flag(rt)
    add_detach_flag(rt)


def _recipe_flags(sp) -> None:
    from core.subsets import plan

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
    add_linkage_flag(sp)
    add_representative_flag(sp)
    sp.add_argument("--force", action="store_true", help="train identical finished runs again")
    add_ray_flag(sp)
    add_detach_flag(sp)


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
    sweep_id, job_id = sweeps.launch_sweep(args.name, spec, ray=check_address(args.ray))
    took = f"about {wording.duration(est['seconds'])} ({est['speed_source']})" if est["seconds"] is not None \
        else est["speed_source"]
    print(f"sweep {sweep_id} (job {job_id}): {wording.plural(est['runs'], 'run')}, {took};"
          " identical finished runs are reused")
    return run_or_detach(args, job_id, after=lambda: _print_results(args.name))


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
            table = table.rename(columns={"method": "subset", "n_train": "training images", "top1": "test top-1 %",
                                          "recipe_tag": "recipe"})
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

    started = sweeps.retry(args.name, ray=check_address(args.ray))
    if started is None:
        print(f"no failed or cancelled runs for {args.name!r}")
        return 0
    print(f"sweep {started[0]} (job {started[1]}) trains the failed and cancelled runs again")
    return run_or_detach(args, started[1], after=lambda: _print_results(args.name))
