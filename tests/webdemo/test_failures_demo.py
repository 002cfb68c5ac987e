"""The streaming demo under hostile use: foreign Host headers, oversized bodies, non-string prompts, an output folder
that cannot be written, and an interrupted server that keeps its partial video (CPU, a tiny model folder)."""
from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import demo
from tests.webdemo.test_demo import folder, loaded, make_service, serving, sse_events, start  # noqa: F401 (fixtures)
from utils import outputs
from utils.locks import try_lock
from utils.video import read_video
from webdemo.server import MAX_BODY_BYTES, create_app, host_name

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("host, status", [
    ("localhost", 200), ("127.0.0.1:5001", 200), ("[::1]:5001", 200), ("LOCALHOST:80", 200),
    ("evil.example", 403), ("evil.example:5001", 403), ("127.0.0.1.evil.example", 403), ("", 403),
])
def test_only_this_machines_host_names_are_served(make_service, host, status):  # noqa: F811
    client = create_app(make_service()).test_client()
    response = client.get("/api/info", headers={"Host": host})
    assert response.status_code == status
    if status == 403:
        assert "is not served here" in response.get_json()["error"]
        assert client.post("/api/start", json={"prompt": "a red circle", "blocks": 1},
                           headers={"Host": host}).status_code == 403


def test_an_allowed_host_can_be_added(make_service):  # noqa: F811
    client = create_app(make_service(), allowed_hosts=["demo.lan"]).test_client()
    assert client.get("/api/info", headers={"Host": "demo.lan:5001"}).status_code == 200
    assert client.get("/api/info", headers={"Host": "localhost"}).status_code == 403
    assert host_name("[::1]:80") == "::1" and host_name("Example.COM") == "example.com"


def test_an_oversized_body_is_refused_and_starts_nothing(make_service):  # noqa: F811
    service = make_service()
    client = create_app(service).test_client()
    body = b'{"prompt": "' + b"a" * (MAX_BODY_BYTES + 10) + b'"}'
    response = client.post("/api/start", data=body, content_type="application/json")
    assert response.status_code == 413 and "at most" in response.get_json()["error"]
    assert service.current is None
    # Sent in chunks, without a Content-Length, over a real socket: the limit still holds.
    with serving(service) as (_, port):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        chunks = [b'{"prompt": "', *[b"a" * 4096] * (MAX_BODY_BYTES // 4096 + 2), b'", "blocks": 1}']
        try:
            conn.request("POST", "/api/start", body=iter(chunks), headers={"Content-Type": "application/json"},
                         encode_chunked=True)
            status = conn.getresponse().status
        except (BrokenPipeError, ConnectionResetError):
            status = 413  # the server may close the connection as soon as the limit is passed
        finally:
            conn.close()
    assert status == 413 and service.current is None


@pytest.mark.parametrize("prompt, message", [(7, "must be text (a JSON string), got int"),
                                             (["a", "b"], "must be text (a JSON string), got list"),
                                             ("   ", "the prompt is empty")])
def test_a_prompt_that_is_not_text_is_called_so(make_service, prompt, message):  # noqa: F811
    client = create_app(make_service()).test_client()
    response = start(client, prompt=prompt)
    assert response.status_code == 400 and message in response.get_json()["error"]


def test_an_output_dir_that_cannot_be_written_fails_before_loading(tmp_path, monkeypatch, capsys):
    def refuse(args):
        raise AssertionError("the model was loaded before the bad --output-dir was reported")
    monkeypatch.setattr(demo, "load_service", refuse)
    blocker = tmp_path / "file"
    blocker.write_text("keep me")
    for bad in (blocker, blocker / "sub"):
        assert demo.main(["--port", "0", "--output-dir", str(bad)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: --output-dir") and "Traceback" not in err
    assert blocker.read_text() == "keep me"


def test_stopping_the_server_keeps_the_partial_video(make_service):  # noqa: F811
    service = make_service()
    client = create_app(service).test_client()
    job_id = start(client, blocks=400).get_json()["job"]
    events = sse_events(client.get(f"/api/events/{job_id}", buffered=False))
    assert next(events)[0] == "start" and next(events)[0] == "block"
    job = service.stop_current("the demo was interrupted")  # what Ctrl+C / SIGTERM do
    assert job is not None and job.state == "stopped" and job.video_ready
    frames, _ = read_video(job.video_path)
    assert 2 <= frames.shape[0] < 800  # the blocks made before the interruption
    assert not [p for p in job.video_path.parent.iterdir() if p.name.startswith(".")]  # no temp or claim file


def test_a_demo_leaves_a_live_videos_temp_file_alone_and_sweeps_a_dead_ones(tmp_path):
    out = tmp_path / "videos"
    out.mkdir()
    live_temp = out / ".abc-a-cat.mp4.l1ve0000.tmp.mp4"
    dead_temp = out / ".def-a-dog.mp4.d3ad0000.tmp.mp4"
    for path in (live_temp, dead_temp):
        path.write_bytes(b"partial")
    held = try_lock(outputs.claim_path(out, "abc-a-cat"))  # a demo on this folder still writing it
    try:
        assert outputs.sweep_leftovers(out) == [dead_temp.name]
        assert live_temp.exists() and not dead_temp.exists()
    finally:
        held.release()
    assert outputs.sweep_leftovers(out) == [live_temp.name]
    assert list(out.iterdir()) == []


def test_sigterm_ends_the_command_and_keeps_the_running_video(folder, tmp_path):  # noqa: F811
    videos = tmp_path / "videos"
    proc = subprocess.Popen([sys.executable, str(REPO / "demo.py"), "--model", str(folder), "--port", "0",
                             "--output-dir", str(videos)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
    try:
        line = proc.stdout.readline()
        assert "open http://127.0.0.1:" in line, line + proc.stderr.read()
        port = int(line.split("open http://127.0.0.1:", 1)[1].split("/")[0])
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("POST", "/api/start", json.dumps({"prompt": "a red circle", "blocks": 400}),
                     {"Content-Type": "application/json"})
        job = json.loads(conn.getresponse().read())["job"]
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:  # the page watching the stream
            sock.sendall(f"GET /api/events/{job} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
            received = b""
            while received.count(b"event: block") < 2:
                received += sock.recv(65536)
            proc.send_signal(signal.SIGTERM)  # a service manager stopping the demo mid-video
            code = proc.wait(timeout=60)
        assert code == 0, proc.stderr.read()[-2000:]
        out = proc.stdout.read()
        assert "kept the partial video" in out, out + proc.stderr.read()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    (video,) = videos.iterdir()  # the partial mp4, and no temp or claim file beside it
    frames, _ = read_video(video)
    assert video.suffix == ".mp4" and 4 <= frames.shape[0] < 800
