"""Streaming decode: each finished block is decoded while the generator works on the next one.

On CUDA the decode runs on a side stream, so the host can queue the next block's DiT calls right away and the GPU
overlaps the two; frames are handed out, in block order, as soon as their decode has finished (polled at every
block boundary and at the end). On the CPU it decodes in place. Time to first frame is taken on the GPU timeline
(CUDA events), so measuring it never stalls the host.
"""
from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

FramesCallback = Callable[[int, Tensor], None]  # (block index, pixel frames [B, t, 3, H, W] in [0, 1])


def decode_stream(device: torch.device) -> torch.cuda.Stream:
    """The side stream every decoder of a process runs on, one per device. The caching allocator hands a freed block
    only to later allocations of the stream it was made on; a new stream per video (`torch.cuda.Stream()` cycles
    through a pool of 32) would keep each video's decoder activations cached apart, so the reserved memory would grow
    by the decoder's working set with every video."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _decode_stream(index)


@functools.cache
def _decode_stream(index: int) -> torch.cuda.Stream:
    return torch.cuda.Stream(torch.device("cuda", index))


def to_unit(pixels: Tensor) -> Tensor:
    """Codec output in [-1, 1] -> float32 [0, 1]."""
    return (pixels.float() * 0.5 + 0.5).clamp_(0, 1)


class BlockDecoder:
    """Decode latent blocks `[B, n, C, h, w]` with a codec's `stream_decoder()` as they come.

    side_stream: decode on a separate CUDA stream (ignored off CUDA). on_frames: called with each block's frames,
    in order, once they are ready. first_frame_alone: decode the very first latent frame on its own, so the first
    pixel frame is out before the rest of block 0 is decoded (same frames: the codecs' stream decoders are causal;
    block 0 is then handed out in two parts). keep_frames: False hands frames to `on_frames` only (long streams hold
    no pixels); `pixel_frames` counts them either way. frames_on_host: on CUDA, each block's frames are copied to
    pinned host memory on the decode stream and handed out as CPU tensors once there, so a caller writing them to
    disk never waits on (or stalls) the generation stream. The clock (time to first frame) starts at construction.
    """

    def __init__(self, stream_decoder: Any, device: torch.device, *, side_stream: bool = True,
                 on_frames: FramesCallback | None = None, first_frame_alone: bool = True, keep_frames: bool = True,
                 frames_on_host: bool = False):
        self.decoder = stream_decoder
        self.device = device
        self.on_frames = on_frames
        self.first_frame_alone = first_frame_alone
        self.keep_frames = keep_frames
        self.cuda = device.type == "cuda"
        self.frames_on_host = frames_on_host and self.cuda
        self.stream = decode_stream(device) if self.cuda and side_stream else None
        self.frames: list[Tensor] = []
        self.pixel_frames = 0
        self._submitted = False
        self._pending: list[tuple[int, Tensor, Any]] = []
        self._tic = time.perf_counter()
        self._start = self._first_done = None
        self._first_frame_ms: float | None = None
        if self.cuda:
            self._start = torch.cuda.Event(enable_timing=True)
            self._start.record()

    def submit(self, index: int, latents: Tensor) -> None:
        """Queue the decode of one block `[B, n, C, h, w]` (its latents must not be modified afterwards)."""
        if self.first_frame_alone and not self._submitted and latents.shape[1] > 1:
            self._submit(index, latents[:, :1])
            latents = latents[:, 1:]
        self._submit(index, latents)
        self.poll()

    def add_decoded(self, pixels: Tensor) -> None:
        """Frames decoded elsewhere (an initial latent's) that belong before the blocks: kept and counted, not
        handed out (the caller already did)."""
        self.pixel_frames += pixels.shape[1]
        if self.keep_frames:
            self.frames.append(pixels)

    def _submit(self, index: int, latents: Tensor) -> None:
        self._submitted = True
        if self.stream is None:
            pixels = self._to_host(to_unit(self.decoder.decode_chunk(latents)))
            done = None
            if self.cuda:
                done = torch.cuda.Event(enable_timing=True)
                done.record()
        else:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.stream):
                pixels = self._to_host(to_unit(self.decoder.decode_chunk(latents)))
                done = torch.cuda.Event(enable_timing=True)
                done.record(self.stream)
            latents.record_stream(self.stream)  # the allocator must not hand it to the main stream too early
        if self._first_done is None and done is not None:
            self._first_done = done
        if not self.cuda and self._first_frame_ms is None:
            self._first_frame_ms = (time.perf_counter() - self._tic) * 1000.0
        self._pending.append((index, pixels, done))

    def _to_host(self, pixels: Tensor) -> Tensor:
        """With frames_on_host: an asynchronous copy into pinned memory on the current stream (its event, recorded
        after it, tells when the frames are there). The device tensor's memory is only reused by later work of the
        same stream, so it outlives the copy."""
        if not self.frames_on_host:
            return pixels
        host = torch.empty(pixels.shape, dtype=pixels.dtype, pin_memory=True)
        host.copy_(pixels, non_blocking=True)
        return host

    def poll(self) -> None:
        """Hand out every block whose decode has finished, in order."""
        while self._pending and (self._pending[0][2] is None or self._pending[0][2].query()):
            self._hand_out(*self._pending.pop(0)[:2])

    def finish(self) -> list[Tensor]:
        """Wait for every queued decode, hand the rest out, and return all frames in block order."""
        if self.stream is not None:
            torch.cuda.current_stream(self.device).wait_stream(self.stream)
        while self._pending:
            index, pixels, done = self._pending.pop(0)
            if done is not None:
                done.synchronize()
            self._hand_out(index, pixels)
        return self.frames

    def _hand_out(self, index: int, pixels: Tensor) -> None:
        if self.stream is not None and pixels.is_cuda:
            pixels.record_stream(torch.cuda.current_stream(self.device))
        self.pixel_frames += pixels.shape[1]
        if self.keep_frames:
            self.frames.append(pixels)
        if self.on_frames is not None:
            self.on_frames(index, pixels)

    @property
    def time_to_first_frame_ms(self) -> float | None:
        """Milliseconds from construction until the first block's frames were decoded (after `finish`)."""
        if self._first_frame_ms is None and self._first_done is not None:
            self._first_done.synchronize()
            self._first_frame_ms = self._start.elapsed_time(self._first_done)
        return self._first_frame_ms


class TimelineClock:
    """Marks on the device's timeline (CUDA events on the current stream; the host clock elsewhere), read once after
    the work is done: never a host sync while marking."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self._marks: list[Any] = []
        self.mark()

    def mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self._marks.append(event)
        else:
            self._marks.append(time.perf_counter())

    def since_start_ms(self) -> list[float]:
        """Milliseconds from construction to each later mark (waits for the last one)."""
        first, rest = self._marks[0], self._marks[1:]
        if self.cuda:
            if rest:
                rest[-1].synchronize()
            return [first.elapsed_time(m) for m in rest]
        return [(m - first) * 1000.0 for m in rest]
