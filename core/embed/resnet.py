"""CIFAR-style ResNets, the default `trained:` backbones (the paper's 64-d embeddings).

The `aa` variants downsample anti-aliased (Zhang 2019, "Making convolutional networks shift-invariant
again"): every stride-2 convolution sees its input low-passed by a fixed 3x3 binomial blur first, so a
shift of the image by a pixel moves the features smoothly instead of aliasing them. Blurring before a
strided convolution equals blurring its output before subsampling (both are linear), so this is
Zhang's BlurPool placed where it costs one depthwise 3x3 filter per downsampling and no extra
convolution work. Measured (docs/benchmarks.md, "Near copies"): it alone does not bring shifted
copies next to their original (4 %); the contrastive backbone recipe does. Not the default.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class ResNetConfig:
    """A CIFAR-style ResNet: a 3x3 stem, then one stage per width (stride 2 between stages)."""

    widths: tuple[int, ...] = (16, 32, 64)
    depths: tuple[int, ...] = (1, 1, 1)  # basic blocks per stage; depth = 2 * sum + 2
    stem_stride: int = 1
    blur: bool = False  # low-pass (3x3 binomial) the input of every stride-2 convolution


class Blur(nn.Module):
    """Fixed depthwise 3x3 binomial low-pass filter ([1, 2, 1] x [1, 2, 1] / 16), reflect padding,
    stride 1: `[N, C, H, W]` -> `[N, C, H, W]`. No parameters; the kernel is a non-persistent buffer."""

    def __init__(self, chans: int):
        super().__init__()
        taps = torch.tensor([1.0, 2.0, 1.0])
        kernel = (taps[:, None] * taps[None, :]) / 16.0
        self.register_buffer("kernel", kernel.expand(chans, 1, 3, 3).clone(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), self.kernel.to(x.dtype), groups=x.shape[1])


def _blur_if(on: bool, chans: int, stride: int) -> nn.Module:
    return Blur(chans) if on and stride > 1 else nn.Identity()


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers and a shortcut (1x1 conv-BN when the shape changes)."""

    def __init__(self, in_chs: int, out_chs: int, stride: int, blur: bool = False):
        super().__init__()
        self.blur = _blur_if(blur, in_chs, stride)  # shared by conv1 and the shortcut
        self.conv1 = nn.Conv2d(in_chs, out_chs, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_chs)
        self.conv2 = nn.Conv2d(out_chs, out_chs, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_chs)
        self.shortcut = nn.Identity()
        if stride != 1 or in_chs != out_chs:
            self.shortcut = nn.Sequential(nn.Conv2d(in_chs, out_chs, 1, stride, bias=False), nn.BatchNorm2d(out_chs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blur(x)
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
        self.stem_blur = _blur_if(cfg.blur, in_chans, cfg.stem_stride)
        blocks = []
        in_chs = cfg.widths[0]
        for stage, (width, depth) in enumerate(zip(cfg.widths, cfg.depths)):
            for i in range(depth):
                blocks.append(BasicBlock(in_chs, width, stride=2 if stage > 0 and i == 0 else 1, blur=cfg.blur))
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
        return self.blocks(self.stem(self.stem_blur(x))).mean((2, 3))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


# Registered CIFAR-style ResNets, all widths 16/32/64 (the paper's 64-d embeddings).
# The `s2` variants have a stride-2 stem: ~4x fewer FLOPs on 28-32 px images (stages at
# 14/7/4 px), the CPU-friendly default.
ARCHS: dict[str, ResNetConfig] = {
    "resnet8": ResNetConfig(depths=(1, 1, 1)),
    "resnet14": ResNetConfig(depths=(2, 2, 2)),
    "resnet20": ResNetConfig(depths=(3, 3, 3)),
    "resnet8s2": ResNetConfig(depths=(1, 1, 1), stem_stride=2),
    "resnet14s2": ResNetConfig(depths=(2, 2, 2), stem_stride=2),
    "resnet8s2aa": ResNetConfig(depths=(1, 1, 1), stem_stride=2, blur=True),
    "resnet14s2aa": ResNetConfig(depths=(2, 2, 2), stem_stride=2, blur=True),
}
