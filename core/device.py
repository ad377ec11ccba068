"""Device choice shared by every model in redex: CUDA, then Apple MPS, then CPU; AMP on CUDA only."""
from __future__ import annotations

import contextlib
import os

import torch


def pick_device(prefer: str | None = None) -> torch.device:
    """`prefer` (or `REDEX_DEVICE`) forces a device; otherwise the best available one."""
    prefer = prefer or os.environ.get("REDEX_DEVICE")
    if prefer:
        return torch.device(prefer)
    if torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def autocast(device: torch.device):
    """Mixed precision (bf16 where supported, else fp16) on CUDA; a no-op elsewhere."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


def needs_grad_scaler(device: torch.device) -> bool:
    """fp16 autocast needs loss scaling; bf16 and CPU do not."""
    return device.type == "cuda" and not torch.cuda.is_bf16_supported()


def full_precision(device: torch.device):
    """A region where autocast is off (inside an `autocast` region too); a no-op off CUDA."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    return torch.autocast("cuda", enabled=False)
