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

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from model.attention import BlockCausal, block_causal_mask
from model.config import X0_PREDICTION_MIN_SIGMA, WanConfig
from model.inductor_heuristics import persistent_reductions
from model.kv_cache import KVCache
from model.rope import RotaryTables, Rotation, sinusoidal_embedding
from model.wan_block import Context, Head, InferenceOptions, WanBlock


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
        # Set by `utils.distributed.compile_blocks` (training): KV-cached calls then run each block uncompiled with
        # its layer-independent pieces compiled. A whole compiled block guards on the layer index and the cache's
        # Python state, so a rollout recompiles per layer and, past dynamo's recompile limit, runs eager.
        self.compile_cached_pieces = False
        self.sequence_parallel = None  # split tokens over ranks (inference): utils.sequence_parallel

    # ------------------------------------------------------------------------------------------------ helpers
    @torch.no_grad()
    def init_weights(self) -> "WanDiT":
        """The original initialisation (`wan/modules/model.py`), for training from scratch: Xavier-uniform linears
        with zero bias, text/time embeddings N(0, 0.02), a zero output head, modulation randn / sqrt(dim)."""
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
        # Row-major tokens: the residual stream inherits this layout through every layer, and a transposed one makes
        # each norm a strided column reduction and each elementwise kernel a transpose.
        return h.flatten(2).transpose(1, 2).contiguous(), tuple(h.shape[2:])

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
        # `_call_impl` is the module call without its compiled wrapper (hooks such as FSDP's still run)
        uncompiled = kv_cache is not None and self.compile_cached_pieces
        # Compiled pieces compile (once) inside their first call, under the model's inductor heuristics.
        heuristics = (persistent_reductions() if ctx.compiled and ctx.options.persistent_norms
                      else contextlib.nullcontext())
        with heuristics:
            for layer, block in enumerate(self.blocks):
                if uncompiled:
                    block = block._call_impl
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
        if self.config.prediction == "x0":
            flow = self._flow_from_x0(flow, x, t_groups)
        if return_hidden:
            if len(hidden) != len(return_hidden):
                raise ValueError(f"return_hidden {list(return_hidden)} names blocks outside 0..{len(self.blocks) - 1}")
            return flow, hidden, e
        return flow

    @staticmethod
    def _flow_from_x0(x0: Tensor, x: Tensor, t_groups: Tensor) -> Tensor:
        """flow = (x_t - x0) / sigma per sample and frame group (sigma = t / 1000, floored; see WanConfig)."""
        b, f = x.shape[:2]
        sigma = (t_groups.float() / 1000.0).clamp(min=X0_PREDICTION_MIN_SIGMA)
        sigma = sigma.repeat_interleave(f // sigma.shape[1], dim=1).view(b, f, 1, 1, 1)
        return ((x.float() - x0.float()) / sigma).to(x0.dtype)

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
                       compiled=(opts.compile and not torch.is_grad_enabled()) or self.compile_cached_pieces)
