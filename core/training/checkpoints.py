"""Checkpoint files of every model: atomic writes, tagged formats, `weights_only` loads.

A redex checkpoint is a dict `{"format": tag, ...fields, "meta": JSON-able dict, "state_dict": ...}`
saved with `torch.save`; the tag names the model and its version (e.g. "redex-mae/1").
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn


def cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict as contiguous CPU tensors."""
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


def save_payload(path: str | Path, payload: dict[str, Any]) -> None:
    """`torch.save` a checkpoint dict (with a JSON-able 'meta') via a temporary file and a rename."""
    json.dumps(payload["meta"])  # fail now, not at load time, on non-plain metadata
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def save_model(path: str | Path, fmt: str, model: nn.Module, meta: dict[str, Any], **fields: Any) -> None:
    """Write `{"format": fmt, **fields, "meta": meta, "state_dict": cpu_state(model)}` atomically."""
    json.dumps(meta)  # before the weights are copied
    save_payload(path, {"format": fmt, **fields, "meta": meta, "state_dict": cpu_state(model)})


def read_weights(path: str | Path) -> Any:
    """`torch.load(path, weights_only=True)` onto the CPU: tensors and plain containers only."""
    return torch.load(path, map_location="cpu", weights_only=True)


def load_model_payload(path: str | Path, fmt: str, what: str) -> dict[str, Any]:
    """The checkpoint dict at `path`; ValueError unless its format tag is `fmt` (`what` names the model)."""
    payload = read_weights(path)
    if not isinstance(payload, dict) or payload.get("format") != fmt:
        raise ValueError(f"{path}: not a redex {what} checkpoint ({fmt})")
    return payload


def load_model(path: str | Path, fmt: str, what: str,
               build: Callable[[dict[str, Any]], nn.Module]) -> tuple[nn.Module, dict[str, Any]]:
    """`(model, meta)` from the checkpoint at `path` (format `fmt`): `build(payload)` makes the model,
    which gets the saved weights and is returned in eval mode, on the CPU."""
    payload = load_model_payload(path, fmt, what)
    model = build(payload)
    model.load_state_dict(payload["state_dict"])
    return model.eval(), payload["meta"]
