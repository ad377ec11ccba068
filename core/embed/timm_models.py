"""Pretrained timm backbones behind redex's interface; never silently random weights."""
from __future__ import annotations

import difflib
import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from core.training.checkpoints import read_weights


class BackboneUnavailable(RuntimeError):
    """No weights could be found for a pretrained backbone."""


def check_timm_name(name: str) -> None:
    import timm

    if not timm.is_model(name):
        close = difflib.get_close_matches(name.split(".")[0], timm.list_models(), n=5)
        hint = f"; close matches: {', '.join(close)}" if close else ""
        raise ValueError(f"unknown timm model {name!r}{hint} (all names: timm.list_models())")


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

    check_timm_name(name)
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
    state = read_weights(path)
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
