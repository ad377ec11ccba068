"""Embedding backbones, named by a spec string `kind:name`.

- `trained:<arch>` (the default, the paper's way): a CIFAR-style ResNet trained on the dataset
  itself; its embedding is the global-average-pool output (64-d for widths 16/32/64).
- `timm:<model>`: a pretrained timm model, loaded offline from the local Hugging Face cache or
  from a checkpoint file; never silently random.

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

from core.device import autocast, pick_device
from core.embed.resnet import ARCHS, CifarResNet
from core.embed.timm_models import check_timm_name
from core.training.checkpoints import load_model, save_model
from core.training.classifier import Normalized, train_classifier
from core.training.loop import Progress, ShouldStop
from core.training.pixels import as_nhwc, pixels_view, to_batch
from core.training.recipe import DEFAULT_ARCH, Recipe, default_recipe

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
    """Build `spec` (seeded by the recipe) and train it on uint8 `images [N, H, W, C]`."""
    spec = parse_spec(spec)
    images = as_nhwc(images)
    recipe = recipe or default_recipe(images.shape[1], arch=spec.name)
    if recipe.arch != spec.name:
        raise ValueError(f"recipe.arch={recipe.arch!r} does not match the backbone {spec}")
    torch.manual_seed(recipe.seed)
    model = build_model(spec, num_classes, images.shape[-1], images.shape[1])
    metrics = train_classifier(model, images, labels, recipe, eval_images=eval_images, eval_labels=eval_labels,
                               device=device, progress=progress, should_stop=should_stop)
    return model, metrics


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
