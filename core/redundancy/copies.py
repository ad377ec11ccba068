"""Near copies by pixels: a second signal beside the embedding (ours, not the paper's).

An image moved by a pixel or two, or cropped by a few pixels and resized back, can embed farther
from its original than other images of its class (docs/benchmarks.md, "Near copies"), whatever the
backbone. This module finds such pairs inside each class from the pixel cache alone, so the result
holds for every backbone: `core.redundancy.trees.build_class_tree(pairs=...)` then treats a pair's
distance as 0, so the pair merges before any of the tree's own merges and shares a group at every
cut that keeps fewer groups than the class has images minus joined pairs.

Two steps per class, on grayscale pixels at `COMPARE_SIDE` px or less:
1. candidates: the `k` nearest neighbours of each image by the cosine of each of two 12 x 12
   descriptors that a move (`centred`), or a move and a zoom (`normalised`), barely changes: the image
   resampled around its centre of mass. Blocked matrix products, O(n_c^2) per class;
2. verification: the tolerant distance of each candidate pair, 1 - the largest Pearson r between one
   image and the other moved by up to `max_shift` px on each axis, over the pixels where the two
   overlap, also after zooming either image by each of `scales` about its centre (and moving it by
   half a pixel, `subpixel`). Pairs at most `threshold` apart are near copies. The moves of one
   transform come from one inverse FFT per pair, on spectra computed once per image (`_prepare`).

Measured on 200 planted copies among the 10,000 Fashion-MNIST test images (docs/benchmarks.md, "Near
copies"): the threshold 0.01 keeps the pairs that are not planted copies to a few dozen.
"""
from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # torch is imported where it computes: the pages import this module's settings only
    import torch

COMPARE_SIDE = 32          # images larger than this are area-averaged down to it for both steps


@dataclass(frozen=True)
class CopySettings:
    """What decides the pairs (saved with them; a change recomputes them and rebuilds the trees)."""

    k: int = 16                                 # candidates per image and descriptor
    max_shift: int = 2                          # px at the comparison size, each direction
    scales: tuple[float, ...] = (1.04, 1.08, 1.12)  # zooms tried on either image, besides 1.0
    threshold: float = 0.01                     # largest tolerant distance of a near copy
    subpixel: bool = True                       # also try each zoom moved by half a pixel
    blur: float = 0.0                           # Gaussian sigma (px) applied before comparing

    def to_dict(self) -> dict:
        return {**asdict(self), "scales": list(self.scales), "compare_side": COMPARE_SIDE}

    def key(self) -> str:
        return hashlib.blake2b(repr(sorted(self.to_dict().items())).encode(), digest_size=8).hexdigest()


DEFAULT_SETTINGS = CopySettings()


# -- pixels -------------------------------------------------------------------------------------
def gray(pixels: np.ndarray) -> torch.Tensor:
    """uint8 [n, S, S(, C)] -> float32 [n, s, s] in 0..1, s = min(S, COMPARE_SIDE) (area-averaged)."""
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(np.asarray(pixels)).float()
    if x.ndim == 4:
        x = x.mean(-1)
    x = x / 255.0
    if x.shape[-1] > COMPARE_SIDE:
        x = F.adaptive_avg_pool2d(x[:, None], COMPARE_SIDE)[:, 0]
    return x


def centred(x: torch.Tensor) -> torch.Tensor:
    """`normalised` without the zoom: a window of 0.9 times the image around its centre of mass (moves)."""
    return normalised(x, fixed=0.9)


def normalised(x: torch.Tensor, side: int = 12, spread: float = 1.2, fixed: float | None = None) -> torch.Tensor:
    """[n, s, s] -> unit rows [n, side^2]: each image resampled around its centre of mass, over a window
    of `spread` times its radius of gyration each way (or `fixed` times the half-side), weights: distance
    of each pixel from the mean of the image's border; so a move or a zoom of the content barely changes
    it. Mean removed. (Planted-copy benchmark: side 12 finds more copies among the 8 nearest than 6 or 8.)"""
    import torch
    import torch.nn.functional as F

    n, s = len(x), x.shape[-1]
    border = torch.cat([x[:, 0], x[:, -1], x[:, :, 0], x[:, :, -1]], 1).mean(1)
    w = (x - border[:, None, None]).abs()
    total = w.sum((1, 2)).clamp_min(1e-6)
    pos = (torch.arange(s, dtype=torch.float32) + 0.5) / s * 2 - 1          # pixel centres in -1..1
    cy = (w.sum(2) * pos).sum(1) / total
    cx = (w.sum(1) * pos).sum(1) / total
    var = ((w.sum(2) * (pos[None] - cy[:, None]) ** 2).sum(1)
           + (w.sum(1) * (pos[None] - cx[:, None]) ** 2).sum(1)) / total
    radius = var.clamp_min(1e-4).sqrt() * spread if fixed is None else torch.full((n,), fixed)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = radius
    theta[:, 0, 2], theta[:, 1, 2] = cx, cy
    grid = F.affine_grid(theta, (n, 1, 2 * side, 2 * side), align_corners=False)
    v = F.avg_pool2d(F.grid_sample(x[:, None], grid, align_corners=False), 2).flatten(1)
    v = v - v.mean(1, keepdim=True)
    return v / v.norm(dim=1, keepdim=True).clamp_min(1e-6)


def candidates(x: torch.Tensor, k: int, describe, block: int = 2048) -> np.ndarray:
    """Unique pairs (i < j) int64 [m, 2] where j is among i's k nearest by the cosine of `describe(x)`
    (unit rows), or i among j's."""
    import torch

    n = len(x)
    k = min(k, n - 1)
    if k < 1:
        return np.zeros((0, 2), np.int64)
    v = describe(x)
    out = []
    for lo in range(0, n, block):
        sim = v[lo:lo + block] @ v.T                        # [b, n]
        sim[torch.arange(len(sim)), torch.arange(lo, lo + len(sim))] = -2.0
        nn_ = sim.topk(k, dim=1).indices                    # [b, k]
        rows = torch.arange(lo, lo + len(sim))[:, None].expand_as(nn_)
        out.append(torch.stack([rows.reshape(-1), nn_.reshape(-1)], 1))
    pairs = torch.cat(out).numpy()
    pairs = np.sort(pairs, axis=1)
    return np.unique(pairs, axis=0)


# -- the tolerant distance -----------------------------------------------------------------------
def zoom(x: torch.Tensor, scale: float, dy: float = 0.0, dx: float = 0.0) -> torch.Tensor:
    """[n, s, s] zoomed in by `scale` about the centre and moved by (dy, dx) px (bilinear, zero fill)."""
    import torch
    import torch.nn.functional as F

    if scale == 1.0 and dy == 0.0 and dx == 0.0:
        return x
    n, s = len(x), x.shape[-1]
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0 / scale
    theta[:, 0, 2], theta[:, 1, 2] = -2.0 * dx / s, -2.0 * dy / s
    grid = F.affine_grid(theta, (n, 1, s, s), align_corners=False)
    return F.grid_sample(x[:, None], grid, align_corners=False, padding_mode="zeros")[:, 0]


def transforms(settings: CopySettings) -> list[tuple[float, float, float]]:
    """(scale, dy, dx) tried on either image besides the identity: each zoom, at `subpixel` offsets."""
    offsets = [(0.0, 0.0)] + ([(0.0, 0.5), (0.5, 0.0), (0.5, 0.5)] if settings.subpixel else [])
    return [(z, dy, dx) for z in (1.0, *settings.scales) for dy, dx in offsets][1:]


@dataclass(frozen=True)
class _Prepared:
    """Per image and zoom what every pair needs: the spectrum of the image zero-padded to `side`
    (spec complex [Z, n, side, side//2+1]), the sum and sum of squares of the image seen through each
    move (zero fill; win_sum, win_sq [Z, n, T]), the whole image's sum and squares (sum, sq [n])."""

    spec: torch.Tensor
    win_sum: torch.Tensor
    win_sq: torch.Tensor
    sum: torch.Tensor
    sq: torch.Tensor
    side: int
    shifts: torch.Tensor   # int64 [T, 2]: (dy, dx) of each move


def _prepare(x: torch.Tensor, settings: CopySettings) -> _Prepared:
    import torch
    import torch.nn.functional as F

    s, m = x.shape[-1], settings.max_shift
    side = s + m
    shifts = torch.tensor([(dy, dx) for dy in range(-m, m + 1) for dx in range(-m, m + 1)])
    specs, sums, squares = [], [], []
    for z in [(1.0, 0.0, 0.0), *transforms(settings)]:
        xz = zoom(gaussian(x, settings.blur), *z)
        specs.append(torch.fft.rfft2(xz, s=(side, side)))
        padded = F.pad(xz, (m, m, m, m))
        ones = torch.ones(1, 1, s, s)
        sums.append(F.conv2d(padded[:, None], ones)[:, 0].flatten(1))          # [n, T], dy-major
        squares.append(F.conv2d((padded * padded)[:, None], ones)[:, 0].flatten(1))
    x = gaussian(x, settings.blur)
    return _Prepared(torch.stack(specs), torch.stack(sums), torch.stack(squares), x.sum((1, 2)),
                     (x * x).sum((1, 2)), side, shifts)


def gaussian(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """[n, s, s] blurred by a Gaussian of `sigma` px (zero fill); sigma 0: unchanged."""
    import torch
    import torch.nn.functional as F

    if sigma <= 0:
        return x
    r = max(1, int(round(3 * sigma)))
    t = torch.arange(-r, r + 1, dtype=torch.float32)
    g = torch.exp(-t * t / (2 * sigma * sigma))
    g = g / g.sum()
    y = F.conv2d(x[:, None], g.view(1, 1, 1, -1), padding=(0, r))
    return F.conv2d(y, g.view(1, 1, -1, 1), padding=(r, 0))[:, 0]


def _correlation(p: _Prepared, za: int, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Largest Pearson r between images b (unzoomed) and a (transform index za) moved by each allowed
    shift, over the pixels where the two overlap (the strip a move empties is left out) -> [P]. The
    cross-correlation of all moves comes from one inverse FFT per pair."""
    import torch

    full = torch.fft.irfft2(p.spec[za, a] * p.spec[0, b].conj(), s=(p.side, p.side))  # [P, side, side]
    cross = full[:, p.shifts[:, 0] % p.side, p.shifts[:, 1] % p.side]               # [P, T]
    s = p.side - int(p.shifts.max())
    count = ((s - p.shifts[:, 0].abs()) * (s - p.shifts[:, 1].abs())).float()        # [T] overlap
    sw, sww = p.win_sum[za, a], p.win_sq[za, a]
    sb, sbb = p.win_sum[0, b].flip(1), p.win_sq[0, b].flip(1)  # b over the overlap: its window at -shift
    cov = cross - sw * sb / count
    var = (sww - sw * sw / count).clamp_min(1e-9) * (sbb - sb * sb / count).clamp_min(1e-9)
    return (cov / var.sqrt()).max(1).values


def tolerant_distance(x: torch.Tensor, pairs: np.ndarray, settings: CopySettings = DEFAULT_SETTINGS,
                      chunk: int = 4096) -> np.ndarray:
    """1 - the best Pearson r of each pair (i, j) of `x` [n, s, s] over moves of up to `max_shift` px
    and zooms of either image by `scales` -> float32 [m]."""
    import torch

    prep = _prepare(x, settings)
    out = np.empty(len(pairs), np.float32)
    for lo in range(0, len(pairs), chunk):
        p = torch.from_numpy(np.asarray(pairs[lo:lo + chunk], np.int64))
        a, b = p[:, 0], p[:, 1]
        best = _correlation(prep, 0, a, b)
        for z in range(1, len(transforms(settings)) + 1):
            best = torch.maximum(best, _correlation(prep, z, a, b))
            best = torch.maximum(best, _correlation(prep, z, b, a))
        out[lo:lo + chunk] = (1.0 - best).numpy()
    return out


def class_pairs(pixels: np.ndarray, settings: CopySettings = DEFAULT_SETTINGS) -> tuple[np.ndarray, np.ndarray]:
    """Near-copy pairs of one class: (positions int64 [m, 2], i < j, into `pixels` [n, S, S(, C)]; their
    tolerant distances float32 [m]), sorted."""
    x = gray(pixels)
    cand = np.unique(np.concatenate([candidates(x, settings.k, describe=centred),
                                     candidates(x, settings.k, describe=normalised)]), axis=0)
    if not len(cand):
        return cand, np.zeros(0, np.float32)
    dist = tolerant_distance(x, cand, settings)
    keep = dist <= settings.threshold
    return cand[keep], dist[keep]


def components(n: int, pairs: np.ndarray) -> np.ndarray:
    """Connected components of `pairs` [m, 2] over n items: a component id per item int64 [n] (the
    smallest member's position), singletons their own."""
    parent = np.arange(n)

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for a, b in np.asarray(pairs, np.int64):
        ra, rb = root(int(a)), root(int(b))
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    return np.array([root(i) for i in range(n)], np.int64)


def pairs_fingerprint(pairs: np.ndarray) -> str:
    """A short hash of a class's pairs [m, 2] (positions in the class): part of its tree's fingerprint."""
    data = np.ascontiguousarray(np.asarray(pairs, np.int64).reshape(-1, 2))
    return hashlib.blake2b(data.tobytes(), digest_size=8).hexdigest()
