"""The streaming demo's generation service: checked requests, one generation at a time, and jobs that stream each
decoded block as an event, take prompt edits between blocks, stop on request or when nobody watches, and leave an mp4.

Free of any web framework, so the server (`webdemo/server.py`) is a thin layer of routes and this logic is tested
on its own. Events are `(name, data)` pairs on `Job.events`: `start`, `block` (frames as `uint8 [t, H, W, 3]` arrays,
encoded for the wire by the server's thread, not this one), `prompt` (a switch, at the block where it applies) and
`done` (last).
"""
from __future__ import annotations

import copy
import queue
import random
import re
import threading
import time
import traceback
import uuid
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from pipeline.compile import compile_pieces
from pipeline.denoiser import Denoiser
from pipeline.inference import CallOverrides, CausalInferencePipeline, CausalSettings, Delivery, VideoRequest
from pipeline.rollout import block_layout
from utils import outputs
from utils.prompts import slugify
from utils.video import BackgroundVideoWriter, to_uint8_frames

DECODER_LABELS = {"wan": "Wan VAE", "taehv": "TAEHV", "pixel": "pixel shuffle (shapes)"}
MAX_PROMPT_CHARS = 2000
FPS_RANGE = (1, 60)
SEED_LIMIT = 2**63  # torch.Generator.manual_seed takes any 64-bit value; keep to non-negative ones


class RequestError(ValueError):
    """A bad input from the page; `field` names the input, the message says what was expected."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


class Busy(RuntimeError):
    """A generation is already running (one per process: one model, one KV cache)."""


class JobError(RuntimeError):
    """An action the job's state does not allow (a prompt for a finished job, a second watcher)."""


@dataclass(frozen=True)
class GenerationRequest:
    prompt: str
    seed: int
    fps: int
    blocks: int
    decoder: str
    compile: bool


def parse_prompt(value: Any) -> str:
    if value is not None and not isinstance(value, str):
        raise RequestError("prompt", f"the prompt must be text (a JSON string), got {type(value).__name__}")
    if value is None or not value.strip():
        raise RequestError("prompt", "the prompt is empty: describe the video to generate")
    text = " ".join(value.split())  # one line: newlines from the text box mean nothing to the model
    if len(text) > MAX_PROMPT_CHARS:
        raise RequestError("prompt", f"the prompt has {len(text)} characters; at most {MAX_PROMPT_CHARS}")
    return text


def _whole_number(value: Any, field: str, what: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and re.fullmatch(r"\s*[+-]?\d{1,30}\s*", value):
        return int(value)
    raise RequestError(field, f"{what} must be a whole number, got {value!r}")


def _in_range(value: int, low: int, high: int, field: str, what: str) -> int:
    if not low <= value <= high:
        raise RequestError(field, f"{what} must be between {low} and {high}, got {value}")
    return value


def parse_request(data: Mapping[str, Any], *, max_blocks: int, decoders: list[str],
                  default_compile: bool = False) -> GenerationRequest:
    """A page's start request -> GenerationRequest; RequestError names the first bad field."""
    if not isinstance(data, Mapping):
        raise RequestError("request", "expected a JSON object with prompt, seed, fps, blocks, decoder, compile")
    prompt = parse_prompt(data.get("prompt"))
    seed = data.get("seed")
    if seed is None or (isinstance(seed, str) and seed.strip().lower() in ("", "random")):
        seed = random.randrange(2**32)  # a fresh seed, reported back so a good video can be made again
    else:
        seed = _in_range(_whole_number(seed, "seed", "the seed (or empty for a random one)"), 0, SEED_LIMIT - 1,
                         "seed", "the seed")
    fps = _in_range(_whole_number(data.get("fps", 16), "fps", "frames per second"), *FPS_RANGE, "fps",
                    "frames per second")
    blocks = _in_range(_whole_number(data.get("blocks"), "blocks", "the number of blocks"), 1, max_blocks,
                       "blocks", "the number of blocks")
    decoder = data.get("decoder") or decoders[0]
    if decoder not in decoders:
        raise RequestError("decoder", f"decoder {decoder!r} is not loaded; choose one of {', '.join(decoders)}")
    compile_ = data.get("compile", default_compile)
    if not isinstance(compile_, bool):
        raise RequestError("compile", f"compile must be true or false, got {compile_!r}")
    return GenerationRequest(prompt, seed, fps, blocks, decoder, compile_)


class Job:
    """One generation: its request, its events, its live prompt and its stop flag (all thread-safe)."""

    def __init__(self, request: GenerationRequest, output_dir: Path, attach_timeout: float):
        self.id = uuid.uuid4().hex[:12]
        self.request = request
        self.video_path = Path(output_dir) / f"{self.id}-{slugify(request.prompt, 40)}.mp4"
        self.events: queue.Queue[tuple[str, dict[str, Any]]] = queue.Queue()
        self.state = "running"  # then done | stopped | failed
        self.stop_reason: str | None = None
        self.video_ready = False
        self.finished = threading.Event()
        self.started = time.monotonic()
        self._attach_timeout = attach_timeout
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._live_prompt = request.prompt  # what the page asks for now
        self._prompt = request.prompt  # what the blocks are generated under
        self._watched = False  # a page has connected (once per job)
        self._abandoned = False  # its page left, or none came: nobody will read the events

    @property
    def download_name(self) -> str:
        return f"{slugify(self.request.prompt, 40)}-seed{self.request.seed}.mp4"

    def emit(self, name: str, data: dict[str, Any]) -> None:
        self.events.put((name, data))

    # -------------------------------------------------------------------------------------------- from the page
    def set_prompt(self, text: str) -> None:
        with self._lock:
            if self.finished.is_set():
                raise JobError(f"the generation already {self.state}; start a new one")
            self._live_prompt = text

    def stop(self, reason: str = "stopped from the page") -> None:
        with self._lock:
            if not self._stop.is_set():
                self.stop_reason = reason
                self._stop.set()

    def attach(self) -> None:
        """One watcher per job, once: a closed page stops the job, so there is nothing to come back to."""
        with self._lock:
            if self._watched:
                raise JobError("this generation is already being watched")
            self._watched = True

    def detach(self) -> None:
        self._abandoned = True
        if not self.finished.is_set():
            self.stop("the page was closed")

    # -------------------------------------------------------------------------------------------- from the pipeline
    def prompt_for_block(self, block: int) -> str:
        with self._lock:
            prompt = self._live_prompt
            changed = prompt != self._prompt
            self._prompt = prompt
        if changed:
            self.emit("prompt", {"block": block, "prompt": prompt})
        return prompt

    @property
    def current_prompt(self) -> str:
        with self._lock:
            return self._prompt

    def should_stop(self) -> bool:
        if not self._watched and time.monotonic() - self.started > self._attach_timeout:
            # The page that started it never connected (closed right away): nobody would see the video.
            self._abandoned = True
            self.stop(f"no page connected within {self._attach_timeout:.0f} s")
        return self._stop.is_set()

    def finish(self, state: str, data: dict[str, Any]) -> None:
        self.state = state
        self.finished.set()
        # A job may well end before its page connects (a short video): its events wait. An abandoned job's frames
        # would wait for nobody: free them, keep only `done`.
        while self._abandoned and not self.events.empty():
            self.events.get_nowait()
        self.emit("done", {"state": state, "reason": self.stop_reason if state == "stopped" else None,
                           "video": f"/api/video/{self.id}.mp4" if self.video_ready else None, **data})


def codec_name(codec: Any) -> str:
    names = {"PixelShuffleCodec": "pixel", "WanVAE": "wan", "TAEHVCodec": "taehv"}
    return names.get(type(codec).__name__, type(codec).__name__)


def compiled_twin(generator: torch.nn.Module) -> torch.nn.Module:
    """The generator with its own compile lever on (`pipeline.compile.compile_pieces`: the per-layer pieces, static
    shapes, no recompiles across block positions), as a shallow copy sharing the weights, so eager and compiled jobs
    can alternate without touching each other."""
    return compile_pieces(copy.copy(generator))


class DemoService:
    """Owns the pipeline and runs at most one job at a time on a background thread.

    decoders: name -> codec (`codec_name`), the pipeline's own first; the page picks one per job.
    rolling_window, rolling_sink: latent frames of the rolling KV cache used when a job is longer than the model
      holds without a window (the `long` inference preset's values, capped to the model's trained length).
    compile_fn: how the generator is compiled when a job asks for it (once, then reused; default
      `compiled_twin`).
    default_compile: whether a job compiles when its request does not say (the page's switch starts so).
    """

    def __init__(self, pipe: CausalInferencePipeline, decoders: dict[str, Any], *, height: int, width: int,
                 output_dir: str | Path, source: str = "", device: str = "", default_fps: int = 16,
                 default_prompt: str = "", max_blocks: int = 600, rolling_window: int = 21, rolling_sink: int = 5,
                 attach_timeout: float = 15.0, keep_jobs: int = 16,
                 compile_fn: Callable[[torch.nn.Module], Any] | None = None, default_compile: bool = False):
        if max_blocks < 1:
            raise ValueError(f"max_blocks must be >= 1, got {max_blocks}")
        pipe.latent_grid(height, width)  # a bad resolution fails at start-up, not at the first click
        self.pipe, self.decoders = pipe, dict(decoders)
        # Absolute now: Flask's send_file reads a relative path against the app's package folder, not the cwd.
        self.height, self.width, self.output_dir = height, width, Path(output_dir).resolve()
        self.source, self.device, self.default_fps, self.default_prompt = source, device, default_fps, default_prompt
        self.max_blocks, self.rolling_window, self.rolling_sink = max_blocks, rolling_window, rolling_sink
        self.attach_timeout, self.keep_jobs = attach_timeout, keep_jobs
        self.compile_fn = compile_fn or compiled_twin
        self.default_compile = default_compile
        pipe.first_frame_alone = False  # the page takes one event per block (block 0 is not split in two)
        self._compiled: Denoiser | None = None
        self._busy = threading.Lock()
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._jobs_lock = threading.Lock()
        self.current: Job | None = None
        self._thread: threading.Thread | None = None

    def stop_current(self, reason: str, timeout_s: float = 60.0) -> Job | None:
        """Stop the running generation between blocks and wait for it to write what it made (as Stop does); the
        stopped job, or None when none ran."""
        job, thread = self.current, self._thread
        if job is None or thread is None:
            return None
        job.stop(reason)
        thread.join(timeout_s)
        return job

    # -------------------------------------------------------------------------------------------- what fits
    @property
    def settings(self) -> CausalSettings:
        return self.pipe.settings

    def latent_frames(self, blocks: int) -> int:
        return self.pipe.latent_frames_for_blocks(blocks)

    @property
    def rolling_after_blocks(self) -> int | None:
        """The most blocks generated with the full KV cache (None: the model always uses its own window)."""
        st = self.settings
        if st.window_frames != -1:
            return None
        return (st.max_frames_without_window - (1 if st.independent_first_frame else 0)) // st.frames_per_block

    def settings_for(self, blocks: int) -> CausalSettings:
        st = self.settings
        if st.window_frames != -1 or self.latent_frames(blocks) <= st.max_frames_without_window:
            return st
        window = min(self.rolling_window, st.max_frames_without_window)
        sink = max(0, min(self.rolling_sink, window - st.frames_per_block))  # a whole block must fit beside it
        return replace(st, window_frames=window, sink_frames=sink, rope="relative")

    def info(self) -> dict[str, Any]:
        st = self.settings
        rolling = self.settings_for(self.max_blocks)
        after = self.rolling_after_blocks
        return {"source": self.source, "device": self.device, "height": self.height, "width": self.width,
                "frames_per_block": st.frames_per_block, "default_fps": self.default_fps,
                "default_prompt": self.default_prompt, "max_prompt_chars": MAX_PROMPT_CHARS,
                "max_blocks": self.max_blocks, "default_blocks": max(1, min(self.max_blocks, after or 7)),
                "rolling_after_blocks": after, "window_frames": rolling.window_frames,
                "sink_frames": rolling.sink_frames, "fps_range": list(FPS_RANGE),
                "decoders": [{"name": n, "label": DECODER_LABELS.get(n, n)} for n in self.decoders],
                "default_compile": self.default_compile, "busy": self._busy.locked()}

    # -------------------------------------------------------------------------------------------- jobs
    def job(self, job_id: str) -> Job | None:
        with self._jobs_lock:
            return self._jobs.get(job_id)

    def start(self, data: Mapping[str, Any]) -> Job:
        request = parse_request(data, max_blocks=self.max_blocks, decoders=list(self.decoders),
                                default_compile=self.default_compile)
        if not self._busy.acquire(blocking=False):
            running = self.current
            detail = (f" ({running.request.blocks} blocks, started {time.monotonic() - running.started:.0f} s ago)"
                      if running is not None else "")
            raise Busy(f"busy: another generation is running{detail}; wait for it to end or stop it, then start")
        try:
            job = Job(request, self.output_dir, self.attach_timeout)
            with self._jobs_lock:
                self._jobs[job.id] = job
                while len(self._jobs) > self.keep_jobs:  # forget old jobs; their files stay in output_dir
                    self._jobs.popitem(last=False)
            self.current = job
            self._thread = threading.Thread(target=self._run, args=(job,), name=f"demo-job-{job.id}", daemon=True)
            self._thread.start()
        except BaseException:
            self._busy.release()
            raise
        return job

    def warm_up(self) -> float:
        """Generate one video as the page's defaults ask for it (its blocks, the first decoder, the compile switch),
        frames discarded, so the first user's video does not pay for compilation, CUDA-graph capture and the
        decoder's first calls. Returns the seconds it took."""
        tic = time.perf_counter()
        info = self.info()
        blocks = info["default_blocks"]
        self.pipe.generate(
            [self.default_prompt or "warm-up"],
            VideoRequest(self.latent_frames(blocks), self.height, self.width,
                         generator=torch.Generator().manual_seed(0)),
            Delivery(keep_video=False, frames_on_host=True),
            CallOverrides(settings=self.settings_for(blocks), codec=next(iter(self.decoders.values())),
                          denoiser=self._denoiser(self.default_compile)))
        self.pipe.clear_prompt_cache()
        return time.perf_counter() - tic

    def _denoiser(self, compile_: bool) -> Denoiser:
        if not compile_:
            return self.pipe.denoiser
        if self._compiled is None:  # compiled once; torch.compile itself is lazy (the first block pays)
            self._compiled = Denoiser(self.compile_fn(self.pipe.generator), self.pipe.schedule)
        return self._compiled

    def _run(self, job: Job) -> None:
        req, pipe = job.request, self.pipe
        sink: BackgroundVideoWriter | None = None
        claim = None
        sent = {"frames": 0, "blocks": 0, "last": time.perf_counter()}
        try:
            # This job's cache layout, decoder and (compiled or not) generator; the pipeline itself is left as is.
            st = self.settings_for(req.blocks)
            frames = self.latent_frames(req.blocks)
            job.emit("start", {
                "job": job.id, "seed": req.seed, "prompt": req.prompt, "fps": req.fps, "decoder": req.decoder,
                "compile": req.compile, "height": self.height, "width": self.width,
                "blocks": len(block_layout(frames, st.frames_per_block, st.independent_first_frame)),
                "rolling": {"window_frames": st.window_frames, "sink_frames": st.sink_frames}
                if st.window_frames != -1 else None})
            # Held while the video is written, so a demo starting on the same folder leaves its temp file alone.
            claim = outputs.claim(job.video_path.parent, job.video_path.stem)
            sink = BackgroundVideoWriter(job.video_path, fps=req.fps)  # x264 off the generation thread

            def on_frames(index: int, pixels: torch.Tensor) -> None:
                rgb = to_uint8_frames(pixels[0])  # batch of one; uint8 [t, H, W, 3] on the CPU
                sink.append(rgb)
                now = time.perf_counter()
                # Time since the previous block was ready: what sets the stream's pace (includes decoding).
                job.emit("block", {"index": index, "ms": (now - sent["last"]) * 1000.0, "first_frame": sent["frames"],
                                   "frames": rgb, "prompt": job.current_prompt})
                sent["last"] = now
                sent["frames"] += len(rgb)
                sent["blocks"] += 1

            result = pipe.generate(
                [req.prompt],
                VideoRequest(frames, self.height, self.width, generator=torch.Generator().manual_seed(req.seed),
                             prompt_source=job.prompt_for_block),
                Delivery(on_frames=on_frames, keep_video=False, frames_on_host=True, should_stop=job.should_stop),
                CallOverrides(settings=st, codec=self.decoders[req.decoder], denoiser=self._denoiser(req.compile)))
            job.video_ready = sink.close(allow_empty=True)  # stopped before a frame: no file
            stats = result.stats
            outcome = ("stopped" if stats["stopped"] else "done", {
                "frames": sent["frames"], "blocks": sent["blocks"], "total_ms": stats["total_ms"],
                "time_to_first_frame_ms": stats["time_to_first_frame_ms"],
                "frames_per_s": stats.get("frames_per_s"), "prompt_switches": stats.get("prompt_switches", [])})
        except Exception as err:  # noqa: BLE001 - the page gets the one-line reason, the console the traceback
            traceback.print_exc()
            if sink is not None:
                sink.abort()
            message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            outcome = ("failed", {"error": message, "frames": sent["frames"], "blocks": sent["blocks"]})
        finally:
            if claim is not None:
                claim.release()
            pipe.clear_prompt_cache()  # prompts typed during a session would otherwise pile up on the device
            self.current = None
            self._busy.release()
        job.finish(*outcome)
