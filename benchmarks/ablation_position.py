"""Ablation (CPU): can the shapes DiT place a shape by ABSOLUTE position, as the best high-noise prediction of a
prompted direction needs (a shape heading left starts in the right half: `benchmarks/ablation_start_margin.py
ideal`)? The Wan DiT knows positions only relative to each other (3-D RoPE in self-attention, no absolute
embedding), and attempts 5-7's teachers learnt every attribute but direction.

    python benchmarks/ablation_position.py VARIANT SECONDS [DIM LAYERS]     # e.g. rope 600 96 3

Trains a small bidirectional DiT (x0 head, shift-5 flow matching) from scratch on the FIRST frame of one-shape
scenes of the 32x32 world (x2 codec, START_MARGIN 0.5): there the prompted direction says only where the shape is.
VARIANT "rope": the DiT as it is. "coords": the same DiT, its latent given two constant channels holding the x and y
coordinate of each cell (in [-1, 1]; noised and denoised like the others), i.e. an absolute position it can read.
Then measures with `scripts/probe_shapes_teacher.measure` how far each prompt attribute moves the x0 prediction. If
"rope" moves with colour but not with direction while "coords" moves with both, the missing absolute position is
the cause. Prints the table and writes runs/ablations/position_<VARIANT>.json. Run both side by side (one core each).
"""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from common import small_shapes_setup, train_and_probe, write_probe_result  # noqa: E402
from model.wan import WanDiT  # noqa: E402
from utils.shapes import world  # noqa: E402

SIZE, FACTOR, MARGIN = 32, 2, 0.5
VARIANTS = ("rope", "coords")


class CoordinateCodec:
    """A latent codec whose latents carry two extra constant channels: each cell's x and y in [-1, 1]."""

    def __init__(self, codec):
        self.codec = codec
        self.latent_channels = codec.latent_channels + 2

    def encode_to_latent(self, video: torch.Tensor) -> torch.Tensor:
        latent = self.codec.encode_to_latent(video)                     # [B, F, C, h, w]
        b, f, _, h, w = latent.shape
        ys, xs = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
        coords = torch.stack([xs, ys]).to(latent)[None, None].expand(b, f, 2, h, w)
        return torch.cat([latent, coords], dim=2)

    def decode_to_pixel(self, latent: torch.Tensor) -> torch.Tensor:
        return self.codec.decode_to_pixel(latent[:, :, :-2])


def build(variant: str, dim: int, layers: int):
    """(text encoder, codec, fresh DiT) of a variant; both DiTs start from the same seed."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    text, codec, net = small_shapes_setup(dim, layers, FACTOR, "x0")
    if variant == "coords":
        codec = CoordinateCodec(codec)
        torch.manual_seed(0)
        net = WanDiT(dataclasses.replace(net.config, in_dim=codec.latent_channels, out_dim=codec.latent_channels))
        net.init_weights()
    return text, codec, net


def run(variant: str, seconds: float, dim: int = 96, layers: int = 3, num_scenes: int = 32) -> dict:
    default, world.START_MARGIN = world.START_MARGIN, MARGIN  # read at every draw of a scene
    try:
        text, codec, net = build(variant, dim, layers)
        result = train_and_probe(net, text, codec, seconds, 1, SIZE, variant, num_scenes)
    finally:
        world.START_MARGIN = default
    result.update(variant=variant, start_margin=MARGIN, dim=dim, layers=layers)
    return result


def main() -> None:
    variant, seconds = sys.argv[1], float(sys.argv[2])
    dim, layers = (int(sys.argv[3]), int(sys.argv[4])) if len(sys.argv) > 4 else (96, 3)
    write_probe_result(run(variant, seconds, dim, layers), f"position_{variant}")


if __name__ == "__main__":
    main()
