"""Compare the rollout benchmark on one GPU with the same run under sequence parallelism.

    cd benchmarks
    python rollout.py --name sp_TAG_1gpu_7blocks
    python rollout.py --blocks 60 --window 21 --sink 3 --rope relative --repeats 1 --name sp_TAG_1gpu_60blocks
    torchrun --standalone --nproc_per_node=N rollout.py --parallel sequence --name sp_TAG_Ngpu_7blocks
    torchrun --standalone --nproc_per_node=N rollout.py --parallel sequence --blocks 60 --window 21 --sink 3 \
        --rope relative --repeats 1 --name sp_TAG_Ngpu_60blocks
    python compare_parallel.py --tag TAG --gpus N

Reads `sp_<tag>_1gpu_{7,60}blocks.json` and `sp_<tag>_<N>gpu_{7,60}blocks.json` (under $OUT or benchmarks/results/),
prints a table and writes `sequence_parallel_<tag>.json`: per-block ms at blocks 0..6 (full cache) and at the last
of 60 blocks (window 21 + sink 3), steady per-block ms (benchmarks/common.steady_block_ms of the 60-block run), warm-up
run, frames/s of the DiT, and the speed-up of N GPUs over one (target: steady >= 1.7x on 2 GPUs at 480x832).
No multi-GPU figures have been recorded yet.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from common import print_table, write_result

TARGET = 1.7


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tag", required=True)
    parser.add_argument("--gpus", type=int, default=2)
    args = parser.parse_args()
    folder = Path(os.environ.get("OUT") or Path(__file__).with_name("results"))

    def load(gpus: int, blocks: int) -> dict:
        path = folder / f"sp_{args.tag}_{gpus}gpu_{blocks}blocks.json"
        if not path.exists():  # a --tiny harness check
            path = path.with_name(path.stem + "_tiny_cpu.json")
        return json.loads(path.read_text())

    runs = {g: {"short": load(g, 7), "long": load(g, 60)} for g in (1, args.gpus)}

    def figures(r: dict) -> dict:
        return {"block_ms_0_to_6": r["short"]["block_ms"][:7], "block_60_ms": r["long"]["block_ms"][-1],
                "steady_block_ms": r["long"]["steady_block_ms"], "warmup_ms_7blocks": r["short"]["warmup_ms"],
                "warmup_ms_60blocks": r["long"]["warmup_ms"],
                "frames_per_s_dit_only_7blocks": r["short"]["frames_per_s_dit_only"],
                "frames_per_s_dit_only_60blocks": r["long"]["frames_per_s_dit_only"],
                "peak_gib": r["long"]["peak_gib"]}

    one, many = figures(runs[1]), figures(runs[args.gpus])
    speedup = {"steady_block": one["steady_block_ms"] / many["steady_block_ms"],
               "block_60": one["block_60_ms"] / many["block_60_ms"],
               "blocks_0_to_6": [a / b for a, b in zip(one["block_ms_0_to_6"], many["block_ms_0_to_6"])],
               "frames_per_s_60blocks": many["frames_per_s_dit_only_60blocks"] / one["frames_per_s_dit_only_60blocks"]}
    result = {"env": runs[args.gpus]["long"]["env"], "gpus": args.gpus, "one_gpu": one, f"{args.gpus}_gpus": many,
              "speedup": speedup, "target_steady_speedup": TARGET if args.gpus == 2 else None,
              "meets_target": speedup["steady_block"] >= TARGET if args.gpus == 2 else None,
              "args": {"short": runs[1]["short"]["args"], "long": runs[1]["long"]["args"]}}
    def ms(xs: list[float]) -> str:
        return " ".join(f"{x:.0f}" for x in xs)

    n = args.gpus
    print_table([
        ("device", result["env"]["device"]),
        ("blocks 0..6, 1 GPU", f"{ms(one['block_ms_0_to_6'])} ms"),
        (f"blocks 0..6, {n} GPUs", f"{ms(many['block_ms_0_to_6'])} ms"),
        ("block 60 (window 21, sink 3)",
         f"{one['block_60_ms']:.0f} -> {many['block_60_ms']:.0f} ms ({speedup['block_60']:.2f}x)"),
        ("steady per block", (f"{one['steady_block_ms']:.0f} -> {many['steady_block_ms']:.0f} ms "
                              f"({speedup['steady_block']:.2f}x, target {TARGET}x on 2 GPUs)")),
        ("warm-up run (7 blocks)", f"{one['warmup_ms_7blocks']:.0f} -> {many['warmup_ms_7blocks']:.0f} ms"),
        ("frames/s (DiT only, 60 blocks)",
         f"{one['frames_per_s_dit_only_60blocks']:.1f} -> {many['frames_per_s_dit_only_60blocks']:.1f}"),
    ])
    print("wrote", write_result(f"sequence_parallel_{args.tag}", result))


if __name__ == "__main__":
    main()
