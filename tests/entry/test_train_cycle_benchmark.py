"""The training-cycle benchmarks: the cycle clock's bookkeeping, the comparison of two result files, and
benchmarks/train_cycle.py (and, when a checkout of the original is at hand, original_train_cycle.py) at tiny size on
the CPU, writing the JSON the GPU run will write (its values here say nothing about speed)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO_ROOT
from tests.entry.test_speed_benchmark import benchmark_module

CYCLE_KEYS = {"cycle_s", "generator_step_s", "critic_step_s", "critic_steps_s", "peak_allocated_gib",
              "peak_reserved_gib", "profiled"}
RESULT_KEYS = {"side", "env", "settings", "note", "text_encoder_gib", "warmup_cycles", "timed_cycles", "complete",
               "warmup_cycle_s", "cycles", "cycle_s_median", "generator_step_s_median", "critic_step_s_median",
               "peak_allocated_gib", "peak_reserved_gib", "profile"}


def drive(clock, cycles: int, ratio: int = 5) -> int:
    """Feed `clock` the events of a loop like train.py's (a generator update every `ratio` iterations, a critic
    update every iteration) until it says it is done; returns the iterations run."""
    cycle_report = benchmark_module("cycle_report")
    for step in range(cycles * ratio + 1):
        try:
            if step % ratio == 0:
                clock.start("generator")
                torch.ones(8, 8).matmul(torch.ones(8, 8))  # something for the profiler to see
                clock.end("generator")
        except cycle_report.CyclesDone:
            return step
        clock.start("critic")
        torch.ones(8, 8).sum()
        clock.end("critic")
    raise AssertionError("the clock never ended the run")


def test_cycle_clock_drops_warmup_and_stops_after_the_timed_cycles():
    cycle_report = benchmark_module("cycle_report")
    seen = []
    clock = cycle_report.CycleClock(torch.device("cpu"), warmup=2, cycles=3, profile_cycle=1,
                                    on_cycle=lambda c: seen.append(len(c.timed)), log=lambda _: None)
    assert drive(clock, 6) == 25  # 5 cycles of 5 iterations, stopped at the 6th generator start
    assert seen == [0, 0, 1, 2, 3]  # reported after every cycle, warm-up included
    summary = clock.summary()
    assert summary["complete"] and len(summary["warmup_cycle_s"]) == 2 and len(summary["cycles"]) == 3
    for cycle in summary["cycles"]:
        assert set(cycle) == CYCLE_KEYS
        assert len(cycle["critic_steps_s"]) == 5 and cycle["generator_step_s"] >= 0
        assert cycle["cycle_s"] >= cycle["generator_step_s"] + sum(cycle["critic_steps_s"])
        assert cycle["peak_allocated_gib"] is None  # GPU figures only on CUDA
    assert [c["profiled"] for c in summary["cycles"]] == [False, True, False]
    assert "Name" in summary["profile"]  # the profiler's operator table
    unprofiled = sorted(c["cycle_s"] for c in summary["cycles"] if not c["profiled"])
    assert summary["cycle_s_median"] == pytest.approx(sum(unprofiled) / 2)  # the profiled cycle is left out


def test_cycle_clock_refuses_an_end_without_a_start():
    cycle_report = benchmark_module("cycle_report")
    clock = cycle_report.CycleClock(torch.device("cpu"), warmup=0, cycles=1, log=lambda _: None)
    with pytest.raises(RuntimeError, match=r"end\('critic'\) without a start"):
        clock.end("critic")
    with pytest.raises(ValueError, match="cycles >= 1"):
        cycle_report.CycleClock(torch.device("cpu"), warmup=0, cycles=0)


def test_comparison_gives_ratios_and_peaks_without_the_text_encoder():
    cycle_report = benchmark_module("cycle_report")
    ours = {"cycle_s_median": 20.0, "generator_step_s_median": 6.0, "critic_step_s_median": 2.5,
            "peak_allocated_gib": 60.0, "peak_reserved_gib": 70.0, "text_encoder_gib": 10.6}
    original = {"cycle_s_median": 40.0, "generator_step_s_median": 12.0, "critic_step_s_median": 5.0,
                "peak_allocated_gib": 55.0, "peak_reserved_gib": 64.0, "text_encoder_gib": 0.0}
    rows = {label: (a, b, ratio) for label, a, b, ratio in cycle_report.comparison(ours, original)}
    assert rows["s per cycle"] == (20.0, 40.0, 0.5)
    assert rows["s per critic step"][2] == 0.5
    assert rows["peak allocated GiB"][2] == pytest.approx(60 / 55)
    assert rows["peak allocated GiB without text encoder"] == pytest.approx((49.4, 55.0, 49.4 / 55))
    missing = cycle_report.comparison({**ours, "peak_reserved_gib": None}, original)
    assert ("peak reserved GiB", None, 64.0, None) in missing


def check_result(saved: dict, side: str, cycles: int) -> None:
    assert RESULT_KEYS <= saved.keys()
    assert saved["side"] == side and saved["complete"] and saved["env"]["device"].startswith("cpu")
    settings = saved["settings"]
    assert settings["batch_size"] == 1 and settings["dfake_gen_update_ratio"] == 5
    assert settings["image_or_video_shape"][:2] == [1, 21]
    assert len(saved["cycles"]) == cycles
    for cycle in saved["cycles"]:
        assert set(cycle) == CYCLE_KEYS and len(cycle["critic_steps_s"]) == 5
        assert 0 < cycle["generator_step_s"] < cycle["cycle_s"] and 0 < cycle["critic_step_s"] < cycle["cycle_s"]
    assert saved["cycle_s_median"] > 0 and saved["peak_allocated_gib"] is None
    assert saved["cycles"][-1]["profiled"] and "Name" in saved["profile"]


@pytest.mark.slow
def test_train_cycle_runs_train_py_trainer_at_tiny_size(tmp_path, monkeypatch):
    train_cycle = benchmark_module("train_cycle")
    monkeypatch.setenv("OUT", str(tmp_path))
    assert train_cycle.main(["--tiny", "--warmup", "0", "--cycles", "1", "--profile"]) == 0
    assert not list(tmp_path.glob("*.tmp"))  # written atomically
    saved = json.loads((tmp_path / "train_cycle_tiny_cpu.json").read_text())
    check_result(saved, "ours", 2)
    assert saved["text_encoder_gib"] == 0.0  # on the CPU: no GPU memory
    assert saved["settings"]["sharding_strategy"] == "hybrid_full" and saved["settings"]["gradient_checkpointing"]
    assert "dfake_gen_update_ratio=5" in saved["settings"]["overrides"]


ORIGINAL = Path(os.environ.get("SF_ORIGINAL_DIR", REPO_ROOT / ".original" / "Self-Forcing"))


@pytest.mark.slow
@pytest.mark.skipif(not (ORIGINAL / "trainer" / "distillation.py").is_file(),
                    reason="no checkout of the original (set SF_ORIGINAL_DIR or clone it into .original/)")
def test_original_train_cycle_drives_the_original_trainer_at_tiny_size(tmp_path):
    """In a fresh process: the original's packages share their names with this project's."""
    import subprocess
    import sys
    env = {**os.environ, "OUT": str(tmp_path)}
    done = subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / "original_train_cycle.py"),
                           "--original-dir", str(ORIGINAL), "--tiny", "--warmup", "0", "--cycles", "0",
                           "--profile"], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    saved = json.loads((tmp_path / "original_train_cycle_tiny_cpu.json").read_text())
    check_result(saved, "original", 1)
    assert saved["settings"]["sharding_strategy"] == "hybrid_full"
    assert "trainer/distillation.py" in saved["note"] and saved["sdpa_for_flash_attention"]
