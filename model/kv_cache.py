"""The KV cache of the causal DiT: static buffers, rolling window, attention sink, absolute or relative RoPE.

Bookkeeping is plain Python ints (no tensor indices, so no host syncs per layer). Semantics follow the original
(`wan/modules/causal_model.py`): a call for frames `[s, e)` writes the slots that end `e - global_end` past the
last valid slot, so repeated calls for the same block (denoising steps, then the clean-context pass) overwrite the
same slots; a call that would overflow a rolling cache first evicts the oldest non-sink frames.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from model.rope import RotaryTables, rotate_frames


@dataclass(frozen=True)
class CacheWrite:
    """Where one forward call of `num_tokens` tokens writes and what it reads (token indices into the buffer)."""

    write_start: int
    write_end: int
    read_start: int
    global_end: int
    evict: int  # tokens evicted (shifted out) before writing; 0 if none
    keep: int  # tokens moved by the eviction
    query_frame: int  # RoPE frame index of the first query frame


def inference_cache_geometry(frames: int, window_frames: int, sink_frames: int) -> tuple[int, int, int]:
    """(capacity, window, sink) in latent frames of the cache inference builds for a rollout of `frames` frames
    under the model's `local_attn_size` (`window_frames`, -1: none) and `sink_size`: every frame without a window,
    else `window_frames` slots rolling with the sink pinned. A rollout shorter than the window never rolls: a cache of
    its own length attends to the same frames and holds no slots it would never fill (the sink only matters once
    frames are evicted)."""
    if window_frames == -1:
        return frames, -1, 0
    if frames < window_frames:
        return frames, frames, min(sink_frames, frames - 1)
    return window_frames, window_frames, sink_frames


class KVCache:
    """Self-attention K/V of every layer, `[layers, B, capacity_tokens, heads, head_dim]`, plus the prompt's
    cross-attention K/V `[layers, B, text_len, heads, head_dim]`.

    window_frames: -1 keeps every frame (capacity must hold the whole video); otherwise the cache rolls, evicting
      the oldest non-sink frames, and queries attend to at most the last `window_frames` frames.
    sink_frames: frames pinned at the start of the buffer (attention sink).
    rope: "absolute" caches keys rotated at their absolute frame index (the original, bounded by the RoPE table);
      "relative" gives every cached key the position of its slot inside the buffer (plus a common offset), so the
      position differences attention sees stay bounded by the capacity however long the rollout runs.
      RoPE scores depend only on position differences, so "relative" stores keys rotated at their absolute frame
      (queries too, as "absolute") and only re-rotates the pinned sink frames when the window rolls: rolled frames
      move down by as many slots as the offset grows. A pristine copy of the sink keys (`sink_k`) is kept so the
      re-rotation never accumulates rounding. Positions may run past the RoPE table.
    rerotate_window: relative RoPE as first implemented: keys stored un-rotated and the whole readable window
      rotated by slot at every read (every layer, every call). Same attention output, much slower; kept as the
      benchmark's baseline and as the reference of the tests.
    rope_tables: the model's `RotaryTables` (needed by "relative" to re-rotate sink keys).
    detach_writes: write K/V without autograd history (the paper's semantics: the cache is computed without
      gradients). False reproduces the original, where gradients leak through in-place cache writes (docs/original.md).
    cross_heads: heads of the cross-attention K/V (default num_heads); under sequence parallelism the self-attention
      cache holds this rank's heads only, the prompt's K/V all of them.
    """

    def __init__(self, *, num_layers: int, batch_size: int, capacity_frames: int, tokens_per_frame: int,
                 num_heads: int, head_dim: int, text_len: int, window_frames: int = -1, sink_frames: int = 0,
                 rope: str = "absolute", detach_writes: bool = True, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu", rerotate_window: bool = False,
                 rope_tables: RotaryTables | None = None, cross_heads: int | None = None):
        if rope not in ("absolute", "relative"):
            raise ValueError(f"rope must be 'absolute' or 'relative', got {rope!r}")
        if window_frames != -1 and not 0 < window_frames <= capacity_frames:
            raise ValueError(f"window_frames {window_frames} must be -1 or in [1, capacity_frames={capacity_frames}]")
        if not 0 <= sink_frames < capacity_frames:
            raise ValueError(f"sink_frames {sink_frames} must be in [0, capacity_frames={capacity_frames})")
        self.tokens_per_frame = tokens_per_frame
        self.capacity = capacity_frames * tokens_per_frame
        self.window_frames = window_frames
        self.sink = sink_frames * tokens_per_frame
        self.rope = rope
        self.rerotate_window = rope == "relative" and rerotate_window
        self.rope_tables = rope_tables
        self.detach_writes = detach_writes
        shape = (num_layers, batch_size, self.capacity, num_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        # Relative RoPE: keys of the sink slots as written, and the frame offset each sink frame was written at.
        self.sink_k = None
        if rope == "relative" and not self.rerotate_window and self.sink:
            if rope_tables is None:
                raise ValueError("a relative-RoPE cache with sink frames needs the model's rope_tables")
            self.sink_k = torch.zeros((num_layers, batch_size, self.sink, num_heads, head_dim), dtype=dtype,
                                      device=device)
        self._sink_offsets: list[int | None] = [None] * sink_frames
        cross_shape = (num_layers, batch_size, text_len, cross_heads or num_heads, head_dim)
        self.cross_k = torch.zeros(cross_shape, dtype=dtype, device=device)
        self.cross_v = torch.zeros(cross_shape, dtype=dtype, device=device)
        self.cross_ready = [False] * num_layers
        self.global_end = 0  # absolute token index one past the last token ever written
        self.local_end = 0  # buffer slot one past the last valid slot
        self._pending: CacheWrite | None = None

    @property
    def rolling(self) -> bool:
        return self.window_frames != -1

    @property
    def num_frames_held(self) -> int:
        return self.local_end // self.tokens_per_frame

    @property
    def frame_offset(self) -> int:
        """Absolute frame index minus buffer slot (in frames) of every non-sink frame held."""
        return (self.global_end - self.local_end) // self.tokens_per_frame

    @property
    def keys_rotated(self) -> bool:
        """Whether cached keys are stored rotated (all modes but `rerotate_window`)."""
        return not self.rerotate_window

    @property
    def text_ready(self) -> bool:
        """Every layer holds the prompt's cross-attention K/V (the text embedding is then not needed)."""
        return all(self.cross_ready)

    def store_text(self, layer: int, k: Tensor, v: Tensor) -> None:
        """Keep one layer's cross-attention K/V `[B, text_len, heads, head_dim]` of the current prompt."""
        self.cross_k[layer].copy_(k)
        self.cross_v[layer].copy_(v)
        self.cross_ready[layer] = True

    def reset(self, self_attention: bool = True, cross_attention: bool = True) -> None:
        """Forget the video (self-attention) and/or the prompt (cross-attention). Buffers are reused, not freed."""
        if self_attention:
            self.global_end = self.local_end = 0
            self._pending = None
            self._sink_offsets = [None] * len(self._sink_offsets)
        if cross_attention:
            self.cross_ready = [False] * len(self.cross_ready)

    def skip_to(self, frame: int) -> None:
        """Continue at latent frame `frame` without writing the frames in between: an empty cache may start at any
        frame; a rolling cache may jump forward (re-caching writes the sink frames, then jumps to the window)."""
        target = frame * self.tokens_per_frame
        if target < self.global_end:
            raise ValueError(f"cannot skip back from frame {self.global_end // self.tokens_per_frame} to {frame}")
        if target > self.global_end and not (self.rolling or self.local_end == 0):
            raise ValueError("skipping frames needs a rolling cache (window_frames != -1) or an empty one")
        delta = (target - self.global_end) // self.tokens_per_frame
        self.global_end = target
        if delta and self.local_end and self.rope == "relative" and not self.rerotate_window:
            # The held frames keep their slots while the offset grows: move them all by the jump.
            with torch.no_grad():
                held = slice(self.sink, self.local_end)
                self.k[:, :, held] = self._rotate_frames(self.k[:, :, held], delta)
            self._refresh_sink()

    def plan(self, start_frame: int, num_frames: int) -> CacheWrite:
        """Bookkeeping for a call on frames `[start_frame, start_frame + num_frames)`; evicts if needed."""
        n = num_frames * self.tokens_per_frame
        start = start_frame * self.tokens_per_frame
        end = start + n
        if start != self.global_end and end != self.global_end:
            # Anything else would desynchronise the slots from the frames they hold.
            raise ValueError(f"KV cache holds frames up to {self.global_end // self.tokens_per_frame}; a call may "
                             f"only append or rewrite the last chunk (got frames [{start_frame}, {start_frame + num_frames}))")
        grow = end - self.global_end
        evict = keep = 0
        if self.rolling and grow > 0 and self.local_end + grow > self.capacity:
            evict = self.local_end + grow - self.capacity
            keep = self.local_end - evict - self.sink
            if keep < 0:
                raise ValueError(f"a chunk of {num_frames} frames does not fit a rolling cache of "
                                 f"{self.capacity // self.tokens_per_frame} frames with {self.sink // self.tokens_per_frame} sink frames")
            self._shift(evict, keep)
        new_local_end = self.local_end + grow - evict
        if new_local_end > self.capacity:
            raise ValueError(
                f"KV cache overflow: frame {end // self.tokens_per_frame} does not fit a cache of "
                f"{self.capacity // self.tokens_per_frame} frames; enable a rolling window (local_attn_size) "
                "or allocate more capacity")
        attend = self.window_frames * self.tokens_per_frame if self.rolling else self.capacity
        write_start = new_local_end - n
        query_frame = write_start // self.tokens_per_frame if self.rerotate_window else start_frame
        plan = CacheWrite(write_start=write_start, write_end=new_local_end, read_start=max(0, new_local_end - attend),
                          global_end=max(end, self.global_end), evict=evict, keep=keep, query_frame=query_frame)
        self.global_end, self.local_end = plan.global_end, plan.write_end
        if self.sink_k is not None:
            tpf = self.tokens_per_frame
            for slot in range(write_start // tpf, min(new_local_end, self.sink) // tpf):
                self._sink_offsets[slot] = self.frame_offset
            if evict:
                self._refresh_sink()
        return plan

    def _rotate_frames(self, keys: Tensor, delta_frames: int) -> Tensor:
        """Keys `[..., head_dim]` moved `delta_frames` further along the temporal RoPE axis."""
        tables = self.rope_tables
        if tables is None:
            raise ValueError("re-rotating relative-RoPE keys needs the model's rope_tables")
        angles = tables.frame_inv_freq(keys.device) * float(delta_frames)  # float64 on the device: no host sync
        return rotate_frames(keys, tables.axis_dims[0], angles.cos().float(), angles.sin().float())

    def _refresh_sink(self) -> None:
        """Sink keys at the current offset, re-rotated from the pristine copy (so rounding never accumulates)."""
        tpf, offset = self.tokens_per_frame, self.frame_offset
        runs: list[list[int]] = []  # [first slot, end slot, written-at offset] of consecutive sink frames
        for slot, written_at in enumerate(self._sink_offsets):
            if written_at is None:
                continue
            if runs and runs[-1][1] == slot and runs[-1][2] == written_at:
                runs[-1][1] += 1
            else:
                runs.append([slot, slot + 1, written_at])
        with torch.no_grad():
            for first, end, written_at in runs:
                rows = slice(first * tpf, end * tpf)
                self.k[:, :, rows] = self._rotate_frames(self.sink_k[:, :, rows], offset - written_at)

    def _shift(self, evict: int, keep: int) -> None:
        """Move the `keep` tokens after the evicted ones to just after the sink, in every layer at once."""
        src = slice(self.sink + evict, self.sink + evict + keep)
        dst = slice(self.sink, self.sink + keep)
        with torch.no_grad():
            self.k[:, :, dst] = self.k[:, :, src].clone()
            self.v[:, :, dst] = self.v[:, :, src].clone()

    def write(self, layer: int, plan: CacheWrite, k: Tensor, v: Tensor) -> None:
        """Store a call's keys (rotated, or raw with `rerotate_window`) and values `[B, n, heads, head_dim]`."""
        if self.detach_writes:
            k, v = k.detach(), v.detach()
        k_slots, v_slots = self._slot_views(layer, plan)
        k_slots.copy_(k)
        v_slots.copy_(v)
        if self.sink_k is not None and plan.write_start < self.sink:
            end = min(plan.write_end, self.sink)
            with torch.no_grad():
                self.sink_k[layer, :, plan.write_start:end] = k[:, :end - plan.write_start]

    def slots(self, layer: int, plan: CacheWrite) -> tuple[Tensor, Tensor] | None:
        """Views of the K/V slots this call writes, `[B, n, heads, head_dim]`, for writers that store in place; None
        when a write must go through `write` (the pristine sink copy of relative RoPE)."""
        if self.sink_k is not None and plan.write_start < self.sink:
            return None
        return self._slot_views(layer, plan)

    def _slot_views(self, layer: int, plan: CacheWrite) -> tuple[Tensor, Tensor]:
        return (self.k[layer, :, plan.write_start:plan.write_end],
                self.v[layer, :, plan.write_start:plan.write_end])

    def past(self, layer: int, plan: CacheWrite) -> tuple[Tensor, Tensor]:
        """Cached K/V before this call's own slots, `[B, write_start - read_start, heads, head_dim]` (views)."""
        return (self.k[layer, :, plan.read_start:plan.write_start],
                self.v[layer, :, plan.read_start:plan.write_start])

    def readable(self, layer: int, plan: CacheWrite) -> tuple[Tensor, Tensor]:
        """Everything this call attends to, its own slots included (views into the buffers)."""
        return (self.k[layer, :, plan.read_start:plan.write_end],
                self.v[layer, :, plan.read_start:plan.write_end])
