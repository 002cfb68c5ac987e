"""benchmarks/user_path.py on a tiny random folder on the CPU: it drives inference.py itself through every section and
writes the figures the GPU run will write (their values here say nothing about speed)."""
from __future__ import annotations

import json

import pytest

from tests.entry.test_speed_benchmark import benchmark_module

HEADLINE = ("steady_video_fps_wan_vae", "steady_video_fps_taehv", "ttff_ms_steady", "first_video_s_cold",
            "first_video_s_warm_cache", "long_block_ms_steady", "steady_video_fps_wan_vae_decode_3_per_call",
            "steady_video_fps_wan_vae_24gib", "steady_video_fps_wan_vae_expandable")
MEMORY = ("peak_allocated_gib", "peak_reserved_gib", "peak_allocated_gib_text_on_gpu", "peak_reserved_gib_text_on_gpu",
          "peak_reserved_gib_decode_3_per_call", "peak_reserved_gib_expandable")


@pytest.mark.slow
def test_user_path_benchmark_runs_every_section_through_the_command(tmp_path, monkeypatch):
    user_path = benchmark_module("user_path")
    monkeypatch.setenv("OUT", str(tmp_path / "results"))
    result = user_path.main(["--tiny", "--latent-frames", "3", "--long-blocks", "9", "--work-dir",
                             str(tmp_path / "work")])
    saved = json.loads((tmp_path / "results" / "user_path_tiny_cpu.json").read_text())
    assert saved["device"].startswith("cpu") and saved["skipped"] == []
    assert not list((tmp_path / "results").glob("*.tmp"))  # written atomically
    for key in HEADLINE:
        assert saved[key] > 0, key
    for key in MEMORY:  # GPU figures: present, and None off CUDA
        assert key in saved and saved[key] is None, key
    assert saved["text_encoding_ms_per_prompt_cpu"] > 0 and saved["mp4_wait_ms_max"] >= 0
    sections = saved["sections"]
    order = ("cold", "warm_cache", "taehv", "long", "text_on_gpu", "decode_3_per_call", "limit_24gib", "expandable")
    assert tuple(sections) == order and [len(sections[s]["videos"]) for s in order] == [4, 4, 4, 1, 1, 4, 4, 4]
    assert sections["decode_3_per_call"]["levers"]["decode_frames_per_call"] == 3
    assert sections["expandable"]["env"] == {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
    assert all(sections[s]["env"] == {} for s in order[:-1])
    assert all(v["peak_reserved_gib"] is None for v in sections["cold"]["videos"])  # per video; None off CUDA
    assert sections["long"]["blocks"] == 9 and sections["cold"]["videos"][0]["pixel_frames"] == 9
    assert sections["cold"]["levers"]["attention_backend"] == "auto"  # the command's own CPU defaults
    # Every video was written by the command (mp4 next to its stats).
    assert len(list((tmp_path / "work" / "cold").glob("*.mp4"))) == 4
    assert result["first_video_s_cold"] == saved["first_video_s_cold"]


def test_steady_long_block_is_the_tail_after_the_window_fills():
    user_path = benchmark_module("user_path")
    # window 21, 3-frame blocks: block 8 is the first to attend to a full window; 10 blocks, 100 ms each, then the
    # decoder finishes 50 ms after the last block.
    stats = {"settings": {"window_frames": 21, "frames_per_block": 3},
             "block_end_ms": [100.0 * (i + 1) for i in range(10)], "done_ms": 1050.0}
    assert user_path.long_block_ms(stats) == pytest.approx((1050.0 - 800.0) / 2)


def test_peaks_take_loading_and_every_video():
    user_path = benchmark_module("user_path")
    stats = [{"setup_peak_reserved_gib": 3.0, "peak_reserved_gib": 5.0}, {"setup_peak_reserved_gib": 3.0,
                                                                          "peak_reserved_gib": 7.5}]
    assert user_path.peak(stats, "peak_reserved_gib") == 7.5
    assert user_path.peak([{"setup_peak_reserved_gib": 9.0, "peak_reserved_gib": 2.0}], "peak_reserved_gib") == 9.0
    assert user_path.peak([{"peak_reserved_gib": None}], "peak_reserved_gib") is None


@pytest.mark.parametrize("name, slug", [("NVIDIA H100 80GB HBM3", "h100"), ("NVIDIA H200", "h200"),
                                        ("NVIDIA GeForce RTX 4090", "nvidia_geforce_rtx_4090"),
                                        ("NVIDIA L40S", "l40s")])
def test_result_file_is_named_after_the_gpu(name, slug):
    assert benchmark_module("user_path").gpu_slug(name) == slug


def test_summary_row_names_the_measured_figures_only():
    summarize = benchmark_module("summarize")
    data = {"steady_video_fps_wan_vae": 30.12, "steady_video_fps_taehv": None, "ttff_ms_steady": 187.4,
            "first_video_s_cold": 21.04, "first_video_s_warm_cache": 5.5, "long_block_ms_steady": 401.2,
            "peak_reserved_gib": 12.34, "peak_reserved_gib_text_on_gpu": 23.0}
    assert summarize.user_path_figure(data) == ("30.1 frames/s Wan VAE, first frame 187 ms, first video 21.0 s cold, "
                                                "5.5 s warm cache, long 401 ms/block, peak reserved 12.3 GiB (text on "
                                                "CPU), 23.0 GiB (UMT5-XXL on GPU)")
