"""`redex embed`, `redex project`: embeddings of every image, and their UMAP map."""
from __future__ import annotations

from core import wording
from core.cli.common import NEWEST_BACKBONE, CliError, add_command, add_detach_flag, add_ray_flag, start_job


def add_parsers(sub) -> None:
    emb = add_command(sub, "embed", cmd_embed, "embed every image (training the backbone first if needed)")
    emb.add_argument("--backbone", help="spec: trained:resnet8s2 (default; also resnet8, resnet14, resnet20,"
                     " resnet14s2) or timm:NAME (pretrained: its default weights from the Hugging Face cache, or"
                     " downloaded into it unless HF_HUB_OFFLINE=1; reads each image's source file at the"
                     " model's pretrained size)")
    emb.add_argument("--epochs", type=int, help="trained backbones: epochs (default: the recipe's)")
    emb.add_argument("--checkpoint", help="timm backbones: local weights file (.safetensors or .pth state dict)"
                     " instead of the Hugging Face cache")
    emb.add_argument("--retrain", action="store_true", help="train the backbone again even if cached")
    add_ray_flag(emb)
    add_detach_flag(emb)

    proj = add_command(sub, "project", cmd_project, "UMAP map of a dataset's embeddings")
    proj.add_argument("--backbone-id", help=NEWEST_BACKBONE)
    add_detach_flag(proj)


def cmd_embed(args) -> int:
    from core.embed.embeddings import check_embed_params

    params = {k: v for k, v in {"backbone": args.backbone, "epochs": args.epochs,
                                "checkpoint": args.checkpoint, "retrain": args.retrain}.items() if v}
    # unscanned, a bad spec or checkpoint, timm weights neither cached nor downloadable: refused before the job
    params = check_embed_params(args.name, params)
    return start_job(args, "embed", args.name, params, f"embedding {args.name!r}")


def cmd_project(args) -> int:
    from core.embed.embeddings import list_backbones

    bid = args.backbone_id
    if not bid:
        backs = list_backbones(args.name)
        backs = backs[backs.embedded > 0]
        if backs.empty:
            raise CliError(f"no embeddings for {args.name!r} yet: run `redex embed {args.name}` first")
        bid = backs.backbone_id.iloc[0]
    return start_job(args, "project", args.name, {"backbone_id": bid},
                     f"UMAP map of {args.name!r}, embeddings of {wording.plain(bid)}")
