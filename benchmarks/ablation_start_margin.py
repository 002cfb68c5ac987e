"""Ablation (CPU): does a teacher learn to read the prompted direction sooner when a shape starts in the half it
moves away from (0.5, a value `shapes.world.START_MARGIN` once had) than with near-uniform starts (0.25)?

    python benchmarks/ablation_start_margin.py MARGIN SECONDS [DIM LAYERS]     # e.g. 0.5 900 96 3
    python benchmarks/ablation_start_margin.py signal [N]                      # no training, seconds
    python benchmarks/ablation_start_margin.py ideal [N]                       # no training, seconds

`signal`: what a prompt attribute is worth to an x0 regression at sigma -> 1, where the best prediction is the mean
clip given the prompt. Colours are named by the prompt, so what is left to predict is where the shape is: the share
of the variance of the shape's mask (12 frames) that the attribute's group means explain, for both margins, over N
(default 6000) one-shape scenes. A share near the floor (groups - 1) / N is a signal the regression cannot see.
`ideal`: the same question in the units of `scripts/probe_shapes_teacher.py`: how much the best prediction at
sigma -> 1 (the mean latent clip given the prompt, over N start positions) changes when one attribute of a fixed
prompt changes (direction reversed, speed, colour, size swapped), for both margins. A teacher whose own change for an
attribute is far below this has not learnt it, whatever the attribute's share of the variance.
Trains a small bidirectional DiT (x0 head, shift-5 flow matching) from scratch on 12-frame one-shape clips of the
32x32 world (x2 codec) for SECONDS on one thread, then measures with `scripts/probe_shapes_teacher.measure` (on
scenes of the same world) how far each prompt attribute moves its x0 prediction. Prints the table and writes
runs/ablations/start_margin_<MARGIN>.json. Run both margins side by side (one core each) to compare.
"""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from common import (positional_args, small_shapes_setup, train_and_probe, write_ablation,  # noqa: E402
                    write_probe_result)
from shapes import world  # noqa: E402

FRAMES, SIZE, FACTOR = 12, 32, 2


def explained_shares(margin: float, n: int) -> dict[str, float]:
    from shapes import render, sample_scenes
    default, world.START_MARGIN = world.START_MARGIN, margin  # read at every draw of a scene
    try:
        scenes = sample_scenes(n, torch.Generator().manual_seed(0), num_shapes=1)
    finally:
        world.START_MARGIN = default
    masks = []
    for i in range(0, n, 500):
        batch = scenes[i:i + 500]
        video = render(batch, FRAMES, SIZE, SIZE)                                   # [B, 3, T, H, W] in [-1, 1]
        background = torch.tensor([world.PALETTE[s.background] for s in batch]) * 2 - 1
        masks.append(((video - background[:, :, None, None, None]).abs().sum(1) > 0.5).float())
    x = torch.cat(masks).flatten(1)
    total = ((x - x.mean(0)) ** 2).sum(1).mean()
    shares = {}
    for attribute in ("direction", "speed", "shape", "size"):
        keys = [getattr(s.shapes[0], attribute) for s in scenes]
        group_means = {k: x[[i for i, kk in enumerate(keys) if kk == k]].mean(0) for k in set(keys)}
        explained = sum(keys.count(k) * ((m - x.mean(0)) ** 2).sum() for k, m in group_means.items())
        shares[attribute] = float(explained / n / total)
    return shares


def ideal_changes(margin: float, n: int, seed: int = 0) -> dict[str, float]:
    """Mean squared change (per latent element) of the mean clip of "a large red circle moves quickly left on a blue
    background" when one attribute changes, starts drawn as the world draws them at `margin`."""
    from model.pixel_codec import PixelShuffleCodec
    from shapes import render
    codec = PixelShuffleCodec(spatial_factor=FACTOR)
    base = world.ShapeSpec("circle", "red", "large", "left", "fast")
    changed = {"direction": {"direction": "right"}, "speed": {"speed": "slow"}, "colour": {"colour": "green"},
               "size": {"size": "small"}}
    starts = torch.rand(n, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).tolist()

    def mean_clip(spec: "world.ShapeSpec") -> torch.Tensor:
        scenes = []
        for u in starts:  # the same uniform draws for every prompt, mapped into the direction's start range
            start = []
            for step, r in zip(world.DIRECTIONS[spec.direction], u):
                lo, hi = world.start_range(step, margin)
                start.append(lo + (hi - lo) * r)
            scenes.append(world.SceneSpec("blue", (dataclasses.replace(spec, start=(start[0], start[1])),)))
        total = 0
        for i in range(0, n, 500):
            total = total + codec.encode_to_latent(render(scenes[i:i + 500], FRAMES, SIZE, SIZE)).sum(0)
        return total / n

    reference = mean_clip(base)
    return {a: float(((mean_clip(dataclasses.replace(base, **kw)) - reference) ** 2).mean())
            for a, kw in changed.items()}


def ideal(n: int) -> None:
    result = {"n": n, "prompt": "a large red circle moves quickly left on a blue background", "by_margin": {}}
    for margin in (0.25, 0.5):
        result["by_margin"][str(margin)] = changes = ideal_changes(margin, n)
        print(f"START_MARGIN {margin}: best sigma->1 prediction changes by "
              + " ".join(f"{a}={v:.2e}" for a, v in changes.items()))
    print(f"wrote {write_ablation(result, 'start_margin_ideal')}")


def signal(n: int) -> None:
    result = {"n": n, "floor_8_groups": 7 / n, "by_margin": {}}
    for margin in (0.25, 0.5):
        result["by_margin"][str(margin)] = shares = explained_shares(margin, n)
        print(f"START_MARGIN {margin}: share of the mask variance explained by "
              + " ".join(f"{a}={v:.4f}" for a, v in shares.items()) + f"  (floor for 8 groups ~{7 / n:.4f})")
    print(f"wrote {write_ablation(result, 'start_margin_signal')}")


def main() -> None:
    no_training = {"signal": (signal, 6000), "ideal": (ideal, 3000)}  # (measure, default N)
    args = positional_args(__doc__, (1, 2, 4))
    if args[0] in no_training:
        measure_fn, default_n = no_training[args[0]]
        measure_fn(int(args[1]) if len(args) > 1 else default_n)
        return
    positional_args(__doc__, (2, 4))  # MARGIN SECONDS [DIM LAYERS]
    margin, seconds = float(args[0]), float(args[1])
    dim, layers = (int(args[2]), int(args[3])) if len(args) == 4 else (96, 3)
    world.START_MARGIN = margin  # read at every draw of a scene
    text, codec, net = small_shapes_setup(dim, layers, FACTOR, "x0")
    result = train_and_probe(net, text, codec, seconds, FRAMES, SIZE, f"margin {margin}")
    result.update(start_margin=margin, dim=dim, layers=layers)
    write_probe_result(result, f"start_margin_{margin}")


if __name__ == "__main__":
    main()
