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

import difflib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from core.device import autocast, pick_device
from core.training import (
    DEFAULT_ARCH, Normalized, Progress, Recipe, ShouldStop, as_nhwc, default_recipe,
    pixels_view, to_batch, train_classifier,
)

DEFAULT_BACKBONE = f"trained:{DEFAULT_ARCH}"
KINDS = ("trained", "timm")
CHECKPOINT_FORMAT = "redex-backbone/1"


class BackboneUnavailable(RuntimeError):
    """No weights could be found for a pretrained backbone."""


@dataclass(frozen=True)
class BackboneSpec:
    kind: str  # 'trained' | 'timm'
    name: str  # registered arch (trained) or timm model name, optionally with a '.tag'

    def __str__(self) -> str:
        return f"{self.kind}:{self.name}"


@dataclass(frozen=True)
class ResNetConfig:
    """A CIFAR-style ResNet: a 3x3 stem, then one stage per width (stride 2 between stages)."""

    widths: tuple[int, ...] = (16, 32, 64)
    depths: tuple[int, ...] = (1, 1, 1)  # basic blocks per stage; depth = 2 * sum + 2
    stem_stride: int = 1


@dataclass(frozen=True)
class BuildArgs:
    """What `build_model` needs to rebuild a trained backbone (saved in checkpoints)."""

    spec: str
    num_classes: int
    in_chans: int
    image_size: int


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers and a shortcut (1x1 conv-BN when the shape changes)."""

    def __init__(self, in_chs: int, out_chs: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chs, out_chs, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_chs)
        self.conv2 = nn.Conv2d(out_chs, out_chs, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_chs)
        self.shortcut = nn.Identity()
        if stride != 1 or in_chs != out_chs:
            self.shortcut = nn.Sequential(nn.Conv2d(in_chs, out_chs, 1, stride, bias=False), nn.BatchNorm2d(out_chs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """`[N, in_chans, H, W]` normalised images -> pooled features `[N, widths[-1]]` -> logits."""

    def __init__(self, cfg: ResNetConfig, num_classes: int, in_chans: int):
        super().__init__()
        self.embed_dim = cfg.widths[-1]
        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, cfg.widths[0], 3, cfg.stem_stride, 1, bias=False),
            nn.BatchNorm2d(cfg.widths[0]),
            nn.ReLU(inplace=True),
        )
        blocks = []
        in_chs = cfg.widths[0]
        for stage, (width, depth) in enumerate(zip(cfg.widths, cfg.depths)):
            for i in range(depth):
                blocks.append(BasicBlock(in_chs, width, stride=2 if stage > 0 and i == 0 else 1))
                in_chs = width
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(self.embed_dim, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        for block in self.blocks:
            nn.init.zeros_(block.bn2.weight)  # each residual branch starts as the identity

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """`[N, C, H, W]` -> `[N, embed_dim]` (global average pool of the last stage)."""
        return self.blocks(self.stem(x)).mean((2, 3))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


# Registered CIFAR-style ResNets, all widths 16/32/64 (the paper's 64-d embeddings).
# The `s2` variants have a stride-2 stem: ~4x fewer FLOPs on 28-32 px images (stages at
# 14/7/4 px), the CPU-friendly default.
_ARCHS: dict[str, ResNetConfig] = {
    "resnet8": ResNetConfig(depths=(1, 1, 1)),
    "resnet14": ResNetConfig(depths=(2, 2, 2)),
    "resnet20": ResNetConfig(depths=(3, 3, 3)),
    "resnet8s2": ResNetConfig(depths=(1, 1, 1), stem_stride=2),
    "resnet14s2": ResNetConfig(depths=(2, 2, 2), stem_stride=2),
}


def list_archs() -> list[str]:
    return sorted(_ARCHS)


def parse_spec(spec: str | BackboneSpec) -> BackboneSpec:
    """`'trained:resnet8'` / `'timm:resnet18'` -> `BackboneSpec`; ValueError naming valid choices."""
    if isinstance(spec, BackboneSpec):
        return spec
    kind, sep, name = str(spec).strip().partition(":")
    if not sep or not name:
        raise ValueError(f"backbone spec {spec!r} must look like 'kind:name', e.g. {DEFAULT_BACKBONE!r} "
                         f"or 'timm:resnet18'; kinds: {', '.join(KINDS)}")
    if kind == "trained":
        if name not in _ARCHS:
            raise ValueError(f"unknown trained backbone {name!r}; valid: {', '.join(list_archs())}")
    elif kind == "timm":
        _check_timm_name(name)
    else:
        raise ValueError(f"unknown backbone kind {kind!r} in {spec!r}; valid kinds: {', '.join(KINDS)}")
    return BackboneSpec(kind, name)


def _check_timm_name(name: str) -> None:
    import timm

    if not timm.is_model(name):
        close = difflib.get_close_matches(name.split(".")[0], timm.list_models(), n=5)
        hint = f"; close matches: {', '.join(close)}" if close else ""
        raise ValueError(f"unknown timm model {name!r}{hint} (all names: timm.list_models())")


def build_model(spec: str | BackboneSpec, num_classes: int, in_chans: int, image_size: int) -> Normalized:
    """A fresh (untrained) `trained:` backbone wrapped in its normalisation, channels-last."""
    spec = parse_spec(spec)
    if spec.kind != "trained":
        raise ValueError(f"{spec} is a pretrained backbone: load it with load_timm({spec.name!r})")
    if in_chans not in (1, 3) or num_classes < 1 or image_size < 8:
        raise ValueError(f"need in_chans 1 or 3, num_classes >= 1, image_size >= 8; "
                         f"got {in_chans}, {num_classes}, {image_size}")
    model = Normalized(CifarResNet(_ARCHS[spec.name], num_classes, in_chans), in_chans)
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
    json.dumps(meta)  # fail here, not at load time, if meta holds non-plain types
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    payload = {
        "format": CHECKPOINT_FORMAT,
        **asdict(build),
        "mean": model.mean.flatten().tolist(),
        "std": model.std.flatten().tolist(),
        "meta": meta,
        "state_dict": state,
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | Path) -> tuple[Normalized, dict[str, Any]]:
    """Rebuild a saved backbone (eval mode, on CPU); loads with `weights_only=True`."""
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not a redex backbone checkpoint ({CHECKPOINT_FORMAT})")
    build = BuildArgs(payload["spec"], payload["num_classes"], payload["in_chans"], payload["image_size"])
    model = build_model(build.spec, build.num_classes, build.in_chans, build.image_size)
    model.load_state_dict(payload["state_dict"])
    return model.eval(), payload["meta"]


class TimmBackbone(nn.Module):
    """A timm model behind redex's interface.

    Raw pixels `[N, C, H, W]` (0..255, C = 1 or 3) -> 3 channels, resized to the model's input
    size, normalised with its mean/std -> pooled pre-logits features `[N, embed_dim]`.
    The classifier is dropped: `forward` is `forward_features`.
    """

    def __init__(self, model: nn.Module, name: str):
        super().__init__()
        import timm.data

        cfg = timm.data.resolve_model_data_config(model)
        self.model = model
        self.name = name
        self.embed_dim = model.num_features
        self.input_size = tuple(cfg["input_size"][1:])
        self.interpolation = cfg["interpolation"] if cfg["interpolation"] in ("bilinear", "bicubic") else "bilinear"
        self.register_buffer("mean", torch.tensor(cfg["mean"]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(cfg["std"]).view(1, 3, 1, 1))

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """`[N, 1|3, H, W]` 0..255 -> `[N, 3, *input_size]` normalised float."""
        x = x.to(self.mean.dtype) / 255.0
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if tuple(x.shape[-2:]) != self.input_size:
            x = F.interpolate(x, size=self.input_size, mode=self.interpolation, align_corners=False,
                              antialias=x.shape[-1] > self.input_size[-1]).clamp_(0.0, 1.0)
        return (x - self.mean) / self.std

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.model.forward_features(self.prepare(x))
        return self.model.forward_head(feats, pre_logits=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)


def load_timm(name: str, checkpoint: str | Path | None = None) -> TimmBackbone:
    """A pretrained timm model, from `checkpoint` (a local state dict) or the local HF cache.

    Never touches the network and never returns random weights: raises `BackboneUnavailable`.
    """
    import timm

    _check_timm_name(name)
    tried = []
    path = Path(checkpoint) if checkpoint is not None else _cached_timm_weights(name, tried)
    if path is None or not path.is_file():
        if path is not None:
            tried.append(f"checkpoint {path} (no such file)")
        raise BackboneUnavailable(
            f"no pretrained weights for timm model {name!r}. Tried: {'; '.join(tried)}. "
            f"Supply a local weights file with --checkpoint PATH (a .safetensors or .pth state dict "
            f"for {name!r}), or put the Hugging Face repository in the cache "
            f"(`huggingface-cli download <repo>` on a machine with internet, then copy the cache)."
        )
    model = timm.create_model(name, pretrained=False, num_classes=0)
    _load_body(model, _read_state_dict(path), name, path)
    return TimmBackbone(model, name).eval()


def _cached_timm_weights(name: str, tried: list[str]) -> Path | None:
    """Weights of `name`'s default pretrained tag in the local HF or torch-hub cache, else None."""
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)
    if cfg is None:
        tried.append(f"timm has no pretrained weights registered for {name!r}")
        return None
    if cfg.hf_hub_id:
        filenames = [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]
        for filename in filenames:
            try:
                return Path(hf_hub_download(cfg.hf_hub_id, filename, local_files_only=True))
            except LocalEntryNotFoundError:
                tried.append(f"HF cache {constants.HF_HUB_CACHE} for {cfg.hf_hub_id}/{filename}")
    if cfg.url:
        local = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(cfg.url)
        if local.is_file():
            return local
        tried.append(f"torch hub cache {local}")
    return None


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from `.safetensors` or a torch file (`weights_only=True`), unwrapped."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "state_dict_ema"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    return {k.removeprefix("module."): v for k, v in state.items()}


def _load_body(model: nn.Module, state: dict[str, torch.Tensor], name: str, path: Path) -> None:
    """Load every non-classifier weight strictly; classifier weights in `state` are ignored."""
    result = model.load_state_dict(state, strict=False)
    head = model.pretrained_cfg.get("classifier") or "head"
    heads = head if isinstance(head, (list, tuple)) else [head]
    unexpected = [k for k in result.unexpected_keys if not any(k.startswith(h + ".") for h in heads)]
    if result.missing_keys or unexpected:
        raise BackboneUnavailable(
            f"{path} does not hold weights for timm model {name!r}: "
            f"missing {result.missing_keys[:5]}, unexpected {unexpected[:5]}"
        )


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
