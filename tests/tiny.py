"""Tiny configurations shared by the CPU tests (one place, so every test agrees on them)."""
from __future__ import annotations

import torch

from model.config import WanConfig
from model.wan import WanDiT


def tiny_config(**overrides) -> WanConfig:
    base = dict(dim=32, ffn_dim=64, num_heads=2, num_layers=2, text_dim=16, freq_dim=16, text_len=8,
                in_dim=4, out_dim=4)
    base.update(overrides)
    return WanConfig(**base)


def tiny_model(seed: int = 0, **overrides) -> WanDiT:
    torch.manual_seed(seed)
    model = WanDiT(tiny_config(**overrides))
    with torch.no_grad():  # the original zero-initialises nothing we rely on; make every parameter non-trivial
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def tiny_inputs(model: WanDiT, batch: int = 2, frames: int = 6, height: int = 4, width: int = 6, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    x = torch.randn(batch, frames, cfg.in_dim, height, width, generator=g)
    context = torch.randn(batch, cfg.text_len - 2, cfg.text_dim, generator=g)
    return x, context
