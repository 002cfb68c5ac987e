"""First-run warm-up of streamed generation, from a cold compile cache and from a warm one.

    python benchmarks/warmup.py                  # H100: two fresh processes sharing one new compile-cache folder
    python benchmarks/warmup.py --size tiny --levers eager,rope_real --decode wan_vae   # harness check on CPU

Each phase is a new Python process, so dynamo, cuDNN and cuBLAS start empty as they do for a user. It builds the
1.3B DiT with random weights and the levers of benchmarks/speed.py's last entry (CUDA graphs included; attention
`--backend`, default "auto": flash-attn when installed, else SDPA's own choice) and the Wan VAE decoder the pipeline
compiles (`wan_vae_pipeline`), then times a 7-block DiT rollout twice and the streamed decode of its latents twice:
warm-up = the excess of each first run over its second, summed (what a user's first video costs beyond a warm one;
the two overlap in a streamed video, so this is an upper bound). Then a few streamed videos (decode on a side stream).
Phase `cold` starts with empty TORCHINDUCTOR_CACHE_DIR, TRITON_CACHE_DIR and FLASH_ATTENTION_CUTE_DSL_CACHE_DIR; phase
`warm` runs after it with the same folders (inductor's FX-graph and AOT-autograd caches, Triton's and flash-attn 4's
compiled kernels).
Prints a table, writes JSON (benchmarks/results/<name>.json, or $OUT when set).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import environment, print_table, random_codec, sync, write_result

PHASES = ("cold", "warm")


def build_parser() -> argparse.ArgumentParser:
    from speed import LEVERS
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=["real", "tiny"], default="real")
    parser.add_argument("--levers", default=",".join(x for x in LEVERS if x != "sdpa"),
                        help="speed.py levers to switch on (default: all but timing the attention back-ends)")
    parser.add_argument("--decode", default="wan_vae_pipeline", help="codec kind (benchmarks/common.random_codec)")
    parser.add_argument("--backend", default="auto",
                        help="attention back-end (model/attention.py ATTENTION_BACKENDS), or 'fastest': the one "
                             "speed.py's sdpa lever times fastest (its timing counts as build time)")
    parser.add_argument("--videos", type=int, default=2, help="streamed videos per phase after the warm-up runs")
    parser.add_argument("--cache-dir", help="compile-cache folder (default: a new temporary one, removed after)")
    parser.add_argument("--name", default="warmup")
    parser.add_argument("--child-out", help=argparse.SUPPRESS)  # a phase's process writes its result here
    return parser


def run_phase(args) -> dict:
    """In this process: build; a DiT-only rollout and a decode-only stream, each twice (cold, then warm); then
    `args.videos` streamed videos. Also dynamo's time per compile stage and the compile caches' hits and misses."""
    from speed import Bench, Setting, apply_lever
    from speed import build_parser as speed_parser
    from torch._dynamo.utils import compile_times, counters

    from model.wan_block import InferenceOptions
    from pipeline.streaming import BlockDecoder
    tic = time.perf_counter()
    bench = Bench(speed_parser().parse_args(["--size", args.size]))
    setting = Setting(InferenceOptions.all_off())
    for lever in [x for x in args.levers.split(",") if x]:
        apply_lever(setting, lever, bench)
    setting.backend = bench.fastest_attention() if args.backend == "fastest" else args.backend
    codec = random_codec(args.decode, bench.device, bench.dtype, tiny=args.size == "tiny")
    denoiser = bench.denoiser(setting)
    build_s = time.perf_counter() - tic

    def dit_s() -> tuple[float, torch.Tensor]:
        run = bench.run(denoiser, bench.args.blocks, rerotate=setting.rerotate)
        return run["ms"] / 1000.0, run["latents"]

    def decode_s(latents: torch.Tensor) -> float:
        decoder = codec.stream_decoder()
        sync(bench.device)
        tic = time.perf_counter()
        with torch.no_grad():
            for start in range(0, latents.shape[1], bench.fpb):
                decoder.decode_chunk(latents[:, start:start + bench.fpb])
        sync(bench.device)
        return time.perf_counter() - tic

    (dit_first, latents), (dit_warm, _) = dit_s(), dit_s()
    decoder_first, decoder_warm = decode_s(latents), decode_s(latents)
    print(f"[warmup] DiT {dit_first:.1f} s then {dit_warm:.2f} s; decoder {decoder_first:.1f} s then "
          f"{decoder_warm:.2f} s", flush=True)
    videos = []
    for _ in range(args.videos):
        decoder = BlockDecoder(codec.stream_decoder(), bench.device, side_stream=bench.device.type == "cuda")
        run = bench.run(denoiser, bench.args.blocks, rerotate=setting.rerotate, decoder=decoder)
        videos.append({"wall_ms": run["ms"], "time_to_first_frame_ms": decoder.time_to_first_frame_ms})
        print(f"[warmup] video {len(videos)}: {run['ms'] / 1000:.2f} s", flush=True)
    caches = {f"{group}.{key}": value for group in ("inductor", "aot_autograd")
              for key, value in counters[group].items() if "cache" in key}
    return {"build_s": build_s, "dit_first_s": dit_first, "dit_warm_s": dit_warm, "decoder_first_s": decoder_first,
            "decoder_warm_s": decoder_warm, "warmup_s": dit_first - dit_warm + decoder_first - decoder_warm,
            "videos": videos, "compile_caches": caches, "dynamo_compile_times": compile_times(repr="str"),
            "options": vars(setting.options), "compile": setting.compile, "persistent_norms": setting.persistent_norms,
            "cuda_graphs": setting.graphs, "backend": setting.backend}


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    if args.child_out:
        Path(args.child_out).write_text(json.dumps(run_phase(args)))
        return {}
    if args.videos < 1:
        raise SystemExit("--videos must be >= 1")
    name = args.name + ("_tiny_cpu" if args.size == "tiny" else "")
    device = torch.device("cpu" if args.size == "tiny" else "cuda")
    result = {"env": environment(device), "args": vars(args), "phases": {}}
    rows = [("device", result["env"]["device"])]
    with tempfile.TemporaryDirectory(prefix="sf-warmup-") as tmp:
        cache = Path(args.cache_dir or tmp)
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(cache / "inductor"), TRITON_CACHE_DIR=str(cache / "triton"),
                   FLASH_ATTENTION_CUTE_DSL_CACHE_DIR=str(cache / "flash_attn"), PYTHONUNBUFFERED="1")
        child = [sys.executable, str(Path(__file__).resolve()), "--size", args.size, "--levers", args.levers,
                 "--decode", args.decode, "--backend", args.backend, "--videos", str(args.videos)]
        for phase in PHASES:
            out = Path(tmp) / f"{phase}.json"
            tic = time.perf_counter()
            proc = subprocess.run([*child, "--child-out", str(out)], env=env, cwd=Path(__file__).parent)
            if proc.returncode != 0:
                raise SystemExit(f"warm-up phase {phase!r} failed with exit code {proc.returncode} (output above)")
            entry = json.loads(out.read_text())
            entry["process_s"] = time.perf_counter() - tic
            result["phases"][phase] = entry
            rows.append((phase, f"warm-up {entry['warmup_s']:6.1f} s  (DiT {entry['dit_first_s']:.1f} -> "
                                f"{entry['dit_warm_s']:.2f} s, decoder {entry['decoder_first_s']:.1f} -> "
                                f"{entry['decoder_warm_s']:.2f} s; streamed video "
                                f"{entry['videos'][-1]['wall_ms'] / 1e3:.2f} s; build {entry['build_s']:.1f} s, "
                                f"process {entry['process_s']:.1f} s)"))
            write_result(name, result)
    print_table(rows)
    return result


if __name__ == "__main__":
    main()
