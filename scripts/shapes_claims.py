"""The paper's claims in the shapes world, with error bars: every variant at equal generator steps, several training
seeds, evaluated at 1x, 3x and 10x the training length.

    python scripts/shapes_claims.py --out runs/claims --seeds 1,2,3 --generator-steps 200 --prompts 256
    python scripts/shapes_claims.py --out runs/claims_tiny --size smoke --seeds 1,2,3 --generator-steps 2 \
        --prompts 2 --lengths 1,2                                     # the whole path in a minute on a CPU

Layout of `--out`: `shared/` holds base, teacher and ODE pairs (trained once, or copied from `--teacher-run`, a
scripts/shapes_world.py folder that has them); `seed_<s>/` trains, with training seed `s`, the ODE init and then
Self Forcing DMD / SiD / GAN, CausVid, teacher forcing and diffusion forcing, each for the same number of generator
updates (`max_steps` = updates x `dfake_gen_update_ratio` for recipes with a critic, = updates otherwise), and its
`eval.json` (scripts/evaluate_shapes.py, scene and noise seed = the training seed). Every step is skipped when its
output exists, so a cut run continues where it stopped. `claims.json` and `claims.md` hold the table and verdicts.

Intervals (95%): a cell is the mean over training seeds of the held-in score at one length, with a Student-t
interval over the seeds (each seed's own scenes, so the interval covers training and scene sampling); with one seed,
the evaluation's own interval over scenes. A claim is judged on per-seed paired differences (the same teacher,
scenes and noise within a seed), t interval over seeds: "holds" when the interval lies on the claimed side,
"fails" when it lies on the other, "undecided" when it straddles. Claims: (1) every Self Forcing variant beats
teacher forcing and diffusion forcing at 1x; (2) the gap (mean of Self Forcing minus mean of the baselines) grows
from 1x to the longest length; (3) the 4-step DMD student is within `--tolerance` of the teacher at 1x.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scripts.shapes_results import LABELS, SELF_FORCING, metric  # noqa: E402
from utils.errors import InputError, MissingFileError, UserError, one_line  # noqa: E402

SHARED_STAGES = ("base", "teacher", "ode_pairs")
SEED_STAGES = ("ode_init", "dmd", "sid", "gan", "causvid", "teacher_forcing", "diffusion_forcing")
BASELINES = ("teacher_forcing", "diffusion_forcing")
TABLE_STAGES = ("teacher", "teacher_forcing", "diffusion_forcing", "causvid", "ode_init", "dmd", "sid", "gan")
# two-sided 95% Student-t quantiles by degrees of freedom; beyond the table the normal quantile
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        15: 2.131, 20: 2.086, 30: 2.042}


def t_quantile(df: int) -> float:
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    return _T95.get(df) or (_T95[max(k for k in _T95 if k <= df)] if df < 30 else 1.960)


def t_interval(values: list[float]) -> dict[str, Any]:
    """Mean and 95% Student-t interval of `values` (two or more)."""
    n = len(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = t_quantile(n - 1) * sd / math.sqrt(n)
    return {"mean": mean, "low": mean - half, "high": mean + half, "n": n, "method": "t over training seeds"}


def verdict(interval: dict[str, Any], above: float = 0.0) -> str:
    """"holds" if the whole interval is above `above`, "fails" if below, else "undecided"."""
    if interval["low"] > above:
        return "holds"
    if interval["high"] < above:
        return "fails"
    return "undecided"


# ---------------------------------------------------------------------------------------------------- training
def generator_max_steps(stage: str, out: Path, size: str, updates: int) -> int:
    """Loop steps that give `updates` generator updates (a critic recipe updates it every ratio-th step)."""
    from scripts.shapes_world import load_stage_config
    cfg = load_stage_config(stage, out, size)
    critic = cfg.trainer == "gan" or cfg.trainer == "score_distillation"
    return updates * cfg.distillation.dfake_gen_update_ratio if critic else updates


def prepare_shared(out: Path, size: str, teacher_run: Path | None) -> Path:
    from scripts import shapes_world
    shared = out / "shared"
    if teacher_run is not None:
        for stage in SHARED_STAGES:
            if not shapes_world.stage_done(teacher_run, stage):
                raise MissingFileError(f"--teacher-run {teacher_run}: stage {stage} is missing (run "
                                       f"scripts/shapes_world.py --out {teacher_run} --stages base,teacher,ode_pairs)")
            if not (shared / stage).exists():
                shutil.copytree(teacher_run / stage, shared / stage, ignore=shutil.ignore_patterns("logs"))
    elif shapes_world.main(["--out", str(shared), "--size", size, "--stages", ",".join(SHARED_STAGES)]):
        raise RuntimeError("training the shared base, teacher and ODE pairs failed")
    return shared


def train_seed(out: Path, shared: Path, seed: int, size: str, updates: int) -> Path:
    from scripts.shapes_world import read_stage_record, run_stage, stage_done
    run = out / f"seed_{seed}"
    run.mkdir(parents=True, exist_ok=True)
    for stage in SHARED_STAGES:
        if not (run / stage).exists():
            (run / stage).symlink_to((shared / stage).resolve(), target_is_directory=True)
    for stage in SEED_STAGES:
        record = read_stage_record(run, stage)
        if stage_done(run, stage) and record is not None and record["complete"]:
            continue
        steps = generator_max_steps(stage, run, size, updates)
        run_stage(stage, run, size, (f"seed={seed}", f"max_steps={steps}", "time_limit_s=0"))
    return run


# ---------------------------------------------------------------------------------------------------- evaluation
def evaluate_seed(run: Path, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    from scripts.evaluate_shapes import EvalSettings, evaluate_run, write_json_atomic
    path = run / "eval.json"
    if path.is_file():
        data = json.loads(path.read_text())
        if data.get("complete"):
            return data
    settings = EvalSettings(num_prompts=args.prompts, lengths=args.lengths, teacher_steps=args.teacher_steps,
                            baseline_steps=args.baseline_steps, batch_size=args.batch_size, seed=seed,
                            device=args.device)
    data = evaluate_run(run, ["teacher", *SEED_STAGES], settings, on_progress=lambda d: write_json_atomic(path, d))
    write_json_atomic(path, data)
    return data


def _cell(evals: list[dict[str, Any]], stage: str, key: str, length: int) -> dict[str, Any] | None:
    values = [metric(d, stage, key, length=length) for d in evals]
    if any(v is None for v in values):
        return None
    if len(values) >= 2:
        return t_interval(values)
    entry = next(r for r in evals[0]["results"] if (r["stage"], r["split"], r["length"]) == (stage, "train", length))
    ci = entry["ci"][key]
    return {**ci, "method": f"{ci['method']} over scenes (one training seed)"}


def _paired(evals: list[dict[str, Any]], diff) -> dict[str, Any] | None:
    values = [diff(d) for d in evals]
    if any(v is None for v in values) or len(values) < 2:
        return None
    return t_interval(values)


def _gap(d: dict[str, Any], key: str, length: int) -> float | None:
    sf = [metric(d, s, key, length=length) for s in SELF_FORCING]
    base = [metric(d, s, key, length=length) for s in BASELINES]
    if None in sf or None in base:
        return None
    return sum(sf) / len(sf) - sum(base) / len(base)


def judge(evals: list[dict[str, Any]], key: str, lengths: tuple[int, ...], tolerance: float) -> list[dict[str, Any]]:
    """The three claims, each with its per-pair intervals and a verdict (undecided without two or more seeds)."""
    claims = []
    pairs = {f"{a} - {b}": _paired(evals, lambda d, a=a, b=b: None if metric(d, a, key) is None
                                   or metric(d, b, key) is None else metric(d, a, key) - metric(d, b, key))
             for a in SELF_FORCING for b in BASELINES}
    verdicts = [verdict(i) if i else "undecided" for i in pairs.values()]
    overall = "fails" if "fails" in verdicts else "holds" if set(verdicts) == {"holds"} else "undecided"
    claims.append({"claim": "Self Forcing (DMD, SiD, GAN) beats teacher forcing and diffusion forcing at 1x",
                   "verdict": overall, "intervals": pairs})
    longest = max(lengths)
    growth = _paired(evals, lambda d: None if _gap(d, key, longest) is None or _gap(d, key, 1) is None
                     else _gap(d, key, longest) - _gap(d, key, 1)) if longest > 1 else None
    claims.append({"claim": f"the gap between Self Forcing and the baselines grows from 1x to {longest}x",
                   "verdict": verdict(growth) if growth else "undecided", "intervals": {"gap growth": growth}})
    margin = _paired(evals, lambda d: None if metric(d, "teacher", key) is None or metric(d, "dmd", key) is None
                     else tolerance - (metric(d, "teacher", key) - metric(d, "dmd", key)))
    claims.append({"claim": f"the 4-step DMD student is within {tolerance} of the teacher at 1x",
                   "verdict": verdict(margin) if margin else "undecided",
                   "intervals": {"tolerance - (teacher - dmd)": margin}})
    return claims


def _fmt(cell: dict[str, Any] | None) -> str:
    return "–" if cell is None else f"{cell['mean']:.3f} [{cell['low']:.3f}, {cell['high']:.3f}]"


def claims_table(evals: list[dict[str, Any]], seeds: list[int], args: argparse.Namespace) -> dict[str, Any]:
    cells = {stage: {str(n): _cell(evals, stage, args.metric, n) for n in args.lengths} for stage in TABLE_STAGES}
    claims = judge(evals, args.metric, args.lengths, args.tolerance)
    head = "| model | " + " | ".join(f"{args.metric} {n}x" for n in args.lengths) + " |"
    lines = [head, "|---" + "|---:" * len(args.lengths) + "|"]
    lines += [f"| {LABELS[s]} | " + " | ".join(_fmt(cells[s][str(n)]) for n in args.lengths) + " |"
              for s in TABLE_STAGES]
    lines += ["", f"Held-in scenes, {args.prompts} prompts per seed, training seeds {seeds}, {args.generator_steps} "
              "generator updates per variant; mean [95% interval]."]
    lines += [f"- {c['claim']}: **{c['verdict']}**" for c in claims]
    return {"format": "shapes-claims/1", "metric": args.metric, "seeds": seeds, "generator_updates":
            args.generator_steps, "prompts": args.prompts, "lengths": list(args.lengths), "size": args.size,
            "cells": cells, "claims": claims, "markdown": "\n".join(lines)}


def _ints(text: str, flag: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise InputError(f"{flag} must be comma-separated integers, got {text!r}") from None
    if not values or len(set(values)) != len(values):
        raise InputError(f"{flag} must list distinct integers, got {text!r}")
    return values


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for the shared teacher, the seed runs and the table")
    p.add_argument("--size", choices=["full", "smoke"], default="full")
    p.add_argument("--seeds", default="1,2,3", help="training seeds (default: %(default)s; three or more)")
    p.add_argument("--generator-steps", type=int, required=True, help="generator updates of every variant")
    p.add_argument("--teacher-run", default=None, help="take base, teacher and ode_pairs from this run folder")
    p.add_argument("--prompts", type=int, default=256, help="scenes per split and seed (default: %(default)s)")
    p.add_argument("--lengths", default="1,3,10", help="multiples of the training length (default: %(default)s)")
    p.add_argument("--metric", default="overall", help="evaluator score of the table (default: %(default)s)")
    p.add_argument("--tolerance", type=float, default=0.05, help="'close to the teacher' (default: %(default)s)")
    p.add_argument("--teacher-steps", type=int, default=48)
    p.add_argument("--baseline-steps", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    args = p.parse_args(argv)
    try:
        import torch
        seeds = list(_ints(args.seeds, "--seeds"))
        args.lengths = tuple(sorted(_ints(args.lengths, "--lengths")))
        if args.generator_steps < 1 or args.prompts < 1 or min(args.lengths) != 1:
            raise InputError("--generator-steps and --prompts must be >= 1 and --lengths must include 1, got "
                             f"{args.generator_steps}, {args.prompts}, {args.lengths}")
        args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        out = Path(args.out)
        shared = prepare_shared(out, args.size, Path(args.teacher_run) if args.teacher_run else None)
        evals = []
        for seed in seeds:
            run = train_seed(out, shared, seed, args.size, args.generator_steps)
            evals.append(evaluate_seed(run, seed, args))
        table = claims_table(evals, seeds, args)
    except UserError as err:  # the project's own errors: a bug keeps its traceback
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 2
    for name, text in (("claims.json", json.dumps(table, indent=1, allow_nan=False) + "\n"),
                       ("claims.md", table["markdown"] + "\n")):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, out / name)
    print(table["markdown"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
