"""The GPU memory report: both peaks, the per-block record a video's stats carry, and the allocator's breakdown by
pool and stream (CPU: the CUDA queries are replaced by fixed counters)."""
from __future__ import annotations

import pytest
import torch

from pipeline import inference as pipeline_inference
from tests.entry.test_inference import load_pipe
from tests.tiny import save_tiny_model_folder
from utils.gpu_memory import allocator_detail, format_memory, memory_now, memory_report, summarize_segments

GIB = 2**30
CUDA = torch.device("cuda", 0)


def test_memory_report_has_both_peaks(monkeypatch):
    assert memory_report(torch.device("cpu")) == {"peak_allocated_gib": None, "peak_reserved_gib": None}
    assert memory_now(torch.device("cpu")) is None and allocator_detail(torch.device("cpu")) is None
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: 3 * GIB)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device: 5 * GIB // 2)
    report = memory_report(CUDA)
    assert report == {"peak_allocated_gib": 3.0, "peak_reserved_gib": 2.5}
    assert format_memory(report) == "peak GPU memory: 3.00 GiB allocated, 2.50 GiB reserved"


def segment(size_gib: float, pool=(0, 0), stream=0, device=0) -> dict:
    return {"device": device, "total_size": int(size_gib * GIB), "segment_pool_id": pool, "stream": stream}


def test_segments_are_summed_by_pool_and_stream_on_their_own_device():
    summary = summarize_segments([segment(2.0), segment(1.0, stream=77), segment(0.5, pool=(1, 3)),
                                  segment(4.0, pool=(1, 3), stream=77), segment(9.0, device=1)], device_index=0)
    assert summary["reserved_gib_by_pool"] == {"default": 3.0, "graph_pool_1_3": 4.5}
    assert summary["reserved_gib_by_stream"] == {"0": 2.5, "77": 5.0}
    assert summary["largest_segments_gib"] == [4.0, 2.0, 1.0, 0.5]  # the other device's segment is not counted


def test_allocator_detail_reads_fragmentation_retries_and_mallocs(monkeypatch):
    monkeypatch.setattr(torch.cuda, "memory_snapshot", lambda: [segment(1.5), segment(2.5, pool=(2, 1))])
    monkeypatch.setattr(torch.cuda, "memory_stats", lambda device: {
        "inactive_split_bytes.all.current": GIB // 4, "num_alloc_retries": 2, "num_device_alloc": 40})
    detail = allocator_detail(CUDA)
    assert detail == {"reserved_gib_by_pool": {"default": 1.5, "graph_pool_2_1": 2.5},
                      "reserved_gib_by_stream": {"0": 4.0}, "largest_segments_gib": [2.5, 1.5],
                      "inactive_split_gib": 0.25, "alloc_retries": 2, "device_mallocs": 40}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_tiny_model_folder(tmp_path_factory.mktemp("model") / "tiny")


def test_a_video_records_the_memory_after_each_block_and_the_allocator_at_its_end(folder, monkeypatch):
    """The record is taken on the host as each block is queued: one (allocated, reserved) pair per block."""
    pipe = load_pipe(folder)
    readings = iter([(1.0, 2.0), (1.5, 4.0), (1.25, 4.0), (9.0, 9.0)])
    monkeypatch.setattr(pipeline_inference, "memory_now", lambda device: next(readings))
    monkeypatch.setattr(pipeline_inference, "allocator_detail", lambda device: {"alloc_retries": 0})
    blocks = 3
    out = pipe.generate(["a red circle"], pipeline_inference.VideoRequest(
        num_latent_frames=blocks * pipe.settings.frames_per_block, height=64, width=96))
    assert out.stats["block_allocated_gib"] == [1.0, 1.5, 1.25]
    assert out.stats["block_reserved_gib"] == [2.0, 4.0, 4.0]
    assert out.stats["allocator"] == {"alloc_retries": 0}
