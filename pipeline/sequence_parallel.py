"""Sequence parallelism for inference: the tokens of each forward call are split over the ranks of a process group.

One video, several GPUs: every rank runs the SAME rollout (same seed, same noise, same latents); inside the DiT each
rank holds only its share of the block's tokens, and of the KV cache its share of the heads.

Why Ulysses (all-to-all over heads) and not ring attention over the KV cache
---------------------------------------------------------------------------
A causal rollout queries with ONE block (3 frames, 4680 tokens at 480x832) but attends to a cache of up to 21
frames (32760 tokens). Ring attention keeps the queries local and passes the keys/values around the ring: each layer
moves (n-1)/n of the whole readable cache, ~7x the block, and needs attention kernels that return the log-sum-exp to
merge partial results. Ulysses moves only the block: q, k, v go from [local tokens, all heads] to [all tokens,
local heads] (one all-to-all), attention runs unchanged over the full sequence for H/n heads, and the output goes
back (one all-to-all): per layer ~4 x block x dim / n elements per rank, independent of the cache length. The cache
then splits by heads for free: each rank caches all tokens of its own heads, nothing of the cache ever travels, and
the window/sink/relative-RoPE bookkeeping (`model/kv_cache.py`) is untouched. The price is that the group size
must divide the number of heads (Wan 1.3B has 12: 2, 3, 4, 6 ranks; 14B has 40) -- other sizes are a clear error.

How the tokens are split
------------------------
Tokens are frame-major (frame, row, column). Each rank takes the same contiguous slice of EVERY frame (rank r:
tokens `[r*c, (r+1)*c)` of each frame, c = ceil(tokens_per_frame / n)), so a rank's tokens are still grouped by
frame and the per-frame timestep modulation of `WanBlock` works on them unchanged. When n does not divide the
tokens per frame, each frame is padded with zero tokens to n*c; the padding is dropped whenever the sequence is
whole (before attention and the cache, after the output head), so it never reaches the cache or the result.
Everything per token (patch embedding, norms, modulation, FFN, cross-attention with replicated text K/V, the output
head) runs on the local share; after the all-to-all, q/k/v are put back in global frame-major order, so attention,
block-causal masks and the cache see exactly the sequence of a single process. RoPE is applied before the
all-to-all with each token's global position. The head's output (only `patch volume x out_dim` features per token)
is all-gathered so every rank holds the full flow prediction for the next denoising step.

`model/` never imports torch.distributed: `enable_sequence_parallel` installs a `SequenceParallel` as the model's
token layout (`WanDiT.sequence_layout`, by default `model.wan_block.WholeSequence`, which keeps every token), and the
model asks its layout at a few fixed points (split the tokens, heads <-> tokens around attention, gather); it has
no sequence-parallel branches of its own. Inference only: the collectives here carry no gradients.
"""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from model.rope import Rotation
from model.wan_block import WHOLE_SEQUENCE
from utils.errors import InputError

_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # renamed in torch 2.13


def check_head_split(num_heads: int, size: int) -> None:
    """Ulysses gives each rank num_heads / size heads: the group size must divide the head count."""
    if size < 1:
        raise InputError(f"the sequence-parallel group size must be >= 1, got {size}")
    if num_heads % size:
        divisors = [d for d in range(1, num_heads + 1) if num_heads % d == 0]
        raise InputError(f"sequence parallelism splits attention heads over ranks: {num_heads} heads cannot be split "
                         f"over {size} ranks (use a sequence-parallel size in {divisors})")


class SequenceParallel:
    """The process group a model's tokens are split over: the model's token layout (`WanDiT.sequence_layout`)."""

    splits = True

    def __init__(self, group: dist.ProcessGroup | None = None):
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        # This rank's slice of each RoPE table, per (table, frame layout): the full tables are cached by
        # `RotaryTables`, so their slices live as long as they do instead of being cut again in every call.
        self._rotations: weakref.WeakKeyDictionary[Rotation, dict[int, Rotation]] = weakref.WeakKeyDictionary()

    def local_heads(self, num_heads: int) -> int:
        check_head_split(num_heads, self.size)
        return num_heads // self.size

    def split(self, tokens: Tensor, ctx, tokens_per_frame: int) -> Tensor:
        """This rank's share of `tokens` `[B, frames * tokens_per_frame, D]`; sets `ctx.shard` and slices the RoPE
        angles of `ctx` to the same tokens (their global positions)."""
        if torch.is_grad_enabled():
            raise RuntimeError("sequence parallelism is for inference: run the model under torch.no_grad() "
                               "(its collectives carry no gradients)")
        length = tokens.shape[1]
        if length % tokens_per_frame:
            raise ValueError(f"{length} tokens are not whole frames of {tokens_per_frame}")
        if ctx.shard.splits:
            raise RuntimeError("sequence parallelism needs a fresh call context (it cannot replay a prepared one, "
                               "as CUDA graphs do)")
        shard = Shard(self, tokens_per_frame, math.ceil(tokens_per_frame / self.size))
        ctx.shard = shard
        ctx.rope = self._local_rotation(ctx.rope, shard)
        return shard.split(tokens)

    def _local_rotation(self, rope: Rotation, shard: "Shard") -> Rotation:
        per_layout = self._rotations.setdefault(rope, {})
        if shard.tokens_per_frame not in per_layout:  # a new object: the full one is shared through the cache
            per_layout[shard.tokens_per_frame] = Rotation(shard.split(rope.cos), shard.split(rope.sin))
        return per_layout[shard.tokens_per_frame]


@dataclass(frozen=True)
class Shard:
    """The token layout of one forward call: `chunk` tokens of each frame per rank (frames padded to size*chunk)."""

    sp: SequenceParallel
    tokens_per_frame: int
    chunk: int
    splits = True  # a class attribute, not a field: the call's tokens and heads are spread over the group

    @property
    def padded(self) -> int:
        return self.chunk * self.sp.size

    def split(self, x: Tensor) -> Tensor:
        """Global `[..., L, F]` (a leading batch dim or none) -> this rank's `[..., L/T*chunk, F]`."""
        lead, (length, feat) = x.shape[:-2], x.shape[-2:]
        frames = length // self.tokens_per_frame
        x = x.reshape(*lead, frames, self.tokens_per_frame, feat)
        if self.padded != self.tokens_per_frame:
            x = F.pad(x, (0, 0, 0, self.padded - self.tokens_per_frame))
        r = self.sp.rank
        return x[..., r * self.chunk:(r + 1) * self.chunk, :].reshape(*lead, frames * self.chunk, feat)

    def _unpad(self, x: Tensor, batch: int, frames: int) -> Tensor:
        """`[B, frames, padded, ...]` -> `[B, frames * tokens_per_frame, ...]` (padding dropped)."""
        if self.padded != self.tokens_per_frame:
            x = x[:, :, :self.tokens_per_frame]
        return x.reshape(batch, frames * self.tokens_per_frame, *x.shape[3:])

    def to_heads(self, *xs: Tensor) -> tuple[Tensor, ...]:
        """Each of `xs` `[B, local tokens, H, d]` -> `[B, all tokens, H/n, d]` in global order (one all-to-all)."""
        n = self.sp.size
        b, local, heads, d = xs[0].shape
        frames = local // self.chunk
        # [n (head group = destination), len(xs), B, frames, chunk, H/n, d]
        send = torch.stack([x.reshape(b, frames, self.chunk, n, heads // n, d).permute(3, 0, 1, 2, 4, 5) for x in xs],
                           dim=1)
        recv = torch.empty_like(send)  # [n (source rank = token chunk), len(xs), B, frames, chunk, H/n, d]
        dist.all_to_all_single(recv, send, group=self.sp.group)
        recv = recv.permute(1, 2, 3, 0, 4, 5, 6).reshape(len(xs), b, frames, self.padded, heads // n, d)
        return tuple(self._unpad(r, b, frames) for r in recv.unbind(0))

    def to_tokens(self, y: Tensor) -> Tensor:
        """`[B, all tokens, H/n, d]` -> `[B, local tokens, H, d]` (the inverse of `to_heads`)."""
        n = self.sp.size
        b, length, h_local, d = y.shape
        frames = length // self.tokens_per_frame
        y = y.reshape(b, frames, self.tokens_per_frame, h_local, d)
        if self.padded != self.tokens_per_frame:
            y = F.pad(y, (0, 0, 0, 0, 0, self.padded - self.tokens_per_frame))
        # [n (token chunk = destination), B, frames, chunk, H/n, d]
        send = y.view(b, frames, n, self.chunk, h_local, d).permute(2, 0, 1, 3, 4, 5).contiguous()
        recv = torch.empty_like(send)  # [n (head group = source), B, frames, chunk, H/n, d]
        dist.all_to_all_single(recv, send, group=self.sp.group)
        return recv.permute(1, 2, 3, 0, 4, 5).reshape(b, frames * self.chunk, n * h_local, d)

    def gather(self, x: Tensor) -> Tensor:
        """Local `[B, local tokens, F]` -> global `[B, all tokens, F]` on every rank (one all-gather)."""
        b, local, feat = x.shape
        frames = local // self.chunk
        out = x.new_empty(self.sp.size * b, local, feat)  # the concatenated form (gloo knows no other)
        _all_gather(out, x.contiguous(), group=self.sp.group)
        out = out.view(self.sp.size, b, frames, self.chunk, feat).permute(1, 2, 0, 3, 4)
        return self._unpad(out.reshape(b, frames, self.padded, feat), b, frames)


# ---------------------------------------------------------------------------------------------------- setup

@dataclass(frozen=True)
class ParallelLayout:
    """Where this rank sits when `world` ranks run `sequence_size`-way sequence parallelism in
    `world / sequence_size` data-parallel groups (consecutive ranks form a sequence group)."""

    world: int
    rank: int
    sequence_size: int

    @property
    def data_size(self) -> int:
        return self.world // self.sequence_size

    @property
    def data_rank(self) -> int:
        return self.rank // self.sequence_size

    @property
    def sequence_rank(self) -> int:
        return self.rank % self.sequence_size

    @property
    def is_leader(self) -> bool:
        """The first rank of its sequence group: it decodes and writes that group's outputs."""
        return self.sequence_rank == 0


def parallel_layout(world: int, rank: int, sequence_size: int | None) -> ParallelLayout:
    size = world if sequence_size is None else sequence_size
    if size < 1 or world % size:
        raise InputError(f"the sequence-parallel size {size} must divide the number of processes {world}")
    return ParallelLayout(world, rank, size)


def new_sequence_group(layout: ParallelLayout) -> dist.ProcessGroup | None:
    """The process group of this rank's sequence group (a collective: every rank calls it with the same layout)."""
    if layout.sequence_size == layout.world:
        return None  # the default group
    group = None
    for first in range(0, layout.world, layout.sequence_size):  # every rank creates every group, in order
        ranks = list(range(first, first + layout.sequence_size))
        g = dist.new_group(ranks)
        if layout.rank in ranks:
            group = g
    return group


def enable_sequence_parallel(model, group: dist.ProcessGroup | None = None) -> SequenceParallel | None:
    """Split `model`'s tokens over `group` (None: the default group). A group of one leaves the model as it is.

    Caches made afterwards by `model.new_kv_cache` hold this rank's heads only. Weights, inputs and the random
    noise of the rollout must be identical on every rank of the group. Returns the installed layout (None for a
    group of one).
    """
    sp = SequenceParallel(group)
    check_head_split(model.config.num_heads, sp.size)
    model.sequence_layout = sp if sp.size > 1 else WHOLE_SEQUENCE
    return sp if sp.size > 1 else None
