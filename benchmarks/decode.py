"""Streamed decoding alone: the latent codecs on a 7-block video, block by block, with cuDNN's algorithm search off
and on.

    python benchmarks/decode.py                 # Wan VAE (both layouts) and TAEHV, random weights, 480x832, bf16
    python benchmarks/decode.py --size tiny     # harness check on CPU

`torch.backends.cudnn.benchmark` times the convolution algorithms of every new shape once (the first rollout) and
keeps the fastest; off, cuDNN's heuristics choose. Each setting gets a fresh codec, one warm-up video, then the median
of `--repeats` videos: total ms, pixel frames/s, and the first block's ms.
"""
from __future__ import annotations

import argparse
import time

import torch
from common import environment, print_table, random_codec, sync, write_result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=["real", "tiny"], default="real")
    parser.add_argument("--codecs", default="wan_vae,wan_vae_cl,taehv")
    parser.add_argument("--blocks", type=int, default=7)
    parser.add_argument("--frames-per-block", type=int, default=3)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=832)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--name", default="decode")
    args = parser.parse_args(argv)
    tiny = args.size == "tiny"
    device = torch.device("cpu" if tiny else "cuda")
    dtype = torch.float32 if tiny else torch.bfloat16
    h, w = (4, 6) if tiny else (args.height // 8, args.width // 8)
    fpb = args.frames_per_block
    g = torch.Generator(device=device).manual_seed(0)
    latents = torch.randn(1, args.blocks * fpb, 16, h, w, generator=g, device=device, dtype=dtype)
    result = {"env": environment(device), "args": vars(args), "codecs": {}}
    name = args.name + ("_tiny_cpu" if tiny else "")
    rows = [("device", result["env"]["device"])]
    for kind in [k for k in args.codecs.split(",") if k]:
        for search in (False, True):
            torch.backends.cudnn.benchmark = search
            codec = random_codec(kind, device, dtype, tiny=tiny)

            def video() -> tuple[float, float, int]:
                decoder = codec.stream_decoder()
                sync(device)
                tic = time.perf_counter()
                first_ms, frames = None, 0
                with torch.no_grad():
                    for start in range(0, latents.shape[1], fpb):
                        frames += decoder.decode_chunk(latents[:, start:start + fpb]).shape[1]
                        if first_ms is None:
                            sync(device)
                            first_ms = (time.perf_counter() - tic) * 1000.0
                sync(device)
                return (time.perf_counter() - tic) * 1000.0, first_ms, frames

            video()  # warm-up (with the search on, it also picks the algorithms)
            runs = sorted(video() for _ in range(args.repeats))
            total_ms, first_ms, frames = runs[len(runs) // 2]
            entry = {"total_ms": total_ms, "first_block_ms": first_ms, "pixel_frames": frames,
                     "frames_per_s": frames / (total_ms / 1000.0)}
            label = f"{kind}{' cudnn_benchmark' if search else ''}"
            result["codecs"][label] = entry
            rows.append((label, f"{total_ms:8.1f} ms  {entry['frames_per_s']:6.1f} frames/s  first block "
                                f"{first_ms:6.1f} ms  ({frames} frames)"))
            write_result(name, result)
    torch.backends.cudnn.benchmark = False
    print_table(rows)
    return result


if __name__ == "__main__":
    main()
