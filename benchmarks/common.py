"""Helpers shared by the benchmark scripts: random real-size models, CUDA timing, result files."""
from __future__ import annotations

import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.config import WanConfig  # noqa: E402
from model.wan import WanDiT  # noqa: E402


def random_dit(config: WanConfig, device: torch.device, dtype: torch.dtype, seed: int = 0) -> WanDiT:
    """A DiT with random weights built straight on `device` (timing does not depend on weight values)."""
    with torch.device("meta"):
        model = WanDiT(config)
    model = model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm_q.weight") or name.endswith("norm_k.weight") or name.endswith("norm3.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    return model.to(dtype).eval().requires_grad_(False)


def join_torchrun(device: torch.device) -> tuple[torch.device, int, int]:
    """Under torchrun (WORLD_SIZE > 1): join the process group (NCCL on CUDA with NVLink multicast off, gloo on
    CPU) and pin this rank's GPU. Returns (device, rank, world size); (device, 0, 1) without torchrun."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return device, 0, 1
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    return device, dist.get_rank(), world


def leave_torchrun() -> None:
    import torch.distributed as dist
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeats: int = 3, warmup: int = 1) -> tuple[float, object]:
    """Median wall milliseconds of `fn()` over `repeats` runs after `warmup` runs, and its last result."""
    out = None
    for _ in range(warmup):
        out = fn()
    sync(device)
    times = []
    for _ in range(repeats):
        sync(device)
        tic = time.perf_counter()
        out = fn()
        sync(device)
        times.append((time.perf_counter() - tic) * 1000.0)
    times.sort()
    return times[len(times) // 2], out


def environment(device: torch.device) -> dict:
    env = {"torch": torch.__version__, "python": platform.python_version(),
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    if device.type == "cuda":
        env["device"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    else:
        env["device"] = f"cpu ({os.cpu_count()} cores)"
    return env


def write_result(name: str, result: dict) -> Path:
    """Write `<name>.json` under $OUT (device runs) or benchmarks/results/ (local runs), atomically."""
    out_dir = Path(os.environ.get("OUT") or Path(__file__).with_name("results"))
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(path)
    return path


def print_table(rows: list[tuple[str, str]]) -> None:
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
