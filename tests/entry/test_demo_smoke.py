"""benchmarks/demo_smoke.py: one streamed generation through demo.py's loading path and Flask routes."""
from __future__ import annotations

import json

from tests.entry.test_speed_benchmark import benchmark_module
from tests.tiny import save_tiny_model_folder


def test_smoke_streams_every_block_and_writes_its_result(tmp_path, monkeypatch):
    monkeypatch.setenv("OUT", str(tmp_path / "out"))
    monkeypatch.chdir(tmp_path)  # the demo's relative default output folder lands here
    folder = save_tiny_model_folder(tmp_path / "tiny")
    smoke = benchmark_module("demo_smoke")
    assert smoke.main(["--model", str(folder), "--device", "cpu", "--blocks", "3", "--name", "smoke_test"]) == 0
    result = json.loads((tmp_path / "out" / "smoke_test.json").read_text())
    assert result["blocks"] == 3 == len(result["block_ms"]) and all(ms > 0 for ms in result["block_ms"])
    assert result["frames"] == 6 and result["frame_size"] == [32, 48] and result["mp4_bytes"] > 0
    assert result["source"] == str(folder) and result["device"] == "cpu"
    assert 0 < result["time_to_first_frame_ms"] <= result["total_ms"]
