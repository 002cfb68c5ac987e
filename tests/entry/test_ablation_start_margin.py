"""benchmarks/ablation_start_margin.py signal: the share of shape-mask variance a prompt attribute explains."""
from __future__ import annotations

import sys

import pytest

from shapes import world
from tests.entry.test_speed_benchmark import benchmark_module


def test_direction_says_more_about_the_mask_when_shapes_start_in_the_half_they_leave(monkeypatch):
    ablation = benchmark_module("ablation_start_margin")
    monkeypatch.setattr(world, "START_MARGIN", world.START_MARGIN)  # the ablation sets it; restored afterwards
    near_uniform, half = ablation.explained_shares(0.25, 1500), ablation.explained_shares(0.5, 1500)
    assert set(half) == {"direction", "speed", "shape", "size"}
    assert all(0.0 <= v < 1.0 for v in (*near_uniform.values(), *half.values()))
    assert half["direction"] > 2.5 * near_uniform["direction"]
    # the start margin is about position only: what size explains barely moves
    assert abs(half["size"] - near_uniform["size"]) < 0.5 * near_uniform["size"]


def test_the_best_high_noise_prediction_depends_on_direction_as_much_as_on_colour():
    """What a teacher that ignores direction leaves on the table: the mean clip given the prompt moves about as much
    when the direction is reversed as when the colour changes, at either margin (and more at 0.5)."""
    ablation = benchmark_module("ablation_start_margin")
    near_uniform, half = ablation.ideal_changes(0.25, 400), ablation.ideal_changes(0.5, 400)
    for changes in (near_uniform, half):
        assert set(changes) == {"direction", "speed", "colour", "size"}
        assert changes["direction"] > 0.5 * changes["colour"] and changes["direction"] > 2 * changes["speed"]
    assert half["direction"] > near_uniform["direction"]


@pytest.mark.parametrize("argv, status", [(["--help"], 0), (["0.5"], 2), (["signal", "1", "2"], 2)])
def test_a_wrong_command_line_prints_the_usage_lines(monkeypatch, capsys, argv, status):
    ablation = benchmark_module("ablation_start_margin")
    monkeypatch.setattr(sys, "argv", ["ablation_start_margin.py", *argv])
    with pytest.raises(SystemExit) as exit_info:
        ablation.main()
    out = capsys.readouterr()
    assert exit_info.value.code == status
    printed = (out.out if status == 0 else out.err).splitlines()
    assert printed[0] == "usage:" and len(printed) == 4
    assert printed[1].startswith("  python benchmarks/ablation_start_margin.py MARGIN SECONDS [DIM LAYERS]")
