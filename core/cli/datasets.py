"""`redex datasets add|list|remove`, `redex info`: register, scan, inspect and remove datasets."""
from __future__ import annotations

import sys

from core import wording
from core.cli.common import CliError, add_command, add_detach_flag, start_job
from core.cli.doctor import save_record
from core.data import catalog, sources


def add_parsers(sub) -> None:
    ds = sub.add_parser("datasets", help="register and list datasets").add_subparsers(title="datasets commands")
    add = add_command(ds, "add", cmd_datasets_add, dataset=False,
                      help="register a dataset (image folder, CSV/Parquet manifest, or fashion-mnist) and scan it")
    add.add_argument("source", help="folder, manifest file, or 'fashion-mnist'")
    add.add_argument("--name", help="dataset name (default: from the path)")
    add.add_argument("--limit", type=int, help="fashion-mnist only: first N images of each split")
    add.add_argument("--image-size", type=int, help="working size in pixels (default: native if <= 64, else 64)")
    add_detach_flag(add)
    add_command(ds, "list", cmd_datasets_list, "list registered datasets", dataset=False)
    rm = add_command(ds, "remove", cmd_datasets_remove,
                     "delete a dataset and everything derived from it (never its source files)")
    rm.add_argument("--yes", action="store_true", help="do not ask for confirmation")

    info = add_command(sub, "info", cmd_info, "counts per class and split, and every problem file")
    info.add_argument("--ids", action="store_true", help="list every image's content id")


def cmd_datasets_add(args) -> int:
    if args.image_size is not None and not 0 < args.image_size <= sources.MAX_WORKING_SIZE:
        raise CliError(f"--image-size must be 1 to {sources.MAX_WORKING_SIZE:,} pixels, got {args.image_size}")
    if args.limit is not None and args.limit < 1:
        raise CliError(f"--limit must be at least 1, got {args.limit}")
    name = sources.register(args.source, args.name, image_size=args.image_size, limit=args.limit)
    save_record()
    return start_job(args, "scan", name, None, f"dataset {name!r}: scanning", after=lambda: print_summary(name))


def cmd_datasets_list(args) -> int:
    df = catalog.list_datasets()
    save_record()
    print(df.to_string(index=False) if len(df) else "no datasets yet: `redex datasets add fashion-mnist`")
    return 0


def cmd_datasets_remove(args) -> int:
    ds = catalog.get_dataset(args.name)  # an unknown name fails here, listing the known ones
    what = (f"dataset {args.name!r} ({ds['kind']}: {ds['source']}) and everything derived from it (pixel cache,"
            " embeddings, trees, training runs, models, jobs); its source files are kept")
    if not args.yes:
        if not sys.stdin.isatty():
            raise CliError(f"this removes {what}. Nothing was removed: confirm with --yes (there is no"
                           " terminal to ask on)")
        answer = input(f"remove {what}? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            print("nothing removed")
            return 1
    removed = sources.remove_dataset(args.name)
    save_record()
    rows = ", ".join(f"{table} {n:,}" for table, n in sorted(removed["tables"].items()))
    print(f"removed dataset {args.name!r}; rows deleted: {rows or 'none'}")
    for file in removed["files"]:
        print(f"  deleted {file}")
    print(f"its source {ds['source']} was not touched")
    return 0


def cmd_info(args) -> int:
    catalog.get_dataset(args.name)
    print_summary(args.name)
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


def print_summary(name: str) -> None:
    ds = catalog.get_dataset(name)
    counts = catalog.class_counts(name)
    origin = str(ds["source"]) if ds["kind"] == str(ds["source"]) else f"{ds['kind']}: {ds['source']}"
    print(f"dataset {name} ({origin}), working size"
          f" {wording.image_format(ds['image_size'], ds['channels'])}")
    print(counts.to_string(index=False) if len(counts) else "no images")
    skipped = (catalog.problems_table(name).severity == "skipped").sum()
    if skipped:
        print(f"{wording.plural(int(skipped), 'file')} skipped: `redex info {name}` lists them with their reasons")
