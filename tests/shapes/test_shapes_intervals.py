"""shapes/intervals.py: the 95% intervals the shapes evaluation reports per score."""
from __future__ import annotations

import math

import pytest

from shapes.intervals import bootstrap_interval, score_intervals, wilson_interval


def test_wilson_interval_matches_the_closed_form():
    low, high = wilson_interval(8, 10)  # textbook value: 0.490 .. 0.943
    assert (low, high) == pytest.approx((0.4902, 0.9433), abs=1e-4)
    assert wilson_interval(0, 5)[0] == 0.0 and wilson_interval(5, 5)[1] == 1.0
    assert wilson_interval(0, 5)[1] == pytest.approx(0.4345, abs=1e-4)
    wide, narrow = wilson_interval(20, 25), wilson_interval(200, 250)
    assert wide[1] - wide[0] > 2 * (narrow[1] - narrow[0])
    with pytest.raises(ValueError, match="successes <= n"):
        wilson_interval(6, 5)


def test_bootstrap_resamples_whole_scenes_and_is_seeded():
    # every scene has the same ratio -> no spread, whatever the scene sizes
    assert bootstrap_interval([1, 2, 1], [2, 4, 2], seed=0) == pytest.approx((0.5, 0.5))
    values = [0.0, 1.0] * 20
    low, high = bootstrap_interval(values, [1.0] * len(values), seed=3)
    assert low < 0.5 < high and 0.25 < low and high < 0.75
    assert bootstrap_interval(values, [1.0] * len(values), seed=3) == (low, high)
    few_low, few_high = bootstrap_interval(values[:6], [1.0] * 6, seed=3)
    assert few_high - few_low > high - low
    with pytest.raises(ValueError, match="one numerator per denominator"):
        bootstrap_interval([1.0], [1.0, 1.0], seed=0)


def _video(motion: bool, colour_ok: bool, size_ok: bool | None) -> dict:
    return {"overall": 0.5, "attribute_accuracy": 0.75, "motion_correct": motion, "frame_quality": 0.9,
            "background_ok": True,
            "shapes": [{"colour_ok": colour_ok, "shape_ok": True, "size_ok": size_ok, "direction_ok": True,
                        "speed_ok": None, "velocity_match": 1.0}]}


def test_score_intervals_name_their_method_and_count_only_stated_attributes():
    videos = [_video(True, True, True), _video(False, True, None), _video(True, False, False),
              _video(True, True, None)]
    ci = score_intervals(videos, seed=0)
    assert ci["motion_correct"]["method"] == "wilson" and ci["overall"]["method"] == "bootstrap"
    assert ci["motion_correct"]["mean"] == 0.75 and ci["motion_correct"]["n"] == 4
    assert (ci["motion_correct"]["low"], ci["motion_correct"]["high"]) == pytest.approx(wilson_interval(3, 4))
    assert ci["colour_accuracy"]["mean"] == 0.75 and ci["colour_accuracy"]["n"] == 4
    assert ci["size_accuracy"]["n"] == 2 and ci["size_accuracy"]["mean"] == 0.5  # the two prompts that state it
    assert ci["speed_accuracy"]["n"] == 0 and math.isnan(ci["speed_accuracy"]["mean"])
    assert ci["overall"]["low"] == ci["overall"]["high"] == 0.5
    for entry in ci.values():
        if entry["n"]:
            assert entry["low"] <= entry["mean"] <= entry["high"]
