"""Image arrays as tensors: uint8 `[N, H, W, C]` arrays, their channel statistics, device batches, and
the per-channel normalisation of models that take raw pixels (`PixelStats`)."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

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


class PixelStats:
    """Mixin for an `nn.Module` that takes raw pixels (0..255): per-channel mean/std buffers
    `[1, C, 1, 1]` in 0..1 units, named by `STATS` (each model keeps its checkpoints' names)."""

    STATS = ("pixel_mean", "pixel_std")

    def register_stats(self: nn.Module, chans: int) -> None:
        """Register the buffers: mean 0 and std 1 for `chans` channels."""
        self.register_buffer(self.STATS[0], torch.zeros(1, chans, 1, 1))
        self.register_buffer(self.STATS[1], torch.ones(1, chans, 1, 1))

    def pixel_stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The (mean, std) buffers."""
        return getattr(self, self.STATS[0]), getattr(self, self.STATS[1])

    def set_stats(self, mean: list[float], std: list[float]) -> None:
        """Per-channel mean/std of pixel values scaled to 0..1."""
        for buffer, values in zip(self.pixel_stats(), (mean, std)):
            buffer.copy_(torch.tensor(values).view_as(buffer))

    def copy_stats(self, other: PixelStats) -> None:
        """Use `other`'s pixel normalisation."""
        for buffer, source in zip(self.pixel_stats(), other.pixel_stats()):
            buffer.copy_(source)

    def scale_pixels(self, x: torch.Tensor) -> torch.Tensor:
        """Float `[B, C, H, W]` 0..255 -> `(x / 255 - mean) / std` per channel."""
        mean, std = self.pixel_stats()
        return (x / 255.0 - mean) / std
