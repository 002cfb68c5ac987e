"""Ablation (CPU): does a teacher learn to read the prompted direction sooner when a shape starts in the half it
moves away from (`utils.shapes.world.START_MARGIN` 0.5) than with near-uniform starts (0.25)?

    python benchmarks/ablation_start_margin.py MARGIN SECONDS [DIM LAYERS]     # e.g. 0.5 900 96 3
    python benchmarks/ablation_start_margin.py signal [N]                      # no training, seconds

`signal`: what a prompt attribute is worth to an x0 regression at sigma -> 1, where the best prediction is the mean
clip given the prompt. Colours are named by the prompt, so what is left to predict is where the shape is: the share
of the variance of the shape's mask (12 frames) that the attribute's group means explain, for both margins, over N
(default 6000) one-shape scenes. A share near the floor (groups - 1) / N is a signal the regression cannot see.
Trains a small bidirectional DiT (x0 head, shift-5 flow matching) from scratch on 12-frame one-shape clips of the
32x32 world (x2 codec) for SECONDS on one thread, then measures with `scripts/probe_shapes_teacher.measure` (on
scenes of the same world) how far each prompt attribute moves its x0 prediction. Prints the table and writes
runs/ablations/start_margin_<MARGIN>.json. Run both margins side by side (one core each) to compare.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from common import small_shapes_setup, train_on_shapes_frames  # noqa: E402
from pipeline.denoiser import Denoiser  # noqa: E402
from pipeline.schedule import FlowMatchSchedule  # noqa: E402
from scripts.probe_shapes_teacher import measure, print_table  # noqa: E402
from utils.shapes import world  # noqa: E402

FRAMES, SIZE, FACTOR = 12, 32, 2


def explained_shares(margin: float, n: int) -> dict[str, float]:
    from utils.shapes import render, sample_scenes
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


def signal(n: int) -> None:
    result = {"n": n, "floor_8_groups": 7 / n, "by_margin": {}}
    for margin in (0.25, 0.5):
        result["by_margin"][str(margin)] = shares = explained_shares(margin, n)
        print(f"START_MARGIN {margin}: share of the mask variance explained by "
              + " ".join(f"{a}={v:.4f}" for a, v in shares.items()) + f"  (floor for 8 groups ~{7 / n:.4f})")
    out = REPO / "runs" / "ablations" / "start_margin_signal.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")


def main() -> None:
    if sys.argv[1] == "signal":
        signal(int(sys.argv[2]) if len(sys.argv) > 2 else 6000)
        return
    margin, seconds = float(sys.argv[1]), float(sys.argv[2])
    dim, layers = (int(sys.argv[3]), int(sys.argv[4])) if len(sys.argv) > 4 else (96, 3)
    world.START_MARGIN = margin  # read at every draw of a scene
    text, codec, net = small_shapes_setup(dim, layers, FACTOR, "x0")
    loss, steps = train_on_shapes_frames(net, text, codec, 10**9, lr=5e-4, num_shapes=1, batch_size=16,
                                         log_every=200, label=f"margin {margin}", size=SIZE, frames=FRAMES,
                                         time_limit_s=seconds)
    net.eval()
    result = measure(Denoiser(net, FlowMatchSchedule(5.0), uniform_timestep=True), text, codec, FRAMES, SIZE, SIZE)
    result.update(start_margin=margin, seconds=seconds, steps=steps, last_loss=loss, dim=dim, layers=layers)
    print(f"start margin {margin}: {steps} steps in {seconds:.0f} s, last loss {loss:.4f}")
    print_table(result)
    out = REPO / "runs" / "ablations" / f"start_margin_{margin}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
