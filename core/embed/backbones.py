"""Embedding backbones, named by a spec string `kind:name`.

- `trained:<arch>` (the default, the paper's way): a CIFAR-style ResNet trained on the dataset
  itself; its embedding is the global-average-pool output (64-d for widths 16/32/64). Its recipe
  (`core.training.recipe.backbone_recipe`) adds a contrastive term on two jittered views of each
  image to the cross-entropy (`train_contrastive`), so near copies (moved by a pixel or two,
  slightly cropped or rescaled, re-encoded) embed next to their original.
- `timm:<model>`: a pretrained timm model (`core.embed.timm_models`): its default pretrained weights
  from the Hugging Face cache, or downloaded into it unless `HF_HUB_OFFLINE=1`, or a checkpoint file;
  never silently random.

Every model takes raw pixels `[N, C, H, W]` (uint8 or float, 0..255) and answers
`forward_features(x) -> [N, D]`, `forward(x)` and `embed_dim`; `embed_batches` streams
features of a uint8 array batch by batch. The spec's full name (`str(spec)`) goes into cache keys.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from core.device import autocast, pick_device
from core.embed.resnet import ARCHS, CifarResNet
from core.embed.timm_models import check_timm_name
from core.training.checkpoints import load_model, save_model
from core.training.classifier import (
    Normalized,
    train_classifier,
)
from core.training.loop import Progress, ShouldStop, Step
from core.training.pixels import (
    as_nhwc,
    pixels_tensor,
    pixels_view,
    to_batch,
)
from core.training.recipe import DEFAULT_ARCH, Recipe, backbone_recipe

DEFAULT_BACKBONE = f"trained:{DEFAULT_ARCH}"
KINDS = ("trained", "timm")
CHECKPOINT_FORMAT = "redex-backbone/1"


@dataclass(frozen=True)
class BackboneSpec:
    kind: str  # 'trained' | 'timm'
    name: str  # registered arch (trained) or timm model name, optionally with a '.tag'

    def __str__(self) -> str:
        return f"{self.kind}:{self.name}"


@dataclass(frozen=True)
class BuildArgs:
    """What `build_model` needs to rebuild a trained backbone (saved in checkpoints)."""

    spec: str
    num_classes: int
    in_chans: int
    image_size: int


def list_archs() -> list[str]:
    return sorted(ARCHS)


def parse_spec(spec: str | BackboneSpec) -> BackboneSpec:
    """`'trained:resnet8'` / `'timm:resnet18'` -> `BackboneSpec`; ValueError naming valid choices."""
    if isinstance(spec, BackboneSpec):
        return spec
    kind, sep, name = str(spec).strip().partition(":")
    if not sep or not name:
        raise ValueError(f"backbone spec {spec!r} must look like 'kind:name', e.g. {DEFAULT_BACKBONE!r} "
                         f"or 'timm:resnet18'; kinds: {', '.join(KINDS)}")
    if kind == "trained":
        if name not in ARCHS:
            raise ValueError(f"unknown trained backbone {name!r}; valid: {', '.join(list_archs())}")
    elif kind == "timm":
        check_timm_name(name)
    else:
        raise ValueError(f"unknown backbone kind {kind!r} in {spec!r}; valid kinds: {', '.join(KINDS)}")
    return BackboneSpec(kind, name)


def build_model(spec: str | BackboneSpec, num_classes: int, in_chans: int, image_size: int) -> Normalized:
    """A fresh (untrained) `trained:` backbone wrapped in its normalisation, channels-last."""
    spec = parse_spec(spec)
    if spec.kind != "trained":
        raise ValueError(f"{spec} is a pretrained backbone: load it with load_timm({spec.name!r})")
    if in_chans not in (1, 3) or num_classes < 1 or image_size < 8:
        raise ValueError(f"need in_chans 1 or 3, num_classes >= 1, image_size >= 8; "
                         f"got {in_chans}, {num_classes}, {image_size}")
    model = Normalized(CifarResNet(ARCHS[spec.name], num_classes, in_chans), in_chans)
    model.build_args = BuildArgs(str(spec), num_classes, in_chans, image_size)
    return model.to(memory_format=torch.channels_last)


def train_backbone(
    spec: str | BackboneSpec,
    images: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    *,
    recipe: Recipe | None = None,
    eval_images: np.ndarray | None = None,
    eval_labels: np.ndarray | None = None,
    progress: Progress | None = None,
    should_stop: ShouldStop | None = None,
    device: torch.device | str | None = None,
) -> tuple[Normalized, dict[str, Any]]:
    """Build `spec` (seeded by the recipe) and train it on uint8 `images [N, H, W, C]`.

    Default recipe: `backbone_recipe`. With `recipe.contrastive > 0` the training is
    `train_contrastive`, else plain `train_classifier`; the metrics have the same keys.
    """
    spec = parse_spec(spec)
    images = as_nhwc(images)
    recipe = recipe or backbone_recipe(images.shape[1], arch=spec.name)
    if recipe.arch != spec.name:
        raise ValueError(f"recipe.arch={recipe.arch!r} does not match the backbone {spec}")
    torch.manual_seed(recipe.seed)
    model = build_model(spec, num_classes, images.shape[-1], images.shape[1])
    train = train_contrastive if recipe.contrastive > 0 else train_classifier
    metrics = train(model, images, labels, recipe, eval_images=eval_images, eval_labels=eval_labels,
                    device=device, progress=progress, should_stop=should_stop)
    return model, metrics


def train_contrastive(
    model: Normalized,
    images: np.ndarray,
    labels: np.ndarray,
    recipe: Recipe,
    *,
    eval_images: np.ndarray | None = None,
    eval_labels: np.ndarray | None = None,
    device: torch.device | str | None = None,
    progress: Progress | None = None,
    should_stop: ShouldStop | None = None,
) -> dict[str, Any]:
    """`train_classifier` on each image and a near copy of it (`jittered_views`): cross-entropy on
    both plus `recipe.contrastive` x NT-Xent between the two embeddings (`nt_xent`: each must find
    its twin among the batch's other images and copies). Same arguments and metrics, plus
    `train_contrastive` (the NT-Xent of the last epoch); train_acc is on the images themselves."""
    if len(images) < 2:
        raise ValueError(f"{len(images)} images: contrastive training needs 2 or more")
    return train_classifier(model, images, labels, recipe, eval_images=eval_images, eval_labels=eval_labels,
                            device=device, progress=progress, should_stop=should_stop, step=_contrastive_step,
                            sums=("loss", "contrastive", "acc"))


def _contrastive_step(model: Normalized, images: np.ndarray, labels: np.ndarray, recipe: Recipe,
                      device: torch.device) -> Step:
    """The loop's step: sums are (cross-entropy sum over both views / 2, NT-Xent sum, correct, batch size)."""
    pixels = pixels_tensor(images, device)
    targets = torch.from_numpy(np.array(labels)).to(device)

    def step(idx: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        x = to_batch(pixels[idx.to(pixels.device)], device)
        y = targets[idx.to(device)]
        views = torch.cat([x, jittered_views(x, recipe.view_shift, recipe.view_scale, recipe.view_color, gen)])
        feats = model.forward_features(views)
        logits = model.net.forward_head(feats)
        ce = F.cross_entropy(logits, torch.cat([y, y]), label_smoothing=recipe.label_smoothing)
        nce = nt_xent(*feats.float().chunk(2), recipe.temperature)
        loss = ce + recipe.contrastive * nce
        correct = (logits[:len(y)].argmax(1) == y).sum()
        count = torch.tensor(float(len(y)), device=device)
        return loss, torch.stack([ce.detach().float() * len(y), nce.detach() * len(y), correct.float(), count])

    return step


def jittered_views(x: torch.Tensor, shift: float, scale: float, color: float, gen: torch.Generator) -> torch.Tensor:
    """A random near copy of each image of float `x [B, C, H, W]` (0..255): half of them moved by a
    whole number of pixels (up to `shift`, each axis), the others rescaled by a factor in 1 +- `scale`
    and moved by up to `shift` px (bilinear), zero fill; then brightness times 1 +- `color`, and on half
    of them Gaussian noise of sigma up to 32 `color` (grey levels)."""
    b, _, h, w = x.shape
    factor = 1.0 + (2 * torch.rand(b, generator=gen) - 1) * scale
    move = (2 * torch.rand(b, 2, generator=gen) - 1) * shift
    whole = torch.rand(b, generator=gen) < 0.5
    factor = torch.where(whole, torch.ones_like(factor), factor)
    move = torch.where(whole[:, None], move.round(), move)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0 / factor
    theta[:, 0, 2] = -2.0 * move[:, 0] / w
    theta[:, 1, 2] = -2.0 * move[:, 1] / h
    grid = F.affine_grid(theta.to(x.device, x.dtype), list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    gain = 1.0 + (2 * torch.rand(b, 1, 1, 1, generator=gen) - 1) * color
    sigma = torch.rand(b, 1, 1, 1, generator=gen) * 32 * color * (torch.rand(b, 1, 1, 1, generator=gen) < 0.5)
    noise = torch.randn(x.shape, generator=gen) * sigma
    return (x * gain.to(x) + noise.to(x)).clamp(0, 255)


def nt_xent(a: torch.Tensor, b: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent (SimCLR) of paired embeddings `a, b [B, D]`: each of the 2B rows must pick its twin
    among the other 2B - 1 by cosine similarity / temperature; mean cross-entropy."""
    z = F.normalize(torch.cat([a, b]), dim=1)
    sim = (z @ z.T) / temperature
    sim.fill_diagonal_(float("-inf"))
    n = len(a)
    twin = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)
    return F.cross_entropy(sim, twin)


def save_checkpoint(model: Normalized, path: str | Path, meta: dict[str, Any]) -> None:
    """Write weights, build arguments, normalisation and `meta` (JSON-able) to `path`, atomically."""
    build = getattr(model, "build_args", None)
    if build is None:
        raise TypeError("only models made by build_model/train_backbone can be saved")
    save_model(path, CHECKPOINT_FORMAT, model, meta, **asdict(build),
               mean=model.mean.flatten().tolist(), std=model.std.flatten().tolist())


def load_checkpoint(path: str | Path) -> tuple[Normalized, dict[str, Any]]:
    """Rebuild a saved backbone (eval mode, on CPU); loads with `weights_only=True`."""
    def build(payload: dict[str, Any]) -> Normalized:
        return build_model(payload["spec"], payload["num_classes"], payload["in_chans"], payload["image_size"])

    return load_model(path, CHECKPOINT_FORMAT, "backbone", build)


def embed_batches(
    model: nn.Module,
    images: np.ndarray,
    *,
    batch_size: int = 256,
    device: torch.device | str | None = None,
    start: int = 0,
) -> Iterator[tuple[int, int, np.ndarray]]:
    """Yield `(start, end, features float32 [end - start, D])` over uint8 `images [N, H, W, C]`.

    Begins at row `start` (to resume after a kill). Eval mode, no grad, autocast on CUDA.
    """
    pixels = pixels_view(images)
    device = torch.device(device) if device is not None else pick_device()
    model.to(device).eval()
    for lo in range(start, len(pixels), batch_size):
        hi = min(lo + batch_size, len(pixels))
        yield lo, hi, _embed(model, to_batch(pixels[lo:hi], device), device)


@torch.inference_mode()
def _embed(model: nn.Module, x: torch.Tensor, device: torch.device) -> np.ndarray:
    """`[B, C, H, W]` -> float32 numpy `[B, D]` (grad/autocast modes end before the caller resumes)."""
    with autocast(device):
        return model.forward_features(x).float().cpu().numpy()
