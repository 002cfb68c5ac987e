"""What a shapes-world teacher listens to: which prompt attributes move its x0 prediction, and whether it models
the order and the motion of frames. Cheap (a few forward passes, CPU is fine), so it can diagnose a teacher before
it is distilled.

    python scripts/probe_shapes_teacher.py --run runs/shapes --output probe.json

Prompt sensitivity: the same noisy clips (one shape each) denoised under their true prompt and under the prompt with
one attribute changed (direction reversed, speed swapped, colour, shape, size changed); reported is the mean squared
change of the x0 prediction, next to the squared change of the text embedding. A teacher that ignores an attribute
changes its prediction ~0 for it: its samples cannot follow that attribute (CFG only amplifies a difference).
Order: the x0 error on the clip as rendered, reversed in time (the motion opposite to the prompt), frames shuffled,
and frozen on its first frame. A teacher that follows directions has a larger error reversed than as rendered.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from scripts.evaluate_shapes import load_networks, load_stage_config, stage_files, write_json_atomic  # noqa: E402

def _changed(scene: Any, attribute: str) -> Any:
    """`scene` with its (only) shape's `attribute` changed to another valid value."""
    from shapes.world import COLOURS, DIRECTIONS, SHAPES, SIZES
    shape = scene.shapes[0]
    if attribute == "direction":  # the opposite one
        dx, dy = DIRECTIONS[shape.direction]
        value = next(d for d, v in DIRECTIONS.items() if v == (-dx, -dy))
    elif attribute == "speed":
        value = "slow" if shape.speed == "fast" else "fast"
    else:
        options = {"colour": COLOURS, "shape": SHAPES, "size": SIZES}[attribute]
        value = next(v for v in options if v != getattr(shape, attribute) and v != scene.background)
    return dataclasses.replace(scene, shapes=(dataclasses.replace(shape, **{attribute: value}),))


def probe(run: Path, num_scenes: int = 32, timesteps: tuple[float, ...] = (900.0, 700.0, 500.0), seed: int = 0,
          stage: str = "teacher") -> dict[str, Any]:
    """Probe a stage of a shapes-world run (its EMA weights, on the CPU)."""
    from pipeline.denoiser import Denoiser
    from pipeline.schedule import FlowMatchSchedule
    from shapes.components import shapes_codec
    cfg = load_stage_config(run, stage)
    net, text = load_networks(cfg, stage_files(run, stage, "ema")[1], torch.device("cpu"), torch.float32)
    schedule = FlowMatchSchedule(cfg.rollout.generator_shift, cfg.model.num_train_timestep)
    found = measure(Denoiser(net, schedule, uniform_timestep=True), text, shapes_codec(cfg),
                    cfg.rollout.image_or_video_shape[1], cfg.inference.height, cfg.inference.width, num_scenes,
                    timesteps, seed)
    return {"run": str(run), "stage": stage, **found}


def measure(denoiser: Any, text: Any, codec: Any, frames: int, height: int, width: int, num_scenes: int = 32,
            timesteps: tuple[float, ...] = (900.0, 700.0, 500.0), seed: int = 0) -> dict[str, Any]:
    """Prompt sensitivity and clip errors (see the module's text) of a bidirectional `denoiser` (uniform timestep)
    on `num_scenes` one-shape train scenes of the world as it is now."""
    from shapes import render, sample_scenes, short_prompt
    schedule = denoiser.schedule
    scenes = sample_scenes(num_scenes, torch.Generator().manual_seed(seed), split="train", num_shapes=1)
    device = next(denoiser.model.parameters()).device  # the text encoder and the codec may stay on the CPU
    x0 = codec.encode_to_latent(render(scenes, frames, height, width)).to(device)
    context = text([short_prompt(s) for s in scenes]).to(device)
    attributes = ("direction", "speed", "colour", "shape", "size")
    changed = {a: text([short_prompt(_changed(s, a)) for s in scenes]).to(device) for a in attributes}
    order = torch.randperm(frames, generator=torch.Generator().manual_seed(seed + 1)).to(device)
    clips = {"as_rendered": x0, "reversed": x0.flip(1), "shuffled": x0[:, order],
             "first_frame_frozen": x0[:, :1].expand_as(x0).contiguous()}
    gen = torch.Generator().manual_seed(seed + 2)
    out: dict[str, Any] = {"num_scenes": num_scenes, "frames": frames, "by_timestep": {}}
    with torch.no_grad():
        for t_value in timesteps:
            noise = torch.randn(x0.shape, generator=gen).to(device)
            t = torch.full(x0.shape[:2], t_value, device=device)
            x_t = schedule.add_noise(x0, noise, t)
            _, pred = denoiser(x_t, t, context)
            entry = {"sigma": float(schedule.sigma(torch.tensor(t_value))),
                     "x0_error": float(((pred - x0) ** 2).mean()), "prompt_change": {}, "clip_error": {}}
            for attribute, other in changed.items():
                _, moved = denoiser(x_t, t, other)
                entry["prompt_change"][attribute] = {
                    "prediction_change": float(((moved - pred) ** 2).mean()),
                    "embedding_change": float(((other - context) ** 2).mean() / (context ** 2).mean())}
            for name, clip in clips.items():
                _, p = denoiser(schedule.add_noise(clip, noise, t), t, context)
                entry["clip_error"][name] = float(((p - clip) ** 2).mean())
            out["by_timestep"][str(int(t_value))] = entry
    return out


def print_table(result: dict[str, Any]) -> None:
    print(f"{'t':>4} {'sigma':>5} {'x0 err':>7}  prediction change per prompt attribute  |  x0 error per clip")
    for t_value, e in result["by_timestep"].items():
        changes = " ".join(f"{a}={v['prediction_change']:.5f}" for a, v in e["prompt_change"].items())
        clips = " ".join(f"{c}={v:.4f}" for c, v in e["clip_error"].items())
        print(f"{t_value:>4} {e['sigma']:5.2f} {e['x0_error']:7.4f}  {changes}  |  {clips}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="the --out folder of scripts/shapes_world.py")
    p.add_argument("--stage", default="teacher", help="a bidirectional stage of the run (default: teacher)")
    p.add_argument("--num-scenes", type=int, default=32, help="one-shape scenes of the train split (default: 32)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", help="write the JSON here")
    args = p.parse_args(argv)
    if not (Path(args.run) / args.stage).is_dir():
        p.error(f"{args.run} has no stage folder {args.stage!r}")
    result = probe(Path(args.run), args.num_scenes, seed=args.seed, stage=args.stage)
    print_table(result)
    if args.output:
        write_json_atomic(args.output, result)
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
