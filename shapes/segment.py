"""Pixel-level reading of shapes-world frames: palette unmixing against the background, and connected components.

Everything is vectorised torch (CPU or GPU); no scipy. Frames are `[N, 3, H, W]` in [0, 1].
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from shapes.world import PALETTE

_NEIGHBOURS_8 = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]


def palette_tensor(device: torch.device | str | None = None) -> Tensor:
    """`[K, 3]` palette colours in [0, 1], in the order of `world.COLOURS`."""
    return torch.tensor(list(PALETTE.values()), dtype=torch.float32, device=device)


def nearest_colour(pixels: Tensor) -> Tensor:
    """Palette index of each pixel: `[..., 3]` in [0, 1] -> `[...]` long."""
    pal = palette_tensor(pixels.device)
    return torch.cdist(pixels.reshape(-1, 3).float(), pal).argmin(-1).reshape(pixels.shape[:-1])


def border_mode(frames: Tensor) -> Tensor:
    """Most frequent nearest palette colour of the one-pixel border of each frame: `[N, 3, H, W]` -> `[N]`."""
    border = torch.cat([frames[..., 0, :], frames[..., -1, :], frames[..., 1:-1, 0], frames[..., 1:-1, -1]], -1)
    idx = nearest_colour(border.transpose(1, 2))                                  # [N, P]
    counts = F.one_hot(idx, len(PALETTE)).sum(1)                                   # [N, K]
    return counts.argmax(-1)


def unmix(frames: Tensor, background: Tensor, chunk: int = 128) -> tuple[Tensor, Tensor, Tensor]:
    """Explain each pixel as a blend `bg + alpha * (c - bg)` of the background with one palette colour c != bg.

    An antialiased (or blurred) edge of a shape is exactly such a blend, whereas its nearest palette colour can be a
    third colour (half red + half blue is as close to magenta as to either); unmixing reads edges correctly.
    frames `[N, 3, H, W]` in [0, 1], background `[N]` palette indices ->
    colour `[N, H, W]` (best c), alpha `[N, H, W]` in [0, 1], residual `[N, H, W]` (distance to that blend).
    """
    pal = palette_tensor(frames.device)
    out = []
    for start in range(0, frames.shape[0], chunk):
        x = frames[start:start + chunk].float().flatten(2)                        # [n, 3, P]
        bg = pal[background[start:start + chunk]]                                  # [n, 3]
        q = x - bg[:, :, None]
        d = pal[None] - bg[:, None]                                                # [n, K, 3]
        dd = (d * d).sum(-1)                                                       # [n, K]
        qd = torch.einsum("nkc,ncp->nkp", d, q)
        alpha = (qd / dd.clamp(min=1e-6)[..., None]).clamp(0, 1)
        res2 = (q * q).sum(1)[:, None] - 2 * alpha * qd + alpha * alpha * dd[..., None]
        res2 = res2.masked_fill(dd[..., None] < 1e-6, float("inf"))                # the background itself
        best_res2, colour = res2.min(1)
        out.append((colour, alpha.gather(1, colour[:, None])[:, 0], best_res2.clamp(min=0).sqrt()))
    shape = frames.shape[:1] + frames.shape[2:]
    return tuple(torch.cat(parts).reshape(shape) for parts in zip(*out))  # type: ignore[return-value]


def _shifted(x: Tensor, dy: int, dx: int, fill: int) -> Tensor:
    """x[n, i + dy, j + dx] with `fill` outside the frame: `[N, H, W]`."""
    h, w = x.shape[-2:]
    padded = F.pad(x, (1, 1, 1, 1), value=fill)
    return padded[:, 1 + dy:1 + dy + h, 1 + dx:1 + dx + w]


def _runs(labels: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    """Along `dim` of `[N, H, W]` labels: run counter times a base above any id, and each pixel's run-end index."""
    size = labels.shape[dim]
    change = labels.narrow(dim, 1, size - 1) != labels.narrow(dim, 0, size - 1)
    first = torch.zeros_like(labels.narrow(dim, 0, 1), dtype=torch.bool)
    run = torch.cat([first, change], dim).long().cumsum(dim)
    pos = torch.arange(size, device=labels.device).reshape([-1 if d == dim else 1 for d in range(3)])
    ends = torch.cat([change, ~first], dim)               # the last pixel of each run
    # run end of each pixel = the first run end at or after it: a reversed cummin over end positions.
    end_pos = torch.where(ends, pos, size).flip(dim).cummin(dim).values.flip(dim)
    return run * (labels.shape[1] * labels.shape[2] + 1), end_pos


def _run_max(ids: Tensor, base: Tensor, end: Tensor, dim: int) -> Tensor:
    """Max of ids over each run along `dim`: a segmented cummax (the run counter in `base` keeps an earlier run's
    values below a later run's), read at the run's last pixel."""
    big = ids.shape[1] * ids.shape[2] + 1
    scanned = (base + ids + 1).cummax(dim).values
    return scanned.gather(dim, end) % big - 1


def connected_components(labels: Tensor, max_iters: int = 10_000) -> Tensor:
    """8-connected components of equal labels; `labels` `[N, H, W]` long with -1 = background.

    Returns ids `[N, H, W]` long: -1 on background, else the largest flat pixel index (`y * W + x`) of the
    component, so `ids == arange` marks one root pixel per component. Each iteration spreads the maximum along whole
    row and column runs (so convex shapes finish in a couple of iterations), then to diagonal neighbours, then jumps
    pointers (an id is a pixel of the same component whose own id is at least as large).
    """
    n, h, w = labels.shape
    flat = torch.arange(h * w, device=labels.device).expand(n, -1).reshape(n, h, w)
    ids = torch.where(labels >= 0, flat, torch.full_like(flat, -1))
    rows, cols = _runs(labels, 2), _runs(labels, 1)
    diagonal = [(dy, dx) for dy, dx in _NEIGHBOURS_8 if dy and dx]
    same = [_shifted(labels, dy, dx, -2) == labels for dy, dx in diagonal]
    for _ in range(max_iters):
        new = _run_max(_run_max(ids, *rows, 2), *cols, 1)
        for (dy, dx), ok in zip(diagonal, same):
            new = torch.maximum(new, torch.where(ok, _shifted(new, dy, dx, -1), -1))
        jumped = new.reshape(n, -1)
        jumped = torch.where(jumped >= 0, jumped.gather(1, jumped.clamp(min=0)), jumped)
        new = jumped.reshape(n, h, w)
        if torch.equal(new, ids):
            return ids
        ids = new
    raise RuntimeError(f"connected components did not converge in {max_iters} iterations")


def boundary_count(labels: Tensor) -> Tensor:
    """Per frame, the foreground pixels with a 4-neighbour of another label: `[N, H, W]` -> `[N]` (a perimeter)."""
    edge = torch.zeros_like(labels, dtype=torch.bool)
    for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1)):
        edge |= _shifted(labels, dy, dx, -1) != labels
    return (edge & (labels >= 0)).flatten(1).sum(1)
