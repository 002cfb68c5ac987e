"""scripts/probe_shapes_teacher.py: what a shapes teacher's prediction responds to, on a smoke-size teacher."""
from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from scripts import probe_shapes_teacher as probe
from scripts import shapes_world
from shapes import sample_scenes

ATTRIBUTES = ("direction", "speed", "colour", "shape", "size")


def test_changed_scene_differs_in_that_attribute_only():
    for scene in sample_scenes(40, torch.Generator().manual_seed(0), num_shapes=1):
        for attribute in ATTRIBUTES:
            other = probe._changed(scene, attribute)  # a valid scene (ShapeSpec/SceneSpec check themselves)
            a, b = scene.shapes[0], other.shapes[0]
            assert getattr(a, attribute) != getattr(b, attribute)
            assert all(getattr(a, f) == getattr(b, f) for f in ("shape", "colour", "size", "direction", "speed",
                                                                 "start") if f != attribute)


@pytest.mark.slow
def test_probe_reports_every_attribute_and_sees_a_teacher_that_ignores_text(tmp_path):
    run = tmp_path / "run"
    assert shapes_world.main(["--out", str(run), "--size", "smoke", "--stages", "base,teacher"]) == 0
    output = tmp_path / "probe.json"
    assert probe.main(["--run", str(run), "--num-scenes", "4", "--output", str(output)]) == 0
    result = json.loads(output.read_text())
    assert set(result["by_timestep"]) == {"900", "700", "500"}
    for entry in result["by_timestep"].values():
        assert set(entry["prompt_change"]) == set(ATTRIBUTES)
        assert set(entry["clip_error"]) == {"as_rendered", "reversed", "shuffled", "first_frame_frozen"}
        assert entry["clip_error"]["as_rendered"] == pytest.approx(entry["x0_error"])
        for change in entry["prompt_change"].values():
            assert math.isfinite(change["prediction_change"]) and change["embedding_change"] > 0
    # Cut the text out of the network (cross-attention output zero): no attribute may move the prediction.
    weights = run / "teacher" / "generator_ema.safetensors"
    state = load_file(str(weights))
    save_file({k: torch.zeros_like(v) if ".cross_attn.o." in k else v for k, v in state.items()}, str(weights))
    deaf = probe.probe(run, num_scenes=4)
    for entry in deaf["by_timestep"].values():
        assert all(c["prediction_change"] == 0.0 for c in entry["prompt_change"].values())
    assert any(c["prediction_change"] > 0 for c in result["by_timestep"]["900"]["prompt_change"].values())
