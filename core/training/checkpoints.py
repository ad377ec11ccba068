"""Checkpoint files: atomic writes, tagged formats, `weights_only` loads."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

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
