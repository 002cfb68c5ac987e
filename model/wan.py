"""The Wan2.1 diffusion transformer: one class for the bidirectional teacher/critic and the causal generator.

Parameter names are the original ones, so a real Wan2.1 or Self-Forcing state dict loads as is. The attention mode is
chosen per call:
  * bidirectional: no mask, no cache (teacher, critic);
  * block-causal over a whole clip: `block_causal=BlockCausal(...)` (+ `clean_x` for teacher forcing);
  * chunk by chunk with a `KVCache` and `start_frame` (causal inference and self-forcing rollouts).
Timesteps are `[B]` (one per sample, as the bidirectional model) or `[B, F]` (one per latent frame, as the causal
model); modulation is applied per timestep group accordingly.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from model.attention import AttentionMask, BlockCausal, attention, block_causal_mask
from model.config import WanConfig
from model.kv_cache import CacheWrite, KVCache
from model.rope import RotaryTables, Rotation, apply_rope, sinusoidal_embedding


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
    compile: `torch.compile` the per-layer pieces around attention (static shapes: compiled once, shared by every
      layer and block position) on the KV-cached no-grad path.
    """

    fused_rope: bool = True
    reuse_text: bool = True
    cache_pass_kv_only: bool = True
    fused_qkv: bool = False
    compile: bool = False

    @classmethod
    def all_off(cls) -> InferenceOptions:
        return cls(fused_rope=False, reuse_text=False, cache_pass_kv_only=False, fused_qkv=False, compile=False)


class Context:
    """Per-call state shared by all blocks: RoPE rotation, the mask or the cache plan, the token grid."""

    def __init__(self, groups: int, rope: Rotation, mask: AttentionMask | None = None,
                 cache: KVCache | None = None, plan: CacheWrite | None = None, cache_rope: Rotation | None = None,
                 options: InferenceOptions | None = None, compiled: bool = False):
        self.groups = groups  # timestep groups (1 = one timestep per sample, else one per latent frame)
        self.rope = rope
        self.mask = mask
        self.cache, self.plan = cache, plan
        self.cache_rope = cache_rope  # rotation of the readable cache slots (relative RoPE with rerotate_window)
        self.options = options or InferenceOptions()
        self.compiled = compiled  # run the layer pieces through torch.compile
        self.shard = None  # sequence parallel: this call's token split (utils/sequence_parallel.py), else None

    def tensors(self) -> list[Tensor]:
        """Every tensor a call reads from the context (CUDA graphs copy them into static buffers)."""
        rotations = [self.rope] + ([self.cache_rope] if self.cache_rope is not None else [])
        return [t for r in rotations for t in r.tensors()]

    def piece(self, fn):
        return _compiled(fn) if self.compiled else fn


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
                      fused_rope: bool, fused_qkv: tuple[Tensor, Tensor] | None) -> tuple[Tensor, Tensor, Tensor]:
    h = _modulate(block.norm1, x, mod[:, :, 0], mod[:, :, 1], groups)
    q, k, v = block.self_attn.qkv(h, fused_qkv)
    q = apply_rope(q, rope, fused=fused_rope)
    if rotate_k:
        k = apply_rope(k, rope, fused=fused_rope)
    return q, k, v


def _cross_query(block: WanBlock, x: Tensor, y: Tensor, mod: Tensor, groups: int) -> tuple[Tensor, Tensor]:
    x = _gate(x, block.self_attn.out(y), mod[:, :, 2], groups)
    return x, block.cross_attn.query(block.norm3(x))


def _feed_forward(block: WanBlock, x: Tensor, y: Tensor, mod: Tensor, groups: int) -> Tensor:
    x = x + block.cross_attn.out(y)
    h = _modulate(block.norm2, x, mod[:, :, 3], mod[:, :, 4], groups)
    return _gate(x, block.ffn(h), mod[:, :, 5], groups)


@functools.cache
def _compiled(fn):
    return torch.compile(fn, fullgraph=True, dynamic=False)


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

    def forward(self, x: Tensor, e0: Tensor, text: Tensor | None, ctx: Context, layer: int,
                kv_only: bool = False) -> Tensor:
        """x `[B, L, D]`, e0 `[B, G, 6, D]` (G timestep groups), text `[B, text_len, D]` (None when the cache holds
        the prompt's K/V). kv_only: only write this layer's K/V into the cache (returns x unchanged)."""
        mod = self.modulation.unsqueeze(1) + e0  # `[B, G, 6, D]`: shift, scale, gate (attention), same (FFN)
        opts = ctx.options
        rotate_k = ctx.cache is None or ctx.cache.keys_rotated
        fused = self.self_attn.fused_qkv() if opts.fused_qkv and not torch.is_grad_enabled() else None
        q, k, v = ctx.piece(_attention_inputs)(self, x, mod, ctx.groups, ctx.rope, rotate_k, opts.fused_rope, fused)
        if kv_only:
            if ctx.shard is not None:
                _, k, v = ctx.shard.to_heads(q, k, v)
            ctx.cache.write(layer, ctx.plan, k, v)
            return x
        y = self._self_attention(q, k, v, ctx, layer)
        x, cross_q = ctx.piece(_cross_query)(self, x, y, mod, ctx.groups)
        y = attention(cross_q, *self._text_key_value(text, ctx, layer))
        return ctx.piece(_feed_forward)(self, x, y, mod, ctx.groups)

    def _self_attention(self, q: Tensor, k: Tensor, v: Tensor, ctx: Context, layer: int) -> Tensor:
        """Attention heads `[B, L, heads, head_dim]` (before the output projection) of the rotated q, k and v."""
        cache, plan = ctx.cache, ctx.plan
        if ctx.shard is not None:  # sequence parallel: [local tokens, all heads] -> [all tokens, local heads]
            q, k, v = ctx.shard.to_heads(q, k, v)
        if cache is None:
            return self._heads_to_tokens(attention(q, k, v, ctx.mask), ctx)
        cache.write(layer, plan, k, v)
        if torch.is_grad_enabled() and (k.requires_grad or v.requires_grad) and cache.detach_writes:
            # Past K/V come from the (gradient-free) cache; this call's own K/V keep their graph.
            past_k, past_v = cache.past(layer, plan)
            if not getattr(self, "_checkpointed", False):
                # Without activation checkpointing the saved views would be invalidated by later in-place writes.
                past_k, past_v = past_k.clone(), past_v.clone()
            k_all, v_all = torch.cat([past_k, k], dim=1), torch.cat([past_v, v], dim=1)
        else:
            k_all, v_all = cache.readable(layer, plan)
        if not cache.keys_rotated:
            k_all = apply_rope(k_all, ctx.cache_rope, fused=ctx.options.fused_rope)
        return self._heads_to_tokens(attention(q, k_all, v_all), ctx)

    @staticmethod
    def _heads_to_tokens(y: Tensor, ctx: Context) -> Tensor:
        """Sequence parallel: back to this rank's tokens with all heads (a no-op otherwise)."""
        return y if ctx.shard is None else ctx.shard.to_tokens(y)

    def _text_key_value(self, text: Tensor | None, ctx: Context, layer: int) -> tuple[Tensor, Tensor]:
        attn = self.cross_attn
        cache = ctx.cache
        # In grad mode the text K/V are recomputed so text_embedding and cross_attn.k/v receive gradients (SPEC 5.3).
        if cache is not None and not torch.is_grad_enabled():
            if not cache.cross_ready[layer]:
                cache.store_text(layer, *attn.key_value(text))
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
        b, length, dim = x.shape
        shift, scale = (self.modulation.unsqueeze(1) + e.unsqueeze(2)).unbind(2)  # `[B, G, D]` each
        h = self.norm(x).view(b, groups, length // groups, dim) * (1 + scale.unsqueeze(2)) + shift.unsqueeze(2)
        return self.head(h.view(b, length, dim))


class WanDiT(nn.Module):
    """Wan2.1 text-to-video DiT. See the module docstring for the three attention modes."""

    def __init__(self, config: WanConfig):
        super().__init__()
        self.config = cfg = config
        dim = cfg.dim
        self.patch_embedding = nn.Conv3d(cfg.in_dim, dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(cfg.text_dim, dim), nn.GELU(approximate="tanh"),
                                            nn.Linear(dim, dim))
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, dim * 6))
        self.blocks = nn.ModuleList([WanBlock(cfg) for _ in range(cfg.num_layers)])
        self.head = Head(cfg)
        self.rope = RotaryTables(cfg.head_dim, cfg.rope_max_positions)
        self.gradient_checkpointing = False
        self.inference_options = InferenceOptions()
        self.sequence_parallel = None  # split tokens over ranks (inference): utils.sequence_parallel

    # ------------------------------------------------------------------------------------------------ helpers
    @torch.no_grad()
    def init_weights(self) -> "WanDiT":
        """The original initialisation, for training from scratch (SPEC 1.8): Xavier-uniform linears with zero bias,
        text/time embeddings N(0, 0.02), a zero output head, modulation randn / sqrt(dim)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.xavier_uniform_(self.patch_embedding.weight.flatten(1))
        nn.init.zeros_(self.patch_embedding.bias)
        for seq in (self.text_embedding, self.time_embedding):
            for module in seq:
                if isinstance(module, nn.Linear):
                    nn.init.normal_(module.weight, std=0.02)
        nn.init.zeros_(self.head.head.weight)
        dim = self.config.dim
        for p in [b.modulation for b in self.blocks] + [self.head.modulation]:
            p.copy_(torch.randn_like(p) / dim**0.5)
        return self

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each block in backward (non-reentrant). Needed to train through KV-cached rollouts cheaply."""
        self.gradient_checkpointing = enabled
        for block in self.blocks:
            block._checkpointed = enabled

    def tokens_per_frame(self, height: int, width: int) -> int:
        _, ph, pw = self.config.patch_size
        return (height // ph) * (width // pw)

    def new_kv_cache(self, batch_size: int, height: int, width: int, capacity_frames: int, *,
                     window_frames: int = -1, sink_frames: int = 0, rope: str = "absolute",
                     detach_writes: bool = True, dtype: torch.dtype | None = None,
                     device: torch.device | str | None = None, rerotate_window: bool = False) -> KVCache:
        """A cache sized from this model's config and the latent resolution (nothing hard-coded)."""
        cfg = self.config
        param = self.patch_embedding.weight
        sp = self.sequence_parallel  # each rank caches all tokens of its own heads
        heads = cfg.num_heads if sp is None else sp.local_heads(cfg.num_heads)
        return KVCache(num_layers=cfg.num_layers, batch_size=batch_size, capacity_frames=capacity_frames,
                       tokens_per_frame=self.tokens_per_frame(height, width), num_heads=heads,
                       cross_heads=cfg.num_heads,
                       head_dim=cfg.head_dim, text_len=cfg.text_len, window_frames=window_frames,
                       sink_frames=sink_frames, rope=rope, detach_writes=detach_writes,
                       dtype=dtype or param.dtype, device=device or param.device,
                       rerotate_window=rerotate_window, rope_tables=self.rope)

    def _check_inputs(self, x: Tensor, t: Tensor, context: Tensor) -> None:
        cfg = self.config
        if x.dim() != 5 or x.shape[2] != cfg.in_dim:
            raise ValueError(f"latents must be [B, F, {cfg.in_dim}, H, W], got {list(x.shape)}")
        pt, ph, pw = cfg.patch_size
        if x.shape[1] % pt or x.shape[3] % ph or x.shape[4] % pw:
            raise ValueError(f"latent frames/height/width {list(x.shape[1:2]) + list(x.shape[3:])} must be "
                             f"divisible by the patch size {list(cfg.patch_size)}")
        if t.shape not in ((x.shape[0],), tuple(x.shape[:2])):
            raise ValueError(f"timesteps must be [B] or [B, F] = {list(x.shape[:2])}, got {list(t.shape)}")
        if context.dim() != 3 or context.shape[0] != x.shape[0] or context.shape[2] != cfg.text_dim:
            raise ValueError(f"text context must be [{x.shape[0]}, L, {cfg.text_dim}], got {list(context.shape)}")
        if context.shape[1] > cfg.text_len:
            raise ValueError(f"text context has {context.shape[1]} tokens, more than text_len {cfg.text_len}")

    def embed_time(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """t `[B, G]` -> time embedding e `[B, G, D]` and its projection e0 `[B, G, 6, D]`."""
        dtype = self.time_embedding[0].weight.dtype
        # The sinusoid is computed in float64 and cast to the parameter dtype (bf16 in training: the original's quirk).
        e = self.time_embedding(sinusoidal_embedding(self.config.freq_dim, t.flatten()).to(dtype))
        e0 = self.time_projection(e).unflatten(-1, (6, -1))
        return e.unflatten(0, t.shape), e0.unflatten(0, t.shape)

    def embed_text(self, context: Tensor) -> Tensor:
        """`[B, L, text_dim]` -> `[B, text_len, D]`; zero rows pad to text_len and are attended (as upstream Wan)."""
        pad = self.config.text_len - context.shape[1]
        return self.text_embedding(F.pad(context, (0, 0, 0, pad)))

    @torch.no_grad()
    def cache_text(self, kv_cache: KVCache, context: Tensor) -> None:
        """Fill every layer's cross-attention K/V of `kv_cache` for the prompt `context` `[B, L, text_dim]` (what
        the first cached call does lazily; a CUDA-graph runner does it ahead, outside the graph)."""
        text = self.embed_text(context.to(self.text_embedding[0].weight.dtype))
        for layer, block in enumerate(self.blocks):
            kv_cache.store_text(layer, *block.cross_attn.key_value(text))

    def patchify(self, x: Tensor) -> tuple[Tensor, tuple[int, int, int]]:
        """`[B, F, C, H, W]` -> tokens `[B, F'*H'*W', D]` (frame-major, then row, then column) and the grid."""
        h = self.patch_embedding(x.transpose(1, 2).to(self.patch_embedding.weight.dtype))
        return h.flatten(2).transpose(1, 2), tuple(h.shape[2:])

    def unpatchify(self, h: Tensor, grid: tuple[int, int, int]) -> Tensor:
        """`[B, L, pt*ph*pw*C]` (channel fastest) -> `[B, F, C, H, W]`."""
        f, hh, ww = grid
        pt, ph, pw = self.config.patch_size
        c = self.config.out_dim
        h = h.view(h.shape[0], f, hh, ww, pt, ph, pw, c).permute(0, 1, 4, 7, 2, 5, 3, 6)
        return h.reshape(h.shape[0], f * pt, c, hh * ph, ww * pw)

    # ------------------------------------------------------------------------------------------------ forward
    def forward(self, x: Tensor, t: Tensor, context: Tensor, *, block_causal: BlockCausal | None = None,
                clean_x: Tensor | None = None, aug_t: Tensor | None = None, kv_cache: KVCache | None = None,
                start_frame: int = 0, return_hidden: tuple[int, ...] = (), cache_only: bool = False,
                prepared: Context | None = None):
        """Flow prediction `[B, F, C, H, W]` for latents x `[B, F, C, H, W]`, timesteps t `[B]` or `[B, F]` (0..1000)
        and text context `[B, L <= text_len, text_dim]`.

        block_causal: attend block-causally over the whole clip (flex attention); with `clean_x` `[B, F, C, H, W]`
          the teacher-forcing layout (clean context at timestep `aug_t`, default 0; same RoPE positions).
        kv_cache / start_frame: x is the chunk of frames starting at latent frame `start_frame`; K/V are written to
          and read from the cache.
        cache_only: the call only writes K/V into the cache (the clean-context pass); with
          `inference_options.cache_pass_kv_only` it stops after the last layer's K/V and returns None.
        prepared: the `prepare_cached_call` result for this call (planned ahead, e.g. by a CUDA-graph runner).
        return_hidden: block indices whose output tokens `[B, L, D]` are also returned (GAN heads tap the critic
          trunk): the result is then `(flow, [hidden per index], e)` with e the time embedding `[B, G, D]`.
        """
        self._check_inputs(x, t, context)
        if kv_cache is not None and (block_causal is not None or clean_x is not None):
            raise ValueError("kv_cache cannot be combined with block_causal / clean_x")
        if clean_x is not None and block_causal is None:
            raise ValueError("teacher forcing (clean_x) needs block_causal")
        if cache_only and kv_cache is None:
            raise ValueError("cache_only needs a kv_cache")
        tokens, grid = self.patchify(x)
        f = grid[0]
        # Teacher forcing concatenates clean and noisy frames, so it always uses per-frame timesteps.
        t_groups = t if t.dim() == 2 else t[:, None].expand(-1, f if clean_x is not None else 1)
        groups = t_groups.shape[1]
        if groups != 1 and groups != f:
            raise ValueError(f"per-frame timesteps need patch_size[0] == 1 (got {groups} timesteps for {f} frames)")
        e, e0 = self.embed_time(t_groups)
        opts = self.inference_options
        if kv_cache is not None:
            ctx = prepared or self.prepare_cached_call(kv_cache, start_frame, grid)
            ctx.groups = groups
        else:
            ctx, tokens, e0 = self._uncached_context(tokens, grid, groups, e0, block_causal, clean_x, aug_t)
        # The prompt's cross-attention K/V are cached per prompt: the text embedding is only needed to fill them.
        text_cached = (kv_cache is not None and opts.reuse_text and kv_cache.text_ready
                       and not torch.is_grad_enabled())
        text = None if text_cached else self.embed_text(context.to(tokens.dtype))
        kv_only = cache_only and opts.cache_pass_kv_only and not return_hidden
        if self.sequence_parallel is not None:  # from here on this rank holds its share of the tokens only
            tokens = self.sequence_parallel.scatter(tokens, ctx, grid[1] * grid[2])
        hidden = []
        for layer, block in enumerate(self.blocks):
            if kv_only and layer == len(self.blocks) - 1:
                block(tokens, e0, text, ctx, layer, kv_only=True)
                return None
            if self.gradient_checkpointing and torch.is_grad_enabled():
                tokens = checkpoint(block, tokens, e0, text, ctx, layer, use_reentrant=False)
            else:
                tokens = block(tokens, e0, text, ctx, layer)
            if layer in return_hidden:
                hidden.append(tokens if ctx.shard is None else ctx.shard.gather(tokens))
        if clean_x is not None:
            tokens = tokens[:, tokens.shape[1] // 2:]  # only the noisy half is predicted
        out = self.head(tokens, e, groups)
        flow = self.unpatchify(out if ctx.shard is None else ctx.shard.gather(out), grid)
        if return_hidden:
            if len(hidden) != len(return_hidden):
                raise ValueError(f"return_hidden {list(return_hidden)} names blocks outside 0..{len(self.blocks) - 1}")
            return flow, hidden, e
        return flow

    def _uncached_context(self, tokens, grid, groups, e0, block_causal, clean_x, aug_t):
        f, hh, ww = grid
        device = tokens.device
        rope = self.rope.rotation(0, f, hh, ww, device)
        mask = None
        if block_causal is not None:
            mask = block_causal_mask(block_causal, f, hh * ww, clean_x is not None, device)
        if clean_x is not None:
            clean_tokens, _ = self.patchify(clean_x)
            t_clean = aug_t if aug_t is not None else torch.zeros(e0.shape[:2], device=device)
            if t_clean.shape != e0.shape[:2]:
                raise ValueError(f"aug_t must be [B, F] = {list(e0.shape[:2])}, got {list(t_clean.shape)}")
            _, e0_clean = self.embed_time(t_clean)
            tokens = torch.cat([clean_tokens, tokens], dim=1)
            e0 = torch.cat([e0_clean, e0], dim=1)
            rope = Rotation(torch.cat([rope.cos, rope.cos]), torch.cat([rope.sin, rope.sin]))
            groups *= 2
        return Context(groups, rope, mask=mask, options=self.inference_options), tokens, e0

    def prepare_cached_call(self, kv_cache: KVCache, start_frame: int, grid: tuple[int, int, int]) -> Context:
        """Plan a KV-cached call on the `(frames, height, width)` token grid starting at latent frame
        `start_frame` (cache bookkeeping in Python ints, rolling/eviction, RoPE tables): host work only, no sync."""
        f, hh, ww = grid
        if kv_cache.tokens_per_frame != hh * ww:
            raise ValueError(f"KV cache was built for {kv_cache.tokens_per_frame} tokens per frame, "
                             f"the latents have {hh * ww}")
        device = kv_cache.k.device
        plan = kv_cache.plan(start_frame, f)
        relative = kv_cache.rope == "relative"
        rope = self.rope.rotation(plan.query_frame, f, hh, ww, device, beyond_table=relative)
        cache_rope = None
        if not kv_cache.keys_rotated:
            first = plan.read_start // kv_cache.tokens_per_frame
            cache_rope = self.rope.rotation(first, plan.write_end // kv_cache.tokens_per_frame - first, hh, ww,
                                            device)
        opts = self.inference_options
        return Context(1, rope, cache=kv_cache, plan=plan, cache_rope=cache_rope, options=opts,
                       compiled=opts.compile and not torch.is_grad_enabled())
