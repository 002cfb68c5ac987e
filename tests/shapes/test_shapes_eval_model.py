"""scripts/evaluate_shapes.py --model: any exported model folder is scored, the bundled one included."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.schedule import FlowMatchSchedule
from scripts import evaluate_shapes as ev

BUNDLED = Path(__file__).resolve().parents[2] / "assets" / "shapes_world"


def _args(output, *extra, lengths: str = "1"):
    return ["--model", str(BUNDLED), "--num-prompts", "2", "--lengths", lengths, "--batch-size", "2", "--device",
            "cpu", "--output", str(output), *extra]


@pytest.fixture(scope="module")
def bundled_eval(tmp_path_factory):
    output = tmp_path_factory.mktemp("eval_model") / "bundled.json"
    assert ev.main(_args(output)) == 0
    return json.loads(output.read_text())


def test_bundled_folder_is_scored_with_its_stored_rollout_settings(bundled_eval):
    info = bundled_eval["stages"]["model"]
    assert info["kind"] == "few_step" and info["checkpoint"] == str(BUNDLED)
    stored = json.loads((BUNDLED / "transformer" / "config.json").read_text())["causal"]
    assert info["frames_per_block"] == stored["num_frame_per_block"]
    assert info["training_frames"] == stored["image_or_video_shape"][1]
    warped = FlowMatchSchedule(stored["model_kwargs"]["timestep_shift"]).warp(stored["denoising_step_list"])
    assert info["timesteps"] == pytest.approx(warped.tolist())
    entries = {(r["stage"], r["split"], r["length"]) for r in bundled_eval["results"]}
    assert entries == {(s, split, 1) for s in ("model", "reference") for split in ("train", "heldout")}
    for r in bundled_eval["results"]:
        assert r["num_videos"] == 2 and 0.0 <= r["attribute_accuracy"] <= 1.0
    assert bundled_eval["complete"] is True


def test_model_needs_output_and_a_model_folder(tmp_path, capsys):
    assert ev.main(["--model", str(BUNDLED), "--num-prompts", "2"]) == 2
    assert "--output" in capsys.readouterr().err
    assert ev.main(["--model", str(tmp_path), "--output", str(tmp_path / "e.json")]) == 2
    assert "model_index.json" in capsys.readouterr().err
    assert not (tmp_path / "e.json").exists()
    with pytest.raises(SystemExit):  # --run and --model exclude each other
        ev.main(["--model", str(BUNDLED), "--run", str(tmp_path), "--output", str(tmp_path / "e.json")])


def test_every_result_carries_intervals_around_its_means(bundled_eval):
    for r in bundled_eval["results"]:
        ci = r["ci"]
        assert ci["motion_correct"]["method"] == "wilson" and ci["attribute_accuracy"]["method"] == "bootstrap"
        assert ci["attribute_accuracy"]["mean"] == pytest.approx(r["attribute_accuracy"])
        assert ci["motion_correct"]["mean"] == pytest.approx(r["motion_correct"])
        for entry in ci.values():
            if entry["mean"] is not None:
                assert entry["low"] - 1e-9 <= entry["mean"] <= entry["high"] + 1e-9


def test_a_length_list_without_1x_still_times_at_the_training_length(tmp_path):
    """The warm-up and the batch-1 timing run at 1x; a run asked for 3x only scores 3x (it crashed without 1x)."""
    output = tmp_path / "three.json"
    assert ev.main(_args(output, lengths="3")) == 0
    data = json.loads(output.read_text())
    assert {r["length"] for r in data["results"]} == {3} and data["settings"]["lengths"] == [3]
    assert data["stages"]["model"]["timing_batch1"]["time_to_first_frame_ms"] > 0
