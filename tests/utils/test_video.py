"""Video/image I/O (utils/video.py): mp4 round trips, frame formats, atomic writes, streaming, image input."""
from __future__ import annotations

import json
import os
import shutil
import time

import numpy as np
import pytest
import torch

from utils import video as video_mod
from utils.video import (BackgroundVideoWriter, StreamingVideoWriter, read_image, read_video, resize_center_crop,
                         to_uint8_frames, write_json_atomic, write_video)

T, H, W = 6, 32, 48


def smooth_frames(num: int = T, height: int = H, width: int = W) -> torch.Tensor:
    """Float `[T, 3, H, W]` in [0, 1]: slow gradients that H.264 reproduces within a few levels."""
    t = torch.arange(num).view(num, 1, 1, 1).float()
    y = torch.linspace(0, 1, height).view(1, 1, height, 1)
    x = torch.linspace(0, 1, width).view(1, 1, 1, width)
    # Gentle horizontal slopes: decoders site H.264 chroma to the left of where swscale's encoder put it, so
    # steep horizontal ramps would show a sub-pixel shift that is not a colour error.
    red = 0.25 + 0.25 * x + 0.02 * t
    green = 0.2 + 0.6 * y
    blue = 0.6 - 0.3 * y + 0.1 * x
    return torch.cat([red.expand(num, 1, height, width), green.expand(num, 1, height, width),
                      blue.expand(num, 1, height, width)], dim=1).clamp(0, 1)


def dir_listing(path) -> list[str]:
    return sorted(os.listdir(path))


@pytest.mark.parametrize("backend", ["pyav", "ffmpeg"])
def test_round_trip_float_channels_first(tmp_path, backend):
    if backend == "pyav" and not video_mod._pyav_has_libx264():
        pytest.skip("this PyAV build has no libx264")
    frames = smooth_frames()
    path = tmp_path / "clip.mp4"
    write_video(path, frames, fps=16, backend=backend)
    decoded, fps = read_video(path)
    assert decoded.dtype == torch.uint8
    assert tuple(decoded.shape) == (T, H, W, 3)
    assert fps == pytest.approx(16.0)
    expected = to_uint8_frames(frames).astype(np.float64)
    assert np.abs(decoded.numpy().astype(np.float64) - expected).mean() < 2.0
    assert dir_listing(tmp_path) == ["clip.mp4"]  # no temp file left behind


@pytest.mark.parametrize("backend", ["pyav", "ffmpeg"])
def test_lossless_round_trip_has_no_colour_bias(tmp_path, backend):
    if backend == "pyav" and not video_mod._pyav_has_libx264():
        pytest.skip("this PyAV build has no libx264")
    # crf 0 is lossless x264, so what remains is RGB <-> YUV 4:2:0 conversion: swscale's defaults would
    # darken every channel by ~1 level and shift chroma half a pixel on horizontal ramps.
    ramp = torch.zeros(2, H, W, 3, dtype=torch.uint8) + 100
    ramp[..., 0] = (torch.arange(W) * 2 + 60).to(torch.uint8)
    for frames in (smooth_frames(2), ramp):
        write_video(tmp_path / "lossless.mp4", frames, crf=0, backend=backend)
        decoded, _ = read_video(tmp_path / "lossless.mp4")
        error = decoded.numpy().astype(np.float64) - to_uint8_frames(frames)
        assert np.abs(error).mean() < 0.6
        assert np.abs(error.mean(axis=(0, 1, 2))).max() < 0.2


def test_round_trip_uint8_channels_last_and_fractional_fps(tmp_path):
    frames = torch.from_numpy(to_uint8_frames(smooth_frames()))  # [T, H, W, 3] uint8
    path = tmp_path / "sub" / "clip.mp4"  # missing parent directories are created
    write_video(path, frames.numpy(), fps=29.97)
    decoded, fps = read_video(path)
    assert tuple(decoded.shape) == (T, H, W, 3)
    assert fps == pytest.approx(29.97, abs=1e-3)
    assert (decoded.float() - frames.float()).abs().mean() < 2.0


def test_float_conversion_rounds_and_clamps():
    levels = torch.tensor([-0.5, 0.0, 0.4 / 255, 0.6 / 255, 254.5 / 255 + 1e-4, 1.0, 7.0])
    out = to_uint8_frames(levels.view(1, 1, 7, 1).expand(1, 2, 7, 3))  # [T, H, W, 3]
    assert out.dtype == np.uint8 and out.shape == (1, 2, 7, 3)
    assert out[0, 0, :, 0].tolist() == [0, 0, 0, 1, 255, 255, 255]  # rounds (0.6 -> 1, not 0); clamps both ends


def test_layouts_agree_and_bad_frames_rejected():
    chw = smooth_frames(2)
    hwc = chw.permute(0, 2, 3, 1)
    assert np.array_equal(to_uint8_frames(chw), to_uint8_frames(hwc))
    assert np.array_equal(to_uint8_frames(chw.to(torch.bfloat16)).shape, (2, H, W, 3))
    with pytest.raises(ValueError, match="NaN"):
        to_uint8_frames(torch.full((1, 3, 4, 4), float("nan")))
    with pytest.raises(ValueError, match="4-D"):
        to_uint8_frames(torch.zeros(3, 4, 4))
    with pytest.raises(ValueError, match="channel axis"):
        to_uint8_frames(torch.zeros(1, 4, 4, 4))
    with pytest.raises(ValueError, match="dtype"):
        to_uint8_frames(torch.zeros(1, 4, 4, 3, dtype=torch.int32))


def test_odd_size_is_a_value_error_naming_the_size(tmp_path):
    with pytest.raises(ValueError, match="31x48"):
        write_video(tmp_path / "odd.mp4", smooth_frames(2, 31, 48))
    assert dir_listing(tmp_path) == []


def test_bad_fps_and_empty_frames(tmp_path):
    with pytest.raises(ValueError, match="fps"):
        write_video(tmp_path / "a.mp4", smooth_frames(1), fps=0)
    with pytest.raises(ValueError, match="empty"):
        write_video(tmp_path / "a.mp4", torch.zeros(0, 3, 4, 4))
    assert dir_listing(tmp_path) == []


def fail_encoder_at(monkeypatch, nth: int) -> list[int]:
    """Make the `nth` encoded frame raise; returns the list that counts the frames tried."""
    real_encode, calls = video_mod._encode_frame, []

    def encode_then_fail(encoder, rgb):
        calls.append(1)
        if len(calls) == nth:
            raise RuntimeError("encoder died mid-video")
        real_encode(encoder, rgb)

    monkeypatch.setattr(video_mod, "_encode_frame", encode_then_fail)
    return calls


@pytest.mark.parametrize("backend", ["auto", "ffmpeg"])
def test_failing_encoder_leaves_nothing_and_keeps_old_file(tmp_path, monkeypatch, backend):
    path = tmp_path / "clip.mp4"
    path.write_bytes(b"previous output")
    calls = fail_encoder_at(monkeypatch, 3)
    with pytest.raises(RuntimeError, match="mid-video"):
        write_video(path, smooth_frames(), backend=backend)
    assert len(calls) == 3
    assert dir_listing(tmp_path) == ["clip.mp4"]  # temp file removed
    assert path.read_bytes() == b"previous output"  # destination untouched

    fresh = tmp_path / "fresh.mp4"
    calls.clear()
    with pytest.raises(RuntimeError):
        write_video(fresh, smooth_frames(), backend=backend)
    assert not fresh.exists()
    assert dir_listing(tmp_path) == ["clip.mp4"]


def test_ffmpeg_process_failure_is_reported_and_cleaned_up(tmp_path, monkeypatch):
    import imageio_ffmpeg

    false = shutil.which("false")
    if false is None:
        pytest.skip("no `false` executable")
    monkeypatch.setattr(imageio_ffmpeg, "get_ffmpeg_exe", lambda: false)  # exits 1 without reading stdin
    with pytest.raises(RuntimeError, match="ffmpeg"):
        write_video(tmp_path / "clip.mp4", smooth_frames(), backend="ffmpeg")
    assert dir_listing(tmp_path) == []


def test_streaming_writer_matches_one_shot(tmp_path):
    frames = smooth_frames(7)
    write_video(tmp_path / "oneshot.mp4", frames)
    with StreamingVideoWriter(tmp_path / "stream.mp4", fps=16) as writer:
        for block in frames.split(3):  # blocks of 3, 3, 1 frames, as a rollout would deliver them
            writer.append(block)
            assert not (tmp_path / "stream.mp4").exists()  # nothing visible until close
        assert writer.frames_written == 7
    one, fps_one = read_video(tmp_path / "oneshot.mp4")
    streamed, fps_stream = read_video(tmp_path / "stream.mp4")
    assert one.shape == streamed.shape == (7, H, W, 3)
    assert fps_one == fps_stream == pytest.approx(16.0)
    assert (one.float() - streamed.float()).abs().mean() < 1.0
    assert dir_listing(tmp_path) == ["oneshot.mp4", "stream.mp4"]


def test_streaming_writer_exception_deletes_temp(tmp_path):
    path = tmp_path / "stream.mp4"
    with pytest.raises(KeyError):
        with StreamingVideoWriter(path) as writer:
            writer.append(smooth_frames(2))
            assert len(dir_listing(tmp_path)) == 1  # the hidden temp file exists while writing
            assert dir_listing(tmp_path)[0].startswith(".")
            raise KeyError("generation failed")
    assert dir_listing(tmp_path) == []


def test_streaming_writer_size_change_and_no_frames(tmp_path):
    with pytest.raises(ValueError, match="changed size"):
        with StreamingVideoWriter(tmp_path / "a.mp4") as writer:
            writer.append(smooth_frames(2))
            writer.append(smooth_frames(2, H + 2, W))
    with pytest.raises(ValueError, match="no frames"):
        with StreamingVideoWriter(tmp_path / "b.mp4"):
            pass
    assert dir_listing(tmp_path) == []


def test_background_writer_equals_streaming_and_encodes_off_the_caller_thread(tmp_path, monkeypatch):
    import threading
    frames = smooth_frames(7)
    with StreamingVideoWriter(tmp_path / "direct.mp4") as writer:
        for block in frames.split(3):
            writer.append(block)
    real_encode, encoding_threads = video_mod._encode_frame, set()

    def recording_encode(encoder, rgb):
        encoding_threads.add(threading.current_thread().name)
        real_encode(encoder, rgb)

    monkeypatch.setattr(video_mod, "_encode_frame", recording_encode)
    with BackgroundVideoWriter(tmp_path / "background.mp4") as writer:
        for block in frames.split(3):
            writer.append(block)
    assert writer.frames_written == 7
    assert encoding_threads == {"mp4-background.mp4"}  # never the caller's thread
    direct, _ = read_video(tmp_path / "direct.mp4")
    background, _ = read_video(tmp_path / "background.mp4")
    assert direct.shape == background.shape == (7, H, W, 3)
    assert (direct.float() - background.float()).abs().mean() < 0.5  # the same encoder settings and frames
    with pytest.raises(ValueError, match="already closed"):
        writer.append(frames)


def test_background_writer_reports_encoder_errors_and_leaves_nothing(tmp_path, monkeypatch):
    path = tmp_path / "clip.mp4"
    path.write_bytes(b"previous output")
    calls = fail_encoder_at(monkeypatch, 2)
    writer = BackgroundVideoWriter(path)
    writer.append(smooth_frames(3))  # queued: the error comes from the thread later
    with pytest.raises(RuntimeError, match="mid-video"):
        writer.close()
    assert len(calls) == 2  # the frame after the failing one was not encoded
    assert dir_listing(tmp_path) == ["clip.mp4"] and path.read_bytes() == b"previous output"
    # Empty: ValueError like the streaming writer, or no file and False when allowed (a demo stopped at once).
    with pytest.raises(ValueError, match="no frames"):
        BackgroundVideoWriter(tmp_path / "empty.mp4").close()
    assert BackgroundVideoWriter(tmp_path / "empty.mp4").close(allow_empty=True) is False
    assert dir_listing(tmp_path) == ["clip.mp4"]


def test_dropped_background_writer_stops_its_thread_and_deletes_its_temp_file(tmp_path):
    import gc
    import threading
    writer = BackgroundVideoWriter(tmp_path / "dropped.mp4")
    writer.append(smooth_frames(3))
    thread = writer._thread
    for _ in range(200):  # until the thread has encoded them into its temp file
        if writer.frames_written == 3:
            break
        time.sleep(0.05)
    assert any(name.startswith(".dropped.mp4.") for name in dir_listing(tmp_path))
    del writer  # no close, no abort: e.g. an exception between blocks in a caller without `with`
    gc.collect()
    thread.join(timeout=10)
    assert not thread.is_alive()
    assert thread not in threading.enumerate()
    assert dir_listing(tmp_path) == []

    # Collected on the worker thread itself (a GC cycle there), the finalizer cannot wait for the thread: the worker
    # notices its owner is gone once the queue is empty, and discards the file itself.
    import queue
    import weakref

    class Owner:
        pass

    owner, inner = Owner(), StreamingVideoWriter(tmp_path / "orphan.mp4")
    owner_ref = weakref.ref(owner)
    frames_queue = queue.Queue()
    frames_queue.put(smooth_frames(2))
    del owner
    video_mod._encode_queued(frames_queue, inner, [], owner_ref)  # returns: nothing left to encode, no owner
    assert inner.frames_written == 2 and dir_listing(tmp_path) == []


def test_read_video_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.mp4"):
        read_video(tmp_path / "missing.mp4")
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"not a video at all" * 10)
    with pytest.raises(ValueError, match="junk.mp4"):
        read_video(junk)


def test_write_json_atomic(tmp_path):
    path = tmp_path / "stats" / "0000-cat.json"
    write_json_atomic(path, {"prompt": "un chat é", "ms": [1.5, 2.0]})
    assert json.loads(path.read_text(encoding="utf-8")) == {"prompt": "un chat é", "ms": [1.5, 2.0]}
    write_json_atomic(path, {"v": 2})
    assert json.loads(path.read_text()) == {"v": 2}
    with pytest.raises(TypeError):
        write_json_atomic(path, {"bad": object()})
    assert json.loads(path.read_text()) == {"v": 2}
    assert dir_listing(path.parent) == ["0000-cat.json"]


def test_read_image_range_layout_and_errors(tmp_path):
    from PIL import Image

    pixels = np.zeros((5, 8, 3), dtype=np.uint8)
    pixels[..., 0] = 255
    pixels[0, 0] = (0, 128, 255)
    Image.fromarray(pixels).save(tmp_path / "img.png")
    Image.fromarray(np.concatenate([pixels, np.full((5, 8, 1), 7, np.uint8)], -1)).save(tmp_path / "rgba.png")
    img = read_image(tmp_path / "img.png")
    assert img.dtype == torch.float32 and tuple(img.shape) == (3, 5, 8)
    assert img.min() >= -1 and img.max() <= 1
    assert img[:, 0, 0].tolist() == pytest.approx([-1.0, 128 / 127.5 - 1, 1.0], abs=1e-6)
    assert img[0, 1, 1] == 1.0 and img[1, 1, 1] == -1.0
    assert torch.equal(read_image(tmp_path / "rgba.png"), img)
    with pytest.raises(FileNotFoundError, match="nope.png"):
        read_image(tmp_path / "nope.png")
    (tmp_path / "bad.png").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="bad.png"):
        read_image(tmp_path / "bad.png")


def test_resize_center_crop():
    # A wide image: columns carry their index so the crop position is visible.
    img = torch.arange(40).float().view(1, 1, 40).expand(3, 10, 40).contiguous()
    out = resize_center_crop(img, 10, 20)  # already tall enough: no resize, crop the centre 20 columns
    assert tuple(out.shape) == (3, 10, 20)
    assert out[0, 0, 0].item() == 10 and out[0, 0, -1].item() == 29
    tall = torch.rand(3, 64, 16) * 2 - 1
    out = resize_center_crop(tall, 24, 32)  # upscale x2 to 128x32, crop 24 rows
    assert tuple(out.shape) == (3, 24, 32)
    assert out.min() >= tall.min() - 1e-6 and out.max() <= tall.max() + 1e-6
    batched = resize_center_crop(torch.stack([tall, tall]), 24, 32)
    assert tuple(batched.shape) == (2, 3, 24, 32) and torch.allclose(batched[1], out)
    const = torch.full((3, 37, 53), 0.25)
    assert torch.allclose(resize_center_crop(const, 480 // 16, 832 // 16), torch.tensor(0.25))
    with pytest.raises(ValueError, match="positive"):
        resize_center_crop(tall, 0, 32)
    with pytest.raises(ValueError, match="float image"):
        resize_center_crop(torch.zeros(4, 4, dtype=torch.uint8), 2, 2)


def test_streaming_writer_dropped_without_close_cleans_up(tmp_path):
    import gc

    writer = StreamingVideoWriter(tmp_path / "dropped.mp4")
    writer.append(smooth_frames(2))
    assert len(dir_listing(tmp_path)) == 1
    del writer
    gc.collect()
    assert dir_listing(tmp_path) == []
