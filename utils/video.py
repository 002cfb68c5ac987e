"""Video and image I/O for inference: atomic H.264 writers, a reader, and image-to-video input.

Frames accepted by the writers (`write_video`, `StreamingVideoWriter.append`):

* `uint8` in [0, 255], laid out `[T, H, W, 3]` or `[T, 3, H, W]`;
* floating point (any float dtype, bf16 included) in [0, 1], laid out `[T, 3, H, W]` (the pipeline's
  per-sample layout) or `[T, H, W, 3]`. Values are clamped to [0, 1] and ROUNDED to the nearest level;
  the original truncated (`(x * 255).to(uint8)` via torchvision), which darkens every frame by half a level.
  NaN or inf raises, since writing them would silently produce garbage.

torch tensors (any device) and numpy arrays both work. The layout is read from which axis has size 3.

Files are H.264 yuv420p (plays everywhere), so height and width must be even (odd: ValueError naming the size).
Writers are atomic: a hidden temp file in the destination directory is `os.replace`d onto the destination only
after the encoder finished, so an interrupted run never leaves a truncated `.mp4` that a resumed batch would
take for a finished output. Encoding uses PyAV's bundled libx264 in-process, falling back to imageio-ffmpeg's
ffmpeg binary if that PyAV build lacks libx264. Reading uses PyAV.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import queue
import subprocess
import tempfile
import threading
import weakref
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from utils.errors import InputError, MissingFileError

PathLike = str | os.PathLike
Frames = torch.Tensor | np.ndarray

# The highest frame rate the entry points accept: beyond any display, and the mp4 muxer cannot represent some rates
# (65535 fps gives a file that decodes to no frames); writers also check that what they wrote decodes.
MAX_FPS = 240
DEFAULT_CRF = 18  # visually lossless for x264; the original used torchvision's default (crf 23)

# Outputs are BT.709 (the matrix, primaries and curve of sRGB content), limited range, and tagged so, so
# players neither guess (they disagree about untagged SD video) nor shift colours.
_AVCOL_BT709 = 1  # FFmpeg's enum value for BT.709 in AVColorSpace, AVColorPrimaries and AVColorTransferCharacteristic
_AVCOL_RANGE_MPEG = 1  # limited ("tv") range
_KR, _KB = 0.2126, 0.0722  # BT.709 luma coefficients


# mkstemp creates 0600 files; outputs should get the permissions a plain open() would give.
_UMASK = os.umask(0o022)
os.umask(_UMASK)


# ----------------------------------------------------------------------------------------------- atomic files

class _TempBeside:
    """A hidden temp file in the destination's directory (same filesystem, so `os.replace` is atomic)."""

    def __init__(self, path: PathLike, suffix: str):
        self.dest = Path(path)
        self.dest.parent.mkdir(parents=True, exist_ok=True)
        # The leading dot keeps it out of globs like `*.mp4` that a resuming batch might use.
        fd, self.path = tempfile.mkstemp(prefix=f".{self.dest.name}.", suffix=f".tmp{suffix}", dir=self.dest.parent)
        os.close(fd)

    def commit(self) -> None:
        """Flush to disk and move onto the destination (deleting the temp file if that fails)."""
        try:
            os.chmod(self.path, 0o666 & ~_UMASK)
            with open(self.path, "rb") as handle:
                os.fsync(handle.fileno())
            os.replace(self.path, self.dest)
        except BaseException:
            self.discard()
            raise

    def discard(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


def write_json_atomic(path: PathLike, obj: Any, indent: int = 2) -> None:
    """Write `obj` as UTF-8 JSON to `path` atomically (temp file in the same directory + `os.replace`)."""
    text = json.dumps(obj, indent=indent, ensure_ascii=False)  # serialise first: a TypeError leaves nothing behind
    temp = _TempBeside(path, ".json")
    try:
        with open(temp.path, "w", encoding="utf-8") as handle:
            handle.write(text + "\n")
    except BaseException:
        temp.discard()
        raise
    temp.commit()


# ----------------------------------------------------------------------------------------------- frame conversion

def to_uint8_frames(frames: Frames) -> np.ndarray:
    """Convert frames in any accepted format (module docstring) to a contiguous `uint8 [T, H, W, 3]` array."""
    x = torch.from_numpy(np.ascontiguousarray(frames)) if isinstance(frames, np.ndarray) else frames
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"frames must be a torch.Tensor or numpy array, got {type(frames).__name__}")
    if x.dim() != 4:
        raise ValueError(f"frames must be 4-D [T, H, W, 3] or [T, 3, H, W], got shape {tuple(x.shape)}")
    channels_first, channels_last = x.shape[1] == 3, x.shape[-1] == 3
    if channels_first == channels_last:
        raise ValueError(
            f"cannot tell the channel axis of frames with shape {tuple(x.shape)}: expected exactly one of "
            "axis 1 ([T, 3, H, W]) or axis 3 ([T, H, W, 3]) to have size 3")
    x = x.detach().cpu()
    if channels_first:
        x = x.permute(0, 2, 3, 1)
    if x.dtype == torch.uint8:
        out = x
    elif x.is_floating_point():
        x = x.float()
        if not torch.isfinite(x).all():
            raise ValueError("frames contain NaN or inf; expected floats in [0, 1]")
        out = (x.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)
    else:
        raise ValueError(f"frames must be uint8 in [0, 255] or floating point in [0, 1], got dtype {x.dtype}")
    if out.shape[0] == 0:
        raise ValueError("frames are empty (T = 0)")
    return np.ascontiguousarray(out.numpy())


def _check_even(height: int, width: int) -> None:
    if height % 2 or width % 2 or height == 0 or width == 0:
        raise InputError(
            f"frame size {height}x{width} (HxW) cannot be stored as H.264 yuv420p: height and width must be "
            "even and non-zero (crop or pad the frames by one pixel)")


def _fps_fraction(fps: float) -> Fraction:
    if isinstance(fps, bool) or not isinstance(fps, (int, float, Fraction)) or not math.isfinite(fps) or fps <= 0:
        raise InputError(f"fps must be a positive finite number, got {fps!r}")
    return Fraction(fps).limit_denominator(1001 * 1000)


# ----------------------------------------------------------------------------------------------- encoders

def _rgb_to_yuv420p(rgb: np.ndarray) -> np.ndarray:
    """`uint8 [H, W, 3]` RGB -> `uint8 [3H/2, W]` planar yuv420p (BT.709, limited range).

    Converted here rather than by swscale: swscale's default path truncates (a round trip darkens every
    channel by ~1-1.5 levels) and sites chroma at pixel centres, while H.264 decoders read it left-sited
    (co-sited with even columns), shifting colour edges by half a pixel.
    """
    r, g, b = (rgb[..., i].astype(np.float32) for i in range(3))
    luma = _KR * r + (1 - _KR - _KB) * g + _KB * b
    cb = (b - luma) * (224 / 255 / (2 * (1 - _KB)))
    cr = (r - luma) * (224 / 255 / (2 * (1 - _KR)))
    planes = [np.rint(luma * (219 / 255) + 16)]
    for chroma in (cb, cr):
        rows = (chroma[0::2] + chroma[1::2]) * 0.5  # vertically centred between the two luma rows
        left = np.concatenate([rows[:, :1], rows[:, 1:-1:2]], axis=1)  # column 2j-1 (edge replicated)
        sited = 0.25 * left + 0.5 * rows[:, 0::2] + 0.25 * rows[:, 1::2]  # [1, 2, 1] filter around 2j
        planes.append(np.rint(sited + 128))
    flat = np.concatenate([plane.ravel() for plane in planes])
    return np.clip(flat, 0, 255).astype(np.uint8).reshape(-1, rgb.shape[1])


class _PyAVEncoder:
    """libx264 through PyAV, in-process: errors surface as Python exceptions at the frame that caused them."""

    def __init__(self, path: str, width: int, height: int, fps: Fraction, crf: int):
        import av

        self._av = av
        self._container = av.open(path, mode="w", format="mp4", options={"movflags": "+faststart"})
        try:
            self._stream = self._container.add_stream("libx264", rate=fps)
            self._stream.width, self._stream.height = width, height
            self._stream.pix_fmt = "yuv420p"
            context = self._stream.codec_context
            context.colorspace = context.color_primaries = context.color_trc = _AVCOL_BT709
            context.color_range = _AVCOL_RANGE_MPEG
            self._stream.options = {"crf": str(crf), "preset": "medium"}
        except BaseException:
            self._container.close()
            raise

    def write(self, rgb: np.ndarray) -> None:
        """Encode `rgb` `uint8 [H, W, 3]`."""
        frame = self._av.VideoFrame.from_ndarray(_rgb_to_yuv420p(rgb), format="yuv420p")
        frame.colorspace, frame.color_range = _AVCOL_BT709, _AVCOL_RANGE_MPEG
        self._container.mux(self._stream.encode(frame))

    def finish(self) -> None:
        try:
            self._container.mux(self._stream.encode())  # flush the frames x264 still buffers for lookahead
        finally:
            self._container.close()

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            self._container.close()


class _FFmpegEncoder:
    """libx264 in the ffmpeg binary bundled with imageio-ffmpeg, fed raw yuv420p on stdin."""

    def __init__(self, path: str, width: int, height: int, fps: Fraction, crf: int):
        import imageio_ffmpeg

        self._path = path
        command = [
            imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-nostdin", "-v", "error",
            "-f", "rawvideo", "-pix_fmt", "yuv420p", "-s", f"{width}x{height}", "-r", str(fps), "-i", "-", "-an",
            "-vf", "setparams=colorspace=bt709:color_primaries=bt709:color_trc=bt709:range=tv",
            "-c:v", "libx264", "-pix_fmt", "yuv420p", "-crf", str(crf), "-preset", "medium",
            "-movflags", "+faststart", "-f", "mp4", path]
        self._log = tempfile.TemporaryFile()  # a file, not a pipe: a chatty ffmpeg cannot block on it
        self._process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                         stderr=self._log)

    def write(self, rgb: np.ndarray) -> None:
        try:
            self._process.stdin.write(_rgb_to_yuv420p(rgb).tobytes())
        except BrokenPipeError:
            self._process.wait()
            raise RuntimeError(f"ffmpeg stopped while writing {self._path}: {self._stderr()}") from None

    def finish(self) -> None:
        with contextlib.suppress(BrokenPipeError):  # ffmpeg already exited: its exit code says why
            self._process.stdin.close()
        code = self._process.wait()
        message = self._stderr() if code else ""
        self._log.close()
        if code:
            raise RuntimeError(f"ffmpeg failed (exit code {code}) writing {self._path}: {message}")

    def abort(self) -> None:
        self._process.kill()
        self._process.wait()
        with contextlib.suppress(Exception):
            self._process.stdin.close()
        self._log.close()

    def _stderr(self) -> str:
        self._log.seek(0)
        return self._log.read().decode("utf-8", "replace").strip()[-2000:]


def _frame_to_rgb(frame) -> np.ndarray:
    """Decoded frame -> `uint8 [H, W, 3]`, honouring the file's colour matrix, range and chroma siting tags."""
    from av.video.reformatter import Interpolation as I  # noqa: E741

    # Accurate rounding + full chroma interpolation: swscale's defaults darken by ~1 level and blur chroma.
    flags = I.BICUBIC | I.ACCURATE_RND | I.FULL_CHR_H_INT | I.FULL_CHR_H_INP
    range_tag = frame.color_range or None  # 0 = unspecified: swscale then assumes limited range
    return frame.reformat(format="rgb24", src_color_range=range_tag, interpolation=flags).to_ndarray()


def _pyav_has_libx264() -> bool:
    try:
        import av
    except ImportError:  # PyAV is optional when imageio-ffmpeg is installed
        return False
    return "libx264" in av.codecs_available


def _open_encoder(path: str, width: int, height: int, fps: Fraction, crf: int, backend: str):
    if backend == "auto":
        backend = "pyav" if _pyav_has_libx264() else "ffmpeg"
    if backend == "pyav":
        return _PyAVEncoder(path, width, height, fps, crf)
    return _FFmpegEncoder(path, width, height, fps, crf)


# ----------------------------------------------------------------------------------------------- writers

class _CommitOnSuccess:
    """`with writer:` closes (commits the file) on a clean exit and aborts (discards it) on an exception."""

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            self.close()
        else:
            self.abort()
        return False


class StreamingVideoWriter(_CommitOnSuccess):
    """Write an H.264 `.mp4` block by block as frames are generated; the file appears only on success.

    with StreamingVideoWriter("out/0000-a-cat.mp4", fps=16) as writer:
        for block in blocks:          # each [T_block, 3, H, W] float in [0, 1] (or any accepted format)
            writer.append(block)

    Frames go to a hidden temp file in the destination directory; a clean exit from the `with` block
    finishes the encoder and renames the temp file onto `path`. An exception inside the block (or in
    `append`/`close`) deletes the temp file and leaves `path` untouched. Closing with no frames appended is a
    ValueError. Without `with`, call `close()` on success and `abort()` on failure yourself.
    """

    def __init__(self, path: PathLike, fps: float = 16, crf: int = DEFAULT_CRF, backend: str = "auto"):
        self.path = Path(path)
        self.fps = _fps_fraction(fps)
        if not 0 <= crf <= 51:
            raise InputError(f"crf must be in [0, 51] (x264 quality; lower is better), got {crf}")
        if backend not in ("auto", "pyav", "ffmpeg"):
            raise ValueError(f"video backend must be 'auto', 'pyav' or 'ffmpeg', got {backend!r}")
        self.crf, self.backend = crf, backend
        self.frames_written = 0
        self.size: tuple[int, int] | None = None  # (H, W) fixed by the first append
        self._temp: _TempBeside | None = None
        self._encoder = None
        self._closed = False

    def __del__(self) -> None:
        # A writer dropped without close() (no `with`, an exception in the caller) must not leave its temp file.
        with contextlib.suppress(Exception):
            self.abort()

    def append(self, frames: Frames) -> None:
        """Encode `frames` (`[T, H, W, 3]` / `[T, 3, H, W]`, uint8 or float in [0, 1]) after those already written."""
        if self._closed:
            raise ValueError(f"StreamingVideoWriter for {self.path} is already closed")
        rgb = to_uint8_frames(frames)
        height, width = rgb.shape[1], rgb.shape[2]
        if self.size is None:
            _check_even(height, width)
            self._start(height, width)
        elif (height, width) != self.size:
            raise ValueError(
                f"frames for {self.path} changed size from {self.size[0]}x{self.size[1]} to {height}x{width} "
                "(HxW); every block of one video must have the same size")
        for frame in rgb:
            _encode_frame(self._encoder, frame)
            self.frames_written += 1

    def close(self) -> None:
        """Finish encoding and atomically move the file onto `path`; raises if nothing was appended."""
        if self._closed:
            return
        if self._encoder is None:
            self._closed = True
            raise ValueError(f"no frames were appended to the video {self.path}; nothing written")
        try:
            self._encoder.finish()
            if not _decodes_a_frame(self._temp.path):
                raise InputError(f"the video {self.path} written at {float(self.fps):g} fps decodes to no frames (the "
                                 f"mp4 container cannot represent this frame rate); choose another fps")
        except BaseException:
            self.abort()
            raise
        self._closed = True
        self._temp.commit()

    def abort(self) -> None:
        """Stop encoding and delete the temp file; `path` is left as it was."""
        if self._closed:
            return
        self._closed = True
        if self._encoder is not None:
            self._encoder.abort()
        if self._temp is not None:
            self._temp.discard()

    def _start(self, height: int, width: int) -> None:
        self._temp = _TempBeside(self.path, ".mp4")
        try:
            self._encoder = _open_encoder(self._temp.path, width, height, self.fps, self.crf, self.backend)
        except BaseException:
            self.abort()
            raise
        self.size = (height, width)


def _decodes_a_frame(path: str) -> bool:
    """Whether the finished file gives back at least its first frame (decoding stops there)."""
    try:
        import av
    except ImportError:  # PyAV is optional when imageio-ffmpeg writes: nothing to check with
        return True
    try:
        with av.open(path) as container:
            return any(True for _ in container.decode(video=0))
    except av.FFmpegError:
        return False


def _encode_frame(encoder, rgb: np.ndarray) -> None:
    # One module-level seam per frame, so tests can make the encoder fail mid-video.
    encoder.write(rgb)


def write_video(path: PathLike, frames: Frames, fps: float = 16, crf: int = DEFAULT_CRF,
                backend: str = "auto") -> None:
    """Write `frames` (`[T, H, W, 3]` / `[T, 3, H, W]`, uint8 or float in [0, 1]) as an H.264 mp4, atomically."""
    with StreamingVideoWriter(path, fps=fps, crf=crf, backend=backend) as writer:
        writer.append(frames)


class BackgroundVideoWriter(_CommitOnSuccess):
    """A `StreamingVideoWriter` fed from its own thread, so x264 never delays the next block of a rollout.

    `append` only queues the frames (hand over frames nothing else writes to afterwards); an encoder error is raised
    by the next `append`, or by `close`. `close` waits for the queue, then finishes the file atomically like the
    streaming writer; `abort` waits and discards it. Also a context manager (close on success, abort on error).
    """

    def __init__(self, path: PathLike, fps: float = 16, crf: int = DEFAULT_CRF, backend: str = "auto"):
        self._writer = StreamingVideoWriter(path, fps=fps, crf=crf, backend=backend)
        self.path = self._writer.path
        # Bounded: if x264 falls behind a long rollout, the generator waits instead of piling frames up in memory.
        self._queue: queue.Queue[Frames | None] = queue.Queue(maxsize=8)
        self._errors: list[BaseException] = []  # the worker's first error, raised on the caller's thread
        # The thread holds the queue and the inner writer, never `self`: a writer dropped without close/abort is
        # collected, and then the thread stops and the temp file is deleted (also at interpreter exit).
        self._thread = threading.Thread(
            target=_encode_queued, args=(self._queue, self._writer, self._errors, weakref.ref(self)),
            name=f"mp4-{self.path.name}", daemon=True)
        self._thread.start()
        self._discard_if_dropped = weakref.finalize(self, _stop_and_discard, self._queue, self._thread, self._writer)

    @property
    def frames_written(self) -> int:
        return self._writer.frames_written

    def append(self, frames: Frames) -> None:
        if self._errors:
            raise self._errors[0]
        if not self._thread.is_alive():
            raise ValueError(f"BackgroundVideoWriter for {self.path} is already closed")
        self._queue.put(frames)

    def close(self, allow_empty: bool = False) -> bool:
        """Finish and move the file onto `path`; True. With no frame appended: ValueError, or with `allow_empty`
        False and no file."""
        _stop_worker(self._queue, self._thread)
        if self._errors:
            self._writer.abort()
            raise self._errors[0]
        if allow_empty and self._writer.frames_written == 0:
            self._writer.abort()
            return False
        self._writer.close()
        return True

    def abort(self) -> None:
        """Drop the queued frames' file; `path` is left as it was."""
        self._discard_if_dropped()


def _encode_queued(frames_queue: queue.Queue, writer: StreamingVideoWriter, errors: list[BaseException],
                   owner: weakref.ref) -> None:
    while True:
        try:
            frames = frames_queue.get(timeout=0.5)
        except queue.Empty:
            # The owner's finalizer stops this loop, except when garbage collection ran it on this very thread.
            if owner() is None:
                writer.abort()
                return
            continue
        if frames is None:
            return
        if not errors:  # after an error the rest is only drained
            try:
                writer.append(frames)
            except Exception as err:  # noqa: BLE001 - raised on the caller's thread at its next call
                errors.append(err)


def _stop_worker(frames_queue: queue.Queue, thread: threading.Thread) -> None:
    if thread.is_alive():
        frames_queue.put(None)
        thread.join()


def _stop_and_discard(frames_queue: queue.Queue, thread: threading.Thread, writer: StreamingVideoWriter) -> None:
    if threading.current_thread() is thread:
        return  # collected on the worker itself: it cannot wait for itself; it notices the owner is gone
    _stop_worker(frames_queue, thread)
    writer.abort()  # a no-op once closed


# ----------------------------------------------------------------------------------------------- readers

def read_video(path: PathLike) -> tuple[torch.Tensor, float]:
    """Decode every frame of the first video stream: returns (`uint8 [T, H, W, 3]` RGB, fps)."""
    import av

    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"video file {path} does not exist")
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise InputError(f"{path} has no video stream")
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate or stream.base_rate
            frames = [_frame_to_rgb(frame) for frame in container.decode(stream)]
    except av.FFmpegError as error:
        raise InputError(f"cannot decode video file {path}: {error}") from error
    if not frames:
        raise InputError(f"video file {path} contains no frames")
    return torch.from_numpy(np.stack(frames)), float(rate) if rate else float("nan")


def read_image(path: PathLike) -> torch.Tensor:
    """Load an image as RGB `float32 [3, H, W]` in [-1, 1] (EXIF rotation applied, alpha dropped)."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"image file {path} does not exist")
    try:
        with Image.open(path) as image:
            # Phone photos store rotation in EXIF; ignoring it would feed a sideways first frame.
            rgb = ImageOps.exif_transpose(image).convert("RGB")
    except (UnidentifiedImageError, OSError) as error:
        raise InputError(f"cannot read image file {path}: {error}") from error
    pixels = torch.from_numpy(np.asarray(rgb, dtype=np.uint8).copy()).permute(2, 0, 1)
    return pixels.float() / 127.5 - 1.0


def resize_center_crop(img: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Scale `img` `[C, H, W]` or `[B, C, H, W]` (float) so it covers `height x width` keeping its aspect
    ratio, then crop the centre: returns `[C, height, width]` / `[B, C, height, width]`.

    Antialiased bilinear filtering keeps values inside the input's range (no ringing past [-1, 1]).
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"target size must be positive, got {height}x{width} (HxW)")
    if img.dim() not in (3, 4) or not img.is_floating_point():
        raise ValueError(f"expected a float image [C, H, W] or [B, C, H, W], got {img.dtype} {tuple(img.shape)}")
    batched = img if img.dim() == 4 else img.unsqueeze(0)
    src_h, src_w = batched.shape[-2:]
    scale = max(height / src_h, width / src_w)
    new_h, new_w = max(height, round(src_h * scale)), max(width, round(src_w * scale))
    if (new_h, new_w) != (src_h, src_w):
        batched = F.interpolate(batched, size=(new_h, new_w), mode="bilinear", align_corners=False,
                                antialias=True)
    top, left = (new_h - height) // 2, (new_w - width) // 2
    out = batched[..., top:top + height, left:left + width]
    return out if img.dim() == 4 else out[0]
