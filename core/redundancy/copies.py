"""Near copies by pixels: a second signal beside the embedding (ours, not the paper's).

An image moved by a pixel or two, or cropped by a few pixels and resized back, can embed farther
from its original than other images of its class (docs/benchmarks.md, "Near copies"), whatever the
backbone. This module finds such pairs inside each class from the pixel cache alone, so the result
holds for every backbone: `core.redundancy.trees.build_class_tree(pairs=...)` then treats a pair's
distance as 0, so the pair merges before any of the tree's own merges and shares a group at every
cut that keeps fewer groups than the class has images minus joined pairs.

Two steps per class, on grayscale pixels at `COMPARE_SIDE` px or less:
1. candidates (`candidates`): each image's `k` nearest neighbours by the cosine of 12 x 12 descriptors
   that a move, or a move and a zoom, barely changes: the image resampled around its centre of mass
   over a window scaled by its radius of gyration (`normalised`; the pixel weights are distances from
   the median of the border, which a crop or a move to the border leaves as it was); and, for crops,
   a fixed window of each image zoomed in by `query_zoom` against the same window of the others, either
   way. Blocked matrix products, O(n_c^2) per class;
2. verification (`tolerant_distance`), a cascade:
   a. first check: 1 - the largest Pearson r between one image and the other moved by up to
      `max_shift` px on each axis, over the pixels where the two overlap, at zoom 1 and at each of
      `scales` of either image. The correlation at every move is the cross spectrum (spectra computed
      once per image and zoom, `_prepare`) times a fixed DFT basis: one matrix product per pair and
      zoom. Pairs at most `threshold` apart are near copies;
   b. the others whose best move, refined to a fraction of a pixel by a parabola on each axis (of the
      zoom whose refined peak is highest), is within `coarse` are aligned continuously (`align`):
      Gauss-Newton steps on a zoom and a shift (gain and offset in closed form) from that start; a
      pair leaves when its distance before step i is above `gates[i]`. A pair that fits within `aligned` after `steps` steps is a near copy: a
      tighter bar, as three free parameters fit unrelated images better than the fixed moves.

Measured on 200 planted copies among the 10,000 Fashion-MNIST test images (docs/benchmarks.md, "Near
copies"): all 200 pass (the fixed grid of 31 zooms and half-pixel offsets before it: 190, and 8 % of
the crops were not candidates); crops fit at <= 0.0004 once aligned and other pairs from 0.0055, so
14 pairs that are not planted copies pass (before: about 30). One 6,000-image train class: 11-14 s of
CPU against 59-62 s for the grid, in the same run (one torch thread).
"""
from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # torch is imported where it computes: the pages import this module's settings only
    import torch

COMPARE_SIDE = 32          # images larger than this are area-averaged down to it for both steps
FLAT_VARIANCE = 1e-4       # per-pixel variance (0..1 scale, std 0.01) below which an image is flat: r = 0


@dataclass(frozen=True)
class CopySettings:
    """What decides the pairs (saved with them; a change recomputes them and rebuilds the trees)."""

    k: int = 6                                  # candidates per image and descriptor
    query_zoom: float = 1.1                     # the second descriptor: each image zoomed in by this
    max_shift: int = 3                          # px at the comparison size, each direction
    scales: tuple[float, ...] = (1.06, 1.12)    # zooms of either image in the first check, besides 1.0
    coarse: float = 0.06                        # first-check distance above which a pair is not aligned
    steps: int = 3                              # Gauss-Newton steps of the continuous alignment
    gates: tuple[float, ...] = (0.05, 0.02)     # a pair leaves the alignment above gates[i] before step i
    threshold: float = 0.01                     # largest tolerant distance of a near copy
    aligned: float = 0.004                      # the same after the continuous alignment (it fits more)

    def to_dict(self) -> dict:
        return {**asdict(self), "scales": list(self.scales), "gates": list(self.gates), "compare_side": COMPARE_SIDE,
                "flat_variance": FLAT_VARIANCE}

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


# -- candidates ---------------------------------------------------------------------------------
def normalised(x: torch.Tensor, side: int = 12, spread: float = 1.2, fixed: float | None = None) -> torch.Tensor:
    """[n, s, s] -> unit rows [n, side^2]: each image resampled around its centre of mass, over a window
    of `spread` times its radius of gyration each way (or `fixed` times the half-side), weights: distance
    of each pixel from the median of the image's border (the median, not the mean: a crop or a move that
    brings the object to the border leaves it); so a move or a zoom of the content barely changes it.
    Mean removed."""
    import torch
    import torch.nn.functional as F

    n, s = len(x), x.shape[-1]
    border = torch.cat([x[:, 0], x[:, -1], x[:, :, 0], x[:, :, -1]], 1).median(1).values
    w = (x - border[:, None, None]).abs()
    total = w.sum((1, 2)).clamp_min(1e-6)
    pos = (torch.arange(s, dtype=torch.float32) + 0.5) / s * 2 - 1          # pixel centres in -1..1
    cy = (w.sum(2) * pos).sum(1) / total
    cx = (w.sum(1) * pos).sum(1) / total
    var = ((w.sum(2) * (pos[None] - cy[:, None]) ** 2).sum(1)
           + (w.sum(1) * (pos[None] - cx[:, None]) ** 2).sum(1)) / total
    radius = var.clamp_min(1e-4).sqrt() * spread if fixed is None else torch.full((n,), fixed)
    v = F.avg_pool2d(F.grid_sample(x[:, None], _grid(radius, cy, cx, 2 * side), align_corners=False), 2).flatten(1)
    v = v - v.mean(1, keepdim=True)
    return v / v.norm(dim=1, keepdim=True).clamp_min(1e-6)


def nearest(queries: torch.Tensor, keys: torch.Tensor, k: int, both: bool = False, block: int = 2048) -> np.ndarray:
    """Unique pairs (i < j) int64 [m, 2] where key j is among query i's k nearest by cosine (unit rows
    [n, d], the same n images; never i with itself), and with `both` also query i among key j's."""
    import torch

    n = len(keys)
    k = min(k, n - 1)
    if k < 1:
        return np.zeros((0, 2), np.int64)
    out = []
    for rows, cols in ((queries, keys), (keys, queries)) if both else ((queries, keys),):
        for lo in range(0, n, block):
            sim = rows[lo:lo + block] @ cols.T                   # [b, n]
            sim[torch.arange(len(sim)), torch.arange(lo, lo + len(sim))] = -2.0
            nn_ = sim.topk(k, dim=1).indices                     # [b, k]
            at = torch.arange(lo, lo + len(sim))[:, None].expand_as(nn_)
            out.append(torch.stack([at.reshape(-1), nn_.reshape(-1)], 1))
    pairs = np.sort(torch.cat(out).numpy(), axis=1)
    return np.unique(pairs, axis=0)


def candidates(x: torch.Tensor, settings: CopySettings = DEFAULT_SETTINGS) -> np.ndarray:
    """Unique pairs (i < j) int64 [m, 2] of `x` [n, s, s]: each image's `k` nearest by `normalised`
    (moves), and by a fixed window around the centre of mass of the image zoomed in by `query_zoom`
    against the same window of the others (crops), either way."""
    v = normalised(x)
    keys = normalised(x, fixed=0.8)
    queries = normalised(zoom(x, settings.query_zoom), fixed=0.8)
    return np.unique(np.concatenate([nearest(v, v, settings.k), nearest(queries, keys, settings.k, both=True)]), axis=0)


# -- the tolerant distance -----------------------------------------------------------------------
def zoom(x: torch.Tensor, scale: float, dy: float = 0.0, dx: float = 0.0) -> torch.Tensor:
    """[n, s, s] zoomed in by `scale` about the centre and moved by (dy, dx) px (bilinear, zero fill)."""
    import torch
    import torch.nn.functional as F

    if scale == 1.0 and dy == 0.0 and dx == 0.0:
        return x
    n, s = len(x), x.shape[-1]
    grid = _grid(torch.full((n,), 1.0 / scale), torch.full((n,), -2.0 * dy / s), torch.full((n,), -2.0 * dx / s), s)
    return F.grid_sample(x[:, None], grid, align_corners=False, padding_mode="zeros")[:, 0]


def _grid(scale: torch.Tensor, ty: torch.Tensor, tx: torch.Tensor, side: int) -> torch.Tensor:
    """Sampling grid [n, side, side, 2] (x, y in -1..1, as `F.affine_grid` without rotation, align_corners
    False): output pixel centre u samples the input at scale * u + (tx, ty); scale, ty, tx [n]."""
    import torch

    n = len(scale)
    pos = (torch.arange(side, dtype=torch.float32) + 0.5) / side * 2 - 1
    gx = (scale[:, None, None] * pos.view(1, 1, side) + tx[:, None, None]).expand(n, side, side)
    gy = (scale[:, None, None] * pos.view(1, side, 1) + ty[:, None, None]).expand(n, side, side)
    return torch.stack([gx, gy], -1)


@dataclass(frozen=True)
class _Prepared:
    """Per image and zoom (1.0 first, then `scales`) what every pair needs: the spectrum of the image
    zero-padded to side x side, real and imaginary parts (re, im [Z, n, F], F = side * (side//2 + 1)),
    the sum and sum of squares of the image seen through each move (zero fill; win_sum, win_sq [Z, n, T]),
    and the real DFT that takes a cross spectrum to the cross-correlation at each move (basis_re,
    basis_im [F, T]): a matrix product instead of an inverse FFT, as only T of its side^2 values are used."""

    re: torch.Tensor
    im: torch.Tensor
    win_sum: torch.Tensor
    win_sq: torch.Tensor
    basis_re: torch.Tensor
    basis_im: torch.Tensor
    count: torch.Tensor    # float [T]: pixels in the overlap at each move
    shifts: torch.Tensor   # int64 [T, 2]: (dy, dx) of each move, dy-major


def _windows(x: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sums and sums of squares of `x` [n, s, s] over the part that stays in the frame after each move
    (dy, dx) in -m..m, dy-major -> [n, T] each (integral images)."""
    import torch
    import torch.nn.functional as F

    s = x.shape[-1]
    out = []
    for v in (x, x * x):
        cum = F.pad(v.double().cumsum(1).cumsum(2), (1, 0, 1, 0))  # [n, s+1, s+1]
        parts = []
        for dy in range(-m, m + 1):
            y0, y1 = max(0, dy), s + min(0, dy)
            for dx in range(-m, m + 1):
                x0, x1 = max(0, dx), s + min(0, dx)
                parts.append(cum[:, y1, x1] - cum[:, y0, x1] - cum[:, y1, x0] + cum[:, y0, x0])
        out.append(torch.stack(parts, 1).float())
    return out[0], out[1]


def _prepare(x: torch.Tensor, settings: CopySettings) -> _Prepared:
    import torch

    s, m = x.shape[-1], settings.max_shift
    side = s + m
    shifts = torch.tensor([(dy, dx) for dy in range(-m, m + 1) for dx in range(-m, m + 1)])
    re, im, sums, squares = [], [], [], []
    for z in (1.0, *settings.scales):
        xz = zoom(x, z)
        spec = torch.fft.rfft2(xz, s=(side, side)).flatten(1)
        re.append(spec.real.contiguous())
        im.append(spec.imag.contiguous())
        total, total_sq = _windows(xz, m)
        sums.append(total)
        squares.append(total_sq)
    # irfft2 at (dy, dx): sum over kept frequencies of weight * Re(X e^{2 pi i (ky dy + kx dx) / side}) / side^2
    ky = torch.arange(side, dtype=torch.float64)[:, None]
    kx = torch.arange(side // 2 + 1, dtype=torch.float64)[None]
    weight = torch.full((side, side // 2 + 1), 2.0, dtype=torch.float64)
    weight[:, 0] = 1.0
    if side % 2 == 0:
        weight[:, -1] = 1.0
    phase = 2 * torch.pi * (ky[None] * shifts[:, 0, None, None] + kx[None] * shifts[:, 1, None, None]) / side
    basis_re = (weight * torch.cos(phase)).flatten(1).T / side ** 2
    basis_im = (-weight * torch.sin(phase)).flatten(1).T / side ** 2
    count = ((s - shifts[:, 0].abs()) * (s - shifts[:, 1].abs())).float()
    return _Prepared(torch.stack(re), torch.stack(im), torch.stack(sums), torch.stack(squares),
                     basis_re.float().contiguous(), basis_im.float().contiguous(), count, shifts)


def _surface(p: _Prepared, za: int, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pearson r between images b (unzoomed) and a (zoom index za) moved by each allowed shift t, over
    the pixels where the two overlap (the strip a move empties is left out) -> [P, T]; at t, b(u) is
    compared with a(u + t). The cross-correlation is the cross spectrum times the DFT basis."""
    import torch

    ar, ai, br, bi = p.re[za, a], p.im[za, a], p.re[0, b], p.im[0, b]
    cross = (ar * br + ai * bi) @ p.basis_re + (ai * br - ar * bi) @ p.basis_im     # [P, T]
    sw, sww = p.win_sum[za, a], p.win_sq[za, a]
    sb, sbb = p.win_sum[0, b].flip(1), p.win_sq[0, b].flip(1)  # b over the overlap: its window at -shift
    cov = cross - sw * sb / p.count
    va, vb = sww - sw * sw / p.count, sbb - sb * sb / p.count
    r = cov / (va.clamp_min(1e-9) * vb.clamp_min(1e-9)).sqrt()
    # a (nearly) flat image over the overlap has no correlation with anything: without this, float error
    # in its variance (0 in exact arithmetic) gave a blank image r in the thousands against any other
    flat = (va < FLAT_VARIANCE * p.count) | (vb < FLAT_VARIANCE * p.count)
    return torch.where(flat, torch.zeros_like(r), r)


def _peak(r: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Surfaces [P, T] ((2m+1)^2 moves, dy-major) -> (best r, estimated by a parabola through the best
    move and its neighbours on each axis [P]; the move's dy, dx in px, fractional [P] each)."""
    import torch

    w = 2 * m + 1
    grid = r.view(-1, w, w)
    best = r.argmax(1)
    iy, ix = best // w, best % w
    rows = torch.arange(len(r))
    r0 = r[rows, best]
    gain, frac = [], []
    for i, get in ((iy, lambda j: grid[rows, j, ix]), (ix, lambda j: grid[rows, iy, j])):
        inner = (i > 0) & (i < w - 1)
        j = i.clamp(1, w - 2)
        lo, hi = get(j - 1), get(j + 1)
        curve = (2 * r0 - lo - hi).clamp_min(1e-9)
        delta = ((hi - lo) / (2 * curve)).clamp(-0.5, 0.5)
        up = (hi - lo) * delta / 2 - curve * delta * delta / 2
        gain.append(torch.where(inner, up.clamp_min(0), torch.zeros_like(up)))
        frac.append(torch.where(inner, delta, torch.zeros_like(delta)))
    return (r0 + gain[0] + gain[1]).clamp_max(1.0), (iy - m) + frac[0], (ix - m) + frac[1], r0


def gradients(x: torch.Tensor) -> torch.Tensor:
    """[n, s, s] -> [n, 3, s, s]: each image, its d/dx and d/dy (central differences, px units)."""
    import torch
    import torch.nn.functional as F

    k = torch.tensor([-0.5, 0.0, 0.5])
    gx = F.conv2d(F.pad(x[:, None], (1, 1, 0, 0), mode="replicate"), k.view(1, 1, 1, 3))[:, 0]
    gy = F.conv2d(F.pad(x[:, None], (0, 0, 1, 1), mode="replicate"), k.view(1, 1, 3, 1))[:, 0]
    return torch.stack([x, gx, gy], 1)


def _pearson(a: torch.Tensor, b: torch.Tensor, w: torch.Tensor):
    """Pearson r of a and b [P, s, s] over the weights w (0/1) -> (r, a and b centred and masked, a's
    sum of squares, the covariance)."""
    import torch

    count = w.sum((1, 2)).clamp_min(1)
    da = (a - (a * w).sum((1, 2))[:, None, None] / count[:, None, None]) * w
    db = (b - (b * w).sum((1, 2))[:, None, None] / count[:, None, None]) * w
    va, vb, cov = (da * da).sum((1, 2)), (db * db).sum((1, 2)), (da * db).sum((1, 2))
    r = cov / (va * vb).clamp_min(1e-12).sqrt()
    flat = (va < FLAT_VARIANCE * count) | (vb < FLAT_VARIANCE * count)  # as in `_surface`
    return torch.where(flat, torch.zeros_like(r), r), da, db, va, cov


def align(x3: torch.Tensor, x: torch.Tensor, src: torch.Tensor, dst: torch.Tensor, scale: torch.Tensor,
          ty: torch.Tensor, tx: torch.Tensor, steps: int, gates: tuple[float, ...] = ()) -> torch.Tensor:
    """1 - the Pearson r of each pair [P] after `steps` Gauss-Newton steps that fit image src, sampled at
    `scale` * u + (ty, tx) (normalised coordinates u in -1..1 about the centre; bilinear), to image dst,
    with the gain and offset in closed form at each step, over the pixels that sample inside src.
    `x3` = `gradients(x)`; scale, ty, tx [P]: the start (from the first check). A pair whose distance
    before step i is above `gates[i]` stops there (its distance then is returned)."""
    import torch
    import torch.nn.functional as F

    s = x.shape[-1]
    pos = (torch.arange(s, dtype=torch.float32) + 0.5) / s * 2 - 1
    px, py, lim = pos.view(1, 1, s), pos.view(1, s, 1), 1 - 1 / s
    out = torch.ones(len(src))
    live = torch.arange(len(src))
    b = x[dst]
    for step in range(steps + 1):
        n = len(live)
        gx = (scale[:, None, None] * px + tx[:, None, None]).expand(n, s, s)
        gy = (scale[:, None, None] * py + ty[:, None, None]).expand(n, s, s)
        w = ((gx.abs() <= lim) & (gy.abs() <= lim)).float()
        grid = torch.stack([gx, gy], -1)
        if step == steps:
            a = F.grid_sample(x3[src, :1], grid, align_corners=False)[:, 0]
            out[live] = (1 - _pearson(a, b, w)[0]).nan_to_num(1.0)
            return out
        if step < len(gates):  # the image alone first: the gradients only for the pairs that stay
            r = _pearson(F.grid_sample(x3[src, :1], grid, align_corners=False)[:, 0], b, w)[0]
            out[live] = (1 - r).nan_to_num(1.0)
            keep = torch.nonzero(out[live] <= gates[step]).flatten()
            if not len(keep):
                return out
            live, src, b, scale, ty, tx = live[keep], src[keep], b[keep], scale[keep], ty[keep], tx[keep]
            grid, w = grid[keep], w[keep]
        sampled = F.grid_sample(x3[src], grid, align_corners=False)          # [P, 3, s, s]
        r, da, db, va, cov = _pearson(sampled[:, 0], b, w)
        gain = cov / va.clamp_min(1e-12)
        res = db - gain[:, None, None] * da
        ax, ay = sampled[:, 1] * w, sampled[:, 2] * w
        jac = torch.stack([ax * px + ay * py, ay, ax], 1).flatten(2) * (gain * s / 2)[:, None, None]  # [P, 3, s*s]
        hess = jac @ jac.transpose(1, 2) + 1e-6 * torch.eye(3)
        d = torch.linalg.solve(hess, (jac @ res.flatten(1)[:, :, None])[:, :, 0]).nan_to_num(0.0)
        scale = (scale + d[:, 0]).clamp(0.7, 1.4)
        ty, tx = (ty + d[:, 1]).clamp(-0.5, 0.5), (tx + d[:, 2]).clamp(-0.5, 0.5)
    return out


def tolerant_distance(x: torch.Tensor, pairs: np.ndarray, settings: CopySettings = DEFAULT_SETTINGS,
                      chunk: int = 4096) -> np.ndarray:
    """1 - the best Pearson r of each pair (i, j) of `x` [n, s, s] over moves of the content -> float32 [m].

    First check: moves of up to `max_shift` px, at zoom 1 and at each of `scales` of either image. A
    pair whose best r there, refined to a fraction of a pixel by a parabola, is within `coarse` of 1 but
    not within `threshold` is then aligned continuously (`align`: zoom and shift, from that start) and
    keeps the better of the two."""
    import torch

    prep = _prepare(x, settings)
    x3 = gradients(x) if settings.steps > 0 else None
    s, nz = x.shape[-1], len(settings.scales)
    zooms = torch.tensor([1.0, *settings.scales])
    out = np.empty(len(pairs), np.float32)
    for lo in range(0, len(pairs), chunk):
        p = torch.from_numpy(np.asarray(pairs[lo:lo + chunk], np.int64))
        a, b = p[:, 0], p[:, 1]
        # transform 0: a vs b; 1..nz: zoomed a vs b; nz+1..2nz: zoomed b vs a
        surfaces = torch.stack([_surface(prep, 0, a, b)] + [_surface(prep, z, a, b) for z in range(1, nz + 1)]
                               + [_surface(prep, z, b, a) for z in range(1, nz + 1)])      # [Z, P, T]
        est, dy, dx, _ = (v.view(len(surfaces), -1) for v in _peak(surfaces.flatten(0, 1), settings.max_shift))
        est, best_t = est.max(0)                          # the transform whose refined peak is highest [P]
        rows = torch.arange(len(a))
        dy, dx = dy[best_t, rows], dx[best_t, rows]
        dist = 1.0 - surfaces.amax((0, 2))                # exact: the best whole move of any transform
        todo = torch.nonzero((dist > settings.threshold) & (1.0 - est <= settings.coarse)).flatten()
        if len(todo) and settings.steps > 0:
            t = best_t[todo]
            flip = t > nz                                      # the zoomed image is b: it moves onto a
            z = zooms[torch.where(flip, t - nz, t)]
            src, dst = torch.where(flip, b[todo], a[todo]), torch.where(flip, a[todo], b[todo])
            # dst(u) ~ zoomed src(u + d) = src((u + d) / z), in normalised coordinates (2 d / s)
            aligned = align(x3, x, src, dst, 1.0 / z, 2 * dy[todo] / s / z, 2 * dx[todo] / s / z, settings.steps,
                            settings.gates)
            dist[todo] = torch.where(aligned <= settings.aligned, aligned, dist[todo])
        out[lo:lo + chunk] = dist.numpy()
    return out


def class_pairs(pixels: np.ndarray, settings: CopySettings = DEFAULT_SETTINGS) -> tuple[np.ndarray, np.ndarray]:
    """Near-copy pairs of one class: (positions int64 [m, 2], i < j, into `pixels` [n, S, S(, C)]; their
    tolerant distances float32 [m]), sorted."""
    x = gray(pixels)
    cand = candidates(x, settings)
    if not len(cand):
        return cand, np.zeros(0, np.float32)
    dist = tolerant_distance(x, cand, settings)
    keep = dist <= settings.threshold
    return cand[keep], dist[keep]


def components(n: int, pairs: np.ndarray) -> np.ndarray:
    """Connected components of `pairs` [m, 2] over n items: a component id per item int64 [n] (the
    smallest member's position), singletons their own (scipy's `connected_components`)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    if n == 0:
        return np.zeros(0, np.int64)
    pairs = np.asarray(pairs, np.int64).reshape(-1, 2)
    graph = coo_matrix((np.ones(len(pairs), np.int8), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    count, labels = connected_components(graph, directed=False)
    smallest = np.full(count, n, np.int64)
    np.minimum.at(smallest, labels, np.arange(n))
    return smallest[labels]


def pairs_fingerprint(pairs: np.ndarray) -> str:
    """A short hash of a class's pairs [m, 2] (positions in the class): part of its tree's fingerprint."""
    data = np.ascontiguousarray(np.asarray(pairs, np.int64).reshape(-1, 2))
    return hashlib.blake2b(data.tobytes(), digest_size=8).hexdigest()
