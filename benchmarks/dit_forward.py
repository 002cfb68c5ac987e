"""Real-size Wan DiT forwards with random weights: one KV-cached block and one bidirectional clip.

    python benchmarks/dit_forward.py                  # 1.3B, 480x832, bf16 on CUDA
    python benchmarks/dit_forward.py --tiny           # harness check on CPU

Prints a table and writes JSON (time per call, peak GPU memory). No targets: the speed work has its own script.
"""
from __future__ import annotations

import argparse

import torch

from common import environment, print_table, random_dit, timed, write_result
from model.config import WAN_1_3B, WAN_14B, WanConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["1.3b", "14b"], default="1.3b")
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=832)
    parser.add_argument("--frames", type=int, default=21, help="latent frames of the bidirectional clip")
    parser.add_argument("--frames-per-block", type=int, default=3)
    parser.add_argument("--tiny", action="store_true", help="tiny model on CPU (checks the harness only)")
    parser.add_argument("--name", default="dit_forward")
    args = parser.parse_args()

    if args.tiny:
        config = WanConfig(dim=64, ffn_dim=128, num_heads=4, num_layers=2, text_dim=32, freq_dim=32, text_len=16)
        device, dtype = torch.device("cpu"), torch.float32
        args.height, args.width, args.frames = 48, 80, 6
    else:
        config = WAN_1_3B if args.model == "1.3b" else WAN_14B
        device, dtype = torch.device("cuda"), torch.bfloat16
    h, w = args.height // 8, args.width // 8
    model = random_dit(config, device, dtype)
    context = torch.randn(1, config.text_len, config.text_dim, device=device, dtype=dtype)
    n = args.frames_per_block
    results = {"config": config.to_dict(), "latent": [args.frames, config.in_dim, h, w], "dtype": str(dtype),
               "env": environment(device)}

    def cached_block(position: int):
        cache = model.new_kv_cache(1, h, w, capacity_frames=args.frames)
        x = torch.randn(1, n, config.in_dim, h, w, device=device, dtype=dtype)
        t = torch.full((1, n), 500.0, device=device)
        for s in range(0, position * n, n):  # fill the cache up to the block
            model.forward_cached(x, t, context, cache, s)
        cache.global_end = cache.local_end = position * n * cache.tokens_per_frame
        return lambda: (setattr(cache, "global_end", position * n * cache.tokens_per_frame),
                        setattr(cache, "local_end", position * n * cache.tokens_per_frame),
                        model.forward_cached(x, t, context, cache, position * n))[-1]

    rows = []
    with torch.no_grad():
        last = args.frames // n - 1
        for position in (0, last):
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            ms, _ = timed(cached_block(position), device)
            peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
            results[f"cached_block_{position}"] = {"ms": ms, "peak_gib": peak}
            rows.append((f"cached block {position} ({n} frames, {position * n} cached)",
                         f"{ms:8.1f} ms" + (f"  peak {peak:.2f} GiB" if peak else "")))
        x = torch.randn(1, args.frames, config.in_dim, h, w, device=device, dtype=dtype)
        t = torch.full((1,), 500.0, device=device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        ms, _ = timed(lambda: model(x, t, context), device)
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        results["bidirectional"] = {"ms": ms, "peak_gib": peak, "frames": args.frames}
        rows.append((f"bidirectional ({args.frames} frames)", f"{ms:8.1f} ms" + (f"  peak {peak:.2f} GiB" if peak else "")))
    print_table([("device", results["env"]["device"])] + rows)
    print("wrote", write_result(args.name if not args.tiny else args.name + "_tiny_cpu", results))


if __name__ == "__main__":
    main()
