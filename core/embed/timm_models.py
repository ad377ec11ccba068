"""Pretrained timm backbones behind redex's interface; never silently random weights."""
from __future__ import annotations

import difflib
import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from core import paths
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
    path = Path(checkpoint).expanduser() if checkpoint is not None else _cached_timm_weights(name, tried)
    if path is not None and not path.exists():
        tried.append(f"checkpoint {path} (no such file)")
        path = None
    if path is None:
        raise BackboneUnavailable(
            f"no pretrained weights for timm model {name!r}. Tried: {'; '.join(tried)}. "
            f"Supply a local weights file with --checkpoint PATH (a .safetensors or .pth state dict "
            f"for {name!r}), or put the Hugging Face repository in the cache "
            f"(`huggingface-cli download <repo>` on a machine with internet, then copy the cache)."
        )
    paths.regular_file(path, "checkpoint")  # a folder, a FIFO, a device: refused before opening
    model = timm.create_model(name, pretrained=False, num_classes=0)
    _load_body(model, _read_state_dict(path), name, path)
    return TimmBackbone(model, name).eval()


def check_checkpoint(name: str, checkpoint: str | Path) -> None:
    """Refuse, with the reason, a weights file that `load_timm(name, checkpoint)` could not use, before a
    job starts: not a regular file, not a state dict `torch.load(weights_only=True)` can read, or
    tensors whose names or shapes do not match timm model `name` (built on the meta device, no memory)."""
    import timm

    check_timm_name(name)
    path = Path(checkpoint).expanduser()
    paths.regular_file(path, "checkpoint")
    state = _read_state_dict(path)
    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False, num_classes=0)
    expected = model.state_dict()
    wrong = [f"{k} {tuple(v.shape)} (model: {tuple(expected[k].shape)})" for k, v in state.items()
             if k in expected and tuple(v.shape) != tuple(expected[k].shape)]
    if wrong:
        raise BackboneUnavailable(f"{path} does not hold weights for timm model {name!r}: shapes differ: "
                                  f"{', '.join(wrong[:3])}")
    _check_keys(model, [k for k in expected if k not in state], [k for k in state if k not in expected], name, path)


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
    """A state dict from `.safetensors` or a torch file (`weights_only=True`), unwrapped.
    `ValueError` with the reason for a file that is neither (garbage, truncated, a pickle of objects)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = read_weights(path)
    except Exception as exc:  # noqa: BLE001 - torch/safetensors raise many types for a bad file
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "weights_only" in str(exc):
            reason = "it holds Python objects besides tensors, which are never loaded (weights_only=True)"
        raise ValueError(f"{path}: not a weights file that can be loaded safely (.safetensors, or a"
                         f" PyTorch state dict): {reason}") from None
    for key in ("state_dict", "model", "state_dict_ema"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: not a state dict (a dict of tensors)")
    return {str(k).removeprefix("module."): v for k, v in state.items()}


def _load_body(model: nn.Module, state: dict[str, torch.Tensor], name: str, path: Path) -> None:
    """Load every non-classifier weight strictly; classifier weights in `state` are ignored."""
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shapes that differ
        raise BackboneUnavailable(f"{path} does not hold weights for timm model {name!r}: "
                                  f"{' '.join(str(exc).split())[:400]}") from None
    _check_keys(model, result.missing_keys, result.unexpected_keys, name, path)


def _check_keys(model: nn.Module, missing: list[str], unexpected: list[str], name: str, path: Path) -> None:
    """Every body weight present, nothing unknown besides the classifier's."""
    head = model.pretrained_cfg.get("classifier") or "head"
    heads = head if isinstance(head, (list, tuple)) else [head]
    unexpected = [k for k in unexpected if not any(k.startswith(h + ".") for h in heads)]
    if missing or unexpected:
        raise BackboneUnavailable(
            f"{path} does not hold weights for timm model {name!r}: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
