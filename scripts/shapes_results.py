"""The shapes-world results as a markdown table for the README, plus the paper's claims checked on the numbers.

    python scripts/shapes_results.py --eval runs/shapes/eval.json

Input: the JSON of scripts/evaluate_shapes.py. Every sentence below the table is computed from that file: it says
whether each claim holds, with the numbers it rests on (nothing is typed in by hand). The helpers that pool the
evaluator's batch reports into that JSON, and the terminal table evaluate_shapes.py prints, live here too: one
place decides what the numbers mean.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils.errors import InputError, InputKeyError, MissingFileError, UserError, one_line  # noqa: E402

# (stage, row label) in the order of the paper's table; "reference" = the rendered ground truth.
ROWS = (("teacher", "Teacher (bidirectional, many steps, CFG)"), ("teacher_forcing", "Teacher forcing"),
        ("diffusion_forcing", "Diffusion forcing"), ("causvid", "CausVid"), ("dmd", "Self Forcing (DMD)"),
        ("sid", "Self Forcing (SiD)"), ("gan", "Self Forcing (GAN)"), ("ode_init", "ODE init"),
        ("model", "Model folder (--model)"),
        ("reference", "Rendered ground truth (evaluator ceiling)"))
LABELS = dict(ROWS)
SELF_FORCING = ("dmd", "sid", "gan")
BASELINES = ("teacher_forcing", "diffusion_forcing")
FORMAT = "shapes-eval/1"
# Report keys that the evaluator averages over target shapes (the rest: over videos); used to pool batches.
SHAPE_KEYS = ("colour_accuracy", "shape_accuracy", "size_accuracy", "direction_accuracy", "speed_accuracy",
              "velocity_match", "unexplained_reversals", "jitter")
VIDEO_KEYS = ("overall", "attribute_accuracy", "background_accuracy", "count_accuracy", "motion_correct",
              "frame_quality", "clean_fraction", "present", "integrity", "count_ok", "background_ok", "sharpness")


# ---------------------------------------------------------------------------------------------------- pooling
def nan_to_none(x: Any) -> Any:
    """NaN/inf -> None, recursively: strict JSON (the evaluator gives NaN jitter when no shape moves)."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: nan_to_none(v) for k, v in x.items()}
    if isinstance(x, list):
        return [nan_to_none(v) for v in x]
    return x


def _pool(values: list[float | None], weights: list[float]) -> float | None:
    pairs = [(v, w) for v, w in zip(values, weights) if v is not None and math.isfinite(v) and w > 0]
    if not pairs:
        return None
    return sum(v * w for v, w in pairs) / sum(w for _, w in pairs)


def pool_reports(reports: list[dict[str, Any]], num_shapes: list[int]) -> dict[str, Any]:
    """Batch reports of `shapes.evaluate` -> one: video means weighted by videos, shape means by shapes.

    Per-frame lists are weighted by videos (exact for frame metrics; the per-step velocity match is pooled by
    videos, not by the usable steps of each batch, a small approximation)."""
    videos = [r["num_videos"] for r in reports]
    pooled: dict[str, Any] = {"num_videos": sum(videos)}
    for key in VIDEO_KEYS:
        pooled[key] = _pool([r[key] for r in reports], videos)
    for key in SHAPE_KEYS:
        attribute = key.removesuffix("_accuracy")
        # an attribute a short prompt leaves out is scored on the shapes that state it: weigh by those
        weights = [r["num_stated"][attribute] if attribute in r.get("num_stated", {}) else n
                   for r, n in zip(reports, num_shapes)]
        pooled[key] = _pool([r[key] for r in reports], weights)
    pooled["per_frame"] = {
        key: [_pool(list(column), videos) for column in zip(*[r["per_frame"][key] for r in reports])]
        for key in ("frame_quality", "velocity_match")}
    curve = [q for q in pooled["per_frame"]["frame_quality"] if q is not None]
    quarter = max(1, len(curve) // 4)
    pooled["frame_quality_first"] = sum(curve[:quarter]) / quarter if curve else None
    pooled["frame_quality_last"] = sum(curve[-quarter:]) / quarter if curve else None
    return pooled


def pool_timing(stats: list[tuple[int, dict[str, Any]]]) -> dict[str, Any] | None:
    """Batch stats -> latency to the first frame (mean), frames/s per video stream and for the whole batch."""
    if not stats or any("total_ms" not in st for _, st in stats):
        return None
    total_s = sum(st["total_ms"] for _, st in stats) / 1000.0
    frames = sum(n * st["pixel_frames"] for n, st in stats)
    firsts = [st["time_to_first_frame_ms"] for _, st in stats if st.get("time_to_first_frame_ms") is not None]
    per_video = [st["pixel_frames"] / (st["total_ms"] / 1000.0) for _, st in stats]
    return {"batch_size": max(n for n, _ in stats), "time_to_first_frame_ms": sum(firsts) / len(firsts) if firsts
            else None, "frames_per_s_per_video": sum(per_video) / len(per_video),
            "frames_per_s_batch": frames / total_s, "total_s": total_s}


# ---------------------------------------------------------------------------------------------------- reading
def load_eval(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"{path} does not exist (write it with scripts/evaluate_shapes.py)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise InputError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise InputError(f"{path}: key 'format' must be {FORMAT!r} (an evaluate_shapes.py output), "
                         f"got {data.get('format') if isinstance(data, dict) else type(data).__name__!r}")
    for key in ("results", "stages", "settings"):
        if key not in data:
            raise InputKeyError(f"{path}: missing key {key!r}")
    return data


def merge_evals(docs: list[dict[str, Any]], names: list[str]) -> dict[str, Any]:
    """One document from evaluations of different stages run apart (e.g. in parallel on one GPU): their settings
    (prompts, seed, steps) must agree, so the scenes and noise agree; the rollout lengths may differ (the noise is
    seeded per length, and a teacher is scored at 1x only) and the merged document lists them all. A (stage, split,
    length) entry present in several (the rendered reference) is taken from the first."""
    first = docs[0]
    shared = [{k: v for k, v in doc["settings"].items() if k != "lengths"} for doc in docs]
    for settings, name in zip(shared[1:], names[1:]):
        if settings != shared[0]:
            diff = sorted(k for k in set(settings) | set(shared[0]) if settings.get(k) != shared[0].get(k))
            raise InputError(f"{name}: settings {diff} differ from {names[0]}'s; evaluations to merge must share "
                             "them (the same scenes and noise)")
    lengths = sorted({n for doc in docs for n in doc["settings"].get("lengths", [])})
    merged = {**first, "settings": {**first["settings"], "lengths": lengths}, "stages": {}, "results": [],
              "complete": all(d.get("complete", True) for d in docs)}
    seen = set()
    for doc in docs:
        for stage, info in doc["stages"].items():
            merged["stages"].setdefault(stage, info)
        for r in doc["results"]:
            key = (r["stage"], r["split"], r["length"])
            if key not in seen:
                seen.add(key)
                merged["results"].append(r)
    return merged


def entry(data: dict[str, Any], stage: str, split: str = "train", length: int = 1) -> dict[str, Any] | None:
    for r in data["results"]:
        if r["stage"] == stage and r["split"] == split and r["length"] == length:
            return r
    return None


def metric(data: dict[str, Any], stage: str, key: str, split: str = "train", length: int = 1) -> float | None:
    r = entry(data, stage, split, length)
    return None if r is None else r.get(key)


def _f(x: Any, spec: str = ".2f") -> str:
    return "–" if x is None else format(x, spec)


def lengths(data: dict[str, Any]) -> list[int]:
    return sorted({int(r["length"]) for r in data["results"]})


def _drift(data: dict[str, Any], stage: str) -> float | None:
    """Frame quality of the last quarter minus the first, at the longest length evaluated for the stage."""
    longest = max((r["length"] for r in data["results"] if r["stage"] == stage), default=None)
    r = entry(data, stage, "train", longest) if longest is not None else None
    if r is None or r.get("frame_quality_first") is None or r.get("frame_quality_last") is None:
        return None
    return r["frame_quality_last"] - r["frame_quality_first"]


def markdown_table(data: dict[str, Any]) -> str:
    """Rows: the stages present, in the paper's order; columns: steps, held-in scores at 1x, smoothness per length
    (velocity match / jitter), drift, held-out accuracy, batch-1 latency and frames/s."""
    lens = lengths(data)
    head = (["Model", "Steps / block", "Attribute acc.", "Motion correct"]
            + [f"Smoothness {n}x" for n in lens]
            + ["Quality drift", "Held-out acc.", "Overall", "First frame (ms)", "Frames/s"])
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for stage, label in ROWS:
        info = data["stages"].get(stage)
        if info is None:
            continue
        timing = info.get("timing_batch1") or {}
        smooth = []
        for n in lens:
            vm, jit = metric(data, stage, "velocity_match", length=n), metric(data, stage, "jitter", length=n)
            smooth.append("–" if vm is None else f"{vm:.2f} / {_f(jit)}")
        drift = _drift(data, stage)
        cells = ([label, _f(info.get("steps_per_block"), "d"),
                  _f(metric(data, stage, "attribute_accuracy")), _f(metric(data, stage, "motion_correct"))]
                 + smooth
                 + ["–" if drift is None else f"{drift:+.2f}",
                    _f(metric(data, stage, "attribute_accuracy", split="heldout")),
                    _f(metric(data, stage, "overall")),
                    _f(timing.get("time_to_first_frame_ms"), ".1f"), _f(timing.get("frames_per_s_per_video"), ".1f")])
        lines.append("| " + " | ".join(cells) + " |")
    s = data["settings"]
    lines.append("")
    lines.append(f"{s['num_prompts']} prompts per split, {data['device']}, torch {data['torch']}, {data['dtype']}, "
                 f"{s['weights']} weights. Held-in split at 1x unless stated; smoothness = velocity match "
                 "(fraction of frame steps moving as the prompt says, higher is better) / jitter (velocity change "
                 "per step in target speeds, lower is better); quality drift = frame quality of the last quarter "
                 "minus the first at the longest length run (the teacher: 1x); latency and frames/s for one prompt "
                 "alone.")
    return "\n".join(lines)


def _names(stages: list[str]) -> str:
    return ", ".join(LABELS[s] for s in stages)


def claim_self_forcing_wins(data: dict[str, Any], key: str = "overall") -> str:
    sf = [s for s in SELF_FORCING if metric(data, s, key) is not None]
    base = [s for s in BASELINES if metric(data, s, key) is not None]
    if not sf or not base:
        return (f"Self Forcing beats teacher forcing and diffusion forcing: cannot be checked (needs at least one "
                f"of {_names(list(SELF_FORCING))} and one of {_names(list(BASELINES))}).")
    lost = [(a, b) for a in sf for b in base if metric(data, a, key) <= metric(data, b, key)]
    verdict = "holds" if not lost else ("does not hold" if len(lost) == len(sf) * len(base) else "holds partly")
    numbers = ", ".join(f"{LABELS[s]} {metric(data, s, key):.3f}" for s in sf + base)
    tail = "" if not lost else " (not better: " + "; ".join(f"{LABELS[a]} vs {LABELS[b]}" for a, b in lost) + ")"
    return f"Self Forcing beats teacher forcing and diffusion forcing at 1x: {verdict} — {key} {numbers}{tail}."


def _gap(data: dict[str, Any], length: int, key: str) -> float | None:
    """Mean score of the Self Forcing variants minus the mean of the baselines at one length."""
    sf = [metric(data, s, key, length=length) for s in SELF_FORCING]
    base = [metric(data, s, key, length=length) for s in BASELINES]
    sf, base = [v for v in sf if v is not None], [v for v in base if v is not None]
    if not sf or not base:
        return None
    return sum(sf) / len(sf) - sum(b for b in base) / len(base)


def claim_gap_grows(data: dict[str, Any], key: str = "overall") -> str:
    gaps = {n: _gap(data, n, key) for n in lengths(data)}
    gaps = {n: g for n, g in gaps.items() if g is not None}
    if len(gaps) < 2:
        return ("The gap to the baselines grows with length: cannot be checked (needs Self Forcing and a "
                "baseline at two or more lengths).")
    ordered = sorted(gaps)
    first, last = gaps[ordered[0]], gaps[ordered[-1]]
    verdict = "holds" if last > first else "does not hold"
    steady = all(gaps[a] <= gaps[b] for a, b in itertools.pairwise(ordered))
    numbers = ", ".join(f"{gaps[n]:+.3f} at {n}x" for n in ordered)
    return (f"The gap between Self Forcing and the baselines grows with length: {verdict} — mean {key} "
            f"difference {numbers}{' (monotone)' if steady and verdict == 'holds' else ''}.")


def claim_student_near_teacher(data: dict[str, Any], key: str = "overall", tolerance: float = 0.05) -> str:
    student = next((s for s in SELF_FORCING if metric(data, s, key) is not None), None)
    teacher = metric(data, "teacher", key)
    if student is None or teacher is None:
        return "The few-step student is close to the many-step teacher: cannot be checked (needs both)."
    value = metric(data, student, key)
    diff = teacher - value
    verdict = "holds" if diff <= tolerance else "does not hold"
    steps, teacher_steps = data["stages"][student]["steps_per_block"], data["stages"]["teacher"]["steps_per_block"]
    return (f"The {steps}-step {LABELS[student]} student is close to the {teacher_steps}-step teacher: {verdict} — "
            f"{key} {value:.3f} vs {teacher:.3f} (teacher minus student {diff:+.3f}, tolerance {tolerance}).")


def claims(data: dict[str, Any], key: str = "overall", tolerance: float = 0.05) -> list[str]:
    return [claim_self_forcing_wins(data, key), claim_gap_grows(data, key),
            claim_student_near_teacher(data, key, tolerance)]


def format_compact(data: dict[str, Any]) -> str:
    """One line per (stage, split, length) for the terminal: headline scores, drift (fq0 -> fq1) and speed."""
    def f(x: Any, spec: str = ".3f") -> str:
        return "-" if x is None else format(x, spec)
    lines = [f"{data['device']}, torch {data['torch']}, {data['dtype']}",
             (f"{'stage':<18}{'split':<8}{'len':>4}{'steps':>6}{'attr':>7}{'motion':>7}{'velm':>7}{'jitter':>7}"
              f"{'fq0':>7}{'fq1':>7}{'overall':>8}{'ttff ms':>9}{'fps/vid':>9}")]
    for r in data["results"]:
        t = r.get("timing") or {}
        steps = data["stages"][r["stage"]].get("steps_per_block")
        lines.append(f"{r['stage']:<18}{r['split']:<8}{str(r['length']) + 'x':>4}{f(steps, 'd'):>6}"
                     f"{f(r['attribute_accuracy']):>7}{f(r['motion_correct']):>7}{f(r['velocity_match']):>7}"
                     f"{f(r['jitter']):>7}{f(r['frame_quality_first']):>7}{f(r['frame_quality_last']):>7}"
                     f"{f(r['overall']):>8}{f(t.get('time_to_first_frame_ms'), '.1f'):>9}"
                     f"{f(t.get('frames_per_s_per_video'), '.1f'):>9}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--eval", required=True, action="append",
                   help="eval.json written by scripts/evaluate_shapes.py; repeat it to merge evaluations of "
                        "different stages made with the same settings")
    p.add_argument("--metric", default="overall", help="score the claims compare (default: %(default)s)")
    p.add_argument("--tolerance", type=float, default=0.05,
                   help="how far below the teacher the student may score and still count as close")
    args = p.parse_args(argv)
    try:
        data = merge_evals([load_eval(path) for path in args.eval], args.eval)
    except UserError as err:  # only the project's own errors: a bug keeps its traceback
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 2
    print(markdown_table(data))
    print()
    for sentence in claims(data, args.metric, args.tolerance):
        print(f"- {sentence}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
