"""The self-forcing generator rollout used by the DMD, SiD and GAN losses (docs/method.md, "The rollout").

`SelfForcingRollout` is the original `_run_generator` on top of the one rollout (`pipeline.rollout.rollout`):
draw the number of blocks and the exit steps (from a generator shared by all ranks), draw fresh per-rank noise, run
the few-step block-wise rollout with stochastic gradient truncation, keep the loss window (the last
`image_or_video_shape[1]` frames, re-encoding the frame before it through the codec when more were generated) and
build the gradient mask.

Long self-rollouts (`rollout_frames`, docs/training.md "Long self-rollouts"): the rollout runs up to many times the
loss window on a cache whose size does not depend on its length, optionally switching prompts with KV re-cache;
only the window's blocks keep a graph and the losses see the window with the prompt in force (`window_context`).

KV-cache gradients, `kv_cache_grad`:
  * "paper" (default): the cache is written without autograd history (the paper's Algorithm 1). The exit-step
    forward of a block attends to the detached past K/V concatenated with its own K/V, which keep their graph.
  * "original": the cache keeps the autograd history of its in-place writes, as the original training code does. A
    block's exit-step forward reads earlier blocks' slots holding the values of their clean-context pass, but the
    gradient of those reads flows back through the recorded write of each earlier block's EXIT-step K/V (the no-grad
    context pass overwrote the values without recording anything). Forward values are identical to "paper"; the
    gradients differ by exactly that path. Also as the original, without gradient checkpointing the prompt's
    cross-attention K/V come from the cache filled by the rollout's first call (so `text_embedding` and
    `cross_attn.k/v` get gradients only if that call was differentiable); with checkpointing they are recomputed in
    every differentiable call.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor

from model.kv_cache import KVCache, inference_cache_geometry
from pipeline.denoiser import Denoiser
from pipeline.rollout import GradientPolicy, NoiseFn, RolloutOptions, block_layout, recache, rollout
from pipeline.schedule import FlowMatchSchedule
from utils.distributed import gathered_across_forwards
from utils.errors import InputError


def rollout_steps(cfg, schedule: FlowMatchSchedule, drop_final_zero: bool = True) -> list[float]:
    """The denoising timesteps the generator runs: `denoising_step_list`, warped onto the generator's shifted grid
    if `warp_denoising_step` (docs/method.md, "Schedule"). The training rollout drops a trailing 0 (a call at t=0
    would be wasted)."""
    return schedule.denoising_steps(cfg.rollout.denoising_step_list, cfg.rollout.warp_denoising_step, drop_final_zero)


def block_starts(num_frames: int, frames_per_block: int, independent_first_frame: bool) -> list[int]:
    """The first latent frame of every block of `block_layout`."""
    sizes = block_layout(num_frames, frames_per_block, independent_first_frame)
    return [sum(sizes[:i]) for i in range(len(sizes))]


@dataclass
class RolloutPlan:
    """The random choices of one rollout that every rank must share."""

    num_blocks: int  # generated blocks (after the independent first frame, if any)
    exit_steps: list[int]  # denoising step index at which each generated block exits
    switch_block: Optional[int] = None  # long rollouts: the block from which `switch_context` conditions (None: never)


@dataclass
class GeneratorOutput:
    latents: Tensor  # [B, W, C, H, W] the loss window (W = image_or_video_shape[1])
    gradient_mask: Optional[Tensor]  # bool [B, W, C, H, W]: False on frames excluded from the loss; None = all
    denoised_timestep_from: Optional[int]  # exit step's range on the un-warped 0..T scale (None if per block)
    denoised_timestep_to: Optional[int]
    plan: Optional[RolloutPlan] = None
    num_frames: int = 0  # frames generated in total (initial latent included)
    context: Optional[Tensor] = None  # prompt embeddings in force over the window (None: the rollout's context)


def window_context(sample: GeneratorOutput, context: Tensor) -> Tensor:
    """The prompt embeddings the teacher, critic or discriminator must see for the sample's window: the one in force
    there after a prompt switch of a long rollout, else the rollout's own `context`."""
    return context if sample.context is None else sample.context


class SelfForcingRollout:
    """`rollout(context, generator=...) -> GeneratorOutput` for a batch of prompt embeddings `[B, L, text_dim]`.

    generator: a `torch.Generator` that is IDENTICAL on every rank (number of blocks, exit steps); by default the
    object's own `shared_generator`, seeded with `cfg.seed` (`seed()` re-seeds it, `get_state()`/`set_state()`
    save and restore it for exact resume). Noise comes from the default (per-rank) RNG.
    codec: latent codec for the window rule when more than the window was generated (`num_training_frames` larger
    than `image_or_video_shape[1]`).
    cache_dtype: dtype of the KV cache and the noise; default bf16 with `mixed_precision` on CUDA, else the
    generator's parameter dtype.
    """

    def __init__(self, cfg, generator: Denoiser, codec: Any = None, cache_dtype: Optional[torch.dtype] = None):
        self.cfg = cfg
        self.generator = generator
        self.codec = codec
        self.cache_dtype = cache_dtype
        self.steps = rollout_steps(cfg, generator.schedule)
        if cfg.rollout.kv_cache_grad not in ("paper", "original"):
            raise InputError(f"rollout.kv_cache_grad must be 'paper' or 'original', got {cfg.rollout.kv_cache_grad!r}")
        shape = list(cfg.rollout.image_or_video_shape)
        if len(shape) != 5:
            raise InputError(f"rollout.image_or_video_shape must be [B, F, C, H, W], got {shape}")
        self.window = int(shape[1])
        self.latent_shape = tuple(int(s) for s in shape[2:])
        nfpb, first = cfg.rollout.num_frame_per_block, int(cfg.rollout.independent_first_frame)
        # The original's hard-coded 21 (loss window) and num_training_frames (longest rollout), generalised: the
        # rollout generates between `window` and `num_training_frames` frames, in whole blocks. A long rollout
        # (`rollout_frames`) ends where its window ends: at the rollout's end ("latest"), or at a uniformly drawn
        # block boundary ("uniform"; what would follow the window cannot change the loss, so it is not generated).
        self.long = cfg.rollout.rollout_frames > 0
        longest_key = "rollout_frames" if self.long else "num_training_frames"
        self.min_frames, self.max_frames = self.window - first, getattr(cfg.rollout, longest_key) - first
        for key, frames in (("rollout.image_or_video_shape[1]", self.min_frames),
                            (f"rollout.{longest_key}", self.max_frames)):
            if frames < nfpb or frames % nfpb:
                raise InputError(f"{key}: {frames + first} latent frames cannot be split into blocks of "
                                 f"rollout.num_frame_per_block={nfpb}"
                                 + (" after an independent first frame" if first else ""))
        if self.max_frames < self.min_frames:
            raise InputError(f"rollout.{longest_key} ({self.max_frames + first}) must be at least the loss window "
                             f"rollout.image_or_video_shape[1] ({self.window})")
        self.shortest_frames = (self.max_frames if self.long and cfg.rollout.rollout_window == "latest"
                                else self.min_frames)
        self.shared_generator = torch.Generator(device="cpu")
        self.seed(cfg.seed)

    # ------------------------------------------------------------------------------------------ shared RNG
    def seed(self, seed: int) -> None:
        self.shared_generator.manual_seed(int(seed))

    def get_state(self) -> Tensor:
        return self.shared_generator.get_state()

    def set_state(self, state: Tensor) -> None:
        self.shared_generator.set_state(state)

    def sample_plan(self, generator: Optional[torch.Generator] = None) -> RolloutPlan:
        """Number of blocks ~ U{min, max} and one exit step per block ~ U{0..K-1} (K-1 if `last_step_only`)."""
        g = generator or self.shared_generator
        nfpb = self.cfg.rollout.num_frame_per_block
        lo, hi = self.shortest_frames // nfpb, self.max_frames // nfpb
        num_blocks = int(torch.randint(lo, hi + 1, (1,), generator=g).item())
        total_blocks = num_blocks + int(self.cfg.rollout.independent_first_frame)
        exits = torch.randint(0, len(self.steps), (total_blocks,), generator=g).tolist()
        plan = self.plan_from_draws(num_blocks, exits)
        # A prompt switch falls on a block boundary at or before the window's first generated block, so the whole
        # window is generated under the prompt its loss uses. Nothing more is drawn where no boundary qualifies
        # (a rollout of the window's length draws exactly what the standard recipe draws).
        switchable = self._switch_blocks(num_blocks)
        if self.cfg.rollout.prompt_switch_prob > 0 and switchable:
            switch = float(torch.rand((), generator=g)) < self.cfg.rollout.prompt_switch_prob
            pick = int(torch.randint(0, len(switchable), (1,), generator=g).item())
            plan.switch_block = switchable[pick] if switch else None
        return plan

    def _switch_blocks(self, num_blocks: int) -> list[int]:
        """Block indices (the independent first frame counts as block 0) at whose start a prompt switch may fall:
        after block 0 and no later than the first block that starts inside the loss window."""
        first = int(self.cfg.rollout.independent_first_frame)
        nfpb = self.cfg.rollout.num_frame_per_block
        starts = block_starts(num_blocks * nfpb + first, nfpb, bool(first))
        window_start = starts[-1] + nfpb - self.window
        return [i for i, start in enumerate(starts) if 0 < start and (i == 0 or starts[i - 1] < window_start)]

    def plan_from_draws(self, num_blocks: int, exit_draws: list[int]) -> RolloutPlan:
        """The plan for drawn exit steps (one per block, in [0, K)): all K-1 with `last_step_only`, all the first
        one with `same_step_across_blocks` (as the original applies its draw)."""
        exits = [int(e) for e in exit_draws]
        if self.cfg.rollout.last_step_only:
            exits = [len(self.steps) - 1] * len(exits)
        if self.cfg.rollout.same_step_across_blocks:
            exits = [exits[0]] * len(exits)
        return RolloutPlan(num_blocks=num_blocks, exit_steps=exits)

    # ------------------------------------------------------------------------------------------ the rollout
    def __call__(self, context: Tensor, *, generator: Optional[torch.Generator] = None,
                 initial_latent: Optional[Tensor] = None, plan: Optional[RolloutPlan] = None,
                 noise: Optional[Tensor] = None, noise_fn: Optional[NoiseFn] = None,
                 switch_context: Optional[Tensor] = None) -> GeneratorOutput:
        """context `[B, L, text_dim]`; initial_latent `[B, 1, C, H, W]` (image-to-video) or None.

        noise: the initial noise of the generated frames `[B, F, C, H, W]` (default: drawn from the per-rank RNG);
        noise_fn: the fresh noise of every re-noising, in call order (default `torch.randn_like`);
        switch_context: `[B, L, text_dim]` the prompts a long rollout switches to (needed when the plan switches)."""
        cfg = self.cfg
        plan = plan or self.sample_plan(generator)
        in_force = None
        if self.long:
            generated, num_frames, in_force = self.generate_long(context, plan, initial_latent=initial_latent,
                                                                 noise=noise, noise_fn=noise_fn,
                                                                 switch_context=switch_context)
        else:
            generated = self.generate_frames(context, plan, initial_latent=initial_latent, noise=noise,
                                             noise_fn=noise_fn)
            num_frames = generated.shape[1]
        latents = self._loss_window(generated)
        mask = None
        nfpb = cfg.rollout.num_frame_per_block
        if plan.num_blocks * nfpb != self.min_frames:
            # A longer rollout's window starts with the re-encoded image latent; the original keeps the first
            # block's frames of the window (the first frame with an independent first frame) out of the loss.
            mask = torch.ones_like(latents, dtype=torch.bool)
            mask[:, :1 if cfg.rollout.independent_first_frame else nfpb] = False
        t_from = t_to = None
        if cfg.rollout.same_step_across_blocks:
            t_from, t_to = self.generator.schedule.exit_step_range(self.steps, plan.exit_steps[0])
        return GeneratorOutput(latents, mask, t_from, t_to, plan=plan, num_frames=num_frames, context=in_force)

    def generate_frames(self, context: Tensor, plan: RolloutPlan, *, initial_latent: Optional[Tensor] = None,
                        noise: Optional[Tensor] = None, noise_fn: Optional[NoiseFn] = None) -> Tensor:
        """Every latent frame of the rollout `[B, F, C, H, W]` (initial latent included), before the loss window:
        the original's `inference_with_trajectory`. Only the exit-step forwards of blocks starting at or after
        frame `F - image_or_video_shape[1]` keep their graph."""
        cfg, denoiser, model = self.cfg, self.generator, self.generator.model
        batch, device, dtype, nfpb, first = self._rollout_geometry(context, initial_latent)
        noise_frames = plan.num_blocks * nfpb + first
        given = 0 if initial_latent is None else initial_latent.shape[1]
        total = given + noise_frames
        blocks = len(block_layout(noise_frames, nfpb, bool(first)))
        if len(plan.exit_steps) < blocks:
            raise ValueError(f"rollout plan has {len(plan.exit_steps)} exit steps for {blocks} blocks")
        exit_steps = list(plan.exit_steps[:blocks])

        cache = self.new_cache(batch, total, dtype, device)
        shape = (batch, noise_frames, *self.latent_shape)
        if noise is None:
            noise = torch.randn(shape, device=device, dtype=dtype)
        elif tuple(noise.shape) != shape:
            raise ValueError(f"rollout noise must be {list(shape)} for this plan, got {list(noise.shape)}")
        policy = GradientPolicy(exit_steps=exit_steps, grad_from_frame=max(0, total - self.window))
        # renoise_context: the training rollout re-noises each block to `context_noise` before the cache pass
        # (t=0 snaps to the last grid sigma, ~0.005 at shift 5) - the original's quirk, kept for parity. The last
        # block's cache pass is skipped: nothing reads it.
        with gathered_across_forwards(model, cfg.compute.sharding_strategy):
            result = rollout(denoiser, noise, context, cache, RolloutOptions(
                steps=self.steps, frames_per_block=nfpb,
                independent_first_frame=bool(cfg.rollout.independent_first_frame), initial_latent=initial_latent,
                context_noise=cfg.rollout.context_noise, renoise_context=True, final_context_pass=False,
                policy=policy, noise_fn=noise_fn))
        return result.latents

    def generate_long(self, context: Tensor, plan: RolloutPlan, *, initial_latent: Optional[Tensor] = None,
                      noise: Optional[Tensor] = None, noise_fn: Optional[NoiseFn] = None,
                      switch_context: Optional[Tensor] = None) -> tuple[Tensor, int, Tensor]:
        """A long rollout in memory that does not grow with its length: (the last frames `[B, <=2W, C, H, W]`,
        W = image_or_video_shape[1], the frames generated in all, the prompt embeddings in force over the window).

        The rollout runs as consecutive `pipeline.rollout.rollout` calls on one cache: the blocks before the window
        under no_grad in pieces of at most W frames, then the window's blocks under the gradient policy of the
        standard recipe. Only the blocks a re-cache replays (sink and attention window) and the W frames before the
        window (for the window rule's re-encoded first frame) are kept. At `plan.switch_block` the prompt becomes
        `switch_context` and the cache is rebuilt under it (`pipeline.rollout.recache`), as LongLive does. A plan
        of the window's length is one call, exactly `generate_frames`."""
        cfg, denoiser, model = self.cfg, self.generator, self.generator.model
        batch, device, dtype, nfpb, first = self._rollout_geometry(context, initial_latent)
        given = 0 if initial_latent is None else initial_latent.shape[1]
        noise_frames = plan.num_blocks * nfpb + first
        total = given + noise_frames
        sizes = block_layout(noise_frames, nfpb, bool(first))
        if len(plan.exit_steps) < len(sizes):
            raise ValueError(f"rollout plan has {len(plan.exit_steps)} exit steps for {len(sizes)} blocks")
        shape = (batch, noise_frames, *self.latent_shape)
        if noise is not None and tuple(noise.shape) != shape:
            raise ValueError(f"rollout noise must be {list(shape)} for this plan, got {list(noise.shape)}")
        if plan.switch_block is not None and switch_context is None:
            raise InputError("the rollout plan switches prompts (prompt_switch_prob > 0) but no switch prompts were "
                             "given: batches need 'switch_prompts' (one per sample)")
        if switch_context is not None and switch_context.shape != context.shape:
            raise ValueError(f"switch prompt embeddings {list(switch_context.shape)} must match the prompts' "
                             f"{list(context.shape)}")
        starts = [given + s for s in block_starts(noise_frames, nfpb, bool(first))]
        grad_from = max(0, total - self.window)
        window_block = next(i for i, start in enumerate(starts) if start >= grad_from)
        # Pieces: [0, window_block) in runs of at most W frames, cut at the switch; then the window's blocks.
        cuts = {0, window_block, len(sizes)}
        if plan.switch_block is not None:
            cuts.add(plan.switch_block)
        piece_start = 0
        for i in range(window_block):
            if starts[i] + sizes[i] - starts[piece_start] > self.window:
                cuts.add(i)
                piece_start = i
        cuts = sorted(cuts)

        cache = self.new_cache(batch, total, dtype, device)
        cache_window = cache.window_frames if cache.rolling else total
        sink_frames = cache.sink // cache.tokens_per_frame
        keep_frames = max(2 * self.window, cache_window)
        kept: list[tuple[int, Tensor]] = []  # (start frame, latents) of the blocks still needed, in order
        prompt = context
        for lo, hi in zip(cuts[:-1], cuts[1:]):
            wanted = switch_context if plan.switch_block is not None and lo >= plan.switch_block else context
            if wanted is not prompt:
                prompt = wanted
                recache(denoiser, cache, [(s, x.detach()) for s, x in kept], prompt,
                        context_noise=cfg.rollout.context_noise)
            frames = sum(sizes[lo:hi])
            offset = starts[lo] - given
            piece_noise = (noise[:, offset:offset + frames] if noise is not None
                           else torch.randn((batch, frames, *self.latent_shape), device=device, dtype=dtype))
            in_window = lo >= window_block
            policy = GradientPolicy(exit_steps=list(plan.exit_steps[lo:hi]),
                                    grad_from_frame=grad_from if in_window else None)
            with torch.set_grad_enabled(in_window and torch.is_grad_enabled()), \
                    gathered_across_forwards(model, cfg.compute.sharding_strategy):
                result = rollout(denoiser, piece_noise, prompt, cache, RolloutOptions(
                    steps=self.steps, frames_per_block=nfpb,
                    independent_first_frame=bool(cfg.rollout.independent_first_frame) and lo == 0,
                    initial_latent=initial_latent if lo == 0 else None, context_noise=cfg.rollout.context_noise,
                    renoise_context=True, final_context_pass=hi < len(sizes), policy=policy, noise_fn=noise_fn,
                    start_frame=0 if lo == 0 else starts[lo]))
            latents = result.latents
            if lo == 0 and given:
                kept.append((0, latents[:, :given]))
                latents = latents[:, given:]
            for i in range(lo, hi):
                kept.append((starts[i], latents[:, starts[i] - starts[lo]:starts[i] - starts[lo] + sizes[i]]))
            end = starts[hi - 1] + sizes[hi - 1]
            # The sink blocks stay for re-caching; of the rest, what the attention window or the window rule reads.
            kept = [(s, x) for s, x in kept if s < sink_frames or s + x.shape[1] > end - keep_frames]
        tail_start = max(0, total - 2 * self.window)
        tail = torch.cat([x for s, x in kept if s + x.shape[1] > tail_start], dim=1)
        return tail[:, max(0, tail.shape[1] - (total - tail_start)):], total, prompt

    def new_cache(self, batch: int, frames: int, dtype: torch.dtype, device: torch.device) -> KVCache:
        """The KV cache of a rollout of `frames` latent frames. `rollout_cache: training` is the original's: room
        for every frame, attention limited to the last `local_attn_size` frames (no sink: nothing is ever evicted).
        `inference` is the cache inference builds from the same rollout settings (stored with an exported model):
        `local_attn_size` slots, the oldest non-sink frames evicted, `sink_size` frames pinned; its size does not
        depend on the rollout's length."""
        kwargs = self.cfg.rollout
        if kwargs.rollout_cache == "inference":
            capacity, window, sink = inference_cache_geometry(frames, kwargs.local_attn_size, kwargs.sink_size)
        else:
            capacity = frames
            window = kwargs.local_attn_size if 0 < kwargs.local_attn_size < frames else -1
            sink = kwargs.sink_size if window != -1 else 0
        return self.generator.model.new_kv_cache(batch, *self.latent_shape[1:], capacity_frames=capacity,
                                                 window_frames=window, sink_frames=sink, rope=kwargs.rope,
                                                 detach_writes=self.cfg.rollout.kv_cache_grad == "paper", dtype=dtype,
                                                 device=device)

    def _rollout_geometry(self, context: Tensor, initial_latent: Optional[Tensor]):
        """(batch, device, dtype, frames per block, 1 if an independent first frame is generated else 0) of a
        rollout: the first frame is generated unless it is given (i2v), as the original."""
        model = self.generator.model
        device = next(model.parameters()).device
        first = int(self.cfg.rollout.independent_first_frame and initial_latent is None)
        return context.shape[0], device, self._dtype(model, device), self.cfg.rollout.num_frame_per_block, first

    def _dtype(self, model, device: torch.device) -> torch.dtype:
        if self.cache_dtype is not None:
            return self.cache_dtype
        if self.cfg.compute.mixed_precision and device.type == "cuda":
            # Under FSDP mixed precision the stored parameters stay fp32 while K/V are computed in bf16; the cache
            # (and the noise, bf16 as in the original) must match the compute dtype.
            return torch.bfloat16
        return next(model.parameters()).dtype

    def _loss_window(self, latents: Tensor) -> Tensor:
        """The last `window` frames; when more were generated, the first of them is the last pixel frame of the
        earlier latents re-encoded as an image latent (the original's last-21-frames rule)."""
        if latents.shape[1] <= self.window:
            return latents
        if self.codec is None:
            raise NotImplementedError(
                f"the rollout generated {latents.shape[1]} frames for a loss window of {self.window}: the window "
                "rule re-encodes a decoded frame and needs a latent codec (Models.codec)")
        keep = self.window - 1
        with torch.no_grad():
            pixels = self.codec.decode_to_pixel(latents[:, :-keep])  # [B, T, 3, H, W]
            image = self.codec.encode_to_latent(pixels[:, -1:].transpose(1, 2))  # [B, 1, C, h, w]
        return torch.cat([image.to(latents.dtype), latents[:, -keep:]], dim=1)
