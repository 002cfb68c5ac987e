"""The shapes recipe's teacher continues from an earlier session's teacher when the run folder holds one."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

REPO = Path(__file__).resolve().parents[1]


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
    from utils.shapes_components import shapes_dit
    sw = _shapes_world()
    assert sw.main(["--out", str(tmp_path / "a"), "--size", "smoke", "--stages", "base,teacher"]) == 0
    first = tmp_path / "a" / "teacher" / "generator_ema.safetensors"
    (tmp_path / "b" / "teacher_init").mkdir(parents=True)
    (tmp_path / "b" / "teacher_init" / "generator_ema.safetensors").write_bytes(first.read_bytes())
    cfg = sw.load_stage_config("teacher", tmp_path / "b", "smoke")
    assert cfg.generator_ckpt == str(tmp_path / "b" / "teacher_init" / "generator_ema.safetensors")
    net = shapes_dit(cfg, cfg.generator_ckpt)
    loaded = shapes_dit(sw.load_stage_config("ode_init", tmp_path / "a", "smoke"), str(first))
    for (name, a), (_, b) in zip(net.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name


@pytest.mark.slow
def test_device_step_continues_the_teacher_named_by_shapes_teacher_init(tmp_path):
    import os
    import subprocess
    import sys

    from omegaconf import OmegaConf
    work = tmp_path / "checkout"  # the scripts work in the repository root: runs/ lands here
    work.mkdir()
    for entry in REPO.iterdir():
        if entry.name not in (".git", "runs", ".shapes_carry", ".venv", ".whl", ".whl_extra"):
            (work / entry.name).symlink_to(entry)
    sw = _shapes_world()
    earlier = tmp_path / "earlier"
    assert sw.main(["--out", str(earlier), "--size", "smoke", "--stages", "base,teacher"]) == 0
    (work / "plan.txt").write_text("base teacher:60:max_steps=2\n")
    env = {**os.environ, "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}", "SHAPES_SIZE": "smoke",
           "PYTHONPATH": str(work), "OUT": str(tmp_path / "out"), "SHAPES_TEACHER_INIT": str(earlier / "teacher")}
    (tmp_path / "out").mkdir()
    done = subprocess.run(["bash", "benchmarks/device_step.sh", "plan.txt", "120"], cwd=work, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"[step] teacher_init: {earlier / 'teacher'}" in done.stdout
    assert "[watch] run finished" in done.stdout, done.stdout[-2000:]
    config = OmegaConf.load(work / "runs" / "shapes" / "teacher" / "config.yaml")
    assert config.generator_ckpt == "runs/shapes/teacher_init/generator_ema.safetensors"
    init = load_file(str(work / "runs" / "shapes" / "teacher_init" / "generator_ema.safetensors"))
    given = load_file(str(earlier / "teacher" / "generator_ema.safetensors"))
    assert init.keys() == given.keys() and all(torch.equal(init[k], given[k]) for k in given)
    # On a fresh machine, a folder without the weights is refused at once.
    import shutil
    shutil.rmtree(work / "runs")
    bad = subprocess.run(["bash", "benchmarks/device_step.sh", "plan.txt", "20"], cwd=work,
                         env={**env, "SHAPES_TEACHER_INIT": str(tmp_path)}, capture_output=True, text=True,
                         timeout=60)
    assert bad.returncode != 0 and "has no generator_ema.safetensors" in bad.stderr
