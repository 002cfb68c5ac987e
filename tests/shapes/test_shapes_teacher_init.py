"""The shapes recipe's teacher continues from an earlier teacher when the run folder holds one (`teacher_init/`)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

REPO = Path(__file__).resolve().parents[2]


def _shapes_world():
    spec = importlib.util.spec_from_file_location("shapes_world_script", REPO / "scripts" / "shapes_world.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_teacher_starts_fresh_or_from_teacher_init(tmp_path):
    sw = _shapes_world()
    assert sw.weights_overrides("teacher", tmp_path) == []
    init = tmp_path / "teacher_init" / "generator_ema.safetensors"
    init.parent.mkdir()
    save_file({"x": torch.zeros(1)}, init)
    assert sw.weights_overrides("teacher", tmp_path) == [f"generator_ckpt={init}"]
    # the later stages still read the stage's own teacher, never the initial one
    own_teacher = tmp_path / "teacher" / "generator_ema.safetensors"
    assert sw.weights_overrides("ode_init", tmp_path) == [f"generator_ckpt={own_teacher}"]


@pytest.mark.slow
def test_smoke_teacher_continues_from_teacher_init(tmp_path):
    from shapes.components import shapes_dit
    sw = _shapes_world()
    assert sw.main(["--out", str(tmp_path / "a"), "--size", "smoke", "--stages", "base,teacher"]) == 0
    first = tmp_path / "a" / "teacher" / "generator_ema.safetensors"
    (tmp_path / "b" / "teacher_init").mkdir(parents=True)
    (tmp_path / "b" / "teacher_init" / "generator_ema.safetensors").write_bytes(first.read_bytes())
    cfg = sw.load_stage_config("teacher", tmp_path / "b", "smoke")
    assert cfg.model.generator_ckpt == str(tmp_path / "b" / "teacher_init" / "generator_ema.safetensors")
    net = shapes_dit(cfg, cfg.model.generator_ckpt)
    loaded = shapes_dit(sw.load_stage_config("ode_init", tmp_path / "a", "smoke"), str(first))
    for (name, a), (_, b) in zip(net.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
