"""Read shapes-world attributes back out of frames, without knowing the target scene.

Per video: the background (mode of the border pixels over all frames -> palette colour); pixels unmixed against it
(`segment.unmix`: alpha > 0.5 is foreground, labelled by its palette colour); 8-connected components per colour.
Two shapes of a scene have distinct colours, so an object is "the largest component of a colour": a colour is an
object if that component has at least `min_area` pixels in half the frames. Per object and frame: the component's
bounding box, area and fill ratio (area / box area: square ~1.0, circle ~0.785, triangle ~0.5), and an
alpha-weighted centroid (sub-pixel, so velocities of antialiased shapes are exact). Steps where the object is near a
wall it moves towards (a bounce may happen) or overlaps another object are not used for motion.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from shapes.segment import border_mode, boundary_count, connected_components, unmix
from shapes.world import COLOURS, DIRECTIONS, REFERENCE_SIDE, SHAPES, SIZES, SPEEDS

# Fill-ratio thresholds between the shapes' ideal ratios (triangle 0.5 | circle 0.785 | square 1.0).
FILL_CIRCLE, FILL_SQUARE = 0.64, 0.9
DIRECTION_WINDOW = 4  # steps that define the initial direction: START_MARGIN keeps them free of bounces
OCCLUDED_AREA = 0.95  # an object touching another is occluded while its area is below this fraction of its largest
CLEAN_RESIDUAL = 0.1  # [0, 1] units: a pixel further than this from every background/colour blend is not clean


@dataclass
class ObjectReading:
    """What one object looks like; attributes are names from `world`, or "none" when unreadable (e.g. static)."""

    colour: str
    shape: str
    size: str
    direction: str
    speed: str
    presence: float            # fraction of frames in which it is present
    centroids: Tensor          # [T, 2] (x, y) in px, NaN where absent


@dataclass
class SceneReading:
    background: str
    objects: list[ObjectReading]  # by decreasing median area


def to_frames(videos: Tensor, value_range: tuple[float, float] = (-1.0, 1.0), layout: str = "BTCHW") -> Tensor:
    """Videos -> `[B, T, 3, H, W]` float in [0, 1].

    layout "BTCHW" (`[B, T, 3, H, W]` or `[T, 3, H, W]`, what the codec decodes to) or "BCTHW" (`[B, 3, T, H, W]`
    or `[3, T, H, W]`, what `world.render` makes). value_range: the (low, high) the pixel values span.
    """
    if layout not in ("BTCHW", "BCTHW"):
        raise ValueError(f"layout must be 'BTCHW' or 'BCTHW', got {layout!r}")
    lo, hi = (float(v) for v in value_range)
    if not hi > lo:
        raise ValueError(f"value_range must be (low, high) with high > low, got {value_range!r}")
    if videos.dim() == 4:
        videos = videos[None]
    if videos.dim() != 5:
        raise ValueError(f"expected a video [T, 3, H, W] or a batch [B, T, 3, H, W] ({layout}), "
                         f"got {list(videos.shape)}")
    if layout == "BCTHW":
        videos = videos.transpose(1, 2)
    if videos.shape[2] != 3 or videos.shape[1] < 2:
        raise ValueError(f"expected 3 channels and >= 2 frames in layout {layout}, got {list(videos.shape)}")
    return ((videos.float() - lo) / (hi - lo)).clamp(0, 1)


def _masked_median(x: Tensor, mask: Tensor, dim: int) -> Tensor:
    return torch.nanmedian(torch.where(mask, x, float("nan")), dim=dim).values


def _coords(flat_index: Tensor, h: int, w: int) -> tuple[Tensor, Tensor, Tensor]:
    """Flat indices into `[N, H, W]` -> (frame, y, x)."""
    pix = flat_index % (h * w)
    return flat_index // (h * w), pix // w, pix % w


def _pixel_stats(frames: Tensor, bg: Tensor, min_area: float) -> dict[str, Tensor]:
    """Per (frame, colour) stats of the largest component, flattened to `[N, K, ...]`, and per-frame stats `[N]`.

    Works on lists of foreground (or partly covered) pixels, a small part of each frame.
    """
    n, _, h, w = frames.shape
    k, hw, dev = len(COLOURS), h * w, frames.device
    colour, alpha, residual = unmix(frames, bg)
    labels = torch.where(alpha > 0.5, colour, -1)
    ids = connected_components(labels).flatten()
    p = (ids >= 0).nonzero().squeeze(1)
    frame, y, x = _coords(p, h, w)
    root, lab = ids[p], labels.flatten()[p]
    key = frame * hw + root                                 # component of each foreground pixel
    area = torch.zeros(n * hw, device=dev, dtype=torch.long).index_add_(0, key, torch.ones_like(key))
    nk = frame * k + lab
    score = area[key] * hw + root                           # largest area first, ties broken by the root index
    best = torch.full((n * k,), -1, device=dev, dtype=torch.long).scatter_reduce(0, nk, score, "amax")
    has = best >= 0
    best_area = torch.where(has, best // hw, 0)
    mine = score == best[nk]                                # pixels of their colour's largest component
    bbox = torch.stack([torch.full((n * k,), init, device=dev).scatter_reduce(0, nk[mine], c[mine], red)
                        for c, red, init in ((x, "amin", w), (y, "amin", h), (x, "amax", -1), (y, "amax", -1))], -1)
    bbox = torch.where(has[:, None], bbox, 0)               # [N*K, 4] x0, y0, x1, y1
    total = torch.zeros(n * k, device=dev, dtype=torch.long).index_add_(0, nk, torch.ones_like(nk))
    big_root = (root == p % hw) & (area[key] >= min_area)
    big = torch.zeros(n, device=dev, dtype=torch.long).index_add_(0, frame[big_root], torch.ones_like(p[big_root]))
    # Alpha-weighted centroid of colour c inside the (2-px grown) box of its largest component: partial edge
    # pixels count, so the centroid moves continuously with the shape.
    q = (alpha.flatten() > 0.01).nonzero().squeeze(1)
    qf, qy, qx = _coords(q, h, w)
    qk = qf * k + colour.flatten()[q]
    b = bbox[qk]
    inside = (qx >= b[:, 0] - 2) & (qx <= b[:, 2] + 2) & (qy >= b[:, 1] - 2) & (qy <= b[:, 3] + 2) & has[qk]
    wgt = alpha.flatten()[q] * inside
    sums = torch.zeros(n * k, 3, device=dev).index_add_(
        0, qk, torch.stack([wgt, wgt * (qx + 0.5), wgt * (qy + 0.5)], -1))
    soft = ((alpha > 0.1) & (alpha < 0.9)).flatten(1).sum(1).float()
    edge = boundary_count(labels).float()
    # A 1-px antialiasing ramp gives about one partial pixel per boundary pixel; blur widens the ramp.
    sharp = torch.where(soft > 0, (2 * edge / soft.clamp(min=1)).clamp(max=1), (edge > 0).float())
    return {"best_area": best_area.reshape(n, k).float(), "total_area": total.reshape(n, k).float(),
            "bbox": bbox.reshape(n, k, 4).float(),
            "centroid": (sums[:, 1:] / sums[:, :1].clamp(min=1e-6)).reshape(n, k, 2),
            "soft_area": sums[:, 0].reshape(n, k), "big_components": big,
            "clean": (residual < CLEAN_RESIDUAL).flatten(1).float().mean(1), "sharpness": sharp}


def analyse(frames: Tensor, chunk: int = 256) -> dict[str, Tensor]:
    """Everything the scores need, from frames `[B, T, 3, H, W]` in [0, 1] (see module docstring).

    Returns tensors: per video `background` [B]; per frame `frame_background`, `clean`, `sharpness`,
    `big_components` [B, T]; per colour and frame `present`, `occluded`, `best_area`, `total_area`, `soft_area`
    [B, K, T], `bbox` [B, K, T, 4], `centroid` [B, K, T, 2] (NaN where absent); per colour `detected`, `shape`,
    `size`, `direction`, `speed` [B, K] (indices into the world tables, -1 = "none"); per step `velocity`
    [B, K, T-1, 2], `valid` [B, K, T-1]; and `scale` (px per reference px), `height`, `width`.
    """
    b, t, _, h, w = frames.shape
    k = len(COLOURS)
    scale = min(h, w) / REFERENCE_SIDE
    min_area = 16 * scale ** 2
    flat = frames.reshape(b * t, 3, h, w)
    frame_bg = border_mode(flat).reshape(b, t)
    background = F.one_hot(frame_bg, k).sum(1).argmax(-1)
    bg = background.repeat_interleave(t)
    chunks = [_pixel_stats(flat[i:i + chunk], bg[i:i + chunk], min_area) for i in range(0, b * t, chunk)]
    st = {name: torch.cat([c[name] for c in chunks]) for name in chunks[0]}
    a = {name: st[name].reshape(b, t, k, *st[name].shape[2:]).transpose(1, 2)
         for name in ("best_area", "total_area", "soft_area", "bbox", "centroid")}
    a.update({name: st[name].reshape(b, t) for name in ("clean", "sharpness", "big_components")})
    present = a["best_area"] >= min_area                                      # [B, K, T]
    detected = (present.float().mean(-1) >= 0.5) & (torch.arange(k, device=frames.device) != background[:, None])
    a.update(background=background, frame_background=frame_bg, present=present, detected=detected,
             centroid=a["centroid"].masked_fill(~present[..., None], float("nan")),
             scale=torch.tensor(scale), height=torch.tensor(h), width=torch.tensor(w))
    a["occluded"] = _occlusion(a)
    a.update(_shape_and_size(a))
    a.update(_motion(a))
    return a


def _occlusion(a: dict[str, Tensor]) -> Tensor:
    """`[B, K, T]`: the object touches another (boxes grown by 1 px intersect) and has lost area to it. Only the
    shape behind loses pixels; the one in front keeps its area and its motion stays usable."""
    box, present = a["bbox"], a["present"]
    k = box.shape[1]
    lo, hi = box[..., :2] - 1, box[..., 2:] + 1
    meets = ((lo[:, :, None] <= hi[:, None]) & (lo[:, None] <= hi[:, :, None])).all(-1)  # [B, K, K, T]
    others = ~torch.eye(k, dtype=torch.bool, device=box.device)[..., None]
    meets &= (present & a["detected"][..., None])[:, None] & others
    soft_area = a["soft_area"].masked_fill(~present, 0)
    return meets.any(2) & present & (soft_area < OCCLUDED_AREA * soft_area.amax(-1, keepdim=True))


def _shape_and_size(a: dict[str, Tensor]) -> dict[str, Tensor]:
    """Shape: majority vote of the per-frame fill-ratio class; size: median box extent; over unoccluded frames."""
    good = a["present"] & ~a["occluded"]
    good = torch.where(good.any(-1, keepdim=True), good, a["present"])
    box = a["bbox"]
    bw, bh = box[..., 2] - box[..., 0] + 1, box[..., 3] - box[..., 1] + 1
    fill = a["best_area"] / (bw * bh).clamp(min=1)
    shape_t = torch.where(fill > FILL_SQUARE, SHAPES.index("square"),
                          torch.where(fill > FILL_CIRCLE, SHAPES.index("circle"), SHAPES.index("triangle")))
    shape = (F.one_hot(shape_t, len(SHAPES)) * good[..., None]).sum(2).argmax(-1)
    extent = _masked_median(torch.maximum(bw, bh), good, -1)
    threshold = float(a["scale"]) * REFERENCE_SIDE * sum(SIZES.values()) / 2
    return {"shape": shape, "size": (extent >= threshold).long()}              # index into SIZES (small, large)


def _motion(a: dict[str, Tensor]) -> dict[str, Tensor]:
    """Velocities, usable steps (both frames present, unoccluded, no wall within reach on a moving axis), the
    initial direction (first `DIRECTION_WINDOW` usable steps) and the speed class (median |velocity|)."""
    centroid, present, occluded = a["centroid"], a["present"], a["occluded"]
    velocity = centroid[..., 1:, :] - centroid[..., :-1, :]                    # [B, K, T-1, 2]
    both = present[..., 1:] & present[..., :-1]
    slow = SPEEDS["slow"] * float(a["scale"]) * REFERENCE_SIDE
    axis_speed = _masked_median(velocity.abs(), both[..., None], -2)          # [B, K, 2]
    near = wall_contact(a["bbox"], axis_speed.nan_to_num(0) + 1, int(a["height"]), int(a["width"]))
    moving = (axis_speed > 0.25 * slow)[..., None, :]
    bounce = ((near[..., 1:, :] | near[..., :-1, :]) & moving).any(-1)
    valid = both & ~(occluded[..., 1:] | occluded[..., :-1]) & ~bounce
    # Fallbacks for objects hidden or at a wall in every step: occluded steps, then any steps.
    usable = valid
    for fallback in (both & ~bounce, both):
        usable = torch.where(usable.any(-1, keepdim=True), usable, fallback)
    first = usable & (usable.cumsum(-1) <= DIRECTION_WINDOW)
    mean_v = torch.where(first[..., None], velocity, 0.0).sum(-2) / first.sum(-1, keepdim=True).clamp(min=1)
    dirs = torch.tensor([DIRECTIONS[d] for d in DIRECTIONS], dtype=torch.float32, device=velocity.device)
    direction = (mean_v @ (dirs / dirs.norm(dim=-1, keepdim=True)).T).argmax(-1)
    direction = torch.where(mean_v.norm(dim=-1) < 0.3 * slow, -1, direction)
    speed_px = _masked_median(velocity.norm(dim=-1), usable, -1)
    speed = torch.where(speed_px < math.sqrt(SPEEDS["fast"] / SPEEDS["slow"]) * slow, 0, 1)  # geometric mean
    speed = torch.where(speed_px.isnan() | (speed_px < 0.3 * slow), -1, speed)
    return {"velocity": velocity, "valid": valid, "direction": direction, "speed": speed}


def wall_contact(box: Tensor, margin: Tensor, height: int, width: int) -> Tensor:
    """Per axis, whether a box `[..., T, 4]` lies within `margin` `[..., 2]` px of a wall: `[..., T, 2]`."""
    m = margin[..., None, :]
    low = box[..., :2] <= m
    high = box[..., 2:] >= torch.tensor([width - 1, height - 1], device=box.device) - m
    return low | high


def read_scenes(videos: Tensor, value_range: tuple[float, float] = (-1.0, 1.0),
                layout: str = "BTCHW") -> list[SceneReading]:
    """The attributes visible in each video (see `to_frames` for the accepted layouts and ranges)."""
    a = analyse(to_frames(videos, value_range, layout))
    names = {"shape": SHAPES, "size": tuple(SIZES), "direction": tuple(DIRECTIONS), "speed": tuple(SPEEDS)}
    out = []
    for b in range(a["background"].shape[0]):
        ks = [int(c) for c in a["detected"][b].nonzero().flatten()]
        ks.sort(key=lambda c: -float(a["best_area"][b, c].median()))
        objects = [ObjectReading(COLOURS[c], *[tab[int(a[key][b, c])] if int(a[key][b, c]) >= 0 else "none"
                                              for key, tab in names.items()],
                                 presence=float(a["present"][b, c].float().mean()), centroids=a["centroid"][b, c])
                   for c in ks]
        out.append(SceneReading(COLOURS[int(a["background"][b])], objects))
    return out
