"""Score generated shapes-world videos against their target scenes.

Input: videos `[B, T, 3, H, W]` (or `[T, 3, H, W]`; layout "BCTHW" for `[B, 3, T, H, W]`) with values in
`value_range` ((-1, 1) by default, (0, 1) also common), and one `SceneSpec` per video. `reading.analyse` reads the
attributes; this module matches them to the targets and scores:

* attributes: background, and per target shape colour / shape / size / initial direction / speed; the target is
  matched to the object of its colour, else to the largest unclaimed object (colour then counts as wrong); an
  attribute a short prompt leaves out (`ShapeSpec.omitted`) is not scored, and a left-out speed is judged by the
  speed the video shows (motion must still be steady and in the prompted direction);
* motion: per step, the velocity must be a reflection of the target velocity (each axis' magnitude within
  `0.25 * speed + 0.15 px` at 64 px) and an axis may only reverse after touching a wall; `velocity_match` is the
  fraction of usable steps that pass; `motion_correct` = direction and speed right and velocity_match >= 0.8 for
  every shape; `jitter` = mean |velocity change| between consecutive usable steps, in units of the target speed
  (0 for ideal motion);
* per frame (so drift in long rollouts shows): clean pixel fraction (explained as background/colour blends), target
  objects present, integrity (largest piece / all pixels of the colour), object count right, background right,
  edge sharpness; `frame_quality` is their mean.

`overall` = mean of attribute accuracy, motion correctness and mean frame quality.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor

from shapes.reading import analyse, to_frames, wall_contact
from shapes.world import COLOURS, DIRECTIONS, REFERENCE_SIDE, SHAPES, SIZES, SPEEDS, SceneSpec

ATTRIBUTES = ("colour", "shape", "size", "direction", "speed")
FRAME_METRICS = ("clean_fraction", "present", "integrity", "count_ok", "background_ok", "sharpness")


def _match(a: dict[str, Tensor], scenes: Sequence[SceneSpec], num: int) -> Tensor:
    """Detected colour index for each target `[B, S]` (-1 none, or padding beyond the scene's shapes)."""
    match = torch.full((len(scenes), num), -1, dtype=torch.long)
    for b, scene in enumerate(scenes):
        found = [int(c) for c in a["detected"][b].nonzero().flatten()]
        found.sort(key=lambda c: -float(a["best_area"][b, c].median()))
        wanted = [COLOURS.index(s.colour) for s in scene.shapes]
        for s, c in enumerate(wanted):
            if c in found:
                match[b, s] = c
                found.remove(c)
        for s in range(len(wanted)):
            if match[b, s] < 0 and found:
                match[b, s] = found.pop(0)
    return match


def _targets(scenes: Sequence[SceneSpec], num: int, scale: float, read_speed: Tensor) -> dict[str, Tensor]:
    """Target attribute indices `[B, S]` (-2 padding), velocity `[B, S, 2]` in px/frame and, per attribute,
    `stated_<name>` `[B, S]` (the prompt names it). A speed the prompt leaves out is the one read from the video
    (`read_speed` `[B, S]`, -1 when not read): motion is then judged against the speed the model chose."""
    idx = {name: torch.full((len(scenes), num), -2, dtype=torch.long) for name in ATTRIBUTES}
    stated = {name: torch.zeros(len(scenes), num, dtype=torch.bool) for name in ATTRIBUTES}
    vel = torch.zeros(len(scenes), num, 2)
    tables = {"colour": COLOURS, "shape": SHAPES, "size": tuple(SIZES), "direction": tuple(DIRECTIONS),
              "speed": tuple(SPEEDS)}
    for b, scene in enumerate(scenes):
        for s, spec in enumerate(scene.shapes):
            for name in ATTRIBUTES:
                idx[name][b, s] = tables[name].index(getattr(spec, name))
                stated[name][b, s] = spec.states(name)
            speed_name = spec.speed
            if not spec.states("speed") and read_speed[b, s] >= 0:
                speed_name = tables["speed"][int(read_speed[b, s])]
            vel[b, s] = torch.tensor(spec.unit_velocity()) * SPEEDS[speed_name] * REFERENCE_SIDE * scale
    return {**idx, "velocity": vel, **{f"stated_{name}": v for name, v in stated.items()}}


def _take(x: Tensor, match: Tensor) -> Tensor:
    """Per-colour tensor `[B, K, ...]` -> per-target `[B, S, ...]`."""
    index = match.clamp(min=0).reshape(*match.shape, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:])
    return x.gather(1, index.to(x.device))


def _reversals(velocity: Tensor, near: Tensor, target: Tensor) -> Tensor:
    """Steps `[B, S, T-1]` where an axis reverses (vs its previous clearly moving step) without a wall in between."""
    steps = velocity.shape[2]
    speed = target.abs()[:, :, None]                                          # [B, S, 1, 2]
    det = (velocity.abs() > 0.5 * speed) & (speed > 0)
    sign = torch.sign(velocity.nan_to_num(0))
    t_idx = torch.arange(steps)[None, None, :, None].expand_as(det)
    last = torch.where(det, t_idx, -1).cummax(2).values
    prev = torch.cat([torch.full_like(last[:, :, :1], -1), last[:, :, :-1]], 2)  # previous determinate step
    prev_sign = sign.gather(2, prev.clamp(min=0))
    walls = torch.cat([torch.zeros_like(near[:, :, :1], dtype=torch.long), near.long().cumsum(2)], 2)  # [.., T+1, 2]
    # frames prev .. t + 1 touched a wall (on that axis) -> the reversal is a bounce
    hits = walls.gather(2, t_idx + 2) - walls.gather(2, prev.clamp(min=0))
    return (det & (prev >= 0) & (sign != prev_sign) & (hits == 0)).any(-1)


def _motion_scores(a: dict[str, Tensor], match: Tensor, target: Tensor) -> dict[str, Tensor]:
    """Per target `[B, S]`: velocity_match, unexplained reversals, jitter; per step `step_ok`, `valid` [B, S, T-1]."""
    scale, h, w = float(a["scale"]), int(a["height"]), int(a["width"])
    found = match >= 0
    velocity, valid = _take(a["velocity"], match), _take(a["valid"], match) & found[..., None]
    speed = target.norm(dim=-1)[..., None, None]
    tol = 0.25 * speed + 0.15 * scale
    magnitude_ok = ((velocity.abs() - target.abs()[:, :, None]).abs() <= tol).all(-1)
    near = wall_contact(_take(a["bbox"], match), target.abs() + scale, h, w)
    unexplained = _reversals(velocity, near, target) & found[..., None]
    step_ok = valid & magnitude_ok & ~unexplained
    pairs = valid[..., 1:] & valid[..., :-1]
    accel = (velocity[..., 1:, :] - velocity[..., :-1, :]).norm(dim=-1) / speed[..., 0].clamp(min=1e-6)
    jitter = torch.where(pairs, accel, 0).sum(-1) / pairs.sum(-1).clamp(min=1)
    return {"velocity_match": step_ok.sum(-1) / valid.sum(-1).clamp(min=1),
            "unexplained_reversals": unexplained.sum(-1).float(),
            "jitter": jitter.masked_fill(pairs.sum(-1) == 0, float("nan")), "step_ok": step_ok, "valid": valid}


def _frame_scores(a: dict[str, Tensor], match: Tensor, colour_ok: Tensor, real: Tensor,
                  backgrounds: Tensor) -> dict[str, Tensor]:
    """Per-frame quality `[B, T]` for each of `FRAME_METRICS`."""
    n_targets = real.sum(1)[:, None]
    present = _take(a["present"], match) & colour_ok[..., None] & real[..., None]
    integrity = _take(a["best_area"] / a["total_area"].clamp(min=1), match) * present
    return {
        "clean_fraction": a["clean"],
        "present": present.float().sum(1) / n_targets,
        "integrity": integrity.sum(1) / n_targets,
        "count_ok": (a["big_components"] == n_targets).float(),
        "background_ok": (a["frame_background"] == backgrounds[:, None]).float(),
        "sharpness": a["sharpness"],
    }


def _score(a: dict[str, Tensor], scenes: Sequence[SceneSpec]) -> dict[str, Any]:
    num = max(len(s.shapes) for s in scenes)
    a = {k: v.cpu() for k, v in a.items()}
    match = _match(a, scenes, num)
    found = match >= 0
    tg = _targets(scenes, num, float(a["scale"]), torch.where(found, _take(a["speed"], match), -1))
    real = tg["colour"] >= 0
    stated = {n: tg[f"stated_{n}"] for n in ATTRIBUTES}  # only what the prompt names is scored
    right = {"colour": match == tg["colour"]}
    for name in ATTRIBUTES[1:]:
        right[name] = found & (_take(a[name], match) == tg[name])
    backgrounds = torch.tensor([COLOURS.index(s.background) for s in scenes])
    background_ok = a["background"] == backgrounds
    hits = background_ok.float() + sum((right[n] & stated[n]).sum(1) for n in ATTRIBUTES)
    attribute_accuracy = hits / (1 + sum(stated[n].sum(1) for n in ATTRIBUTES))
    motion = _motion_scores(a, match, tg["velocity"])
    motion_ok = right["direction"] & (right["speed"] | ~stated["speed"]) & (motion["velocity_match"] >= 0.8)
    motion_correct = (motion_ok | ~real).all(1).float()
    frames = _frame_scores(a, match, right["colour"], real, backgrounds)
    frame_quality = torch.stack([frames[m] for m in FRAME_METRICS]).mean(0)  # [B, T]
    return {
        "attribute_accuracy": attribute_accuracy, "background_ok": background_ok.float(),
        **{f"{n}_ok": right[n].float() for n in ATTRIBUTES}, "real": real, "stated": stated,
        "count_correct": (a["detected"].sum(1) == real.sum(1)).float(),
        "motion_correct": motion_correct, **motion, "frames": frames, "frame_quality": frame_quality,
        "overall": (attribute_accuracy + motion_correct + frame_quality.mean(1)) / 3,
    }


def _target_mean(x: Tensor, real: Tensor) -> float:
    keep = real & ~x.isnan()
    return float(x[keep].mean()) if keep.any() else float("nan")


def evaluate(videos: Tensor, scenes: Sequence[SceneSpec], value_range: tuple[float, float] = (-1.0, 1.0),
             layout: str = "BTCHW", per_video: bool = False) -> dict[str, Any]:
    """Score a batch of videos against their scenes -> a report of plain floats and lists (JSON/wandb ready).

    Keys: `overall`, `attribute_accuracy`, `<attr>_accuracy` for background/colour/shape/size/direction/speed
    (over videos or the target shapes whose prompt states it; `num_stated` counts those), `count_accuracy`,
    `motion_correct` (fraction of videos), `velocity_match`,
    `unexplained_reversals`, `jitter` (per target shape), `frame_quality` and each of `FRAME_METRICS` (means), and
    `per_frame`: for each of `FRAME_METRICS` + `frame_quality` a list of T means over the batch, and
    `velocity_match` a list of T-1. With `per_video`, also a list of per-video dicts.
    """
    frames = to_frames(videos, value_range, layout)
    if isinstance(scenes, SceneSpec):
        scenes = [scenes]
    if len(scenes) != frames.shape[0]:
        raise ValueError(f"got {frames.shape[0]} videos but {len(scenes)} scenes; expected one SceneSpec per video")
    sc = _score(analyse(frames), scenes)
    real = sc["real"]
    report: dict[str, Any] = {
        "num_videos": len(scenes),
        "overall": float(sc["overall"].mean()),
        "attribute_accuracy": float(sc["attribute_accuracy"].mean()),
        "background_accuracy": float(sc["background_ok"].mean()),
        **{f"{n}_accuracy": _target_mean(sc[f"{n}_ok"], sc["stated"][n]) for n in ATTRIBUTES},
        "num_stated": {n: int(sc["stated"][n].sum()) for n in ATTRIBUTES},
        "count_accuracy": float(sc["count_correct"].mean()),
        "motion_correct": float(sc["motion_correct"].mean()),
        **{k: _target_mean(sc[k], real) for k in ("velocity_match", "unexplained_reversals", "jitter")},
        "frame_quality": float(sc["frame_quality"].mean()),
        **{m: float(sc["frames"][m].mean()) for m in FRAME_METRICS},
    }
    steps = sc["valid"].sum((0, 1)).clamp(min=1)
    report["per_frame"] = {**{m: sc["frames"][m].mean(0).tolist() for m in FRAME_METRICS},
                           "frame_quality": sc["frame_quality"].mean(0).tolist(),
                           "velocity_match": (sc["step_ok"].sum((0, 1)) / steps).tolist()}
    if per_video:
        report["per_video"] = [
            {"overall": float(sc["overall"][b]), "attribute_accuracy": float(sc["attribute_accuracy"][b]),
             "motion_correct": bool(sc["motion_correct"][b]), "frame_quality": float(sc["frame_quality"][b].mean()),
             "background_ok": bool(sc["background_ok"][b]),
             "shapes": [{**{f"{n}_ok": bool(sc[f"{n}_ok"][b, s]) if sc["stated"][n][b, s] else None
                            for n in ATTRIBUTES},
                         "velocity_match": float(sc["velocity_match"][b, s])}
                        for s in range(int(real[b].sum()))]}
            for b in range(len(scenes))]
    return report
