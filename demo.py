"""Streaming web demo: watch a video appear block by block while it is generated, in a browser.

    python demo.py                                   # the bundled shapes-world model; open http://127.0.0.1:5001/
    python demo.py --model exported_model/ --port 8000
    python demo.py --preset official --checkpoint_path checkpoints/self_forcing_dmd.pt --use_ema \\
        --model-root wan_models --taehv-path checkpoints/taew2_1.pth     # GPU: Wan VAE or TAEHV, chosen per video

The page has a prompt box (editable while the video streams: the new prompt takes effect at the next block, with a KV
re-cache), seed (empty = random), playback frames per second, number of blocks (a rolling KV cache beyond what the
model holds without one), decoder, torch.compile on/off, Start and Stop. It shows the frames as each block is decoded,
the time to first frame, frames per second, a per-block timing strip marking prompt switches, and offers the mp4.
One generation runs at a time; a closed tab stops its generation. With CUDA one video with the page's defaults is
made and discarded before serving (`--no-warmup` skips it). Models load exactly as in inference.py (same flags);
trailing `key=value` arguments override config keys.
"""
from __future__ import annotations

import argparse
import os
import socket
import sys
from pathlib import Path
from typing import Any

import torch

import inference
from inference import UsageError

DEFAULT_PORT = 5001  # the original demo's
GENERIC_PROMPT = "A cat walks on the grass, realistic style."  # for Wan checkpoints (the built-ins speak shapes)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model = inference.add_model_arguments(p)
    model.add_argument("--taehv-path", help="also load TAEHV weights (taew2_1.pth) so the page can pick the fast "
                   "decoder (default: the config's taehv_path when that file exists)")
    srv = p.add_argument_group("server")
    srv.add_argument("--host", default="127.0.0.1",
                     help="address to listen on; 0.0.0.0 opens the demo to the network (default: %(default)s)")
    srv.add_argument("--port", type=int, default=DEFAULT_PORT, help="port; 0 picks a free one (default: %(default)s)")
    srv.add_argument("--output-dir", default="outputs/demo",
                     help="where finished videos are written for download (default: %(default)s)")
    srv.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                     help="also answer requests addressed to this host name (repeatable; default: only 127.0.0.1, "
                     "localhost, ::1 and --host, which keeps other web pages from reaching the demo)")
    srv.add_argument("--max-blocks", type=int, default=600,
                     help="the most blocks one video may have; larger requests are refused (default: %(default)s)")
    run = p.add_argument_group("runtime")
    inference.add_device_arguments(run)
    inference.add_speed_arguments(run, compile_flag=False)
    run.add_argument("--compile", action=argparse.BooleanOptionalAction,
                     help="whether the page's torch.compile switch starts on (each video compiles or not as the page "
                     "says; default: on with CUDA)")
    run.add_argument("--warmup", action=argparse.BooleanOptionalAction,
                     help="before serving, generate one video with the page's defaults (frames discarded), so the "
                     "first visitor's video does not wait for compilation and graph capture (default: on with CUDA)")
    p.add_argument("overrides", nargs="*", help="config overrides, key=value")
    return p


def rolling_cache_of_long_preset() -> tuple[int, int]:
    """(window, sink) latent frames of the `long` inference preset: what long demo videos roll with."""
    from utils.config import load_config
    rollout = load_config(inference.PRESETS["long"]).rollout
    return rollout.local_attn_size, rollout.sink_size


def load_decoders(args: argparse.Namespace, cfg, pipe, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """The pipeline's own codec first, then the other Wan decoder where its weights are at hand."""
    from pipeline.loading import wan_components
    from webdemo.jobs import codec_name
    decoders = {codec_name(pipe.codec): pipe.codec}
    configured = cfg.inference.taehv_path
    if args.taehv_path and "taehv" in decoders:
        raise UsageError(f"--taehv-path {args.taehv_path}: the model already decodes with TAEHV from taehv_path "
                         f"{configured} (inference.decoder taehv); give the weights as taehv_path={args.taehv_path}")
    taehv_path = args.taehv_path or (configured if configured and Path(configured).is_file() else None)
    if taehv_path and "taehv" not in decoders:
        from model.taehv import TAEHVCodec
        from utils.errors import reading
        with reading(f"--taehv-path {taehv_path}"):
            codec = TAEHVCodec.from_checkpoint(taehv_path, device=device, dtype=dtype)
        # Decoders are swapped per video, so they must read the same latents into frames of the same size.
        for what, attr in (("latent channels", "latent_channels"), ("spatial factor", "spatial_factor"),
                           ("temporal factor", "temporal_factor")):
            if getattr(codec, attr) != getattr(pipe.codec, attr):
                raise UsageError(f"TAEHV {taehv_path} does not fit this model: {what} {getattr(codec, attr)}, "
                                 f"the model's decoder has {getattr(pipe.codec, attr)}")
        decoders["taehv"] = codec
    if "taehv" in decoders and "wan" not in decoders and not args.model:
        wan_dir = Path(cfg.model.model_root) / cfg.model.generator_name
        if (wan_dir / wan_components.VAE_CHECKPOINT).is_file() or (wan_dir / "vae").is_dir():
            decoders["wan"] = wan_components.load_wan_vae(wan_dir, device=device, dtype=dtype)
    return decoders


def load_service(args: argparse.Namespace):
    """The model, as inference.py loads it, inside a DemoService."""
    import transformers
    transformers.utils.logging.disable_progress_bar()
    from webdemo.jobs import DemoService
    device, dtype = inference.pick_device(args)
    # The pipeline itself stays uncompiled: a job that asks for compile runs a compiled twin sharing its weights. The
    # user's compile option (flag, config key, device default) only sets where the page's switch starts.
    pipe, cfg, source, options = inference.build_pipeline(args, device, dtype, compile_pipeline=False)
    window, sink = rolling_cache_of_long_preset()
    decoders = load_decoders(args, cfg, pipe, device, dtype)
    inference.check_decode_frames_flag(args, list(decoders.values()))
    shapes = "pixel" in decoders  # the pixel-shuffle codec is the shapes world's; the built-in prompts speak it
    return DemoService(pipe, decoders, height=options.height, width=options.width,
                       output_dir=args.output_dir, source=source, device=str(device), default_fps=options.fps,
                       default_prompt=inference.BUILTIN_PROMPTS[0] if shapes else GENERIC_PROMPT,
                       max_blocks=args.max_blocks, rolling_window=window, rolling_sink=sink,
                       default_compile=options.levers.compile)


def run(args: argparse.Namespace) -> int:
    from werkzeug.serving import make_server

    from webdemo.server import LOCAL_HOSTS, create_app
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port must be in [0, 65535], got {args.port}")
    if args.max_blocks < 1:
        raise UsageError(f"--max-blocks must be >= 1, got {args.max_blocks}")
    # Checked before the weights load, so an unwritable folder fails now rather than at every video.
    from utils import outputs
    output_dir = outputs.prepare_output_dir(args.output_dir)
    swept = outputs.sweep_leftovers(output_dir)
    if swept:
        print(f"removed {len(swept)} file(s) an interrupted demo left in {output_dir}", flush=True)
    # Bound before loading, so a taken port fails in a second rather than after the weights load; bound here, not by
    # werkzeug, which reports a taken port over several lines and exits on its own.
    try:
        family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
        listener = socket.create_server((args.host, args.port), family=family)
    except OSError as err:
        raise UsageError(f"cannot listen on {args.host}:{args.port}: {err.strerror or err}") from None
    with listener:
        server = make_server(args.host, args.port, app=None, threaded=True, fd=listener.fileno())  # dups the socket
    service = None
    try:
        service = load_service(args)
        warmup = args.warmup if args.warmup is not None else service.device.startswith("cuda")
        if warmup:
            print("warming up: one video with the page's defaults (compilation, graph capture) ...", flush=True)
            print(f"warmed up in {service.warm_up():.1f} s", flush=True)
        allowed = [*LOCAL_HOSTS, *args.allowed_host] + ([] if args.host in ("0.0.0.0", "::") else [args.host])
        server.app = create_app(service, allowed_hosts=allowed)
        host = "localhost" if args.host in ("0.0.0.0", "::") else args.host
        url = f"http://{f'[{host}]' if ':' in host else host}:{server.port}/"
        print(f"streaming demo of {service.source} on {service.device}: open {url}  (Ctrl+C ends it)", flush=True)
        if args.host not in ("127.0.0.1", "localhost", "::1"):
            print(f"warning: listening on {args.host}: anyone who can reach this machine can use the demo (with a "
                  "host name given by --allowed-host)",
                  file=sys.stderr, flush=True)
        server.serve_forever()  # returns on Ctrl+C (werkzeug catches the KeyboardInterrupt)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        # As Stop does: the running video ends at its next block boundary and is kept as a (partial) mp4.
        job = service.stop_current("the demo was interrupted") if service is not None else None
        if job is not None and job.video_ready:
            print(f"kept the partial video {job.video_path}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)  # flags and key=value overrides in any order
    return inference.run_reporting_errors(run, args)


def interrupt_on_sigterm(signum, frame) -> None:
    """SIGTERM ends the demo as Ctrl+C does: the running video is kept as a partial mp4."""
    raise KeyboardInterrupt


if __name__ == "__main__":
    import signal
    signal.signal(signal.SIGTERM, interrupt_on_sigterm)
    code = main()
    # The server's handler threads are daemons (a page's event stream may still be open at Ctrl+C); if one writes
    # to stderr while the interpreter finalises, CPython aborts the process (SIGABRT). Nothing is left to clean up
    # here (videos are written atomically), so end without finalisation once the output is flushed.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
