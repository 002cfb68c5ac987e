"""The streaming demo (`demo.py`, `webdemo/jobs.py`, `webdemo/server.py`, `webdemo/demo.html`) on a tiny random
model folder: the API through Flask's test client and real HTTP, the command line, and the page in headless Chromium."""
from __future__ import annotations

import base64
import contextlib
import dataclasses
import http.client
import importlib.util
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from werkzeug.serving import make_server

import demo
import inference
from tests.tiny import save_tiny_model_folder
from utils.video import read_video
from webdemo.jobs import DemoService
from webdemo.server import create_app, read_sse

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = Path("/usr/bin/chromium")
NEW_PROMPT = "a small yellow square moves quickly up on a black background"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_tiny_model_folder(tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture(scope="module")
def loaded(folder, tmp_path_factory):
    """A service loaded by demo.py's own path (flags -> inference.build_pipeline); its pipeline is shared."""
    out = tmp_path_factory.mktemp("videos")
    return demo.load_service(demo.build_parser().parse_args(["--model", str(folder), "--output-dir", str(out)]))


@pytest.fixture
def make_service(loaded, tmp_path):
    """A fresh service (own jobs, lock, settings) on the loaded pipeline; each job restores the pipeline."""
    services = []

    def make(**overrides) -> DemoService:
        kwargs = {"height": loaded.height, "width": loaded.width, "output_dir": tmp_path / "videos",
                  "source": "tiny", "device": "cpu", "default_fps": 8, "default_prompt": "a red circle",
                  "max_blocks": 400, **overrides}
        services.append(DemoService(loaded.pipe, kwargs.pop("decoders", loaded.decoders), **kwargs))
        return services[-1]

    yield make
    for service in services:  # a failed test must not leave a generation running into the next one
        job = service.current
        if job is not None:
            job.stop("test teardown")
            job.finished.wait(60)


def sse_events(response):
    """(name, data) of each server-sent event of a streamed test-client response, as it arrives."""
    return read_sse(response.response)


def start(client, **body):
    request = {"prompt": "a red circle", "seed": "7", "fps": 8, "blocks": 3, **body}
    return client.post("/api/start", json=request)


def decode_jpeg(url: str) -> np.ndarray:
    assert url.startswith("data:image/jpeg;base64,")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB"))


def decode_mp4(data: bytes):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "video.mp4"
        path.write_bytes(data)
        return read_video(path)


def wait_until(predicate, timeout: float = 30.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


# ------------------------------------------------------------------------------------------------ API
def test_page_and_info(make_service):
    client = create_app(make_service()).test_client()
    page = client.get("/").get_data(as_text=True)
    for element in ("prompt", "seed", "fps", "blocks", "decoder", "compile", "start", "switch", "stop", "download",
                    "message", "ttff", "gen-fps", "strip"):
        assert f'id="{element}"' in page, element
    info = client.get("/api/info").get_json()
    assert [d["name"] for d in info["decoders"]] == ["pixel"] and info["max_blocks"] == 400
    # 21 latent frames fit without a window: 10 blocks of 2; longer videos roll with the long preset's cache.
    assert info["rolling_after_blocks"] == 10 and info["default_blocks"] == 10
    assert (info["window_frames"], info["sink_frames"]) == (21, 5) and not info["busy"]


@pytest.mark.parametrize("body, field, message", [
    ({"prompt": ""}, "prompt", "prompt is empty"),
    ({"prompt": "  \n "}, "prompt", "prompt is empty"),
    ({"prompt": "a" * 2001}, "prompt", "at most 2000"),
    ({"seed": "abc"}, "seed", "whole number"),
    ({"seed": "1.5"}, "seed", "whole number"),
    ({"seed": -1}, "seed", "between 0 and"),
    ({"blocks": "abc"}, "blocks", "whole number"),
    ({"blocks": 0}, "blocks", "between 1 and 400"),
    ({"blocks": 100000}, "blocks", "between 1 and 400"),
    ({"blocks": ""}, "blocks", "whole number"),
    ({"fps": 0}, "fps", "between 1 and 60"),
    ({"fps": "fast"}, "fps", "whole number"),
    ({"decoder": "taehv"}, "decoder", "not loaded"),
    ({"compile": "yes"}, "compile", "true or false"),
])
def test_bad_inputs_are_rejected_with_a_message(make_service, body, field, message):
    service = make_service()
    response = start(create_app(service).test_client(), **body)
    assert response.status_code == 400
    assert response.get_json()["field"] == field and message in response.get_json()["error"]
    assert service.current is None and not service.info()["busy"]


def test_a_body_that_is_not_json_is_rejected(make_service):
    response = create_app(make_service()).test_client().post("/api/start", data="prompt=x")
    assert response.status_code == 400 and "JSON object" in response.get_json()["error"]


def test_blocks_stream_as_they_are_decoded_and_the_mp4_matches(make_service):
    client = create_app(make_service()).test_client()
    started = start(client, blocks=3, seed="7")
    assert started.status_code == 200 and started.get_json()["seed"] == 7
    events = list(sse_events(client.get(f"/api/events/{started.get_json()['job']}", buffered=False)))
    names = [name for name, _ in events]
    assert names == ["start", "block", "block", "block", "done"]
    assert events[0][1]["rolling"] is None and events[0][1]["blocks"] == 3
    blocks = [data for name, data in events if name == "block"]
    assert [b["index"] for b in blocks] == [0, 1, 2] and [b["first_frame"] for b in blocks] == [0, 2, 4]
    assert all(b["ms"] > 0 and b["prompt"] == "a red circle" for b in blocks)
    streamed = np.stack([decode_jpeg(url) for b in blocks for url in b["frames"]])
    assert streamed.shape == (6, 32, 48, 3)
    done = events[-1][1]
    assert done["state"] == "done" and done["frames"] == 6 and done["time_to_first_frame_ms"] > 0
    video = client.get(done["video"])
    assert video.status_code == 200 and video.mimetype == "video/mp4"
    assert "a-red-circle-seed7.mp4" in video.headers["Content-Disposition"]
    frames, fps = decode_mp4(video.get_data())
    assert frames.shape == (6, 32, 48, 3) and fps == pytest.approx(8)
    # Both the stream (JPEG) and the mp4 (H.264) are lossy copies of the same frames; random frames differ by ~80.
    assert np.abs(frames.numpy().astype(float) - streamed.astype(float)).mean() < 20
    # A fixed seed makes the same video again.
    again = start(client, blocks=3, seed="7").get_json()["job"]
    repeat = [d for n, d in sse_events(client.get(f"/api/events/{again}", buffered=False)) if n == "block"]
    assert [b["frames"] for b in repeat] == [b["frames"] for b in blocks]


def test_a_relative_output_dir_still_downloads(make_service, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # demo.py's default --output-dir is relative (outputs/demo)
    client = create_app(make_service(output_dir=Path("videos"))).test_client()
    job = start(client, blocks=1).get_json()["job"]
    done = [d for n, d in sse_events(client.get(f"/api/events/{job}", buffered=False)) if n == "done"][0]
    video = client.get(done["video"])
    assert video.status_code == 200 and len(video.get_data()) > 0
    assert list((tmp_path / "videos").glob("*.mp4"))


def test_busy_while_running_then_stop_between_blocks_then_restart(make_service):
    service = make_service()
    client = create_app(service).test_client()
    job = start(client, blocks=400).get_json()["job"]
    events = sse_events(client.get(f"/api/events/{job}", buffered=False))
    name, data = next(events)
    assert name == "start" and data["rolling"] == {"window_frames": 21, "sink_frames": 5}  # 800 frames roll
    assert next(events)[0] == "block"  # generating
    busy = start(client, blocks=1)
    assert busy.status_code == 409 and busy.get_json()["error"].startswith("busy")
    assert client.post("/api/stop", json={"job": job}).status_code == 200
    rest = list(events)
    done = rest[-1][1]
    assert rest[-1][0] == "done" and done["state"] == "stopped" and done["reason"] == "stopped from the page"
    assert 1 <= done["blocks"] < 400 and done["frames"] == 2 * done["blocks"]
    frames, _ = decode_mp4(client.get(done["video"]).get_data())  # the part made before the stop
    assert frames.shape[0] == done["frames"]
    again = start(client, blocks=1)
    assert again.status_code == 200
    assert list(sse_events(client.get(f"/api/events/{again.get_json()['job']}", buffered=False)))[-1][1]["state"] \
        == "done"


def test_prompt_edit_takes_effect_at_the_next_block_and_is_marked(make_service):
    client = create_app(make_service()).test_client()
    job = start(client, blocks=400).get_json()["job"]
    events = sse_events(client.get(f"/api/events/{job}", buffered=False))
    assert [next(events)[0], next(events)[0]] == ["start", "block"]
    empty = client.post("/api/prompt", json={"job": job, "prompt": " "})
    assert empty.status_code == 400 and "empty" in empty.get_json()["error"]
    assert client.post("/api/prompt", json={"job": job, "prompt": NEW_PROMPT}).get_json() == {"pending": NEW_PROMPT}
    seen = []
    for name, data in events:
        seen.append((name, data))
        if name == "block" and data["prompt"] == NEW_PROMPT:
            break
    switch = next(data for name, data in seen if name == "prompt")
    first_new = seen[-1][1]
    assert switch == {"block": first_new["index"], "prompt": NEW_PROMPT} and switch["block"] >= 1
    assert all(d["prompt"] == "a red circle" for n, d in seen[:-1] if n == "block")
    client.post("/api/stop", json={"job": job})
    done = list(events)[-1][1]
    assert done["prompt_switches"] == [[0, "a red circle"], [switch["block"], NEW_PROMPT]]
    late = client.post("/api/prompt", json={"job": job, "prompt": "a dog"})
    assert late.status_code == 409 and "already stopped" in late.get_json()["error"]
    assert client.post("/api/prompt", json={"job": "nope", "prompt": "a dog"}).status_code == 404


def test_closing_the_stream_stops_the_generation(make_service):
    service = make_service()
    client = create_app(service).test_client()
    job_id = start(client, blocks=400).get_json()["job"]
    response = client.get(f"/api/events/{job_id}", buffered=False)
    events = sse_events(response)
    assert [next(events)[0], next(events)[0]] == ["start", "block"]
    assert client.get(f"/api/events/{job_id}").status_code == 409  # one watcher per generation
    response.close()  # what the server does when the page's connection goes away
    job = service.job(job_id)
    wait_until(job.finished.is_set, what="the job to stop")
    assert job.state == "stopped" and job.stop_reason == "the page was closed"
    assert service.current is None and not service.info()["busy"]


def test_a_video_that_ends_before_its_page_connects_still_streams_whole(make_service):
    service = make_service()
    client = create_app(service).test_client()
    job_id = start(client, blocks=2).get_json()["job"]
    wait_until(service.job(job_id).finished.is_set, what="the job to end")
    names = [name for name, _ in sse_events(client.get(f"/api/events/{job_id}", buffered=False))]
    assert names == ["start", "block", "block", "done"]


def test_a_generation_nobody_watches_stops(make_service):
    service = make_service(attach_timeout=0.3)
    job_id = start(create_app(service).test_client(), blocks=400).get_json()["job"]
    job = service.job(job_id)
    wait_until(job.finished.is_set, what="the unwatched job to stop")
    assert job.state == "stopped" and "no page connected" in job.stop_reason
    assert [job.events.get_nowait()[0]] == ["done"] and job.events.empty()  # its unread frames were dropped


@contextlib.contextmanager
def serving(service: DemoService, heartbeat_s: float = 0.2):
    """The app on a real threaded HTTP server on a free port (as demo.py serves it)."""
    server = make_server("127.0.0.1", 0, create_app(service, heartbeat_s=heartbeat_s), threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.port}", server.port
    finally:
        server.shutdown()
        server.server_close()


def test_a_dropped_http_connection_stops_the_generation(make_service):
    service = make_service()
    with serving(service) as (_, port):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("POST", "/api/start", json.dumps({"prompt": "a cat", "blocks": 400}),
                     {"Content-Type": "application/json"})
        job_id = json.loads(conn.getresponse().read())["job"]
        conn.close()
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sock.sendall(f"GET /api/events/{job_id} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
            received = b""
            while b"event: block" not in received:
                received += sock.recv(65536)
            assert received.startswith(b"HTTP/1.1 200") and b"text/event-stream" in received
        # The socket is closed without a word, as when a tab goes away.
        job = service.job(job_id)
        wait_until(job.finished.is_set, what="the server to notice the closed connection")
        assert job.state == "stopped" and job.stop_reason == "the page was closed"


def test_compile_is_done_once_and_only_when_asked(make_service):
    compiled = []

    def fake_compile(module):  # torch.compile's contract without its minutes of CPU compilation
        compiled.append(module)
        return module

    service = make_service(compile_fn=fake_compile)
    client = create_app(service).test_client()
    eager = service.pipe.denoiser
    for ask in (False, True, True):
        job = start(client, blocks=1, compile=ask).get_json()["job"]
        assert list(sse_events(client.get(f"/api/events/{job}", buffered=False)))[-1][1]["state"] == "done"
    assert compiled == [service.pipe.generator] and service.pipe.denoiser is eager  # restored after each job


def test_warm_up_makes_the_default_video_once_and_keeps_nothing(make_service, monkeypatch):
    """The warm-up (`demo.py --warmup`, on by default with CUDA) runs what the page's defaults ask for: its number of
    blocks, the first decoder, the compile switch's position; no file, no job; the compiled twin is kept for jobs."""
    compiled, calls = [], []
    service = make_service(compile_fn=lambda module: compiled.append(module) or module, default_compile=True)
    generate = service.pipe.generate
    monkeypatch.setattr(service.pipe, "generate", lambda *a: calls.append(a) or generate(*a))
    assert service.warm_up() > 0
    (prompts, request, delivery, overrides), = calls
    blocks = service.info()["default_blocks"]
    assert prompts == ["a red circle"] and request.num_latent_frames == service.latent_frames(blocks) > 0
    assert not delivery.keep_video and overrides.codec is next(iter(service.decoders.values()))
    assert compiled == [service.pipe.generator] and overrides.denoiser is service._denoiser(True)
    assert not service.output_dir.exists() or not any(service.output_dir.iterdir())
    assert service.current is None and not service.info()["busy"]


def test_a_failing_generation_is_reported_and_frees_the_demo(make_service, monkeypatch):
    service = make_service()
    client = create_app(service).test_client()
    monkeypatch.setattr(service.pipe, "generate", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("out of memory")))
    job = start(client).get_json()["job"]
    done = list(sse_events(client.get(f"/api/events/{job}", buffered=False)))[-1][1]
    assert done["state"] == "failed" and done["error"] == "out of memory" and done["video"] is None
    assert client.get(f"/api/video/{job}.mp4").status_code == 404
    monkeypatch.undo()
    assert start(client, blocks=1).status_code == 200


def test_each_video_uses_the_decoder_it_asks_for(make_service, loaded):
    from model.pixel_codec import PixelShuffleCodec
    other = PixelShuffleCodec(spatial_factor=2, scale=4.0)  # same latents, decoded at a lower contrast
    service = make_service(decoders={"pixel": loaded.pipe.codec, "alt": other})
    client = create_app(service).test_client()
    assert [d["name"] for d in client.get("/api/info").get_json()["decoders"]] == ["pixel", "alt"]
    videos = {}
    for decoder in ("pixel", "alt"):
        job = start(client, blocks=1, seed="4", decoder=decoder).get_json()["job"]
        events = list(sse_events(client.get(f"/api/events/{job}", buffered=False)))
        assert events[0][1]["decoder"] == decoder
        videos[decoder] = np.stack([decode_jpeg(u) for n, d in events if n == "block" for u in d["frames"]])
    assert videos["alt"].std() < 0.75 * videos["pixel"].std()
    assert service.pipe.codec is loaded.pipe.codec  # restored after the job


def test_a_taehv_that_does_not_fit_the_model_is_one_line_exit_2(folder, tmp_path, capsys):
    from safetensors.torch import save_file

    from model.taehv import TAEHV
    path = tmp_path / "taehv.safetensors"
    save_file(TAEHV(decoder_n_f=(8, 8, 4, 4), encoder_width=4, latent_channels=12).state_dict(), str(path))
    assert demo.main(["--model", str(folder), "--taehv-path", str(path), "--port", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: TAEHV") and "spatial factor 8" in err and len(err.splitlines()) == 1


def test_long_runs_switch_to_the_rolling_cache(make_service):
    service = make_service()
    assert service.settings_for(10) is service.settings  # 20 latent frames: the full cache
    rolling = service.settings_for(11)
    assert (rolling.window_frames, rolling.sink_frames, rolling.rope) == (21, 5, "relative")
    assert demo.rolling_cache_of_long_preset() == (21, 5)


# ------------------------------------------------------------------------------------------------ command line
def test_help_explains_every_flag_with_defaults(capsys):
    with pytest.raises(SystemExit) as exit_info:
        demo.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag, default in [("--host", "127.0.0.1"), ("--port", "5001"), ("--output-dir", "outputs/demo"),
                          ("--max-blocks", "600"), ("--model", "assets/shapes_world"), ("--taehv-path", None),
                          ("--checkpoint_path", None), ("--preset", None), ("--device", "cuda when available"),
                          ("--dtype", "bfloat16 on GPU")]:
        assert flag in text and (default is None or default in text), flag


@pytest.mark.parametrize("warmup", [False, True])
def test_the_command_serves_the_page_until_interrupted(folder, tmp_path, warmup):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, str(REPO / "demo.py"), "--model", str(folder), "--port", "0",
                             "--output-dir", str(tmp_path / "videos"), *(["--warmup"] if warmup else [])],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        if warmup:  # off by default on the CPU; asked for, it runs before the page is served
            assert proc.stdout.readline().startswith("warming up: one video")
            assert proc.stdout.readline().startswith("warmed up in ")
        line = proc.stdout.readline()  # printed once the model is loaded and the port is bound
        assert "open http://127.0.0.1:" in line, line + proc.stderr.read()
        url = line.split("open ", 1)[1].split()[0]
        with urllib.request.urlopen(url + "api/info", timeout=30) as response:
            assert json.load(response)["source"] == str(folder)
        with urllib.request.urlopen(url, timeout=30) as response:
            assert b'id="start"' in response.read()
        proc.send_signal(signal.SIGINT)  # Ctrl+C
        code = proc.wait(timeout=30)
        assert code == 0, f"exit {code}: {proc.stderr.read()[-2000:]}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_missing_default_model_is_one_line_exit_2(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(inference, "DEFAULT_MODEL", tmp_path / "absent")
    assert demo.main(["--port", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "--model" in err and len(err.splitlines()) == 1


def test_a_taken_port_is_one_line_exit_2(folder, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        assert demo.main(["--model", str(folder), "--port", str(taken.getsockname()[1])]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: cannot listen on 127.0.0.1:") and "Traceback" not in err


# ------------------------------------------------------------------------------------------------ the browser
def _browser_missing() -> str | None:
    if not CHROMIUM.is_file():
        return f"needs Debian's chromium at {CHROMIUM} (apt-get install chromium)"
    if importlib.util.find_spec("playwright") is None:
        return "needs playwright (pip install -e '.[test]')"
    return None


CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.mark.browser
@pytest.mark.skipif(_browser_missing() is not None, reason=_browser_missing() or "")
def test_page_in_headless_chromium(make_service, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=30_000)  # waits on generation progress; other work can load the 2 CI cores
    service = make_service()
    # The tiny model makes hundreds of blocks in seconds: paced to 0.1 s a block, the long video below is surely still
    # running when the test stops it (unpaced, it could end first and leave Stop disabled).
    generate = service.pipe.generate

    def paced_generate(prompts, request, delivery, overrides):
        def paced(index, pixels):
            time.sleep(0.1)
            delivery.on_frames(index, pixels)
        return generate(prompts, request, dataclasses.replace(delivery, on_frames=paced), overrides)
    service.pipe.generate = paced_generate
    with serving(service) as (url, _), sync_playwright() as pw:
        browser = pw.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1280, "height": 900}, accept_downloads=True)
        try:
            page = browser.new_page()
            errors = []
            page.on("pageerror", lambda err: errors.append(str(err)))
            page.goto(url)
            expect(page.locator("#decoder option")).to_have_count(1)
            expect(page.locator("#prompt")).to_have_value("a red circle")

            # Bad input: a message on the page, nothing started.
            page.fill("#seed", "abc")
            page.click("#start")
            expect(page.locator("#message.error")).to_contain_text("seed")
            assert service.current is None
            page.fill("#seed", "3")

            # Frames arrive (and are drawn) while the generation is still running. Played at 1 frame/s, they pile
            # up unplayed, which the restart below must cut off.
            page.fill("#fps", "1")
            page.fill("#blocks", "400")
            page.click("#start")
            page.wait_for_function("Number(document.getElementById('frames-received').textContent) >= 4")
            expect(page.locator("#state")).to_have_text("running")
            assert service.current is not None and not service.current.finished.is_set()
            assert page.evaluate("""() => { const c = document.getElementById('screen');
                const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
                return d.some((v, i) => i % 4 !== 3 && v > 0); }"""), "nothing drawn on the canvas"
            expect(page.locator("#ttff")).to_contain_text("ms")

            # A second tab is told the demo is busy.
            other = browser.new_page()
            other.goto(url)
            expect(other.locator("#decoder option")).to_have_count(1)
            other.click("#start")
            expect(other.locator("#message.busy")).to_contain_text("busy")

            # The prompt switches at the next block, and the strip marks it.
            page.fill("#prompt", NEW_PROMPT)
            page.click("#switch")
            expect(page.locator("#strip .bar.switch")).to_have_count(1)
            expect(page.locator("#switches")).to_contain_text(NEW_PROMPT)
            page.screenshot(path=str(tmp_path / "demo_streaming.png"), full_page=True)

            # Stop, then download what was made.
            page.wait_for_function("Number(document.getElementById('frames-received').textContent) - "
                                   "Number(document.getElementById('frames-shown').textContent) >= 4")
            page.click("#stop")
            expect(page.locator("#state")).to_have_text("stopped")
            expect(page.locator("#download")).to_be_visible()
            with page.expect_download() as download:
                page.click("#download")
            saved = tmp_path / "stopped.mp4"
            download.value.save_as(saved)
            frames, fps = read_video(saved)
            assert fps == pytest.approx(1)
            # the file holds every frame the page was sent; wait for the page to have counted them all
            expect(page.locator("#frames-received")).to_have_text(str(frames.shape[0]))

            # Restart: a short video runs to the end and plays out (and only it: the old backlog is dropped).
            page.fill("#fps", "8")
            page.fill("#blocks", "3")
            page.click("#start")
            expect(page.locator("#state")).to_have_text("done")
            expect(page.locator("#frames-received")).to_have_text("6")
            expect(page.locator("#frames-shown")).to_have_text("6")
            page.wait_for_timeout(1200)
            assert page.text_content("#frames-shown") == "6"
            expect(page.locator("#blocks-done")).to_have_text("3")
            expect(page.locator("#strip .bar")).to_have_count(3)
            expect(page.locator("#download")).to_be_visible()
            page.screenshot(path=str(tmp_path / "demo_done.png"), full_page=True)
            artifacts = REPO / "tests" / "artifacts"  # git-ignored; kept for a person (or CI) to look at
            artifacts.mkdir(exist_ok=True)
            for name in ("demo_streaming.png", "demo_done.png"):
                assert (tmp_path / name).stat().st_size > 10_000
                shutil.copy(tmp_path / name, artifacts / name)

            # Closing a tab stops its generation.
            other.fill("#blocks", "400")
            other.click("#start")
            other.wait_for_function("Number(document.getElementById('frames-received').textContent) >= 2")
            job = service.current
            other.close()
            wait_until(job.finished.is_set, what="the closed tab's generation to stop")
            assert job.state == "stopped"
            assert errors == []
        finally:
            browser.close()
