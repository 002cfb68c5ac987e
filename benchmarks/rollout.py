"""Time the few-step causal rollout of a real-size Wan DiT with random weights (no text encoder, no decode).

    python benchmarks/rollout.py                    # 1.3B, 480x832, 7 blocks x 3 frames, 4 steps + cache pass
    python benchmarks/rollout.py --blocks 60 --window 21 --sink 3 --rope relative
    python benchmarks/rollout.py --tiny             # harness check on CPU
    torchrun --nproc_per_node=2 benchmarks/rollout.py --parallel sequence   # one video, tokens split over 2 GPUs

Prints per-block milliseconds and writes JSON (per block, total, frames/s of the DiT alone, peak memory, warm-up:
the first, untimed-for-results run). With --parallel sequence (under torchrun) rank 0 reports; compare with the
same command on one GPU of the same machine (benchmarks/compare_parallel.py reads both).
"""
from __future__ import annotations

import argparse
import os
import time

import torch
from common import environment, print_table, random_dit, steady_block_ms, sync, tiny_config, write_result

from model.config import WAN_1_3B
from pipeline.denoiser import Denoiser
from pipeline.rollout import RolloutOptions, rollout
from pipeline.schedule import FlowMatchSchedule
from utils.distributed import cleanup_distributed, init_distributed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=832)
    parser.add_argument("--blocks", type=int, default=7)
    parser.add_argument("--frames-per-block", type=int, default=3)
    parser.add_argument("--steps", type=int, nargs="+", default=[1000, 750, 500, 250])
    parser.add_argument("--window", type=int, default=-1, help="rolling window in latent frames (-1: full cache)")
    parser.add_argument("--sink", type=int, default=0)
    parser.add_argument("--rope", choices=["absolute", "relative"], default="absolute")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--name", default="rollout")
    parser.add_argument("--parallel", choices=["none", "sequence"], default="none",
                        help="sequence: under torchrun, split each block's tokens over all ranks (Ulysses)")
    args = parser.parse_args()

    if args.tiny:
        config, device, dtype = tiny_config(), torch.device("cpu"), torch.float32
        args.height, args.width = 48, 80
    else:
        config, device, dtype = WAN_1_3B, torch.device("cuda"), torch.bfloat16
    h, w = args.height // 8, args.width // 8
    frames = args.blocks * args.frames_per_block
    dist_state = None
    rank, world = 0, 1
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # torchrun: one video split over the ranks
        dist_state = init_distributed("cpu" if device.type == "cpu" else None)
        device, rank, world = dist_state.device, dist_state.rank, dist_state.world_size
    if world > 1 and args.parallel != "sequence":
        raise SystemExit("several processes need --parallel sequence (this script times one video)")
    torch.manual_seed(0)  # the same text and noise on every rank
    model = random_dit(config, device, dtype)
    if args.parallel == "sequence":
        from pipeline.sequence_parallel import enable_sequence_parallel
        enable_sequence_parallel(model)
    schedule = FlowMatchSchedule(shift=5.0)
    steps = schedule.warp(args.steps).tolist()
    denoiser = Denoiser(model, schedule)
    context = torch.randn(1, config.text_len, config.text_dim, device=device, dtype=dtype)
    capacity = frames if args.window == -1 else args.window
    cache = model.new_kv_cache(1, h, w, capacity, window_frames=args.window, sink_frames=args.sink, rope=args.rope)
    noise = torch.randn(1, frames, config.in_dim, h, w, device=device, dtype=dtype)

    block_ms: list[float] = []
    last = [0.0]

    def on_block(index: int, start: int, x0: torch.Tensor) -> None:
        sync(device)
        now = time.perf_counter()
        block_ms.append((now - last[0]) * 1000.0)
        last[0] = now

    options = RolloutOptions(steps=steps, frames_per_block=args.frames_per_block, on_block=on_block,
                             final_context_pass=False)
    runs, warmup_ms = [], None
    with torch.no_grad():
        for repeat in range(args.repeats + 1):  # the first run warms up
            cache.reset()
            block_ms.clear()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            sync(device)
            tic = last[0] = time.perf_counter()
            rollout(denoiser, noise, context, cache, options)
            sync(device)
            total = (time.perf_counter() - tic) * 1000.0
            if repeat:
                runs.append({"total_ms": total, "block_ms": list(block_ms)})
            else:
                warmup_ms = total
    best = min(runs, key=lambda r: r["total_ms"])
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    # Pixel frames per latent frame follow the Wan VAE: 1 + 4 (F - 1).
    pixel_frames = 1 + 4 * (frames - 1)
    result = {"env": environment(device), "config": config.to_dict(), "args": vars(args), "steps": steps,
              "total_ms": best["total_ms"], "block_ms": best["block_ms"],
              "frames_per_s_dit_only": pixel_frames / (best["total_ms"] / 1000.0), "peak_gib": peak,
              "time_to_first_block_ms": best["block_ms"][0], "warmup_ms": warmup_ms,
              "steady_block_ms": steady_block_ms(best["block_ms"], args.window, args.frames_per_block),
              "parallel": {"mode": args.parallel, "world_size": world}}
    rows = [("device", result["env"]["device"]), ("blocks x frames", f"{args.blocks} x {args.frames_per_block}"),
            ("total", f"{best['total_ms']:.1f} ms"), ("frames/s (DiT only)", f"{result['frames_per_s_dit_only']:.1f}")]
    shown = best["block_ms"] if len(best["block_ms"]) <= 8 else best["block_ms"][:3] + best["block_ms"][-3:]
    rows.append(("per block ms", " ".join(f"{m:.1f}" for m in shown)))
    rows.append(("steady block (median, full window)", f"{result['steady_block_ms']:.1f} ms"))
    rows.append(("warm-up run", f"{warmup_ms:.0f} ms"))
    if world > 1:
        rows.append(("sequence parallel", f"{world} ranks"))
    if peak is not None:
        rows.append(("peak memory", f"{peak:.2f} GiB"))
    if rank == 0:
        print_table(rows)
        print("wrote", write_result(args.name + ("_tiny_cpu" if args.tiny else ""), result))
    if dist_state is not None:
        cleanup_distributed(dist_state)


if __name__ == "__main__":
    main()
