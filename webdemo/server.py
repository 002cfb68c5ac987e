"""The streaming demo's web server: one static page and a small JSON + server-sent-events API over `DemoService`.

    GET  /                       the page (webdemo/demo.html)
    GET  /api/info               model, decoders, limits, defaults
    POST /api/start              {prompt, seed, fps, blocks, decoder, compile} -> {job, seed} | 400 {error, field}
                                 | 409 {error} while another generation runs
    GET  /api/events/<job>       text/event-stream: start, block (frames as JPEG data URLs), prompt, done
    POST /api/prompt             {job, prompt}: the prompt from the next block on
    POST /api/stop               {job}: stop between blocks
    GET  /api/video/<job>.mp4    the finished (or stopped) video

Server-sent events rather than WebSockets: the stream only flows to the page (its few requests are plain POSTs),
EventSource is built into every browser, and a closed tab shows up as a failed write, which stops the job.
"""
from __future__ import annotations

import base64
import io
import json
import queue
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from flask import Flask, Response, jsonify, request, send_file
from PIL import Image
from werkzeug.exceptions import RequestEntityTooLarge

from webdemo.jobs import Busy, DemoService, Job, JobError, RequestError, parse_prompt

PAGE = Path(__file__).resolve().with_name("demo.html")
JPEG_QUALITY = 90
MAX_BODY_BYTES = 64 * 1024  # a start request is a few hundred bytes; the longest prompt is MAX_PROMPT_CHARS
# Host names a page on this machine uses. Anything else is refused: a web page elsewhere could otherwise reach the
# demo through a name it controls that resolves to 127.0.0.1 (DNS rebinding).
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def jpeg_data_url(rgb: np.ndarray, quality: int = JPEG_QUALITY) -> str:
    """`uint8 [H, W, 3]` -> a `data:image/jpeg;base64,...` URL an <img> or Image() can show directly."""
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def sse_message(name: str, data: dict[str, Any]) -> str:
    if name == "block":  # frames travel as uint8 arrays up to here: encoding them is this thread's work
        data = {**data, "frames": [jpeg_data_url(frame) for frame in data["frames"]]}
    return f"event: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


def read_sse(chunks: Iterable[bytes | str]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(name, data) of each event in a stream of SSE text chunks, as it completes (comments skipped): the reading
    side of `sse_message`, for scripts and tests that drive the app without a browser."""
    buffer = ""
    for chunk in chunks:
        buffer += chunk.decode() if isinstance(chunk, bytes) else chunk
        while "\n\n" in buffer:
            message, buffer = buffer.split("\n\n", 1)
            fields = dict(line.split(": ", 1) for line in message.splitlines() if not line.startswith(":"))
            if "event" in fields:
                yield fields["event"], json.loads(fields["data"])


def event_stream(job: Job, heartbeat_s: float) -> Iterator[str]:
    """The job's events as SSE text; a comment every `heartbeat_s` so a closed page is noticed (the write fails,
    the server closes this generator, and `finally` stops the job) even while no block is ready."""
    try:
        yield "retry: 3600000\n\n"  # a dropped stream is final (the job stops); do not let the browser retry soon
        while True:
            try:
                name, data = job.events.get(timeout=heartbeat_s)
            except queue.Empty:
                yield ": keep-alive\n\n"
                continue
            yield sse_message(name, data)
            if name == "done":
                return
    finally:
        job.detach()


def _error(message: str, status: int, **extra: Any) -> tuple[Response, int]:
    return jsonify({"error": message, **extra}), status


def _json_body() -> dict[str, Any]:
    # force: navigator.sendBeacon (the page's last word when it closes) cannot set a JSON content type.
    data = request.get_json(force=True, silent=True)
    return data if isinstance(data, dict) else {}


def host_name(header: str) -> str:
    """The host of a Host header, without its port (`[::1]:5001` -> `::1`), lower case."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def create_app(service: DemoService, *, page: Path = PAGE, heartbeat_s: float = 1.0,
               allowed_hosts: Iterable[str] = LOCAL_HOSTS) -> Flask:
    """The app; requests whose Host header names none of `allowed_hosts` get 403, bodies over MAX_BODY_BYTES 413."""
    app = Flask(__name__, static_folder=None)
    # Werkzeug cuts a body sent without a Content-Length at this size (silently): one byte more than allowed, so a
    # body that long is known to be too long, and memory stays bounded.
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES + 1
    allowed = {host_name(h) for h in allowed_hosts}

    @app.before_request
    def guard():
        host = host_name(request.headers.get("Host", ""))
        if host not in allowed:
            return _error(f"host {host!r} is not served here (allowed: {', '.join(sorted(allowed))}; demo.py "
                          "--allowed-host adds one)", 403)
        if (request.content_length or 0) > MAX_BODY_BYTES:
            return _error(f"request body of {request.content_length} bytes; at most {MAX_BODY_BYTES}", 413)
        try:  # read (and cache) a body sent without a length now: past the limit it is refused, not truncated
            too_long = len(request.get_data(cache=True)) > MAX_BODY_BYTES
        except RequestEntityTooLarge:
            too_long = True
        if too_long:
            return _error(f"request body too large; at most {MAX_BODY_BYTES} bytes", 413)
        return None

    @app.errorhandler(413)
    def too_large(_err):
        return _error(f"request body too large; at most {MAX_BODY_BYTES} bytes", 413)

    def find_job(data: dict[str, Any]) -> Job | tuple[Response, int]:
        job = service.job(str(data.get("job", "")))
        return job if job is not None else _error("no such generation (it may have been forgotten)", 404)

    @app.get("/")
    def index() -> Response:
        return send_file(page, mimetype="text/html", max_age=0)

    @app.get("/api/info")
    def info() -> Response:
        return jsonify(service.info())

    @app.post("/api/start")
    def start():
        try:
            job = service.start(request.get_json(silent=True))  # None (not JSON) is rejected with a message
        except RequestError as err:
            return _error(str(err), 400, field=err.field)
        except Busy as err:
            return _error(str(err), 409)
        return jsonify({"job": job.id, "seed": job.request.seed})

    @app.get("/api/events/<job_id>")
    def events(job_id: str):
        job = service.job(job_id)
        if job is None:
            return _error("no such generation", 404)
        try:
            job.attach()
        except JobError as err:
            return _error(str(err), 409)
        return Response(event_stream(job, heartbeat_s), mimetype="text/event-stream",
                        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/api/prompt")
    def prompt():
        data = _json_body()
        job = find_job(data)
        if not isinstance(job, Job):
            return job
        try:
            text = parse_prompt(data.get("prompt"))
            job.set_prompt(text)
        except RequestError as err:
            return _error(str(err), 400, field=err.field)
        except JobError as err:
            return _error(str(err), 409)
        return jsonify({"pending": text})

    @app.post("/api/stop")
    def stop():
        job = find_job(_json_body())
        if not isinstance(job, Job):
            return job
        job.stop()
        return jsonify({"state": job.state})

    @app.get("/api/video/<job_id>.mp4")
    def video(job_id: str):
        job = service.job(job_id)
        if job is None or not job.video_ready:
            return _error("no finished video for this generation", 404)
        return send_file(job.video_path, mimetype="video/mp4", as_attachment=True,
                         download_name=job.download_name, max_age=0)

    return app
