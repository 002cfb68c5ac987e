"""95% confidence intervals of the evaluator's scores over the sampled scenes.

Two kinds, each named in its output under "method":

* "wilson": a yes/no score per scene (a video's motion is correct, its background right): the Wilson score interval
  of the binomial proportion, which stays inside [0, 1] and is sensible at 0 or n successes.
* "bootstrap": any other score: a percentile bootstrap over scenes (resampling whole scenes, so the shapes of a
  two-shape scene stay together); a per-shape score is the ratio of the resampled sums, as the point estimate is.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch

LEVEL = 0.95
BOOTSTRAP_RESAMPLES = 2000
_Z = 1.959963984540054  # the standard normal quantile at 0.975


def wilson_interval(successes: int, n: int) -> tuple[float, float]:
    """(low, high) of the Wilson score interval at `LEVEL` for `successes` out of `n` (n >= 1)."""
    if n < 1 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n and n >= 1, got {successes} of {n}")
    p = successes / n
    centre = (p + _Z**2 / (2 * n)) / (1 + _Z**2 / n)
    half = _Z / (1 + _Z**2 / n) * math.sqrt(p * (1 - p) / n + _Z**2 / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def bootstrap_interval(numerators: Sequence[float], denominators: Sequence[float], seed: int,
                       resamples: int = BOOTSTRAP_RESAMPLES) -> tuple[float, float]:
    """(low, high) percentile interval at `LEVEL` of sum(numerators) / sum(denominators), resampling the scenes
    (one numerator/denominator pair each) with replacement; deterministic given `seed`."""
    num = torch.tensor(list(numerators), dtype=torch.float64)
    den = torch.tensor(list(denominators), dtype=torch.float64)
    if num.numel() == 0 or num.shape != den.shape:
        raise ValueError(f"need one numerator per denominator, at least one; got {num.numel()} and {den.numel()}")
    idx = torch.randint(0, num.numel(), (resamples, num.numel()), generator=torch.Generator().manual_seed(seed))
    totals = den[idx].sum(1)
    ratios = (num[idx].sum(1) / totals)[totals > 0]
    if ratios.numel() == 0:
        return float("nan"), float("nan")
    tail = (1 - LEVEL) / 2
    low, high = torch.quantile(ratios, torch.tensor([tail, 1 - tail], dtype=torch.float64)).tolist()
    return low, high


# Per-video keys of `shapes.evaluate(per_video=True)` -> the report key they make up.
BINARY_VIDEO = {"motion_correct": "motion_correct", "background_ok": "background_accuracy"}
GRADED_VIDEO = {"overall": "overall", "attribute_accuracy": "attribute_accuracy", "frame_quality": "frame_quality"}
SHAPE_SCORES = {"colour_ok": "colour_accuracy", "shape_ok": "shape_accuracy", "size_ok": "size_accuracy",
                "direction_ok": "direction_accuracy", "speed_ok": "speed_accuracy",
                "velocity_match": "velocity_match"}


def _entry(mean: float, low: float, high: float, n: int, method: str) -> dict[str, Any]:
    return {"mean": mean, "low": low, "high": high, "n": n, "method": method}


def score_intervals(per_video: list[dict[str, Any]], seed: int) -> dict[str, dict[str, Any]]:
    """Per-video records of the evaluator -> {report key: {mean, low, high, n, method}}.

    A per-shape score counts only the shapes that state it (a value of None: the prompt left it out); `n` is the
    number of scenes (videos) or, for per-shape scores, of the shapes counted."""
    if not per_video:
        raise ValueError("per_video is empty; expected one record per scored video")
    out: dict[str, dict[str, Any]] = {}
    n = len(per_video)
    for key, name in BINARY_VIDEO.items():
        hits = sum(bool(v[key]) for v in per_video)
        out[name] = _entry(hits / n, *wilson_interval(hits, n), n, "wilson")
    for offset, (key, name) in enumerate(GRADED_VIDEO.items()):
        values = [float(v[key]) for v in per_video]
        out[name] = _entry(sum(values) / n, *bootstrap_interval(values, [1.0] * n, seed + offset), n, "bootstrap")
    for offset, (key, name) in enumerate(SHAPE_SCORES.items()):
        kept = [[float(s[key]) for s in v["shapes"] if s[key] is not None and not math.isnan(float(s[key]))]
                for v in per_video]
        count = sum(len(k) for k in kept)
        if count == 0:
            out[name] = _entry(float("nan"), float("nan"), float("nan"), 0, "bootstrap")
            continue
        low, high = bootstrap_interval([sum(k) for k in kept], [len(k) for k in kept], seed + 100 + offset)
        out[name] = _entry(sum(map(sum, kept)) / count, low, high, count, "bootstrap")
    return out
