"""Discriminator heads on the critic trunk for the GAN variant of Self Forcing (docs/method.md, "GAN").

Learned register tokens cross-attend to the critic's hidden tokens after a few of its transformer blocks; the
resulting tokens (optionally plus the scaled time embedding) go through a small classification branch -> logits
`[B, num_class]`. Parameter names are the original ones (`_register_tokens.*`, `_gan_ca_blocks.N.*`,
`_cls_pred_branch.*`), so an original GAN checkpoint's head keys load as is.

Sizes come from the critic's config instead of the original's constants (width 1536, 12 heads, FFN 8192, taps after
blocks 13/21/29 of 30). Defaults reproduce them for Wan 1.3B: FFN = 16/3 x width (8192 for 1536), and the taps sit
at the same relative depths, `round(L * (i + 1) / 30) - 1` for i in 13, 21, 29 (13/21/29 for L = 30; 18/28/39 for
the 40-layer 14B). Shallow critics may map several taps to the same block; each tap still has its own register.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from model.attention import attention
from model.config import WanConfig
from model.wan_block import Attention, RMSNorm

ORIGINAL_TAPS = (13, 21, 29)  # 0-based blocks of the 30-layer Wan 1.3B the original taps
ORIGINAL_LAYERS = 30
TIME_TOKEN_SCALE = 10.0  # the original appends 10 * time embedding as the extra token


def default_taps(num_layers: int) -> list[int]:
    """Blocks at the original relative depths (13, 21, 29 of 30) for a trunk of `num_layers` blocks."""
    return [min(num_layers - 1, max(0, round(num_layers * (i + 1) / ORIGINAL_LAYERS) - 1)) for i in ORIGINAL_TAPS]


class RegisterTokens(nn.Module):
    """`register_tokens [n, dim]` (N(0, 0.02) init), RMS-normed on every use."""

    def __init__(self, num_registers: int, dim: int, eps: float = 1e-6):
        super().__init__()
        self.register_tokens = nn.Parameter(torch.randn(num_registers, dim) * 0.02)
        self.rms_norm = RMSNorm(dim, eps)

    def forward(self) -> Tensor:
        return self.rms_norm(self.register_tokens)


class GanAttentionBlock(nn.Module):
    """One register token reads the video tokens: `tok = reg + CrossAttn(q = reg, kv = norm3(hidden))`,
    `out = FFN(norm2(tok)) + tok`."""

    def __init__(self, dim: int, ffn_dim: int, num_heads: int, eps: float = 1e-6):
        super().__init__()
        self.norm3 = nn.LayerNorm(dim, eps=eps, elementwise_affine=True)
        self.norm2 = nn.LayerNorm(dim, eps=eps, elementwise_affine=False)
        self.cross_attn = Attention(dim, num_heads, qk_norm=True, eps=eps)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(ffn_dim, dim))

    def forward(self, hidden: Tensor, register: Tensor) -> Tensor:
        """hidden `[B, L, D]`, register `[B, 1, D]` -> `[B, 1, D]`."""
        attn = self.cross_attn
        k, v = attn.key_value(self.norm3(hidden))
        token = register + attn.out(attention(attn.query(register), k, v))
        return self.ffn(self.norm2(token)) + token


class GanHeads(nn.Module):
    """Register tokens + one cross-attention block per tap + the classification branch."""

    def __init__(self, dim: int, num_heads: int, num_class: int, taps: Sequence[int], ffn_dim: Optional[int] = None,
                 time_embed_dim: int = 0, eps: float = 1e-6):
        super().__init__()
        if num_class < 1:
            raise ValueError(f"num_class must be >= 1, got {num_class}")
        if not taps:
            raise ValueError("the discriminator needs at least one tapped block")
        self.taps = [int(t) for t in taps]
        self.time_embed_dim = time_embed_dim
        ffn_dim = ffn_dim or dim * 16 // 3
        self._register_tokens = RegisterTokens(len(self.taps), dim, eps)
        self._gan_ca_blocks = nn.ModuleList(GanAttentionBlock(dim, ffn_dim, num_heads, eps) for _ in self.taps)
        features = dim * len(self.taps) + time_embed_dim
        self._cls_pred_branch = nn.Sequential(nn.LayerNorm(features), nn.Linear(features, dim), nn.SiLU(),
                                              nn.Linear(dim, num_class))

    @classmethod
    def for_critic(cls, config: WanConfig, num_class: int, concat_time_embeddings: bool = False,
                   taps: Optional[Sequence[int]] = None) -> "GanHeads":
        """Heads sized for a critic with this config (taps default to `default_taps(num_layers)`)."""
        taps = list(taps) if taps is not None else default_taps(config.num_layers)
        bad = [t for t in taps if not 0 <= t < config.num_layers]
        if bad:
            raise ValueError(f"GAN taps {bad} outside the critic's blocks 0..{config.num_layers - 1}")
        return cls(config.dim, config.num_heads, num_class, taps,
                   time_embed_dim=config.dim if concat_time_embeddings else 0, eps=config.eps)

    @property
    def unique_taps(self) -> tuple[int, ...]:
        """The blocks whose hidden states the critic must return (`WanDiT.features(..., layers)`)."""
        return tuple(sorted(set(self.taps)))

    def forward(self, hidden: Sequence[Tensor], time_embedding: Optional[Tensor] = None) -> Tensor:
        """hidden: the critic's tokens `[B, L, D]` after each block of `unique_taps` (in that order);
        time_embedding `[B, D]` (needed iff built with time_embed_dim) -> logits `[B, num_class]`."""
        by_block = dict(zip(self.unique_taps, hidden))
        if len(hidden) != len(self.unique_taps):
            raise ValueError(f"expected hidden states of blocks {list(self.unique_taps)}, got {len(hidden)} tensors")
        registers = self._register_tokens()
        dtype, b = registers.dtype, hidden[0].shape[0]
        by_block = {tap: h.to(dtype) for tap, h in by_block.items()}  # heads may run in another dtype than the trunk
        tokens = [block(by_block[tap], registers[i].expand(b, 1, -1))
                  for i, (tap, block) in enumerate(zip(self.taps, self._gan_ca_blocks))]
        if self.time_embed_dim:
            if time_embedding is None:
                raise ValueError("these heads append the time embedding (concat_time_embeddings): pass it")
            tokens.append(TIME_TOKEN_SCALE * time_embedding.to(dtype)[:, None, :])
        return self._classify(torch.cat(tokens, dim=1).flatten(1))

    def _classify(self, features: Tensor) -> Tensor:
        """The classification branch in float32 whatever the trunk, the parameters or autocast compute in: the
        losses apply softplus to the logits and R1/R2 divide logit differences by sigma = 0.01, where bf16 rounding
        (~0.4% of a logit) is as large as the difference itself."""
        norm, first, act, last = self._cls_pred_branch
        with torch.autocast(features.device.type, enabled=False):
            x = nn.functional.layer_norm(features.float(), norm.normalized_shape, norm.weight.float(),
                                         norm.bias.float(), norm.eps)
            x = act(nn.functional.linear(x, first.weight.float(), first.bias.float()))
            return nn.functional.linear(x, last.weight.float(), last.bias.float())
