"""Text to video with a causal few-step generator: conditioning -> the one rollout -> streaming decode.

Each finished block is decoded right away with the codec's streaming decoder (the causal VAE cache is kept between
blocks), so frames are available while later blocks are still being generated.
"""
from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from model.kv_cache import KVCache, inference_cache_geometry
from model.prompt_cache import PromptEmbeddingCache
from model.wan import WanDiT
from pipeline.compile import compile_pieces
from pipeline.cuda_graphs import GraphedDiT
from pipeline.denoiser import Denoiser
from pipeline.rollout import Conditioning, NoiseFn, RolloutOptions, block_layout, rollout
from pipeline.schedule import FlowMatchSchedule
from pipeline.streaming import BlockDecoder, FramesCallback, TimelineClock, to_unit
from utils.gpu_memory import allocator_detail, memory_now, memory_report

PromptSource = Callable[[int], str]  # block index -> the prompt of that block, asked at each block boundary


@dataclass
class CausalSettings:
    """How the generator rolls out. `steps` are the timesteps actually run (already warped)."""

    steps: list[float]
    frames_per_block: int = 3
    independent_first_frame: bool = False
    context_noise: float = 0.0
    window_frames: int = -1
    sink_frames: int = 0
    rope: str = "absolute"
    # Without a rolling window every frame stays in the cache; beyond the trained length attention leaves the
    # training distribution (and memory grows), so longer videos need a window.
    max_frames_without_window: int = 21

    @classmethod
    def from_config(cls, cfg: Any, schedule: FlowMatchSchedule) -> CausalSettings:
        r = cfg.rollout
        return cls(steps=schedule.denoising_steps(r.denoising_step_list, r.warp_denoising_step),
                   frames_per_block=r.num_frame_per_block,
                   independent_first_frame=r.independent_first_frame, context_noise=r.context_noise,
                   window_frames=r.local_attn_size, sink_frames=r.sink_size, rope=r.rope,
                   max_frames_without_window=r.num_training_frames)

    def latent_frames_for_blocks(self, blocks: int, *, with_initial_latent: bool = False) -> int:
        """Latent frames for `blocks` blocks; an independent first frame is one more block of its own unless an
        initial latent (image, video) supplies it."""
        if blocks < 1:
            raise ValueError(f"the number of blocks must be >= 1, got {blocks}")
        return blocks * self.frames_per_block + (1 if self.independent_first_frame and not with_initial_latent else 0)

    def rollout_options(self, **call: Any) -> RolloutOptions:
        """The rollout these settings describe, with a call's own fields (`RolloutOptions`) added."""
        return RolloutOptions(steps=self.steps, frames_per_block=self.frames_per_block,
                              independent_first_frame=self.independent_first_frame, context_noise=self.context_noise,
                              **call)


@dataclass(frozen=True, eq=False)
class VideoRequest:
    """What one `generate` call makes: the video's length and size, its noise and the prompts over time."""

    num_latent_frames: int
    """new latent frames per prompt (after those of `initial_latent`)"""
    height: int
    """pixels; a multiple of the codec's downsampling times the patch size"""
    width: int
    """pixels; a multiple of the codec's downsampling times the patch size"""
    generator: torch.Generator | None = None
    """draws the initial noise (unless `noise` is given) and every re-noising; None: the global generator"""
    noise: Tensor | None = None
    """`[B, F, C, h, w]` initial noise of the generated frames, instead of drawing it"""
    initial_latent: Tensor | None = None
    """`[B, Fi, C, h, w]` clean frames written into the cache first (an image, a video to extend)"""
    prompt_schedule: Sequence[tuple[int, str]] | None = None
    """`[(block, prompt), ...]` switching every sample's prompt at block boundaries (block 0 first)"""
    prompt_source: PromptSource | None = None
    """asked `block -> prompt` at every block boundary while generating (a prompt typed during the stream); a changed
    prompt is encoded then and switched to with a KV re-cache"""


@dataclass(frozen=True, eq=False)
class Delivery:
    """How a `generate` call hands its frames out, and when it stops early."""

    decode: bool = True
    """decode the latents into pixels (False: `video` is None and `on_frames` is never called)"""
    on_frames: FramesCallback | None = None
    """called with each block's pixel frames in order; block -1 carries the decoded frames of an initial latent;
    block 0 comes in two calls (its first frame alone) unless the pipeline's first_frame_alone is off"""
    keep_video: bool = True
    """False streams frames to `on_frames` only (`video` is None), so long runs hold no pixels"""
    frames_on_host: bool = False
    """frames reach `on_frames` (and `video`) as CPU tensors, copied off the GPU asynchronously (`BlockDecoder`); for
    callers that write or send them"""
    should_stop: Callable[[], bool] | None = None
    """asked before every block; True ends the generation there with the frames made so far (`stats["stopped"]`)"""


@dataclass(frozen=True, eq=False)
class CallOverrides:
    """This call's own parts instead of the pipeline's (e.g. a rolling cache for a long job, another decoder, a
    compiled twin of the generator sharing its weights), leaving the pipeline as it is. None: the pipeline's."""

    settings: CausalSettings | None = None
    codec: Any = None
    denoiser: Denoiser | None = None


@dataclass
class Generation:
    video: Tensor | None  # [B, T, 3, H, W] float in [0, 1] (None when not decoded)
    latents: Tensor  # [B, F, C, h, w]
    stats: dict[str, Any] = field(default_factory=dict)


class CausalInferencePipeline:
    """Prompts -> videos. `text_encoder(prompts) -> [B, L, D]`; `codec` follows `model.vae.LatentCodec`."""

    def __init__(self, generator: WanDiT, text_encoder: Any, codec: Any, schedule: FlowMatchSchedule,
                 settings: CausalSettings, *, negative_prompt: str = "", compile: bool = False,
                 cuda_graphs: bool = False, decode_side_stream: bool = True, first_frame_alone: bool = True,
                 decode_frames_per_call: int | None = None):
        """compile / cuda_graphs: the generator's speed levers (`pipeline.compile.compile_pieces`, `GraphedDiT`);
        compile also speeds up a Wan VAE codec's decoder on CUDA (`WanVAE.speed_up_decoder`: NDHWC, padded channels and
        convolutions, regionally compiled);
        decode_side_stream: on CUDA, decode each block on a side stream while the next one is generated;
        first_frame_alone: decode and hand out the video's first frame before the rest of block 0 (so
        `on_frames` is called twice with block 0), for the earliest first frame;
        decode_frames_per_call: latent frames per Wan VAE decoder call (None: the decoder's default, 3): fewer hold
        less activation memory, at some decode speed (`StreamingVAEDecoder`; the same frames)."""
        self.generator = generator.eval()
        self.text_encoder = text_encoder
        self.codec = codec
        self.schedule = schedule
        self.settings = settings
        self.negative_prompt = negative_prompt
        self.decode_side_stream = decode_side_stream
        self.first_frame_alone = first_frame_alone
        self.decode_frames_per_call = decode_frames_per_call
        if compile:
            compile_pieces(generator)
            if hasattr(codec, "compile_decoder") and next(codec.parameters()).device.type == "cuda":
                codec.speed_up_decoder()
        self.denoiser = Denoiser(GraphedDiT(generator) if cuda_graphs else generator, schedule)
        self._prompt_cache = PromptEmbeddingCache()
        self._kv: KVCache | None = None

    @property
    def device(self) -> torch.device:
        return self.generator.patch_embedding.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.generator.patch_embedding.weight.dtype

    # ------------------------------------------------------------------------------------------------ text
    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> Tensor:
        """`[B, L, text_dim]` on the generator's device; each distinct prompt is encoded once per pipeline."""
        return self._prompt_cache(prompts, lambda missing: self.text_encoder(missing).to(self.device, self.dtype))

    def clear_prompt_cache(self) -> None:
        self._prompt_cache.clear()

    # ------------------------------------------------------------------------------------------------ shapes
    def latent_grid(self, height: int, width: int, codec: Any = None) -> tuple[int, int]:
        s = (self.codec if codec is None else codec).spatial_factor
        _, ph, pw = self.generator.config.patch_size
        if height % (s * ph) or width % (s * pw):
            raise ValueError(f"height/width {height}x{width} must be multiples of {s * ph}x{s * pw} "
                             f"({s}x codec downsampling, then {ph}x{pw} patches)")
        return height // s, width // s

    def latent_frames_for_blocks(self, blocks: int, *, with_initial_latent: bool = False) -> int:
        """`CausalSettings.latent_frames_for_blocks` of the pipeline's settings."""
        return self.settings.latent_frames_for_blocks(blocks, with_initial_latent=with_initial_latent)

    def check_request(self, request: VideoRequest, overrides: CallOverrides = CallOverrides(), *,
                      initial_frames: int | None = None) -> None:
        """Raise ValueError, before any work, for a request `generate` cannot serve: a resolution off the latent grid,
        a frame count that is not whole blocks, more frames (after those of an initial latent) than the KV cache or
        the RoPE table hold, a prompt schedule that does not fit the blocks. initial_frames: the initial latent's
        frames when the request does not carry it yet (each prompt of an image folder brings its own image)."""
        st, codec, _ = self._resolve(overrides)
        self.latent_grid(request.height, request.width, codec)
        num_latent_frames = request.num_latent_frames
        if num_latent_frames < 1:
            raise ValueError(f"the number of latent frames must be >= 1, got {num_latent_frames}")
        if initial_frames is None:
            initial_frames = 0 if request.initial_latent is None else request.initial_latent.shape[1]
        self._check_length(initial_frames + num_latent_frames, st)
        blocks = len(block_layout(num_latent_frames, st.frames_per_block,  # whole blocks, checked before any work
                                  st.independent_first_frame and not initial_frames))
        prompt_schedule = request.prompt_schedule
        if prompt_schedule:
            if prompt_schedule[0][0] != 0:
                raise ValueError("the prompt schedule must start at block 0")
            if prompt_schedule[-1][0] >= blocks:
                raise ValueError(f"prompt schedule switches at block {prompt_schedule[-1][0]}, "
                                 f"but only {blocks} blocks are generated")

    def _check_length(self, frames: int, st: CausalSettings) -> None:
        """Cached frames (prefix included) must fit the cache without a window and the absolute RoPE table."""
        if st.window_frames == -1 and frames > st.max_frames_without_window:
            raise ValueError(f"{frames} latent frames do not fit the KV cache without a rolling window (at most "
                             f"{st.max_frames_without_window}); set rollout.local_attn_size (e.g. --preset long)")
        if st.rope == "absolute" and frames > self.generator.config.rope_max_positions:
            raise ValueError(f"{frames} latent frames exceed the RoPE table of "
                             f"{self.generator.config.rope_max_positions}; use rollout.rope=relative")

    def _cache(self, batch: int, h: int, w: int, frames: int, st: CausalSettings, denoiser: Denoiser) -> KVCache:
        """The KV cache of a call, sized for its frames (the window's when rolling), reused while it fits exactly."""
        self._check_length(frames, st)
        capacity, window, sink = inference_cache_geometry(frames, st.window_frames, st.sink_frames)
        cache = self._kv
        if (cache is None or cache.k.shape[1] != batch
                or cache.capacity != capacity * self.generator.tokens_per_frame(h, w)
                or cache.window_frames != window or cache.sink != sink * cache.tokens_per_frame
                or cache.rope != st.rope or cache.k.dtype != self.dtype or cache.k.device != self.device
                or cache.tokens_per_frame != self.generator.tokens_per_frame(h, w)):
            # The old cache goes before the new one is allocated (never both at once), and with it every CUDA graph
            # recorded on it: a graph holds its cache, its static inputs and its memory pool.
            self._kv = cache = None
            for user in {id(d): d for d in (self.denoiser, denoiser)}.values():
                if isinstance(user.model, GraphedDiT):
                    user.model.reset()
            cache = self._kv = self.generator.new_kv_cache(batch, h, w, capacity, window_frames=window,
                                                           sink_frames=sink, rope=st.rope)
        cache.reset()
        return cache

    def _stream_decoder(self, codec: Any):
        """`codec.stream_decoder()`, with `decode_frames_per_call` where the codec takes it (the Wan VAE)."""
        takes = "frames_per_call" in inspect.signature(codec.stream_decoder).parameters
        if self.decode_frames_per_call is None or not takes:
            return codec.stream_decoder()
        return codec.stream_decoder(frames_per_call=self.decode_frames_per_call)

    # ------------------------------------------------------------------------------------------------ generate
    @torch.no_grad()
    def generate(self, prompts: Sequence[str], request: VideoRequest, delivery: Delivery = Delivery(),
                 overrides: CallOverrides = CallOverrides()) -> Generation:
        """Generate `request.num_latent_frames` new latent frames per prompt (after `request.initial_latent` if
        given), delivered as `delivery` says, with the pipeline's settings, codec and denoiser unless `overrides`
        names this call's own. With a prompt schedule or source, `prompts` only sets the batch size."""
        st, codec, denoiser = self._resolve(overrides)
        h, w = self.latent_grid(request.height, request.width, codec)
        batch = len(prompts)
        # A length that does not split into blocks fails here, before any prompt is encoded.
        block_layout(request.num_latent_frames, st.frames_per_block,
                     st.independent_first_frame and request.initial_latent is None)
        tic = time.perf_counter()
        context, switches = self._conditioning(prompts, request, st, codec)
        noise = request.noise
        if noise is None:
            gen = request.generator
            noise = torch.randn(batch, request.num_latent_frames, self.generator.config.in_dim, h, w, generator=gen,
                                device=gen.device if gen is not None else self.device)
        noise = noise.to(device=self.device, dtype=self.dtype)
        initial_latent = request.initial_latent
        prefix = 0 if initial_latent is None else initial_latent.shape[1]
        if initial_latent is not None:
            initial_latent = initial_latent.to(device=self.device, dtype=self.dtype)
        cache = self._cache(batch, h, w, prefix + request.num_latent_frames, st, denoiser)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        start_ms = (time.perf_counter() - tic) * 1000.0  # prompt encoding and set-up, before the decoder's clock

        decoder = self._block_decoder(codec, delivery, initial_latent)
        clock = TimelineClock(self.device)
        block_memory: list[tuple[float, float]] = []  # (allocated, reserved) GiB once each block's decode is queued

        def on_block(index: int, start: int, x0: Tensor) -> None:
            clock.mark()
            if decoder is not None:
                decoder.submit(index, x0)
            now = memory_now(self.device)
            if now is not None:
                block_memory.append(now)

        result = rollout(denoiser, noise, context, cache, st.rollout_options(
            initial_latent=initial_latent, noise_fn=_fresh_noise(request.generator), on_block=on_block,
            should_stop=delivery.should_stop, final_context_pass=False))
        frames = decoder.finish() if decoder is not None else []
        clock.mark()  # after `finish`, the generation stream has waited for the decode stream: every frame is out
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        total_ms = (time.perf_counter() - tic) * 1000.0
        video = torch.cat(frames, dim=1) if frames else None
        first_ms = decoder.time_to_first_frame_ms if decoder is not None else None
        *block_end_ms, done_ms = clock.since_start_ms()
        # block_ms: host time per block (the host may run ahead of the GPU); block_end_ms / done_ms: on the device's
        # timeline from the rollout's start, when each block's latents were ready and when the last frame was decoded.
        stats = {"block_ms": result.block_ms, "block_end_ms": block_end_ms, "done_ms": done_ms, "total_ms": total_ms,
                 "latent_frames": result.latents.shape[1],
                 "time_to_first_frame_ms": None if first_ms is None else first_ms + start_ms,
                 "stopped": result.stopped}
        if switches:
            stats["prompt_switches"] = switches
        if decoder is not None and decoder.pixel_frames:
            stats["pixel_frames"] = decoder.pixel_frames
            stats["frames_per_s"] = decoder.pixel_frames * batch / (total_ms / 1000.0)
        stats.update(memory_report(self.device))
        if block_memory:  # which block grew the memory, and where the reserved memory sits at the end
            stats["block_allocated_gib"] = [a for a, _ in block_memory]
            stats["block_reserved_gib"] = [r for _, r in block_memory]
            stats["allocator"] = allocator_detail(self.device)
        return Generation(video=video, latents=result.latents, stats=stats)

    def _resolve(self, overrides: CallOverrides) -> tuple[CausalSettings, Any, Denoiser]:
        """This call's settings, codec and denoiser: the overrides' where given, else the pipeline's."""
        return (self.settings if overrides.settings is None else overrides.settings,
                self.codec if overrides.codec is None else overrides.codec,
                self.denoiser if overrides.denoiser is None else overrides.denoiser)

    def _conditioning(self, prompts: Sequence[str], request: VideoRequest, st: CausalSettings, codec: Any
                      ) -> tuple[Conditioning, list[tuple[int, str]]]:
        """The rollout's conditioning for the request's prompts, schedule or source, and the list of prompt switches
        a prompt source made (filled in while the rollout asks it)."""
        batch = len(prompts)
        switches: list[tuple[int, str]] = []
        if request.prompt_schedule and request.prompt_source is not None:
            raise ValueError("give a prompt schedule or a prompt source, not both")
        if request.prompt_source is not None:
            embedded: dict[str, Tensor] = {}

            def context(block: int) -> Tensor:  # the same tensor per prompt, so only a real change re-caches
                prompt = request.prompt_source(block)
                if prompt not in embedded:
                    embedded[prompt] = self.encode_prompts([prompt] * batch)
                if not switches or switches[-1][1] != prompt:
                    switches.append((block, prompt))  # the schedule as it happened, block 0 first
                return embedded[prompt]
            return context, switches
        if request.prompt_schedule:
            self.check_request(request, CallOverrides(settings=st, codec=codec))
            return [(b, self.encode_prompts([p] * batch)) for b, p in request.prompt_schedule], switches
        return self.encode_prompts(prompts), switches

    def _block_decoder(self, codec: Any, delivery: Delivery, initial_latent: Tensor | None) -> BlockDecoder | None:
        """The streaming decoder of a call that decodes, holding the initial latent's frames (handed out first, as
        block -1) if there are any."""
        if not delivery.decode:
            return None
        stream = self._stream_decoder(codec)
        pixels = None
        if initial_latent is not None:
            pixels = to_unit(stream.decode_chunk(initial_latent))
            if delivery.on_frames is not None:
                delivery.on_frames(-1, pixels)
        decoder = BlockDecoder(stream, self.device, side_stream=self.decode_side_stream, on_frames=delivery.on_frames,
                               first_frame_alone=self.first_frame_alone, keep_frames=delivery.keep_video,
                               frames_on_host=delivery.frames_on_host)
        if pixels is not None:
            decoder.add_decoded(pixels)
        return decoder


def _fresh_noise(generator: torch.Generator | None) -> NoiseFn:
    """The rollout's re-noising draws from `generator` (the global generator when None)."""
    def fresh_noise(like: Tensor) -> Tensor:
        noise = torch.randn(like.shape, generator=generator, device=generator.device if generator is not None
                            else like.device)
        if noise.device.type == "cpu" and like.is_cuda:
            # A seeded CPU generator keeps videos identical across devices; a pinned, non-blocking copy keeps the
            # re-noising from synchronising the host with the GPU at every step.
            noise = noise.pin_memory().to(like.device, non_blocking=True)
        return noise.to(like)
    return fresh_noise
