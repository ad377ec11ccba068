"""`redex cluster`, `redex subset`, `redex export`: merge trees, and the subsets cut from them."""
from __future__ import annotations

from core.cli.common import (NEWEST_BACKBONE, add_command, add_detach_flag, add_linkage_flag, add_ray_flag,
                             add_representative_flag, check_out_file, check_out_folder, start_job)


def add_parsers(sub) -> None:
    cl = add_command(sub, "cluster", cmd_cluster, "class-wise agglomerative merge trees (cached; a job)")
    add_linkage_flag(cl)
    cl.add_argument("--backbone-id", help=NEWEST_BACKBONE)
    copies = cl.add_mutually_exclusive_group()
    copies.add_argument("--near-copies", dest="near_copies", action="store_true", default=None,
                        help="join near copies found by pixels first (ours; the default, kept per dataset)")
    copies.add_argument("--no-near-copies", dest="near_copies", action="store_false",
                        help="the paper's method exactly: trees of the embeddings alone")
    add_ray_flag(cl)
    add_detach_flag(cl)

    sp = _subset_command(sub, "subset", cmd_subset,
                         "write the subset table (path,label,split,group,kept) as CSV or Parquet")
    sp.add_argument("--out", required=True, help="file.csv or file.parquet")
    sp.add_argument("--which", default="all", choices=("all", "kept", "removed"))
    ex = _subset_command(sub, "export", cmd_export, "write the kept images as an image folder (symlinks, or --copy)")
    ex.add_argument("--imagefolder", required=True, help="output folder (must be new or empty)")
    ex.add_argument("--copy", action="store_true", help="copy files instead of symlinking")
    ex.add_argument("--skip-missing", action="store_true",
                    help="leave out source files that no longer exist (default: refuse, listing them)")


def _subset_command(sub, command: str, func, help: str):
    """A command that cuts the merge trees: by --fraction or --threshold, then how to pick each group's image."""
    sp = add_command(sub, command, func, help)
    how = sp.add_mutually_exclusive_group(required=True)
    how.add_argument("--fraction", type=float, help="keep max(1, round(f * n_c)) groups per class")
    how.add_argument("--threshold", type=float, help="cut every tree at this cosine distance")
    add_linkage_flag(sp)
    add_representative_flag(sp)
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--backbone-id")
    return sp


def cmd_cluster(args) -> int:
    from core.redundancy import clusterings

    bid = args.backbone_id or clusterings.default_backbone(args.name)
    params = {"backbone_id": bid, "linkage": args.linkage}
    if args.near_copies is not None:
        params["near_copies"] = args.near_copies
    return start_job(args, "cluster", args.name, params,
                     f"{args.linkage}-linkage trees of {args.name!r} with {bid}")


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

    check_out_file(args.out, (".csv", ".parquet", ".pq"))
    out = export.export_table(_subset(args), args.out, which=args.which)
    print(f"wrote {out}")
    return 0


def cmd_export(args) -> int:
    from core.redundancy import export

    check_out_folder(args.imagefolder, "--imagefolder")
    frame = _subset(args)
    n = export.export_imagefolder(args.name, frame, args.imagefolder, copy=args.copy,
                                  skip_missing=args.skip_missing)
    print(f"wrote {n:,} {'files' if args.copy else 'symlinks'} under {args.imagefolder}")
    skipped = int(frame.kept.sum()) - n
    if skipped:
        print(f"skipped {skipped:,} kept image(s) whose source file no longer exists"
              f" (`redex datasets add` on the source rescans it)")
    return 0
