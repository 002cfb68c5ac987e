"""Ablation (CPU, ~2 min): can a tiny DiT read the background colour from the prompt, for a given text encoder?

    python benchmarks/ablation_text_encoder.py FOLDER STEPS     # FOLDER holds text_encoder/ + tokenizer/

Trains a 3-layer, 64-wide DiT on single 64x64 frames of the shapes world, then predicts x0 from pure noise (sigma 1:
the prompt alone) and checks the median colour against the prompted background. Results of the run that chose the
shipped encoder: benchmarks/results/shapes_ablations_cpu.json (1500 steps: random UMT5 45%, context-mixing 100%).
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import positional_args, shapes_frames, train_on_shapes_frames  # noqa: E402
from model.config import WanConfig  # noqa: E402
from model.pixel_codec import PixelShuffleCodec  # noqa: E402
from model.text_encoder import TextEncoder  # noqa: E402
from model.wan import WanDiT  # noqa: E402
from shapes.world import COLOURS, PALETTE  # noqa: E402


def main() -> None:
    folder, steps = positional_args(__doc__, (2,))
    steps = int(steps)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    text = TextEncoder.from_diffusers_folder(folder, text_len=32, device="cpu")
    codec = PixelShuffleCodec(spatial_factor=4)
    net = WanDiT(WanConfig(dim=64, ffn_dim=128, num_heads=2, num_layers=3, text_dim=64, text_len=32, freq_dim=32,
                           in_dim=48, out_dim=48))
    net.init_weights()
    loss, _ = train_on_shapes_frames(net, text, codec, steps, lr=1e-3, log_every=200, label=folder)
    palette = torch.tensor([PALETTE[c] for c in COLOURS])
    scenes, x0, context = shapes_frames(text, codec, 128, torch.Generator().manual_seed(99))
    with torch.no_grad():
        noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(7))
        x0_pred = noise - net(noise, torch.full((128,), 1000.0), context)   # sigma 1: from the prompt alone
    pixels = codec.decode_to_pixel(x0_pred)[:, 0] * 0.5 + 0.5               # [B, 3, H, W]
    median = pixels.flatten(2).median(dim=2).values                         # [B, 3]
    nearest = ((median[:, None] - palette[None]) ** 2).sum(-1).argmin(-1)
    correct = sum(COLOURS[int(i)] == s.background for i, s in zip(nearest, scenes))
    print(f"{folder}: final loss {loss:.4f}  background accuracy {correct / len(scenes):.3f}")


if __name__ == "__main__":
    main()
