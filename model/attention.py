"""Attention back-ends (chosen here and nowhere else) and the block-causal masks of the causal DiT.

Back-end order for unmasked attention: flash-attn 3 -> flash-attn 4 -> flash-attn 2 (CUDA, half precision, when
installed) -> torch SDPA (cuDNN/flash kernels on GPU, math on CPU); `set_attention_backend` pins one (e.g. cuDNN SDPA
where the speed benchmark finds it fastest). Under torch.compile flash-attn is one opaque op without gradients; a
compiled graph that needs gradients uses SDPA (eager training keeps flash-attn's own autograd). Masked
(block-causal) attention uses flex attention on CUDA and SDPA with the equivalent dense boolean mask on CPU, where
compiling flex attention costs ~20 s per shape.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


def _output_only(fn):
    """flash-attn 3 (some releases) and 4 also return the log-sum-exp: keep the output."""
    def call(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        out = fn(q, k, v)
        return out[0] if isinstance(out, tuple) else out
    return call


@functools.cache
def _installed_flash_attn():
    """(major version, `flash_attn_func`) of the installed flash-attention taking `[B, L, H, D]`, or None: 3 (Hopper),
    then 4 (CuTe DSL; Hopper and Blackwell), then 2."""
    try:
        from flash_attn_interface import flash_attn_func
        return 3, flash_attn_func
    except ImportError:
        pass
    # flash-attn 4 compiles its kernels at first use (seconds each) and keeps them on disk only when asked: ask, as
    # torch.compile keeps inductor's, so a second process starts warm (a user's own setting wins).
    os.environ.setdefault("FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED", "1")
    try:
        from flash_attn.cute import flash_attn_func
        return 4, flash_attn_func
    except ImportError:
        pass
    try:
        from flash_attn import flash_attn_func
        return 2, flash_attn_func
    except ImportError:
        return None


def _flash_attn_func():
    """The installed flash-attention as `(q, k, v) -> out`, or None."""
    installed = _installed_flash_attn()
    if installed is None:
        return None
    version, fn = installed
    return fn if version == 2 else _output_only(fn)


def _flash_attn_lse_func():
    """The installed flash-attention as `(q, k, v) -> (out, lse [B, H, Lq])`, or None."""
    installed = _installed_flash_attn()
    if installed is None:
        return None
    version, fn = installed
    if version == 4:
        return lambda q, k, v: fn(q, k, v, return_lse=True)[:2]
    if version == 2:
        return lambda q, k, v: fn(q, k, v, return_attn_probs=True)[:2]
    return lambda q, k, v: fn(q, k, v)[:2]


@torch.compiler.assume_constant_result
def _flash_attn_installed() -> bool:
    """`_flash_attn_func() is not None` as a constant to torch.compile: dynamo cannot trace the try-imports (a failing
    import is a graph break), so it runs this eagerly once per graph instead."""
    return _flash_attn_func() is not None


# Devices whose tensors flash-attn takes (a test adds "cpu" to run the branch with a fake flash-attn).
_FLASH_DEVICE_TYPES = ("cuda",)


@torch.library.custom_op("self_forcing::flash_attention", mutates_args=())
def _flash_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """The installed flash-attn as one opaque op: torch.compile does not trace into it (flash-attn 4 is a JIT-compiling
    Python DSL that dynamo cannot follow), so the compiled pieces keep one graph around it."""
    return _flash_attn_func()(q, k, v)


@_flash_attention.register_fake
def _(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    return q.new_empty(q.shape[:-1] + v.shape[-1:])


@functools.cache
def _compiled_flex_attention():
    from torch.nn.attention.flex_attention import flex_attention
    return torch.compile(flex_attention, dynamic=False)


@dataclass(frozen=True)
class BlockCausal:
    """How a whole clip is split into autoregressive blocks (the causal training path).

    frames_per_block: latent frames generated together (3 in Self Forcing).
    independent_first_frame: frame 0 is a block of its own (image-to-video layout 1, n, n, ...).
    local_attn_size: if not -1, keys must also lie within this many frames ending at the end of the query's block.
    """

    frames_per_block: int = 3
    independent_first_frame: bool = False
    local_attn_size: int = -1

    def block_sizes(self, num_frames: int) -> list[int]:
        """Frames per block for a clip of `num_frames` latent frames, e.g. [3, 3, 3] or [1, 3, 3]."""
        first = 1 if self.independent_first_frame else 0
        if num_frames <= first or (num_frames - first) % self.frames_per_block:
            raise ValueError(
                f"{num_frames} latent frames cannot be split into blocks of {self.frames_per_block}"
                + (" after an independent first frame" if first else ""))
        return [1] * first + [self.frames_per_block] * ((num_frames - first) // self.frames_per_block)

    def frame_block_bounds(self, num_frames: int) -> tuple[list[int], list[int]]:
        """(start, end) frame of the block containing each frame (end exclusive)."""
        starts, ends, start = [], [], 0
        for size in self.block_sizes(num_frames):
            starts += [start] * size
            ends += [start + size] * size
            start += size
        return starts, ends


class AttentionMask:
    """A block-causal (optionally teacher-forcing) mask over `num_frames * tokens_per_frame` tokens.

    Teacher forcing doubles the sequence: `[clean tokens | noisy tokens]`; a clean query of block b sees clean blocks
    0..b, a noisy query of block b sees clean blocks before b and its own noisy block. Every token sees itself.
    """

    def __init__(self, spec: BlockCausal, num_frames: int, tokens_per_frame: int, teacher_forcing: bool,
                 device: torch.device):
        if teacher_forcing and spec.independent_first_frame:
            raise NotImplementedError("teacher forcing with an independent first frame is not supported")
        starts, ends = (torch.tensor(b, device=device) for b in spec.frame_block_bounds(num_frames))
        self.spec = spec
        self.num_tokens = num_frames * tokens_per_frame * (2 if teacher_forcing else 1)
        self.teacher_forcing = teacher_forcing
        n = num_frames * tokens_per_frame
        self._n = n
        self._end = ends.repeat_interleave(tokens_per_frame) * tokens_per_frame
        self._start = starts.repeat_interleave(tokens_per_frame) * tokens_per_frame
        self._window = spec.local_attn_size * tokens_per_frame if spec.local_attn_size != -1 else None
        self.device = device
        self._dense: Tensor | None = None
        self._block_mask = None

    def mask_mod(self, b, h, q, k):  # noqa: ARG002 - flex attention signature
        if not self.teacher_forcing:
            end = self._end[q]
            allowed = k < end
            if self._window is not None:
                allowed = allowed & (k >= end - self._window)
            return allowed | (q == k)
        n = self._n
        q_clean = q < n
        qi = torch.where(q_clean, q, q - n)
        end, start = self._end[qi], self._start[qi]
        k_clean = k < n
        ki = torch.where(k_clean, k, k - n)
        clean_rows = k_clean & (ki < end)
        noisy_rows = (k_clean & (ki < start)) | (~k_clean & (ki >= start) & (ki < end))
        if self._window is not None:
            clean_rows = clean_rows & (ki >= end - self._window)
            noisy_rows = noisy_rows & (ki >= end - self._window)
        return torch.where(q_clean, clean_rows, noisy_rows) | (q == k)

    def dense(self) -> Tensor:
        """`[L, L]` bool, True = attend."""
        if self._dense is None:
            idx = torch.arange(self.num_tokens, device=self.device)
            self._dense = self.mask_mod(None, None, idx[:, None], idx[None, :])
        return self._dense

    def block_mask(self):
        if self._block_mask is None:
            from torch.nn.attention.flex_attention import create_block_mask
            def mask_mod(b, h, q, k):  # flex attention inspects the signature: a plain 4-argument function
                return self.mask_mod(b, h, q, k)

            self._block_mask = create_block_mask(mask_mod, B=None, H=None, Q_LEN=self.num_tokens,
                                                 KV_LEN=self.num_tokens, device=self.device)
        return self._block_mask


@functools.lru_cache(maxsize=16)
def block_causal_mask(spec: BlockCausal, num_frames: int, tokens_per_frame: int, teacher_forcing: bool,
                      device: torch.device) -> AttentionMask:
    """Cached per shape: a new clip length or layout gets its own mask (the original kept the first one forever)."""
    return AttentionMask(spec, num_frames, tokens_per_frame, teacher_forcing, device)


# Unmasked attention back-end: "auto" (flash-attn if installed, else SDPA's own choice), "flash_attn", one SDPA
# kernel: "sdpa_cudnn", "sdpa_flash", "sdpa_efficient", "sdpa_math", or cuDNN / flash-attn with long key sets in two
# halves without gradients ("sdpa_cudnn_halves", "flash_attn_halves", `_key_halves`); benchmarks/speed.py times them
# and picks.
ATTENTION_BACKENDS = ("auto", "flash_attn", "sdpa", "sdpa_cudnn", "sdpa_flash", "sdpa_efficient", "sdpa_math",
                      "sdpa_cudnn_halves", "flash_attn_halves")
# Key sets at least this long are halved by the *_halves back-ends (the self-attention over the cache; not the 512 text
# tokens of cross-attention).
HALVES_MIN_KEYS = 4096
_backend = "auto"


def set_attention_backend(name: str) -> None:
    """Choose the unmasked attention back-end for the whole process (see `ATTENTION_BACKENDS`)."""
    global _backend
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"attention backend must be one of {ATTENTION_BACKENDS}, got {name!r}")
    if name in ("flash_attn", "flash_attn_halves") and _flash_attn_func() is None:
        raise ValueError(f"attention backend {name}: none of flash-attn 3, 4 or 2 is installed")
    _backend = name


def _sdpa(q: Tensor, k: Tensor, v: Tensor, kernel: str | None) -> Tensor:
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if kernel is None or not q.is_cuda:
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2)
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with sdpa_kernel(getattr(SDPBackend, {"cudnn": "CUDNN_ATTENTION", "flash": "FLASH_ATTENTION",
                                          "efficient": "EFFICIENT_ATTENTION", "math": "MATH"}[kernel])):
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2)


def merge_attention_parts(outs: Tensor, lses: Tensor) -> Tensor:
    """Attention over the union of disjoint key sets from each set's result: `outs` `[S, ..., D]` and the natural-log
    sums of exponentiated scores `lses` `[S, ...]` -> `[..., D]` (each part weighted by its share of the softmax
    mass)."""
    weights = torch.softmax(lses.float(), dim=0).unsqueeze(-1)
    return (outs.float() * weights).sum(0).to(outs.dtype)


@functools.cache
def _compiled_merge():
    return torch.compile(merge_attention_parts, dynamic=False)


def _cudnn_attention_with_lse(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """cuDNN SDPA on `[B, L, H, D]`: the output `[B, Lq, H, D]` and the log-sum-exp `[B, H, Lq]`."""
    out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None, True, 0.0, False, False)[:2]
    return out.transpose(1, 2), lse.reshape(out.shape[:3])


@torch.library.custom_op("self_forcing::flash_attention_lse", mutates_args=())
def _flash_attention_lse(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """The installed flash-attn with its log-sum-exp, one opaque op (as `_flash_attention`)."""
    out, lse = _flash_attn_lse_func()(q, k, v)
    return out, lse.float()


@_flash_attention_lse.register_fake
def _(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    return q.new_empty(q.shape[:-1] + v.shape[-1:]), q.new_empty((q.shape[0], q.shape[2], q.shape[1]),
                                                                  dtype=torch.float32)


def _key_halves(q: Tensor, k: Tensor, v: Tensor, partial) -> Tensor:
    """Batch-1 attention (`[1, L, H, D]`) with the keys split into two halves run as a batch of two, then merged;
    `partial(q, k, v) -> (out [B, Lq, H, D], lse [B, H, Lq])` is one kernel launch with its log-sum-exp.

    A block's queries make 37 row tiles of 128 per head, 444 tiles on an H100's 132 SMs: 3.4 waves, so the last wave
    runs a third full (cuDNN takes as long for 4,680 queries as for 5,376: benchmarks/attention_split.py). Two halves
    of the keys in one launch make 888 shorter tiles, 6.7 waves. The halves are views of the contiguous cache; the
    query is shared (a stride-0 batch)."""
    half = k.shape[1] // 2
    kh, vh = (t.reshape(2, half, *t.shape[2:]) for t in (k, v))
    out, lse = partial(q.expand(2, -1, -1, -1), kh, vh)
    # One fused kernel on the GPU (attention runs between the compiled pieces, so the merge is compiled on its own).
    merge = _compiled_merge() if out.is_cuda else merge_attention_parts
    return merge(out, lse.transpose(1, 2)).unsqueeze(0)


def _halves_apply(q: Tensor, k: Tensor) -> bool:
    return q.is_cuda and q.shape[0] == 1 and k.shape[1] >= HALVES_MIN_KEYS and k.shape[1] % 2 == 0


def attention(q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask | None = None) -> Tensor:
    """Softmax attention with scale 1/sqrt(head_dim): `q` `[B, Lq, H, D]`, `k`/`v` `[B, Lk, H, D]` -> `[B, Lq, H, D]`.
    """
    if mask is not None:
        if q.is_cuda:
            out = _compiled_flex_attention()(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             block_mask=mask.block_mask())
        else:
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                 attn_mask=mask.dense())
        return out.transpose(1, 2)
    no_grad = not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad))
    if _backend == "sdpa_cudnn_halves":
        if no_grad and _halves_apply(q, k):
            return _key_halves(q, k, v, _cudnn_attention_with_lse)
        return _sdpa(q, k, v, "cudnn")
    half_precision = q.dtype in (torch.float16, torch.bfloat16)
    if _backend == "flash_attn_halves" and no_grad and half_precision and _halves_apply(q, k):
        return _key_halves(q, k, v, _flash_attention_lse)
    if _backend.startswith("sdpa"):
        return _sdpa(q, k, v, _backend[5:] or None)
    if q.device.type in _FLASH_DEVICE_TYPES and half_precision and _flash_attn_installed():
        if no_grad:
            return _flash_attention(q, k, v)
        if not torch.compiler.is_compiling():
            return _flash_attn_func()(q, k, v)  # flash-attn's own autograd function; the opaque op has no backward
        # A compiled graph that needs gradients takes SDPA: flash-attn 4's autograd function is not traceable.
    return _sdpa(q, k, v, None)


# Activation checkpointing that keeps the attention outputs: backward then recomputes a block's projections, norms,
# FFN and elementwise work, but not its quadratic self-attention, which is most of the FLOPs of a 32,760-token clip
# (and over half of a rollout chunk's against its KV cache). Cross-attention to the text (fewer keys than queries) is
# cheap to redo and not kept. The kept outputs (with their log-sum-exp) are what the attention backward reads anyway.
_SAVED_ATTENTION_OPS = tuple(
    getattr(torch.ops.aten, name).default for name in (
        "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_efficient_attention", "_scaled_dot_product_flash_attention_for_cpu")
    if hasattr(torch.ops.aten, name))


def _keep_self_attention(ctx, op, *args, **kwargs):
    from torch.utils.checkpoint import CheckpointPolicy
    if op in _SAVED_ATTENTION_OPS and args[1].shape[-2] >= args[0].shape[-2]:  # SDPA layout: [B, H, L, D]
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def checkpoint_keeping_self_attention():
    """`context_fn` for `torch.utils.checkpoint.checkpoint` (non-reentrant): selective recomputation that keeps the
    outputs of self-attention kernels (SDPA's cuDNN, flash, memory-efficient and CPU flash ops)."""
    from torch.utils.checkpoint import create_selective_checkpoint_contexts
    return create_selective_checkpoint_contexts(_keep_self_attention)
