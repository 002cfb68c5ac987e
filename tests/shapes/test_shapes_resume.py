"""scripts/shapes_world.py: a stage stopped by its time limit is continued by --resume to the same end as a run that
was never stopped (tiny sizes, CPU)."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from scripts import shapes_world


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    shapes_world.run_base(root / "uncut", "smoke")
    return root


def _run(out, *extra):
    return shapes_world.main(["--out", str(out), "--size", "smoke", "--stages", "base,teacher", *extra])


def test_time_limited_stage_resumes_to_the_uncut_end(base, monkeypatch, capsys):
    uncut, cut = base / "uncut", base / "cut"
    assert _run(uncut) == 0
    full = shapes_world.read_stage_record(uncut, "teacher")
    assert full["complete"] and full["step"] == full["max_steps"] == 3
    # A clock that advances one second a reading makes the time limit stop the stage mid-way on any machine.
    import trainer.loop
    ticks = iter(range(10**6))
    monkeypatch.setattr(trainer.loop.time, "perf_counter", lambda: float(next(ticks)))
    monkeypatch.setenv("SHAPES_OVERRIDES", "time_limit_s=4")
    assert _run(cut) == 0
    monkeypatch.undo()
    record = shapes_world.read_stage_record(cut, "teacher")
    assert not record["complete"] and 0 < record["step"] < 3 and (cut / "teacher" / "generator.safetensors").is_file()
    capsys.readouterr()
    assert _run(cut) == 0  # without --resume the stopped stage counts as done
    assert "--resume continues it" in capsys.readouterr().out
    assert shapes_world.read_stage_record(cut, "teacher")["step"] == record["step"]
    assert _run(cut, "--resume") == 0
    resumed = shapes_world.read_stage_record(cut, "teacher")
    assert resumed["complete"] and resumed["step"] == full["step"]
    # same data order and random state: the continued run ends on the uncut run's weights
    ends = [load_file(str(run / "teacher" / "generator.safetensors")) for run in (uncut, cut)]
    assert ends[0].keys() == ends[1].keys()
    assert all(torch.equal(ends[0][k], ends[1][k]) for k in ends[0])
    capsys.readouterr()
    assert _run(cut, "--resume") == 0  # nothing left to continue
    assert "teacher: done, skipped\n" in capsys.readouterr().out


def test_resume_and_force_exclude_each_other(tmp_path):
    with pytest.raises(SystemExit):
        shapes_world.main(["--out", str(tmp_path), "--resume", "--force"])
