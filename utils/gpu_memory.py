"""GPU memory as a run reports it: both peaks, the allocator's state now, and where its reserved memory sits.

`allocated` is what live tensors occupy; `reserved` is what PyTorch's caching allocator holds from the driver (what
`nvidia-smi` and a small card's limit see). Every query here reads the allocator's host-side counters: none waits for
the GPU, so a rollout can record them per block without a synchronisation.
"""
from __future__ import annotations

from typing import Any

import torch

MEMORY_KEYS = ("peak_allocated_gib", "peak_reserved_gib")
GIB = 2**30


def memory_report(device: torch.device) -> dict[str, float | None]:
    """Peak GPU memory since the last `torch.cuda.reset_peak_memory_stats`, both figures. None off CUDA."""
    if device.type != "cuda":
        return dict.fromkeys(MEMORY_KEYS)
    return {"peak_allocated_gib": torch.cuda.max_memory_allocated(device) / GIB,
            "peak_reserved_gib": torch.cuda.max_memory_reserved(device) / GIB}


def format_memory(report: dict[str, float | None]) -> str:
    """One line for the console: both peaks, or that there is no GPU figure."""
    if report.get("peak_allocated_gib") is None:
        return "peak GPU memory: n/a (not on CUDA)"
    return (f"peak GPU memory: {report['peak_allocated_gib']:.2f} GiB allocated, "
            f"{report['peak_reserved_gib']:.2f} GiB reserved")


def memory_now(device: torch.device) -> tuple[float, float] | None:
    """(allocated, reserved) GiB at this point of the host's program (allocations happen when work is queued, so this
    is the memory of everything queued so far). None off CUDA."""
    if device.type != "cuda":
        return None
    return torch.cuda.memory_allocated(device) / GIB, torch.cuda.memory_reserved(device) / GIB


def allocator_detail(device: torch.device) -> dict[str, Any] | None:
    """Where the reserved memory sits now and how the allocator got there:
    reserved_gib_by_pool: per memory pool ("default", or the CUDA-graph pool's id): a graph pool's memory serves only
      its graphs' replays;
    reserved_gib_by_stream: per CUDA stream (a block freed on one stream is reused only by allocations on that
      stream, so a side stream caches its own peak);
    inactive_split_gib: cached memory in segments that are partly in use (fragmentation: held, but only blocks that
      fit the free pieces can use it);
    alloc_retries: how often an allocation failed, the cache was returned to the driver and the allocation retried
      (a run at its memory limit); device_mallocs: cudaMalloc calls so far; largest_segments_gib: the five largest.
    None off CUDA."""
    if device.type != "cuda":
        return None
    stats = torch.cuda.memory_stats(device)
    index = device.index if device.index is not None else torch.cuda.current_device()
    return summarize_segments(torch.cuda.memory_snapshot(), index) | {
        "inactive_split_gib": stats.get("inactive_split_bytes.all.current", 0) / GIB,
        "alloc_retries": int(stats.get("num_alloc_retries", 0)),
        "device_mallocs": int(stats.get("num_device_alloc", 0)),
    }


def summarize_segments(segments: list[dict[str, Any]], device_index: int) -> dict[str, Any]:
    """`torch.cuda.memory_snapshot()` segments of one device -> reserved GiB by pool and by stream, the largest."""
    by_pool: dict[str, float] = {}
    by_stream: dict[str, float] = {}
    sizes = []
    for seg in segments:
        if seg.get("device", device_index) != device_index:
            continue
        size = seg["total_size"] / GIB
        pool = tuple(seg.get("segment_pool_id", (0, 0)))
        pool_name = "default" if pool == (0, 0) else f"graph_pool_{pool[0]}_{pool[1]}"
        by_pool[pool_name] = by_pool.get(pool_name, 0.0) + size
        stream = str(seg.get("stream", 0))
        by_stream[stream] = by_stream.get(stream, 0.0) + size
        sizes.append(size)
    return {"reserved_gib_by_pool": by_pool, "reserved_gib_by_stream": by_stream,
            "largest_segments_gib": sorted(sizes, reverse=True)[:5]}
