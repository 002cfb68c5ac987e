"""The streaming demo end to end without a browser: demo.py's own loading path, its Flask app (through the test
client: the same routes, no socket), one generation streamed as server-sent events, the mp4 downloaded. Prints a table
and writes demo_smoke.json ($OUT on a device, else benchmarks/results/) with per-block times as the page sees them.

    python benchmarks/demo_smoke.py                                   # the bundled shapes-world model, 4 blocks
    python benchmarks/demo_smoke.py --model rw_folder --blocks 7 --compile   # e.g. a random real-size folder on a GPU

Any demo.py model flag works (--model, --checkpoint_path, --preset, --device, --dtype, ...).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from common import environment, print_table, write_result  # noqa: E402


def sse_events(response):
    """(name, data, seconds since the request) of each server-sent event, as it arrives."""
    from webdemo.server import read_sse
    tic = time.perf_counter()
    for name, data in read_sse(response.response):
        yield name, data, time.perf_counter() - tic


def smoke(argv: list[str]) -> tuple[dict, str]:
    """(result, result file name) of one streamed generation."""
    import demo
    import torch
    from webdemo.server import create_app
    parser = demo.build_parser()
    parser.add_argument("--blocks", type=int, default=4, help="blocks to generate (default: 4)")
    parser.add_argument("--prompt", help="prompt (default: the demo's own)")
    parser.add_argument("--name", default="demo_smoke", help="result file name (default: %(default)s)")
    args = parser.parse_intermixed_args(argv)
    tic = time.perf_counter()
    service = demo.load_service(args)
    load_s = time.perf_counter() - tic
    client = create_app(service).test_client()
    body = {"prompt": args.prompt or service.default_prompt, "seed": "0", "fps": service.default_fps,
            "blocks": args.blocks, "compile": service.default_compile}  # demo.py's --compile: the page's box
    started = client.post("/api/start", json=body)
    if started.status_code != 200:
        raise SystemExit(f"error: /api/start answered {started.status_code}: {started.get_json()}")
    events = list(sse_events(client.get(f"/api/events/{started.get_json()['job']}", buffered=False)))
    names = [name for name, _, _ in events]
    done = events[-1][1] if names and names[-1] in ("done", "stopped", "failed") else {}
    if not done or names[-1] != "done":
        raise SystemExit(f"error: the generation did not finish: events {names}, last {done}")
    video = client.get(done["video"])
    blocks = [(data, at) for name, data, at in events if name == "block"]
    device = torch.device(service.device)
    return {
        "env": environment(device), "source": service.source, "device": service.device, "args": body,
        "load_s": load_s, "blocks": len(blocks), "frames": done["frames"],
        "block_ms": [data["ms"] for data, _ in blocks],
        "first_block_arrived_s": blocks[0][1] if blocks else None,
        "time_to_first_frame_ms": done["time_to_first_frame_ms"], "total_ms": done["total_ms"],
        "frames_per_s": done["frames_per_s"], "mp4_bytes": len(video.get_data()) if video.status_code == 200 else 0,
        "frame_size": [service.height, service.width],
    }, args.name


def main(argv: list[str] | None = None) -> int:
    result, name = smoke(sys.argv[1:] if argv is None else argv)
    path = write_result(name, result)
    print_table([("model", result["source"]), ("device", result["device"]), ("load", f"{result['load_s']:.1f} s"),
                 ("blocks / frames", f"{result['blocks']} / {result['frames']} at {result['frame_size']}"),
                 ("block ms", " ".join(f"{ms:.0f}" for ms in result["block_ms"])),
                 ("time to first frame", f"{result['time_to_first_frame_ms']:.0f} ms"),
                 ("frames/s", f"{result['frames_per_s']:.1f}"), ("mp4", f"{result['mp4_bytes']} bytes")])
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
