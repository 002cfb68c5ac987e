"""Ablation (CPU, ~20 min at 5000 steps): flow prediction vs x0 prediction for a DiT whose tokens carry as many
values as it is wide (the shapes world's 192 = 2x2 patch x 48 latent channels, in a 192-wide model), and how wide a
token should be for the model (the codec's pixel-unshuffle factor: a token is 2F x 2F pixels, 12 F^2 values).

    python benchmarks/ablation_prediction.py flow|x0 STEPS DIM LAYERS [FACTOR SIZE]   # e.g. x0 5000 192 2 (4 64)

Trains on single SIZE x SIZE frames (one shape) with the same flow-matching loss for both (`WanConfig.prediction`:
with "x0" the head outputs the clean latent and the model returns (x_t - x0) / max(sigma, 0.05)), then reports the x0
error in pixels at four noise levels (the same for every FACTOR: the codec only rearranges pixels) and writes 8
samples (24 Euler steps) under the ground truth to runs/ablations/prediction_<mode>_<steps>[_f<F>_s<S>].png.
Results: benchmarks/results/shapes_ablations_cpu.json.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from common import positional_args, shapes_frames, small_shapes_setup, train_on_shapes_frames  # noqa: E402
from pipeline.solvers import euler_sampler_sigmas  # noqa: E402



def main() -> None:
    args = positional_args(__doc__, (4, 6))
    mode, steps, dim, layers = args[0], int(args[1]), int(args[2]), int(args[3])
    factor, size = (int(args[4]), int(args[5])) if len(args) == 6 else (4, 64)
    text, codec, net = small_shapes_setup(dim, layers, factor, mode)
    train_on_shapes_frames(net, text, codec, steps, lr=5e-4, num_shapes=1, label=mode, size=size)
    _, x0, context = shapes_frames(text, codec, 64, torch.Generator().manual_seed(99), num_shapes=1, size=size)
    errors = []
    with torch.no_grad():
        for s in (0.2, 0.5, 0.8, 0.95):
            noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(7))
            x_t = (1 - s) * x0 + s * noise
            x0_pred = x_t - s * net(x_t, torch.full((64,), s * 1000), context)
            errors.append(f"s={s}: {float(((x0_pred - x0) ** 2).mean()):.4f}")
        x = torch.randn(8, *x0.shape[1:], generator=torch.Generator().manual_seed(3))
        sigmas = euler_sampler_sigmas(24, 5.0)
        for i in range(24):
            flow = net(x, torch.full((8,), float(sigmas[i]) * 1000), context[:8])
            x = x + (float(sigmas[i + 1]) - float(sigmas[i])) * flow
    truth = codec.decode_to_pixel(x0[:8])[:, 0] * 0.5 + 0.5
    samples = (codec.decode_to_pixel(x)[:, 0] * 0.5 + 0.5).clamp(0, 1)
    grid = torch.cat(list(torch.cat([truth, samples], 2)), 2).permute(1, 2, 0)
    suffix = "" if (factor, size) == (4, 64) else f"_f{factor}_s{size}"
    image = REPO / "runs" / "ablations" / f"prediction_{mode}_{steps}{suffix}.png"
    image.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((grid.numpy() * 255).astype(np.uint8)).save(image)
    print(mode, "x0 mse", " ".join(errors), f"(samples: {image})")


if __name__ == "__main__":
    main()
