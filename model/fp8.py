"""FP8 (e4m3) linear layers for inference, an optional speed lever: weights quantized once per output channel,
activations per token at run time (row-wise scales), one `torch._scaled_mm` on GPUs with FP8 tensor cores
(compute capability 8.9+: Ada, Hopper); elsewhere the same quantized numbers are multiplied in float32, so CPU tests
see the arithmetic the GPU does (up to accumulation order).

    from model.fp8 import convert_to_fp8
    n = convert_to_fp8(model)          # the DiT's attention and FFN projections; embeddings and head stay as they are

Inference only (no gradients, no state-dict keys of the original layout): convert after loading weights.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

E4M3 = torch.float8_e4m3fn
E4M3_MAX = torch.finfo(E4M3).max  # 448


def quantize_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """`[M, K]` -> (e4m3 `[M, K]`, float32 scales `[M, 1]`) with x ~= q * scale: each row's largest magnitude maps
    to the format's largest finite value."""
    amax = x.detach().abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12)
    scale = amax / E4M3_MAX
    return (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3), scale


def fp8_matmul_supported(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


class Fp8Linear(nn.Module):
    """A frozen `nn.Linear` with e4m3 weights and per-output-channel scales; output in the input's dtype."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        weight, scale = quantize_rows(linear.weight)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight_fp8", weight)  # [N, K] row-major: its transpose is the column-major operand
        self.register_buffer("weight_scale", scale.reshape(1, -1))  # [1, N]
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())
        self.use_kernel = fp8_matmul_supported(weight.device)  # decided where the weights live, not per call

    def _apply(self, fn, recurse: bool = True):
        """`.to(device)` moves the quantized weights and scales; `.to(dtype)` (the network's) leaves them alone."""
        kept = {name: self._buffers[name] for name in ("weight_fp8", "weight_scale")}
        super()._apply(fn, recurse)
        for name, tensor in kept.items():
            self._buffers[name] = tensor.to(self._buffers[name].device)
        self.use_kernel = fp8_matmul_supported(self.weight_fp8.device)
        return self

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        rows = x.reshape(-1, self.in_features)
        q, scale = quantize_rows(rows)
        if self.use_kernel:
            y = torch._scaled_mm(q, self.weight_fp8.t(), scale_a=scale, scale_b=self.weight_scale,
                                 out_dtype=x.dtype)
        else:
            y = F.linear(q.float() * scale, self.weight_fp8.float() * self.weight_scale.t()).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, e4m3 row-wise"


def convert_to_fp8(model: nn.Module) -> int:
    """Replace, in place, the linear layers of every transformer block (self- and cross-attention q/k/v/o, FFN) by
    `Fp8Linear`; returns how many. The embeddings, time projection and output head keep their precision (small, and
    the head writes the prediction)."""
    count = 0
    for block in model.blocks:
        for parent in list(block.modules()):
            for name, child in list(parent.named_children()):
                if type(child) is nn.Linear:
                    setattr(parent, name, Fp8Linear(child))
                    count += 1
    return count
