"""The pieces of a Wan2.1 DiT layer: attention projections, the transformer block (self-attention over the mode's
mask or KV cache, cross-attention to the text, FFN, all modulated per timestep group), the output head, the per-call
context shared by all blocks, and the inference speed switches. `model/wan.py` assembles them into `WanDiT`.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.attention import AttentionMask, attention
from model.config import WanConfig
from model.kv_cache import CacheWrite, KVCache
from model.rope import Rotation, apply_rope


class RMSNorm(nn.Module):
    """RMS norm computed in float32 and cast back before the weight, as the original `WanRMSNorm`."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype) * self.weight


class Attention(nn.Module):
    """Projections of a self- or cross-attention layer (`q, k, v, o`, optional QK RMS-norm over the full width)."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool, eps: float):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = RMSNorm(dim, eps) if qk_norm else nn.Identity()
        self.norm_k = RMSNorm(dim, eps) if qk_norm else nn.Identity()
        self._fused: tuple | None = None  # (key of the source parameters, weight, bias) of the fused projection

    def heads(self, x: Tensor) -> Tensor:
        return x.unflatten(-1, (self.num_heads, -1))

    def query(self, x: Tensor) -> Tensor:
        return self.heads(self.norm_q(self.q(x)))

    def key_value(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.heads(self.norm_k(self.k(x))), self.heads(self.v(x))

    def qkv(self, x: Tensor, fused: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Query, key and value heads `[B, L, heads, head_dim]`; `fused` = `fused_qkv()` runs one GEMM for all."""
        if fused is None:
            return (self.query(x), *self.key_value(x))
        q, k, v = F.linear(x, *fused).chunk(3, dim=-1)
        return self.heads(self.norm_q(q)), self.heads(self.norm_k(k)), self.heads(v)

    def fused_qkv(self) -> tuple[Tensor, Tensor] | None:
        """The q/k/v weights and biases concatenated (inference only), rebuilt whenever a source parameter was
        changed in place (optimizer step, load_state_dict) or moved, so it never goes stale. None when the
        projections are not plain linears (e.g. LoRA adapters injected)."""
        if not all(type(m) is nn.Linear for m in (self.q, self.k, self.v)):
            return None
        params = (self.q.weight, self.k.weight, self.v.weight, self.q.bias, self.k.bias, self.v.bias)
        key = tuple((p.data_ptr(), p._version) for p in params)
        if self._fused is None or self._fused[0] != key:
            with torch.no_grad():
                weight = torch.cat(params[:3])
                bias = torch.cat(params[3:])
            self._fused = (key, weight, bias)
        return self._fused[1], self._fused[2]

    def out(self, x: Tensor) -> Tensor:
        return self.o(x.flatten(-2))


@dataclass
class InferenceOptions:
    """Switches of the inference speed levers (`benchmarks/speed.py` measures each against all off).

    fused_rope: RoPE as one multiply-add on float32 pair tables (else the split/stack formula); same numbers.
    reuse_text: skip the text embedding when every layer's cross-attention K/V are cached for the prompt.
    cache_pass_kv_only: a cache-only call (the clean-context pass) stops once the last layer's K/V are written:
      no attention, cross-attention or FFN in that layer, no output head. Exact.
    fused_qkv: one GEMM for the self-attention q/k/v projections (copies of the weights, rebuilt when they change).
    gelu_epilogue: the FFN's first GEMM applies its tanh GELU in cuBLASLt's epilogue (CUDA, no grad; elsewhere the
      plain path), so the 8960-wide hidden activation is written once instead of written, read and written again.
    fused_cache_write: the piece that makes K/V writes them straight into the cache slots (no grad, plain slot
      writes) instead of returning them for a separate copy.
    """

    fused_rope: bool = True
    reuse_text: bool = True
    cache_pass_kv_only: bool = True
    fused_qkv: bool = False
    gelu_epilogue: bool = True
    fused_cache_write: bool = True

    @classmethod
    def all_off(cls) -> InferenceOptions:
        return cls(fused_rope=False, reuse_text=False, cache_pass_kv_only=False, fused_qkv=False,
                   gelu_epilogue=False, fused_cache_write=False)


class WholeSequence:
    """The token layout of a model whose calls hold all their tokens on one process (the default).

    It is the identity of the token-layout seam: `WanDiT.sequence_layout.split` hands each call its share of the
    tokens and sets `Context.shard`, which the blocks ask to move q/k/v to "all tokens, this process's heads" around
    attention and back, and the model asks to gather hidden states and the head's output. Sequence parallelism
    (`pipeline/sequence_parallel.py`) installs a layout that splits; the model itself never branches on it.
    """

    splits = False  # False: the tokens and heads of a call are all here (the cache's K/V layout is the blocks')

    def local_heads(self, num_heads: int) -> int:
        return num_heads

    def split(self, tokens: Tensor, ctx: Context, tokens_per_frame: int) -> Tensor:
        return tokens

    def to_heads(self, *xs: Tensor | None) -> tuple[Tensor | None, ...]:
        return xs

    def to_tokens(self, y: Tensor) -> Tensor:
        return y

    def gather(self, x: Tensor) -> Tensor:
        return x


WHOLE_SEQUENCE = WholeSequence()


def _as_they_are(piece: Callable) -> Callable:
    return piece


# How a call runs its per-layer pieces (`Context.piece`): a runner `piece -> callable`. Eager here; compilation
# (`pipeline/compile.py`) installs its own as `WanDiT.cached_pieces`, so the blocks never branch on it.
EAGER_PIECES = _as_they_are


class Context:
    """Per-call state shared by all blocks: RoPE rotation, the mask or the cache plan, the token layout."""

    def __init__(self, groups: int, rope: Rotation, mask: AttentionMask | None = None,
                 cache: KVCache | None = None, plan: CacheWrite | None = None, cache_rope: Rotation | None = None,
                 options: InferenceOptions | None = None, pieces: Callable[[Callable], Callable] = EAGER_PIECES):
        self.groups = groups  # timestep groups (1 = one timestep per sample, else one per latent frame)
        self.rope = rope
        self.mask = mask
        self.cache, self.plan = cache, plan
        self.cache_rope = cache_rope  # rotation of the readable cache slots (relative RoPE with rerotate_window)
        self.options = options or InferenceOptions()
        self.piece = pieces  # `piece(fn)` is what runs the per-layer piece fn (fn itself, or its compiled form)
        self.shard = WHOLE_SEQUENCE  # this call's token layout, set by `WanDiT.sequence_layout.split`

    def tensors(self) -> list[Tensor]:
        """Every tensor a call reads from the context (CUDA graphs copy them into static buffers)."""
        rotations = [self.rope] + ([self.cache_rope] if self.cache_rope is not None else [])
        return [t for r in rotations for t in r.tensors()]


def _grouped(h: Tensor, groups: int) -> Tensor:
    """`[B, L, D]` -> `[B, G, L/G, D]` so per-group (per-frame) modulation broadcasts."""
    b, length, dim = h.shape
    return h.view(b, groups, length // groups, dim)


def _modulate(norm: nn.Module, x: Tensor, shift: Tensor, scale: Tensor, groups: int) -> Tensor:
    return (norm(_grouped(x, groups)) * (1 + scale.unsqueeze(2)) + shift.unsqueeze(2)).view(x.shape)


def _gate(x: Tensor, y: Tensor, gate: Tensor, groups: int) -> Tensor:
    return x + (_grouped(y, groups) * gate.unsqueeze(2)).view(x.shape)


# The three pieces of a layer around its two attentions: pure tensor functions of static shape, so one compiled
# graph serves every layer (parameters are graph inputs) and every block position of a rollout.
def _attention_inputs(block: WanBlock, x: Tensor, mod: Tensor, groups: int, rope: Rotation, rotate_k: bool,
                      fused_rope: bool, fused_qkv: tuple[Tensor, Tensor] | None,
                      slots: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Rotated q, k and v heads; with `slots` (the cache's K/V views for this call) k and v are written there and
    (None, None) is returned in their place, so a compiled piece stores them once, from the kernel that makes them."""
    h = _modulate(block.norm1, x, mod[:, :, 0], mod[:, :, 1], groups)
    q, k, v = block.self_attn.qkv(h, fused_qkv)
    q = apply_rope(q, rope, fused=fused_rope)
    if rotate_k:
        k = apply_rope(k, rope, fused=fused_rope)
    if slots is None:
        return q, k, v
    slots[0].copy_(k)
    slots[1].copy_(v)
    return q, None, None


def _cross_query(block: WanBlock, x: Tensor, y: Tensor, mod: Tensor, groups: int) -> tuple[Tensor, Tensor]:
    x = _gate(x, block.self_attn.out(y), mod[:, :, 2], groups)
    return x, block.cross_attn.query(block.norm3(x))


def _feed_forward(block: WanBlock, x: Tensor, y: Tensor, mod: Tensor, groups: int, gelu_epilogue: bool = False
                  ) -> Tensor:
    x = x + block.cross_attn.out(y)
    h = _modulate(block.norm2, x, mod[:, :, 3], mod[:, :, 4], groups)
    return _gate(x, _ffn(block.ffn, h, gelu_epilogue), mod[:, :, 5], groups)


def _ffn(ffn: nn.Sequential, h: Tensor, gelu_epilogue: bool) -> Tensor:
    first = ffn[0]
    # On the CPU `_addmm_activation` applies the exact (erf) GELU, not Wan's tanh one: CUDA only.
    if not (gelu_epilogue and h.is_cuda and type(first) is nn.Linear):
        return ffn(h)
    hidden = torch._addmm_activation(first.bias, h.flatten(0, -2), first.weight.t(), use_gelu=True)
    return ffn[2](hidden.unflatten(0, h.shape[:-1]))


class WanBlock(nn.Module):
    def __init__(self, cfg: WanConfig):
        super().__init__()
        dim, eps = cfg.dim, cfg.eps
        self.norm1 = nn.LayerNorm(dim, eps=eps, elementwise_affine=False)
        self.self_attn = Attention(dim, cfg.num_heads, cfg.qk_norm, eps)
        self.norm3 = nn.LayerNorm(dim, eps=eps, elementwise_affine=True) if cfg.cross_attn_norm else nn.Identity()
        self.cross_attn = Attention(dim, cfg.num_heads, cfg.qk_norm, eps)
        self.norm2 = nn.LayerNorm(dim, eps=eps, elementwise_affine=False)
        self.ffn = nn.Sequential(nn.Linear(dim, cfg.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.ffn_dim, dim))
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)
        # Whether this block runs under activation checkpointing (`WanDiT.set_gradient_checkpointing`): its forward
        # then saves nothing for backward (backward recomputes it), so views of the cache need no defensive copies.
        self.checkpointed = False

    def forward(self, x: Tensor, e0: Tensor, text: Tensor | None, ctx: Context, layer: int,
                kv_only: bool = False) -> Tensor:
        """x `[B, L, D]`, e0 `[B, G, 6, D]` (G timestep groups), text `[B, text_len, D]` (None when the cache holds
        the prompt's K/V). kv_only: only write this layer's K/V into the cache (returns x unchanged)."""
        mod = self.modulation.unsqueeze(1) + e0  # `[B, G, 6, D]`: shift, scale, gate (attention), same (FFN)
        opts = ctx.options
        rotate_k = ctx.cache is None or ctx.cache.keys_rotated
        no_grad = not torch.is_grad_enabled()
        fused = self.self_attn.fused_qkv() if opts.fused_qkv and no_grad else None
        slots = None
        if opts.fused_cache_write and no_grad and ctx.cache is not None and not ctx.shard.splits:
            slots = ctx.cache.slots(layer, ctx.plan)
        q, k, v = ctx.piece(_attention_inputs)(self, x, mod, ctx.groups, ctx.rope, rotate_k, opts.fused_rope, fused,
                                               slots)
        if kv_only:
            if slots is None:
                k, v = ctx.shard.to_heads(k, v)  # the query is not needed: only K/V are written
                ctx.cache.write(layer, ctx.plan, k, v)
            return x
        y = self._self_attention(q, k, v, ctx, layer)
        x, cross_q = ctx.piece(_cross_query)(self, x, y, mod, ctx.groups)
        y = attention(cross_q, *self._text_key_value(text, ctx, layer))
        return ctx.piece(_feed_forward)(self, x, y, mod, ctx.groups, opts.gelu_epilogue and no_grad)

    def _self_attention(self, q: Tensor, k: Tensor | None, v: Tensor | None, ctx: Context, layer: int) -> Tensor:
        """Attention heads `[B, L, heads, head_dim]` (before the output projection) of the rotated q, k and v
        (k and v None: already written into the cache's slots)."""
        cache, plan = ctx.cache, ctx.plan
        q, k, v = ctx.shard.to_heads(q, k, v)  # [tokens here, all heads] -> [all tokens, heads here]
        if cache is None:
            return ctx.shard.to_tokens(attention(q, k, v, ctx.mask))
        if k is not None:
            cache.write(layer, plan, k, v)
        if torch.is_grad_enabled() and (k.requires_grad or v.requires_grad) and cache.detach_writes:
            # Past K/V come from the (gradient-free) cache; this call's own K/V keep their graph.
            past_k, past_v = cache.past(layer, plan)
            if not self.checkpointed:
                # Without activation checkpointing the saved views would be invalidated by later in-place writes.
                past_k, past_v = past_k.clone(), past_v.clone()
            k_all, v_all = torch.cat([past_k, k], dim=1), torch.cat([past_v, v], dim=1)
        else:
            k_all, v_all = cache.readable(layer, plan)
            if torch.is_grad_enabled() and not cache.detach_writes and not self.checkpointed:
                # kv_cache_grad "original" without checkpointing: copies keep the values this call saw (later in-place
                # writes would invalidate saved views) while gradients still reach the writes recorded in the cache.
                k_all, v_all = k_all.clone(), v_all.clone()
        if not cache.keys_rotated:
            k_all = apply_rope(k_all, ctx.cache_rope, fused=ctx.options.fused_rope)
        return ctx.shard.to_tokens(attention(q, k_all, v_all))

    def _text_key_value(self, text: Tensor | None, ctx: Context, layer: int) -> tuple[Tensor, Tensor]:
        attn = self.cross_attn
        cache = ctx.cache
        # In grad mode the text K/V are recomputed so text_embedding and cross_attn.k/v receive gradients, except
        # for kv_cache_grad "original" without checkpointing: the original then reads them from the cache filled by
        # the first call, differentiable only if that call was.
        reads_cache = not torch.is_grad_enabled() or (
            cache is not None and not cache.detach_writes and not self.checkpointed)
        if cache is not None and reads_cache:
            if not cache.cross_ready[layer]:
                cache.store_text(layer, *attn.key_value(text))
            if torch.is_grad_enabled():  # copies: the next layer's store would invalidate saved views of the buffer
                return cache.cross_k[layer].clone(), cache.cross_v[layer].clone()
            return cache.cross_k[layer], cache.cross_v[layer]
        return attn.key_value(text)


class Head(nn.Module):
    def __init__(self, cfg: WanConfig):
        super().__init__()
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.eps, elementwise_affine=False)
        self.head = nn.Linear(cfg.dim, math.prod(cfg.patch_size) * cfg.out_dim)
        self.modulation = nn.Parameter(torch.randn(1, 2, cfg.dim) / cfg.dim**0.5)

    def forward(self, x: Tensor, e: Tensor, groups: int) -> Tensor:
        """x `[B, L, D]`, e `[B, G, D]` (the time embedding, not its projection) -> `[B, L, out features]`."""
        shift, scale = (self.modulation.unsqueeze(1) + e.unsqueeze(2)).unbind(2)  # `[B, G, D]` each
        return self.head(_modulate(self.norm, x, shift, scale, groups))
