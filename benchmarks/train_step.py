"""Time training steps of a recipe and show where a step goes (torch.profiler), without saving anything.

    python benchmarks/train_step.py --config_path configs/shapes/teacher.yaml text_encoder_path=assets/shapes_base
    python benchmarks/train_step.py --config_path configs/shapes/self_forcing_dmd.yaml --steps 20 ...
    torchrun --nproc_per_node=2 benchmarks/train_step.py --config_path ...      # FSDP over 2 GPUs

Prints median ms per step after warm-up and the top operators by self time (CPU and CUDA), and writes JSON (rank 0;
the name gets `_<N>gpu` under torchrun, and the peak memory of every rank is listed).
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from common import environment, print_table, write_result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config_path", required=True)
    p.add_argument("--steps", type=int, default=30, help="timed steps after warm-up")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--profile-steps", type=int, default=5, help="steps recorded by torch.profiler")
    p.add_argument("--name", default="train_step")
    p.add_argument("overrides", nargs="*")
    args = p.parse_intermixed_args()
    import train
    from utils.distributed import cleanup_distributed, init_distributed

    total = args.warmup + args.steps + args.profile_steps
    dist = init_distributed()
    with tempfile.TemporaryDirectory() as logdir:
        targs = train.parse_args(["--config_path", args.config_path, "--logdir", logdir, "--no_save",
                                  "--disable-wandb", *args.overrides, f"max_steps={total}", "log_every=1000000"])
        started = time.perf_counter()
        trainer = train._setup(targs, dist, None, None, None)
        device = dist.device
        sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)

        def progress(what: str) -> None:  # a run cut short still shows how far it got
            if dist.rank == 0:
                print(f"[train_step] {time.perf_counter() - started:7.1f} s  {what}", flush=True)
        progress("models built and sharded")
        for i in range(args.warmup):
            trainer.train_step()
            progress(f"warm-up step {i + 1}/{args.warmup}")
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times = []
        for _ in range(args.steps):
            sync()
            tic = time.perf_counter()
            trainer.train_step()
            sync()
            times.append((time.perf_counter() - tic) * 1000.0)
            progress(f"timed step {len(times)}/{args.steps}: {times[-1]:.0f} ms")
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=activities) as prof:
            for _ in range(args.profile_steps):
                trainer.train_step()
            sync()
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    peaks = [peak]
    if dist.world_size > 1:
        import torch.distributed as tdist
        peaks = [None] * dist.world_size
        tdist.all_gather_object(peaks, peak)
    cleanup_distributed(dist)
    if dist.rank != 0:
        return
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    averages = prof.key_averages()
    table = averages.table(sort_by=sort, row_limit=25)
    # On a GPU, also where the host's time goes: a step far longer than its GPU time is host-bound.
    host_table = averages.table(sort_by="self_cpu_time_total", row_limit=25) if device.type == "cuda" else None
    print(table)
    # With a critic the generator updates every dfake_gen_update_ratio steps: the mean over the timed steps (a
    # multiple of the ratio) is the cost per iteration, the median that of a critic-only step.
    result = {"env": environment(device), "config": args.config_path, "overrides": args.overrides,
              "ms_per_step_median": statistics.median(times), "ms_per_step_mean": statistics.fmean(times),
              "ms_per_step": times, "world_size": dist.world_size,
              "peak_gpu_memory_gib": peak, "peak_gpu_memory_gib_per_rank": peaks, "profile": table,
              "profile_host": host_table}
    print_table([("device", result["env"]["device"]), ("config", args.config_path),
                 ("ms/step (median)", f"{result['ms_per_step_median']:.1f}"),
                 ("ranks", str(dist.world_size)), ("ms/step (mean)", f"{result['ms_per_step_mean']:.1f}"),
                 ("peak GPU memory per rank (GiB)",
                  "-" if peak is None else " / ".join(f"{p:.1f}" for p in peaks))])
    print("wrote", write_result(args.name + (f"_{dist.world_size}gpu" if dist.world_size > 1 else "")
                                 + ("" if device.type == "cuda" else "_tiny_cpu"), result))


if __name__ == "__main__":
    main()
