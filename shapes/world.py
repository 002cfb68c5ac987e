"""The shapes world: attributes, the held-out split, the scene sampler and the batched renderer.

A scene is a background colour and one or two shapes; each shape has a kind, a colour, a size, a direction and a speed
(the attributes a prompt names) plus a start position (not named; drawn from a `torch.Generator`). Shapes move in a
straight line and bounce off the walls (position and velocity reflected at the borders), so a video of any length is
defined and any frame can be rendered on its own.

Geometry is relative to the shorter frame side `min(H, W)` (`REFERENCE_SIDE` = 64 px gives the numbers in comments),
so the same scene renders at any resolution. Pixel `i` covers `[i, i + 1)`; positions are shape centres in pixels.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Optional, Sequence

import torch
from torch import Tensor

# Corners of the RGB cube pulled in to 0.1/0.9: any two colours differ by >= 0.8 in some channel, so the nearest
# palette colour survives blur and noise, and values stay off the [-1, 1] clamp of the pixel codec.
PALETTE: dict[str, tuple[float, float, float]] = {
    "red": (0.9, 0.1, 0.1),
    "green": (0.1, 0.9, 0.1),
    "blue": (0.1, 0.1, 0.9),
    "yellow": (0.9, 0.9, 0.1),
    "cyan": (0.1, 0.9, 0.9),
    "magenta": (0.9, 0.1, 0.9),
    "white": (0.9, 0.9, 0.9),
    "black": (0.1, 0.1, 0.1),
}
COLOURS: tuple[str, ...] = tuple(PALETTE)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
# Side of the shape's bounding box as a fraction of min(H, W): 12 and 20 px at 64 (3 and 5 latent cells of 4 px).
SIZES: dict[str, float] = {"small": 12 / 64, "large": 20 / 64}
# Speed along the direction, fraction of min(H, W) per frame: 1 and 2 px/frame at 64 (16 and 32 px/s at 16 fps).
SPEEDS: dict[str, float] = {"slow": 1 / 64, "fast": 2 / 64}
# Image axes: x to the right, y DOWN, so "up" is -y.
DIRECTIONS: dict[str, tuple[int, int]] = {
    "left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1),
    "up_left": (-1, -1), "up_right": (1, -1), "down_left": (-1, 1), "down_right": (1, 1),
}
REFERENCE_SIDE = 64
# A shape starts at least this fraction of its free range away from the walls it heads to: the first frames show the
# prompt's direction before any bounce (at 0 the evaluator reads the direction of rendered clips right only 78% of
# the time). 0.25 still lets 12% of shapes bounce within a 12-frame training clip; at 0.5 none did, and
# the first student to follow the prompted direction, trained at 0.5, ran into the walls instead of bouncing in 10x
# rollouts. The 0.5 margin was meant to make the direction say where a shape is (6.0% of a clip's mask variance
# against 1.45%, `benchmarks/ablation_start_margin.py signal`); what the teacher lacked was an arrow of time
# (`frame_causal_fraction`, docs/shapes_world.md).
START_MARGIN = 0.25
# Two shapes stay apart for this many frames, so both show their colour, shape and direction unoccluded first.
SEPARATE_FRAMES = 8
SPLITS = ("train", "heldout", "all")
# Attributes a short prompt may leave out ("a red circle moves left on a blue background"): the scene still has
# them, drawn by the sampler like every other attribute, and the evaluator does not score them.
OMITTABLE: tuple[str, ...] = ("size", "speed")
# The subsets a short prompt leaves out, drawn uniformly for each shape of a short-prompt scene.
OMISSIONS: tuple[tuple[str, ...], ...] = (("size",), ("speed",), ("size", "speed"))

# Attribute combinations never sampled in the train split (a scene is held out if ANY of its shapes has one).
HELDOUT_SHAPE_COLOUR: frozenset[tuple[str, str]] = frozenset(
    {("circle", "green"), ("square", "magenta"), ("triangle", "yellow")})
HELDOUT_COLOUR_BACKGROUND: frozenset[tuple[str, str]] = frozenset(
    {("red", "white"), ("blue", "black"), ("cyan", "magenta")})
HELDOUT_SHAPE_DIRECTION: frozenset[tuple[str, str]] = frozenset({("square", "up_left"), ("triangle", "down")})


def _check(name: str, value: str, options: Sequence[str]) -> None:
    if value not in options:
        raise ValueError(f"{name} must be one of {list(options)}, got {value!r}")


@dataclass(frozen=True)
class ShapeSpec:
    """One moving shape. `start` = (x, y) start position as a fraction in [0, 1] of the range the centre can take;
    `omitted`: attributes of `OMITTABLE` its prompt leaves out (the shape still has them)."""

    shape: str
    colour: str
    size: str
    direction: str
    speed: str
    start: tuple[float, float] = (0.5, 0.5)
    omitted: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _check("shape", self.shape, SHAPES)
        _check("colour", self.colour, COLOURS)
        _check("size", self.size, tuple(SIZES))
        _check("direction", self.direction, tuple(DIRECTIONS))
        _check("speed", self.speed, tuple(SPEEDS))
        if len(self.start) != 2 or not all(0.0 <= float(u) <= 1.0 for u in self.start):
            raise ValueError(f"start must be (x, y) fractions in [0, 1], got {self.start!r}")
        object.__setattr__(self, "omitted", tuple(self.omitted))
        if any(name not in OMITTABLE for name in self.omitted) or len(set(self.omitted)) != len(self.omitted):
            raise ValueError(f"omitted must name distinct attributes of {list(OMITTABLE)}, got {self.omitted!r}")

    def states(self, attribute: str) -> bool:
        """Whether this shape's prompt names `attribute`."""
        return attribute not in self.omitted

    def unit_velocity(self) -> tuple[float, float]:
        """Direction of motion scaled to length 1 (x, y), y pointing down."""
        dx, dy = DIRECTIONS[self.direction]
        norm = math.hypot(dx, dy)
        return dx / norm, dy / norm


@dataclass(frozen=True)
class SceneSpec:
    """A background and 1..2 shapes (distinct colours, none equal to the background); later shapes are drawn on top."""

    background: str
    shapes: tuple[ShapeSpec, ...]

    def __post_init__(self) -> None:
        _check("background", self.background, COLOURS)
        if isinstance(self.shapes, list):
            object.__setattr__(self, "shapes", tuple(self.shapes))
        if (not isinstance(self.shapes, tuple) or not 1 <= len(self.shapes) <= 2
                or not all(isinstance(s, ShapeSpec) for s in self.shapes)):
            raise ValueError(f"shapes must be a tuple of 1 or 2 ShapeSpec, got {self.shapes!r}")
        colours = [s.colour for s in self.shapes]
        if self.background in colours:
            raise ValueError(f"a shape has the background colour {self.background!r}; they must differ")
        if len(set(colours)) != len(colours):
            raise ValueError(f"shapes must have distinct colours, got {colours}")


def heldout_reasons(scene: SceneSpec) -> list[str]:
    """The held-out combinations a scene contains, e.g. `["shape_colour=(circle, green)"]`; empty for train scenes."""
    reasons = []
    for s in scene.shapes:
        if (s.shape, s.colour) in HELDOUT_SHAPE_COLOUR:
            reasons.append(f"shape_colour=({s.shape}, {s.colour})")
        if (s.colour, scene.background) in HELDOUT_COLOUR_BACKGROUND:
            reasons.append(f"colour_background=({s.colour}, {scene.background})")
        if (s.shape, s.direction) in HELDOUT_SHAPE_DIRECTION:
            reasons.append(f"shape_direction=({s.shape}, {s.direction})")
    return reasons


def is_heldout(scene: SceneSpec) -> bool:
    """True iff the scene contains a held-out attribute combination (never sampled with split="train")."""
    return bool(heldout_reasons(scene))


def _centre(spec: ShapeSpec, frame: int, side: float) -> tuple[float, float]:
    """Centre (x, y) in px of a shape at `frame` in a square frame of `side` px: the formula of `_positions` in
    Python floats (the sampler calls this for every candidate scene; tensors cost ~100x more host time here)."""
    half = SIZES[spec.size] * side / 2
    span = side - 2 * half
    centre = []
    for start, unit in zip(spec.start, spec.unit_velocity()):
        x = (start * span + unit * SPEEDS[spec.speed] * side * frame) % (2 * span)
        centre.append(half + (2 * span - x if x > span else x))
    return centre[0], centre[1]


def _overlap_early(scene: SceneSpec) -> bool:
    """Whether the two shapes' boxes come within 1 px of each other in the first `SEPARATE_FRAMES` frames (reference
    square frame)."""
    a, b = scene.shapes
    reach = (SIZES[a.size] + SIZES[b.size]) * REFERENCE_SIDE / 2 + 1
    for frame in range(SEPARATE_FRAMES):
        (ax, ay), (bx, by) = _centre(a, frame, REFERENCE_SIDE), _centre(b, frame, REFERENCE_SIDE)
        if abs(ax - bx) < reach and abs(ay - by) < reach:
            return True
    return False


def start_range(step: int, margin: Optional[float] = None) -> tuple[float, float]:
    """Where a shape may start along one axis, as a fraction of its free range: heading to the wall at 1 (step > 0)
    it starts below 1 - margin, heading to 0 above margin, anywhere when still along that axis. margin: START_MARGIN
    unless given (read at each call, so ablations may change it)."""
    margin = START_MARGIN if margin is None else margin
    return (0.0, 1.0 - margin) if step > 0 else (margin, 1.0) if step < 0 else (0.0, 1.0)


def _draw_scene(generator: torch.Generator, counts: Sequence[int], short_fraction: float = 0.0) -> SceneSpec:
    # One fixed draw of 32 numbers a scene (at most 19 used): the prompt form takes the last ones, so the same
    # generator gives the same scenes whatever `short_fraction` is.
    u = iter(torch.rand(32, generator=generator, dtype=torch.float64).tolist())

    def pick(options: Sequence):
        return options[min(int(next(u) * len(options)), len(options) - 1)]

    count = pick(counts)
    background = pick(COLOURS)
    free = [c for c in COLOURS if c != background]
    shapes = []
    for _ in range(count):
        colour = pick(free)
        free.remove(colour)
        direction = pick(tuple(DIRECTIONS))
        start = []
        for step in DIRECTIONS[direction]:
            lo, hi = start_range(step)
            start.append(lo + (hi - lo) * next(u))
        shapes.append(ShapeSpec(pick(SHAPES), colour, pick(tuple(SIZES)), direction, pick(tuple(SPEEDS)),
                                (start[0], start[1])))
    if short_fraction > 0 and next(u) < short_fraction:
        shapes = [replace(s, omitted=pick(OMISSIONS)) for s in shapes]
    return SceneSpec(background, tuple(shapes))


def sample_scenes(n: int, generator: torch.Generator, split: str = "train",
                  num_shapes: int | Sequence[int] = (1, 2), short_fraction: float = 0.0) -> list[SceneSpec]:
    """`n` random scenes, deterministic given the generator's state.

    split: "train" (no held-out combination), "heldout" (at least one), "all" (no filter).
    num_shapes: a count or the counts to draw from uniformly. Two shapes do not overlap in the first
    `SEPARATE_FRAMES` frames.
    short_fraction: the chance that a scene's prompt is a short form, leaving out one of `OMISSIONS` per shape;
    the attributes it leaves out are drawn as always (the same scenes as at 0, only `omitted` differs).
    """
    _check("split", split, SPLITS)
    if not 0.0 <= short_fraction <= 1.0:
        raise ValueError(f"short_fraction must be in [0, 1], got {short_fraction}")
    counts = (num_shapes,) if isinstance(num_shapes, int) else tuple(num_shapes)
    if not counts or any(c not in (1, 2) for c in counts):
        raise ValueError(f"num_shapes must be 1, 2 or a sequence of them, got {num_shapes!r}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    scenes = []
    for _ in range(n):
        for _draw in range(10_000):
            scene = _draw_scene(generator, counts, short_fraction)
            if len(scene.shapes) == 2 and _overlap_early(scene):
                continue
            if split == "all" or is_heldout(scene) == (split == "heldout"):
                break
        else:  # pragma: no cover - the split filters accept a quarter or more of all scenes
            raise RuntimeError(f"could not sample a {split!r} scene")
        scenes.append(scene)
    return scenes


def _scene_tensors(scenes: Sequence[SceneSpec], height: int, width: int, device) -> dict[str, Tensor]:
    """Per-shape numbers padded to the largest shape count: `[B, S]` ids/sizes, `[B, S, 2]` vectors, `[B, S, 3]` rgb."""
    if not scenes:
        raise ValueError("scenes is empty; expected at least one SceneSpec")
    side = float(min(height, width))
    num = max(len(s.shapes) for s in scenes)
    shape_id, half, present = [], [], []
    vel, start, rgb = [], [], []
    for scene in scenes:
        padded = list(scene.shapes) + [scene.shapes[0]] * (num - len(scene.shapes))
        present.append([i < len(scene.shapes) for i in range(num)])
        shape_id.append([SHAPES.index(s.shape) for s in padded])
        half.append([SIZES[s.size] * side / 2 for s in padded])
        vel.append([[c * SPEEDS[s.speed] * side for c in s.unit_velocity()] for s in padded])
        start.append([list(s.start) for s in padded])
        rgb.append([PALETTE[s.colour] for s in padded])
    f = dict(device=device, dtype=torch.float32)
    return {"shape_id": torch.tensor(shape_id, device=device), "half": torch.tensor(half, **f),
            "present": torch.tensor(present, device=device), "velocity": torch.tensor(vel, **f),
            "start": torch.tensor(start, **f), "rgb": torch.tensor(rgb, **f),
            "background": torch.tensor([PALETTE[s.background] for s in scenes], **f)}


def _fold(p: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
    """Unbounded straight-line positions -> positions bouncing between lo and hi (a triangle wave of period 2L)."""
    span = hi - lo
    x = torch.remainder(p - lo, 2 * span)
    return lo + torch.where(x > span, 2 * span - x, x)


def _positions(t: dict[str, Tensor], frames: Tensor, height: int, width: int) -> Tensor:
    size = torch.tensor([width, height], device=frames.device, dtype=torch.float32)
    lo = t["half"][..., None]                                  # [B, S, 1]
    hi = size - lo                                             # [B, S, 2]
    if (hi <= lo).any():
        raise ValueError(f"a shape does not fit into a {height}x{width} frame")
    p0 = lo + t["start"] * (hi - lo)
    p = p0[:, :, None] + t["velocity"][:, :, None] * frames[None, None, :, None]
    return _fold(p, lo[:, :, None], hi[:, :, None])          # [B, S, T, 2]


def trajectories(scenes: Sequence[SceneSpec], num_frames: int, height: int = 64, width: int = 64,
                 start_frame: int = 0) -> Tensor:
    """Shape centres `[B, S, T, 2]` (x, y in pixels) of frames `start_frame ..`; NaN for padding shapes."""
    t = _scene_tensors(scenes, height, width, "cpu")
    frames = torch.arange(start_frame, start_frame + num_frames, dtype=torch.float32)
    pos = _positions(t, frames, height, width)
    return pos.masked_fill(~t["present"][:, :, None, None], float("nan"))


def _signed_distance(shape_id: Tensor, centre: Tensor, half: Tensor, xs: Tensor, ys: Tensor) -> Tensor:
    """Signed distance in px (negative inside) `[B, T, H, W]`; shape_id/half `[B]`, centre `[B, T, 2]`."""
    dx = xs[None, None, None, :] - centre[..., 0, None, None]
    dy = ys[None, None, :, None] - centre[..., 1, None, None]
    r = half[:, None, None, None]
    circle = torch.sqrt(dx * dx + dy * dy) - r
    qx, qy = dx.abs() - r, dy.abs() - r
    square = torch.sqrt(qx.clamp(min=0) ** 2 + qy.clamp(min=0) ** 2) + torch.maximum(qx, qy).clamp(max=0)
    # Apex up, base at the bottom of the box; the max of the three edge half-planes is exact along edges, which is
    # all the 1-px antialiasing ramp needs.
    s5 = math.sqrt(5.0)
    triangle = torch.maximum(dy - r, (2 * dx.abs() - (dy + r)) / s5)
    kind = shape_id[:, None, None, None]
    return torch.where(kind == 0, circle, torch.where(kind == 1, square, triangle))


def render(scenes: Sequence[SceneSpec], num_frames: int, height: int = 64, width: int = 64, *,
           start_frame: int = 0, antialias: bool = True, device: Optional[torch.device | str] = None) -> Tensor:
    """Render scenes -> video `[B, 3, T, H, W]` float32 in [-1, 1] (the latent codec's input layout).

    Deterministic: a function of the scenes (start positions included) and the frame indices only, so frames
    `start_frame .. start_frame + num_frames - 1` of a long video equal the same slice of a longer render.
    antialias: coverage ramp of 1 px across the edge (a pixel centre inside the shape has coverage > 0.5).
    """
    if num_frames < 1 or height < 1 or width < 1:
        raise ValueError(f"num_frames, height, width must be >= 1, got {num_frames}, {height}, {width}")
    t = _scene_tensors(scenes, height, width, device)
    dev = t["half"].device
    frames = torch.arange(start_frame, start_frame + num_frames, device=dev, dtype=torch.float32)
    centres = _positions(t, frames, height, width)
    xs = torch.arange(width, device=dev, dtype=torch.float32) + 0.5
    ys = torch.arange(height, device=dev, dtype=torch.float32) + 0.5
    video = t["background"][:, :, None, None, None].expand(-1, -1, num_frames, height, width)
    for s in range(centres.shape[1]):
        dist = _signed_distance(t["shape_id"][:, s], centres[:, s], t["half"][:, s], xs, ys)
        alpha = (0.5 - dist).clamp(0, 1) if antialias else (dist < 0).float()
        alpha = (alpha * t["present"][:, s, None, None, None])[:, None]          # [B, 1, T, H, W]
        video = video * (1 - alpha) + t["rgb"][:, s, :, None, None, None] * alpha
    return video * 2 - 1
