"""The block-wise autoregressive rollout, written once for inference and self-forcing training.

For each block of latent frames: run the few-step chain (predict x0, re-noise it to the next step's timestep with
fresh noise, predict again ...), emit the block, then run one pass at the context timestep on the block's x0 to
write clean keys/values into the KV cache for the blocks that follow.

Inference calls it without a gradient policy (everything under no_grad). Self-forcing training passes a
`GradientPolicy`: each block exits its chain at a given step and only the exit-step forward of blocks starting at or
after `grad_from_frame` keeps its graph; every other forward runs under no_grad (stochastic gradient truncation).
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from model.kv_cache import KVCache
from pipeline.denoiser import Denoiser

NoiseFn = Callable[[Tensor], Tensor]  # returns fresh Gaussian noise shaped like its argument
# A live source of prompt embeddings, asked once per block at the block boundary (an interactive demo's prompt box).
# Returning a different tensor object than the one in use switches prompts there (KV re-cache); the same object
# keeps the cache.
ContextSource = Callable[[int], Tensor]
# Prompt embeddings `[B, L, text_dim]`, a schedule [(first block, embeddings), ...] starting at block 0, or a source.
Conditioning = Tensor | Sequence[tuple[int, Tensor]] | ContextSource
BlockCallback = Callable[[int, int, Tensor], None]  # (block index, start frame, x0 of the block [B, n, C, H, W])
StopFn = Callable[[], bool]  # asked before every block; True ends the rollout there with the blocks made so far


@dataclass
class GradientPolicy:
    """exit_steps: denoising step index at which each generated block stops (len = number of blocks).
    grad_from_frame: blocks starting before this frame never carry gradients (None: no gradients at all)."""

    exit_steps: Sequence[int]
    grad_from_frame: int | None = 0


@dataclass
class RolloutResult:
    latents: Tensor  # [B, F, C, H, W], initial latent frames included
    block_ms: list[float] = field(default_factory=list)  # wall time per generated block (host-side)
    stopped: bool = False  # `should_stop` ended the rollout before its last block


def block_layout(num_frames: int, frames_per_block: int, independent_first_frame: bool) -> list[int]:
    """Frames per block for `num_frames` latent frames: [n, n, ...] or [1, n, n, ...]."""
    first = 1 if independent_first_frame else 0
    if num_frames < 1 or (num_frames - first) % frames_per_block:
        raise ValueError(f"{num_frames} latent frames cannot be split into blocks of {frames_per_block}"
                         + (" after an independent first frame" if first else ""))
    return [1] * min(first, num_frames) + [frames_per_block] * ((num_frames - first) // frames_per_block)


def _full_t(value: float, like: Tensor) -> Tensor:
    return torch.full(like.shape[:2], float(value), device=like.device, dtype=torch.float32)


def _context_source(context: Conditioning) -> ContextSource:
    """Every form of conditioning as a source `block -> embeddings` returning the same object until a switch."""
    if isinstance(context, Tensor):
        return lambda block: context
    if callable(context):
        return context
    switches = dict(context)
    if 0 not in switches:
        raise ValueError("a prompt schedule must start at block 0")
    starts = sorted(switches)
    return lambda block: switches[max(s for s in starts if s <= block)]


def recache(denoiser: Denoiser, cache: KVCache, blocks: Sequence[tuple[int, Tensor]], context: Tensor, *,
            context_noise: float = 0.0) -> None:
    """Rebuild the self- and cross-attention cache from already generated clean blocks under a new prompt.

    blocks: `[(start frame, latents [B, n, C, H, W]), ...]` in order, as they were generated. Only the blocks the
    cache would still hold are replayed (for a rolling cache: the sink blocks, then those inside the window), each
    at `context_noise`, so motion stays continuous while the new prompt takes hold at once (KV re-cache, LongLive).
    """
    cache.reset()
    if not blocks:
        return
    end = blocks[-1][0] + blocks[-1][1].shape[1]
    replay = list(blocks)
    if cache.rolling:
        sink_frames = cache.sink // cache.tokens_per_frame
        window_start = end - (cache.window_frames - sink_frames)
        sink = [i for i, (s, _) in enumerate(blocks) if s < blocks[0][0] + sink_frames and s < window_start]
        replay = [blocks[i] for i in sink] + [b for i, b in enumerate(blocks) if b[0] >= window_start and i not in sink]
    cache.skip_to(replay[0][0])
    with torch.no_grad():
        for start, x in replay:
            cache.skip_to(start)
            denoiser.cache_pass(x, _full_t(context_noise, x), context, cache, start)


@dataclass(frozen=True, eq=False)
class RolloutOptions:
    """How `rollout` runs, besides what it runs on (denoiser, noise, context, cache). One value per call, so a caller
    builds it once (e.g. `CausalSettings.rollout_options`) and varies single fields with `dataclasses.replace`."""

    steps: Sequence[float]
    """the (warped) denoising timesteps of every block's chain, e.g. [1000, 937.5, 833.3, 625]"""
    frames_per_block: int
    """latent frames generated per block"""
    independent_first_frame: bool = False
    """the first generated frame is a block of its own (unless `initial_latent` supplies it)"""
    initial_latent: Tensor | None = None
    """`[B, Fi, C, H, W]` clean frames written into the cache first (image-to-video, video extension)"""
    start_frame: int = 0
    """latent frame index of the first frame (continuing a cache that already holds earlier frames)"""
    context_noise: float = 0.0
    """the timestep of the clean-context pass that writes each finished block into the cache"""
    renoise_context: bool = False
    """re-noise each block's x0 to `context_noise` before the cache pass, as the original training rollout does
    (t=0 snaps to sigma ~0.005 on the grid); the original inference feeds x0 as is"""
    final_context_pass: bool = True
    """run the clean-context pass after the last block too (nothing reads it unless the cache is continued)"""
    policy: GradientPolicy | None = None
    """which forwards keep their graph (self-forcing training); None: none does"""
    noise_fn: NoiseFn | None = None
    """fresh noise for re-noising between steps; None: `torch.randn_like`"""
    on_block: BlockCallback | None = None
    """called with each finished block's x0, in order"""
    should_stop: StopFn | None = None
    """asked before each generated block; True ends the rollout there (`stopped`), `latents` holding the frames made
    so far"""


def rollout(denoiser: Denoiser, noise: Tensor, context: Conditioning, cache: KVCache,
            options: RolloutOptions) -> RolloutResult:
    """Generate `noise.shape[1]` latent frames block by block, after the frames of `options.initial_latent` if given.

    noise: `[B, F, C, H, W]` pure noise of the frames to generate.
    context: `[B, L, text_dim]` prompt embeddings, a schedule `[(block, embeddings), ...]` switching prompts at
      block boundaries (block 0 first), or a `ContextSource` asked at each block boundary; at a switch the cache is
      rebuilt under the new prompt (`recache`).
    cache: the KV cache the blocks are written into and read from.
    """
    if noise.dim() != 5:
        raise ValueError(f"noise must be [B, F, C, H, W], got {list(noise.shape)}")
    steps = [float(s) for s in options.steps]
    if not steps:
        raise ValueError("the denoising step list is empty")
    policy = options.policy
    noise_fn = options.noise_fn or torch.randn_like
    schedule = denoiser.schedule
    source = _context_source(context)
    context = source(0)  # asked once for block 0: it also conditions the initial latent frames
    outputs: list[Tensor] = []
    blocks: list[tuple[int, Tensor]] = []  # (start frame, clean latents) of every block, for re-caching
    frame = options.start_frame

    def context_pass(x0: Tensor, at: int) -> None:
        t = _full_t(options.context_noise, x0)
        x = schedule.add_noise(x0, noise_fn(x0), t) if options.renoise_context else x0
        with torch.no_grad():
            denoiser.cache_pass(x.detach(), t, context, cache, at)

    independent_first_frame = options.independent_first_frame
    if options.initial_latent is not None:
        prefix = options.initial_latent
        for size in block_layout(prefix.shape[1], options.frames_per_block, independent_first_frame):
            chunk = prefix[:, frame - options.start_frame:frame - options.start_frame + size]
            with torch.no_grad():  # priming: the clean frames only fill the cache (t = 0, as the original)
                denoiser.cache_pass(chunk, _full_t(0.0, chunk), context, cache, frame)
            outputs.append(chunk)
            blocks.append((frame, chunk))
            frame += size
        independent_first_frame = False  # the first frame came from the input

    sizes = block_layout(noise.shape[1], options.frames_per_block, independent_first_frame)
    if policy is not None and len(policy.exit_steps) != len(sizes):
        raise ValueError(f"gradient policy has {len(policy.exit_steps)} exit steps for {len(sizes)} blocks")
    block_ms: list[float] = []
    offset = 0
    stopped = False
    for index, size in enumerate(sizes):
        if options.should_stop is not None and options.should_stop():
            stopped = True
            break
        tic = time.perf_counter()
        if index > 0:
            wanted = source(index)
            if wanted is not context:
                context = wanted
                recache(denoiser, cache, blocks, context, context_noise=options.context_noise)
        x = noise[:, offset:offset + size]
        exit_step = len(steps) - 1 if policy is None else int(policy.exit_steps[index])
        with_grad = (policy is not None and policy.grad_from_frame is not None
                     and frame >= policy.grad_from_frame and torch.is_grad_enabled())
        for j in range(exit_step + 1):
            t = _full_t(steps[j], x)
            with torch.set_grad_enabled(with_grad and j == exit_step):
                _, x0 = denoiser.cached(x, t, context, cache, frame)
            if j < exit_step:
                x = schedule.add_noise(x0, noise_fn(x0), _full_t(steps[j + 1], x0)).detach()
        outputs.append(x0)
        blocks.append((frame, x0.detach()))
        if options.on_block is not None:
            options.on_block(index, frame, x0.detach())
        if options.final_context_pass or index < len(sizes) - 1:
            context_pass(x0, frame)
        block_ms.append((time.perf_counter() - tic) * 1000.0)
        frame += size
        offset += size
    latents = torch.cat(outputs, dim=1) if outputs else noise[:, :0]
    return RolloutResult(latents=latents, block_ms=block_ms, stopped=stopped)
