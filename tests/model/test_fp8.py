"""The optional FP8 linear layers (model/fp8.py): quantization error, the layer against nn.Linear, the DiT converted."""
from __future__ import annotations

import torch
from torch import nn

from model.fp8 import E4M3, E4M3_MAX, Fp8Linear, convert_to_fp8, quantize_rows
from tests.tiny import tiny_inputs, tiny_model


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_rows_are_scaled_to_the_format_range_and_round_trip_within_e4m3_precision():
    x = torch.randn(64, 96) * torch.logspace(-3, 3, 64)[:, None]  # rows of very different magnitudes
    q, scale = quantize_rows(x)
    assert q.dtype == E4M3 and scale.shape == (64, 1)
    assert torch.allclose(q.float().abs().amax(dim=1), torch.full((64,), E4M3_MAX))
    back = q.float() * scale
    assert rel(back, x) < 0.04  # 3 mantissa bits: ~2-3% RMS, whatever each row's magnitude
    assert ((back - x).abs() <= x.abs().amax(dim=1, keepdim=True) / 16 + 1e-12).all()


def test_fp8_linear_tracks_the_linear_it_replaces():
    torch.manual_seed(0)
    linear = nn.Linear(96, 48)
    layer = Fp8Linear(linear)
    x = torch.randn(2, 5, 96)
    with torch.no_grad():
        y, reference = layer(x), linear(x)
    assert y.shape == reference.shape == (2, 5, 48)
    assert 0 < rel(y, reference) < 0.05
    # The CPU path is the dequantized product the GPU kernel computes.
    q, s = quantize_rows(x.reshape(-1, 96))
    expected = (q.float() * s) @ (layer.weight_fp8.float() * layer.weight_scale.t()).t() + linear.bias
    torch.testing.assert_close(y.reshape(-1, 48), expected.detach(), atol=1e-5, rtol=1e-5)


def test_converted_dit_keeps_its_output_within_fp8_error():
    model = tiny_model(dim=64, ffn_dim=128, num_heads=4)
    x, context = tiny_inputs(model)
    t = torch.tensor([700.0, 300.0])
    with torch.no_grad():
        before = model(x, t, context)
        assert model.blocks[0].self_attn.fused_qkv() is not None
        converted = convert_to_fp8(model)
        after = model(x, t, context)
    assert converted == model.config.num_layers * 10  # self- and cross-attention q/k/v/o, two FFN layers
    assert not any(type(m) is nn.Linear for block in model.blocks for m in block.modules())
    assert type(model.head.head) is nn.Linear  # the output head keeps its precision
    assert model.blocks[0].self_attn.fused_qkv() is None  # the fused-QKV lever steps aside
    assert 0 < rel(after, before) < 0.1


def test_casting_the_network_keeps_the_quantized_weights():
    layer = Fp8Linear(nn.Linear(32, 16)).to(torch.bfloat16)
    assert layer.weight_fp8.dtype == E4M3 and layer.weight_scale.dtype == torch.float32
    assert layer.bias.dtype == torch.bfloat16 and not layer.use_kernel  # no FP8 tensor cores on a CPU
    y = layer(torch.randn(3, 32, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and y.shape == (3, 16)
