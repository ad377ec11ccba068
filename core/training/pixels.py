"""Image arrays as tensors: uint8 `[N, H, W, C]` arrays, their channel statistics, device batches."""
from __future__ import annotations

import numpy as np
import torch

# Keep the training array on an accelerator only while it takes less than this share of free memory.
DEVICE_DATA_SHARE = 0.5


def as_nhwc(images: np.ndarray) -> np.ndarray:
    """Check a uint8 image array; `[N, H, W]` (grayscale) becomes `[N, H, W, 1]`."""
    if images.dtype != np.uint8:
        raise TypeError(f"images must be uint8, got {images.dtype}")
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4:
        raise ValueError(f"images must be [N, H, W, C] (or [N, H, W]), got shape {images.shape}")
    return images


def channel_stats(images: np.ndarray, chunk: int = 8192) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of `[N, H, W, C]` uint8 pixels, in 0..1 units (float64 sums)."""
    images = as_nhwc(images)
    total = np.zeros(images.shape[-1])
    squares = np.zeros(images.shape[-1])
    for start in range(0, len(images), chunk):
        block = images[start:start + chunk].reshape(-1, images.shape[-1]).astype(np.float64) / 255.0
        total += block.sum(0)
        squares += np.square(block).sum(0)
    count = images[..., 0].size
    mean = total / count
    std = np.sqrt(np.maximum(squares / count - mean ** 2, 0.0))
    return mean.tolist(), np.maximum(std, 1e-3).tolist()


def pixels_view(images: np.ndarray) -> torch.Tensor:
    """uint8 `[N, H, W, C]` -> CPU uint8 tensor `[N, C, H, W]`, a channels-last view.

    Copies only arrays torch cannot share (read-only, e.g. parsed from bytes, or strided).
    """
    images = as_nhwc(images)
    if not images.flags.writeable or not images.flags.c_contiguous:
        images = np.array(images, order="C")
    return torch.from_numpy(images).permute(0, 3, 1, 2)


def pixels_tensor(images: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8 `[N, H, W, C]` -> uint8 tensor `[N, C, H, W]`, on `device` when it fits there."""
    data = pixels_view(images)
    if device.type == "cuda" and data.numel() > DEVICE_DATA_SHARE * torch.cuda.mem_get_info(device)[0]:
        return data.pin_memory()
    return data.to(device)


def to_batch(pixels: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 `[B, C, H, W]` -> float32 0..255 on `device`, channels-last (fast convolutions)."""
    x = pixels.to(device, non_blocking=True).float()
    return x.contiguous(memory_format=torch.channels_last)
