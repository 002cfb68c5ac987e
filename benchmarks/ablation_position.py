"""Ablation (CPU): can the shapes DiT place a shape by ABSOLUTE position, as the best high-noise prediction of a
prompted direction needs (a shape heading left starts in the right half: `benchmarks/ablation_start_margin.py
ideal`)? The Wan DiT knows positions only relative to each other (3-D RoPE in self-attention, no absolute
embedding), and shapes teachers trained without frame-causal steps learnt every attribute but direction.

    python benchmarks/ablation_position.py VARIANT SECONDS [--dim 96 --layers 3]     # CPU, one thread
    python benchmarks/ablation_position.py VARIANT SECONDS --device cuda --batch-size 256   # a GPU: many more steps

Trains a small bidirectional DiT (x0 head, shift-5 flow matching) from scratch on the FIRST frame of one-shape
scenes of the 32x32 world (x2 codec, START_MARGIN 0.5): there the prompted direction says only where the shape is.
VARIANT "rope": the DiT as it is. "coords": the same DiT given two more input channels holding each cell's x and y
(in [-1, 1]), clean at every noise level: an absolute position it can read. "coords_noised": the coordinates as two
more latent channels instead, noised and denoised like the others (at sigma 0.9 mostly noise).
Then measures with `scripts/probe_shapes_teacher.measure` how far each prompt attribute moves the x0 prediction. If
"rope" moves with colour but not with direction while "coords" moves with both, the missing absolute position is
the cause. Prints the table and writes runs/ablations/position_<VARIANT>.json. Run both side by side (one core each).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from common import small_shapes_setup, train_and_probe, write_probe_result  # noqa: E402
from model.wan import WanDiT  # noqa: E402
from shapes import world  # noqa: E402

SIZE, FACTOR, MARGIN = 32, 2, 0.5
VARIANTS = ("rope", "coords", "coords_noised")


def coordinates(latent: torch.Tensor) -> torch.Tensor:
    """`[B, F, 2, h, w]`: each latent cell's x and y in [-1, 1], for latents `[B, F, C, h, w]`."""
    b, f, _, h, w = latent.shape
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    return torch.stack([xs, ys]).to(latent)[None, None].expand(b, f, 2, h, w)


class WithCoordinates(torch.nn.Module):
    """A DiT of `C + 2` input/output channels that sees the clean coordinates beside the `C` latent channels and
    answers for those `C` (its x0 head turns x0 into flow channel by channel, so the extra two are simply dropped)."""

    def __init__(self, net: WanDiT):
        super().__init__()
        self.net, self.config = net, net.config

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, **kwargs) -> torch.Tensor:
        return self.net(torch.cat([x, coordinates(x)], dim=2), t, context, **kwargs)[:, :, :-2]


class CoordinateCodec:
    """A latent codec whose latents carry two extra constant channels: each cell's x and y in [-1, 1]."""

    def __init__(self, codec):
        self.codec = codec
        self.latent_channels = codec.latent_channels + 2

    def encode_to_latent(self, video: torch.Tensor) -> torch.Tensor:
        latent = self.codec.encode_to_latent(video)                     # [B, F, C, h, w]
        return torch.cat([latent, coordinates(latent)], dim=2)

    def decode_to_pixel(self, latent: torch.Tensor) -> torch.Tensor:
        return self.codec.decode_to_pixel(latent[:, :, :-2])


def build(variant: str, dim: int, layers: int):
    """(text encoder, codec, fresh DiT) of a variant; both DiTs start from the same seed."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    text, codec, net = small_shapes_setup(dim, layers, FACTOR, "x0")
    if variant != "rope":
        channels = codec.latent_channels + 2
        torch.manual_seed(0)
        net = WanDiT(dataclasses.replace(net.config, in_dim=channels, out_dim=channels))
        net.init_weights()
        if variant == "coords":
            net = WithCoordinates(net)
        else:
            codec = CoordinateCodec(codec)
    return text, codec, net


def run(variant: str, seconds: float, dim: int = 96, layers: int = 3, num_scenes: int = 32, device: str = "cpu",
        batch_size: int = 16) -> dict:
    default, world.START_MARGIN = world.START_MARGIN, MARGIN  # read at every draw of a scene
    try:
        text, codec, net = build(variant, dim, layers)
        result = train_and_probe(net.to(device), text, codec, seconds, 1, SIZE, variant, num_scenes, batch_size)
    finally:
        world.START_MARGIN = default
    result.update(variant=variant, start_margin=MARGIN, dim=dim, layers=layers, device=str(device))
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("variant", choices=VARIANTS)
    p.add_argument("seconds", type=float, help="training time")
    p.add_argument("--dim", type=int, default=96)
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--name", help="result name (default: position_<variant>[_<device type>])")
    args = p.parse_args(argv)
    result = run(args.variant, args.seconds, args.dim, args.layers, device=args.device, batch_size=args.batch_size)
    suffix = "" if args.device == "cpu" else f"_{torch.device(args.device).type}"
    write_probe_result(result, args.name or f"position_{args.variant}{suffix}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
