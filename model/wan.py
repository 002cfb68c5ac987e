"""The Wan2.1 diffusion transformer: one class for the bidirectional teacher/critic and the causal generator.

Parameter names are the original ones, so a real Wan2.1 or Self-Forcing state dict loads as is. One public method
per attention mode, one return type each:
  * `forward(x, t, context, block_causal=None)`: a whole clip, bidirectional (teacher, critic) or block-causal
    (flex attention) -> flow;
  * `forward_teacher_forcing(x, t, context, clean_x, block_causal, aug_t=None)`: a whole clip, block-causal, each
    block attending to the clean frames before it -> flow;
  * `forward_cached(x, t, context, kv_cache, start_frame)`: a chunk of frames attending to a `KVCache`, into which
    its K/V are written (causal inference, self-forcing rollouts) -> flow;
  * `write_cache(x, t, context, kv_cache, start_frame)`: the clean-context pass, K/V written only -> None;
  * `features(x, t, context, layers)`: the bidirectional call with hidden states of some blocks (GAN heads)
    -> (flow, hidden states, time embedding).
Timesteps are `[B]` (one per sample, as the bidirectional model) or `[B, F]` (one per latent frame, as the causal
model); modulation is applied per timestep group accordingly.

How a call's tokens are laid out over processes is the `sequence_layout` seam (`WholeSequence`, or the
sequence-parallel layout `pipeline/sequence_parallel.py` installs); FSDP, `torch.compile` (of the per-layer pieces
through the `cached_pieces` seam, of whole blocks) and CUDA graphs are applied from outside too
(`utils/distributed.py`, `pipeline/compile.py`, `pipeline/cuda_graphs.py`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint, noop_context_fn

from model.attention import BlockCausal, block_causal_mask, checkpoint_keeping_self_attention
from model.config import X0_PREDICTION_MIN_SIGMA, WanConfig
from model.kv_cache import KVCache
from model.rope import RotaryTables, Rotation, sinusoidal_embedding
from model.wan_block import EAGER_PIECES, WHOLE_SEQUENCE, Context, Head, InferenceOptions, WanBlock

Grid = tuple[int, int, int]  # latent tokens per (frame, row, column)


class WanDiT(nn.Module):
    """Wan2.1 text-to-video DiT. See the module docstring for its modes."""

    # The public methods besides `forward` that run the network: whatever wraps `forward` from outside (FSDP's
    # parameter gathering, `utils/distributed.py`) must wrap these as well.
    entry_points = ("forward_teacher_forcing", "forward_cached", "write_cache", "features")

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
        self.inference_options = InferenceOptions()
        # How KV-cached calls run the per-layer pieces: as they are, unless compilation (`pipeline/compile.py`)
        # installs a runner that compiles them.
        self.cached_pieces = EAGER_PIECES
        self.checkpoint_keeps_self_attention = True  # see set_gradient_checkpointing
        # How each call's tokens are laid out over processes: all here, unless sequence parallelism
        # (`pipeline.sequence_parallel.enable_sequence_parallel`) installs a layout that splits them.
        self.sequence_layout = WHOLE_SEQUENCE

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

    def set_gradient_checkpointing(self, enabled: bool = True, keep_self_attention: bool = True) -> None:
        """Recompute each block in backward (non-reentrant). Needed to train through KV-cached rollouts cheaply.
        keep_self_attention: the recomputation skips the self-attention kernels, whose outputs are kept instead
        (`model.attention.checkpoint_keeping_self_attention`); the same gradients for a little memory."""
        for block in self.blocks:
            block.checkpointed = enabled
        self.checkpoint_keeps_self_attention = keep_self_attention

    @property
    def gradient_checkpointing(self) -> bool:
        return all(block.checkpointed for block in self.blocks)

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
        heads = self.sequence_layout.local_heads(cfg.num_heads)  # all tokens of this process's heads
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

    # ------------------------------------------------------------------------------------------------ modes
    def forward(self, x: Tensor, t: Tensor, context: Tensor, *, block_causal: BlockCausal | None = None) -> Tensor:
        """Flow prediction `[B, F, C, H, W]` for a whole clip: latents x `[B, F, C, H, W]`, timesteps t `[B]` or
        `[B, F]` (0..1000), text context `[B, L <= text_len, text_dim]`. Bidirectional, or block-causal (flex
        attention) with `block_causal`."""
        self._check_inputs(x, t, context)
        # 1. patchify: latents -> tokens
        tokens, grid = self.patchify(x)
        # 2. time embedding, one group per sample or per latent frame
        t_groups = self._timestep_groups(t, grid[0])
        e, e0 = self.embed_time(t_groups)
        # 3. text embedding
        text = self.embed_text(context.to(tokens.dtype))
        # 4. attention context: RoPE over the clip, the block-causal mask if any
        ctx = self._clip_context(grid, t_groups.shape[1], block_causal, tokens.device)
        # 5. transformer blocks
        tokens, _ = self._run_blocks(tokens, e0, text, ctx, grid)
        # 6. output head -> flow
        return self._output(tokens, e, ctx, grid, x, t_groups)

    def forward_teacher_forcing(self, x: Tensor, t: Tensor, context: Tensor, clean_x: Tensor,
                                block_causal: BlockCausal, aug_t: Tensor | None = None) -> Tensor:
        """Flow prediction for the noisy clip x where each block attends block-causally to the CLEAN frames
        `clean_x` `[B, F, C, H, W]` before it (teacher forcing), not to noisy ones. The clean frames sit at timestep
        `aug_t` `[B, F]` (default 0) and at the same RoPE positions as the noisy ones."""
        self._check_inputs(x, t, context)
        if clean_x.shape != x.shape:
            raise ValueError(f"clean_x must have the latents' shape {list(x.shape)}, got {list(clean_x.shape)}")
        # 1. patchify: the sequence is [clean frames; noisy frames]
        noisy_tokens, grid = self.patchify(x)
        clean_tokens, _ = self.patchify(clean_x)
        tokens = torch.cat([clean_tokens, noisy_tokens], dim=1)
        # 2. time embedding, per frame: the clean half at aug_t
        t_groups = self._timestep_groups(t, grid[0], per_frame=True)
        e, e0 = self.embed_time(t_groups)
        t_clean = aug_t if aug_t is not None else torch.zeros_like(t_groups, dtype=torch.float32)
        if t_clean.shape != t_groups.shape:
            raise ValueError(f"aug_t must be [B, F] = {list(t_groups.shape)}, got {list(t_clean.shape)}")
        e0 = torch.cat([self.embed_time(t_clean)[1], e0], dim=1)
        # 3. text embedding
        text = self.embed_text(context.to(tokens.dtype))
        # 4. attention context: both halves at the same RoPE positions, the teacher-forcing mask
        ctx = self._clip_context(grid, 2 * t_groups.shape[1], block_causal, tokens.device, teacher_forcing=True)
        # 5. transformer blocks
        tokens, _ = self._run_blocks(tokens, e0, text, ctx, grid)
        # 6. output head on the noisy half -> flow
        return self._output(tokens[:, tokens.shape[1] // 2:], e, ctx, grid, x, t_groups)

    def forward_cached(self, x: Tensor, t: Tensor, context: Tensor, kv_cache: KVCache, start_frame: int = 0, *,
                       prepared: Context | None = None) -> Tensor:
        """Flow prediction for the chunk x of frames starting at latent frame `start_frame`: its K/V are written
        into `kv_cache` and it attends to everything the cache holds. prepared: the `prepare_cached_call` plan of
        this call, made ahead (e.g. by a CUDA-graph runner); it then stands for `start_frame`."""
        self._check_inputs(x, t, context)
        # 1. patchify: latents -> tokens
        tokens, grid = self.patchify(x)
        # 2. time embedding, one group per sample or per latent frame
        t_groups = self._timestep_groups(t, grid[0])
        e, e0 = self.embed_time(t_groups)
        # 3. text embedding, unless the cache holds the prompt's cross-attention K/V already
        text = self._text_for_cache(context, kv_cache, tokens.dtype)
        # 4. attention context: the cache plan (slots to write, range to read, RoPE tables)
        ctx = self._cached_context(kv_cache, start_frame, grid, t_groups.shape[1], prepared)
        # 5. transformer blocks
        tokens, _ = self._run_blocks(tokens, e0, text, ctx, grid)
        # 6. output head -> flow
        return self._output(tokens, e, ctx, grid, x, t_groups)

    def write_cache(self, x: Tensor, t: Tensor, context: Tensor, kv_cache: KVCache, start_frame: int = 0, *,
                    prepared: Context | None = None) -> None:
        """Write the K/V of the chunk x (frames from `start_frame`) into `kv_cache`, as `forward_cached` does, and
        nothing else (the clean-context pass, priming, re-caching). With `inference_options.cache_pass_kv_only`
        the last layer stops once its K/V are written (exact); without it the whole call runs, as the original's."""
        self._check_inputs(x, t, context)
        kv_only = self.inference_options.cache_pass_kv_only
        # 1. patchify: latents -> tokens
        tokens, grid = self.patchify(x)
        # 2. time embedding, one group per sample or per latent frame
        t_groups = self._timestep_groups(t, grid[0])
        e, e0 = self.embed_time(t_groups)
        # 3. text embedding, unless the cache holds the prompt's cross-attention K/V already
        text = self._text_for_cache(context, kv_cache, tokens.dtype)
        # 4. attention context: the cache plan
        ctx = self._cached_context(kv_cache, start_frame, grid, t_groups.shape[1], prepared)
        # 5. transformer blocks, the last one stopping after its K/V with `cache_pass_kv_only`
        tokens, _ = self._run_blocks(tokens, e0, text, ctx, grid, last_kv_only=kv_only)
        # 6. output head, only without the lever (its flow is not returned)
        if not kv_only:
            self._output(tokens, e, ctx, grid, x, t_groups)

    def features(self, x: Tensor, t: Tensor, context: Tensor, layers: tuple[int, ...]
                 ) -> tuple[Tensor, list[Tensor], Tensor]:
        """The bidirectional `forward` plus what the GAN heads tap from the critic trunk: `(flow, hidden, e)` with
        hidden the output tokens `[B, L, D]` of the blocks in `layers` (in block order) and e the time embedding
        `[B, G, D]`."""
        self._check_inputs(x, t, context)
        if any(not 0 <= layer < len(self.blocks) for layer in layers):
            raise ValueError(f"features: layers {list(layers)} name blocks outside 0..{len(self.blocks) - 1}")
        # 1. patchify: latents -> tokens
        tokens, grid = self.patchify(x)
        # 2. time embedding, one group per sample or per latent frame
        t_groups = self._timestep_groups(t, grid[0])
        e, e0 = self.embed_time(t_groups)
        # 3. text embedding
        text = self.embed_text(context.to(tokens.dtype))
        # 4. attention context: RoPE over the clip
        ctx = self._clip_context(grid, t_groups.shape[1], None, tokens.device)
        # 5. transformer blocks, keeping the tapped blocks' outputs
        tokens, hidden = self._run_blocks(tokens, e0, text, ctx, grid, taps=tuple(layers))
        # 6. output head -> flow
        return self._output(tokens, e, ctx, grid, x, t_groups), hidden, e

    # ------------------------------------------------------------------------------------------------ steps
    @staticmethod
    def _timestep_groups(t: Tensor, frames: int, per_frame: bool = False) -> Tensor:
        """t `[B]` or `[B, F]` -> `[B, G]`: one group per sample (G = 1) or per latent frame (G = frames)."""
        t_groups = t if t.dim() == 2 else t[:, None].expand(-1, frames if per_frame else 1)
        groups = t_groups.shape[1]
        if groups != 1 and groups != frames:
            raise ValueError(f"per-frame timesteps need patch_size[0] == 1 (got {groups} timesteps for {frames} "
                             f"frames)")
        return t_groups

    def _text_for_cache(self, context: Tensor, kv_cache: KVCache, dtype: torch.dtype) -> Tensor | None:
        # The prompt's cross-attention K/V are cached per prompt: the text embedding is only needed to fill them.
        if self.inference_options.reuse_text and kv_cache.text_ready and not torch.is_grad_enabled():
            return None
        return self.embed_text(context.to(dtype))

    def _clip_context(self, grid: Grid, groups: int, block_causal: BlockCausal | None, device: torch.device,
                      teacher_forcing: bool = False) -> Context:
        f, hh, ww = grid
        rope = self.rope.rotation(0, f, hh, ww, device)
        mask = None
        if block_causal is not None:
            mask = block_causal_mask(block_causal, f, hh * ww, teacher_forcing, device)
        if teacher_forcing:  # clean and noisy frames share their positions
            rope = Rotation(torch.cat([rope.cos, rope.cos]), torch.cat([rope.sin, rope.sin]))
        return Context(groups, rope, mask=mask, options=self.inference_options)

    def _cached_context(self, kv_cache: KVCache, start_frame: int, grid: Grid, groups: int,
                        prepared: Context | None) -> Context:
        ctx = prepared or self.prepare_cached_call(kv_cache, start_frame, grid)
        ctx.groups = groups
        return ctx

    def _run_blocks(self, tokens: Tensor, e0: Tensor, text: Tensor | None, ctx: Context, grid: Grid,
                    taps: tuple[int, ...] = (), last_kv_only: bool = False) -> tuple[Tensor, list[Tensor]]:
        """Every block over this process's share of the tokens (`sequence_layout`) -> (output tokens, the whole
        outputs of the blocks in `taps`). last_kv_only: the last block only writes its K/V into the cache."""
        tokens = self.sequence_layout.split(tokens, ctx, grid[1] * grid[2])
        hidden = []
        checkpoint_contexts = (checkpoint_keeping_self_attention if self.checkpoint_keeps_self_attention
                               else noop_context_fn)
        for layer, block in enumerate(self.blocks):
            if last_kv_only and layer == len(self.blocks) - 1:
                block(tokens, e0, text, ctx, layer, kv_only=True)
            elif block.checkpointed and torch.is_grad_enabled():
                tokens = checkpoint(block, tokens, e0, text, ctx, layer, use_reentrant=False,
                                    context_fn=checkpoint_contexts)
            else:
                tokens = block(tokens, e0, text, ctx, layer)
            if layer in taps:
                hidden.append(ctx.shard.gather(tokens))
        return tokens, hidden

    def _output(self, tokens: Tensor, e: Tensor, ctx: Context, grid: Grid, x: Tensor, t_groups: Tensor) -> Tensor:
        """Output head, gathered over the token layout, unpatchified; x0 predictions converted to flow."""
        out = ctx.shard.gather(self.head(tokens, e, e.shape[1]))
        flow = self.unpatchify(out, grid)
        if self.config.prediction == "x0":
            flow = self._flow_from_x0(flow, x, t_groups)
        return flow

    @staticmethod
    def _flow_from_x0(x0: Tensor, x: Tensor, t_groups: Tensor) -> Tensor:
        """flow = (x_t - x0) / sigma per sample and frame group (sigma = t / 1000, floored; see WanConfig)."""
        b, f = x.shape[:2]
        sigma = (t_groups.float() / 1000.0).clamp(min=X0_PREDICTION_MIN_SIGMA)
        sigma = sigma.repeat_interleave(f // sigma.shape[1], dim=1).view(b, f, 1, 1, 1)
        return ((x.float() - x0.float()) / sigma).to(x0.dtype)

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
        return Context(1, rope, cache=kv_cache, plan=plan, cache_rope=cache_rope, options=self.inference_options,
                       pieces=self.cached_pieces)
