"""`redex ltrp train|score|show`: LTRP patch ranking."""
from __future__ import annotations

from core import wording
from core.cli.common import add_command, add_detach_flag, add_ray_flag, check_out_file, start_job
from core.data import catalog


def add_parsers(sub) -> None:
    lt = sub.add_parser("ltrp", help="LTRP patch ranking: train, score every image, draw heatmaps")
    cmds = lt.add_subparsers(title="ltrp commands")
    tr = add_command(cmds, "train", cmd_ltrp_train, "train the MAE (or load --checkpoint) and the patch ranker,"
                     " then score every image (cached; a job)")
    tr.add_argument("--checkpoint", help="pretrained MAE with its decoder (official models_mae layout, e.g."
                    " mae_visualize_vit_base.pth) instead of training one on the dataset")
    tr.add_argument("--mae-epochs", type=int, help="MAE training epochs (default 2)")
    tr.add_argument("--ranker-epochs", type=int, help="ranker training epochs (default 1)")
    tr.add_argument("--mask-ratio", type=float, help="pseudo-score mask ratio (default 0.75 on grids of at most"
                    " 64 patches, else the paper's 0.9)")
    tr.add_argument("--retrain", action="store_true", help="train again even if cached (drops its scores)")
    tr.add_argument("--no-score", action="store_true", help="train only; `redex ltrp score` scores later")
    add_ray_flag(tr)
    add_detach_flag(tr)
    sc = add_command(cmds, "score", cmd_ltrp_score,
                     "score the patches of every image not scored yet (resumable; a job)")
    _ranker_id_flag(sc)
    add_ray_flag(sc)
    add_detach_flag(sc)
    sh = add_command(cmds, "show", cmd_ltrp_show, "write original | heatmap | kept patches | reconstruction as a PNG")
    sh.add_argument("image", help="content id (or a unique prefix), path relative to the dataset root,"
                    " or an image file")
    sh.add_argument("--keep", type=float, default=0.5, help="keep ratio, 0 < r <= 1 (default 0.5)")
    sh.add_argument("--out", default="heatmap.png", help="PNG file to write (default heatmap.png)")
    _ranker_id_flag(sh)


def _ranker_id_flag(p) -> None:
    p.add_argument("--ranker-id", help="default: the dataset's newest ranker")


def _ranker_id(args) -> str:
    from core.ltrp import models

    return args.ranker_id or models.require_ranker(args.name)


def cmd_ltrp_train(args) -> int:
    from pathlib import Path

    from core.ltrp import models

    catalog.load_pixels(args.name)  # fail fast if it was never scanned
    params = {"checkpoint": args.checkpoint, "mae_epochs": args.mae_epochs, "ranker_epochs": args.ranker_epochs,
              "mask_ratio": args.mask_ratio, "retrain": args.retrain or None, "score": False if args.no_score else None}
    params = {k: v for k, v in params.items() if v is not None}
    models.LtrpSettings.from_params(params)  # bad values fail here, before a job starts
    if args.checkpoint:
        models.check_mae_checkpoint(args.name, args.checkpoint)  # an unusable file fails here, with the reason
        params["checkpoint"] = str(Path(args.checkpoint).expanduser().resolve())
    return start_job(args, "ltrp", args.name, params,
                     f"LTRP for {args.name!r}: MAE, ranker{'' if args.no_score else ', score maps'}",
                     after=lambda: _print_ranker(args.name))


def _print_ranker(name: str) -> None:
    from core.ltrp import models

    r = models.list_rankers(name).iloc[0]
    print(f"{wording.plain(r.model_id)}: {wording.plural(int(r.scored), 'image')} scored (--ranker-id {r.model_id})")


def cmd_ltrp_score(args) -> int:
    rid = _ranker_id(args)
    return start_job(args, "ltrp_score", args.name, {"ranker_id": rid},
                     f"scoring the patches of {args.name!r} with the {wording.plain(rid)}")


def cmd_ltrp_show(args) -> int:
    from core.ltrp import models, scoring
    from core.ltrp import view as ltrp_view

    check_out_file(args.out, make_parents=True)
    rid = _ranker_id(args)
    image = ltrp_view.resolve_image(args.name, args.image)
    scores, stored = scoring.image_scores(args.name, rid, image)
    view = ltrp_view.image_view(models.load_mae_model(rid), image, scores, args.keep)  # model size; source shown
    out = ltrp_view.panels_png(view, args.out)
    print(f"{image.path} ({image.label or 'not in the dataset'}, score map {'stored' if stored else 'computed now'}):"
          f" kept {len(view.keep)} of {wording.plural(int(view.scores.size), 'patch')}; wrote {out}")
    return 0
