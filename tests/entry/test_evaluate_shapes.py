"""scripts/evaluate_shapes.py and scripts/shapes_results.py: a smoke run of the recipe scored end to end, the cache
and step choices, batch pooling, and the claims computed from the numbers."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from pipeline.schedule import FlowMatchSchedule
from scripts import evaluate_shapes as ev
from scripts import shapes_results as sr
from utils.config import load_config

LENGTHS = (1, 2)
METRICS_01 = ("attribute_accuracy", "motion_correct", "velocity_match", "frame_quality", "frame_quality_first",
              "frame_quality_last", "overall")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A smoke run: base, teacher and teacher forcing trained for a few steps; the teacher-forcing model copied as
    a stand-in `dmd` stage (a real dmd stage needs ODE pairs, which this test does not generate)."""
    from scripts import shapes_world
    out = tmp_path_factory.mktemp("shapes_run")
    assert shapes_world.main(["--out", str(out), "--size", "smoke", "--stages", "base,teacher,teacher_forcing"]) == 0
    shutil.copytree(out / "teacher_forcing", out / "dmd", ignore=shutil.ignore_patterns("logs"))
    return out


def _eval_args(run, output, *extra):
    return ["--run", str(run), "--num-prompts", "2", "--lengths", ",".join(map(str, LENGTHS)), "--teacher-steps",
            "2", "--baseline-steps", "2", "--batch-size", "2", "--device", "cpu", "--output", str(output), *extra]


@pytest.fixture(scope="module")
def evaluated(run):
    output = run / "eval.json"
    assert ev.main(_eval_args(run, output)) == 0
    return output, json.loads(output.read_text())


@pytest.mark.slow
def test_eval_json_structure_and_ranges(run, evaluated):
    path, data = evaluated
    assert [p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")] == []
    assert data["format"] == sr.FORMAT and data["torch"] == torch.__version__ and data["dtype"] == "float32"
    assert data["device"].startswith("cpu")
    train_frames = load_config(run / "dmd" / "config.yaml").rollout.image_or_video_shape[1]
    stages = data["stages"]
    assert set(stages) == {"teacher", "teacher_forcing", "dmd", "reference"}
    assert [stages[s]["kind"] for s in ("teacher", "teacher_forcing", "dmd")] == ["teacher", "diffusion", "few_step"]
    schedule = FlowMatchSchedule(5.0)
    assert stages["teacher"]["steps_per_block"] == 2
    assert stages["teacher_forcing"]["timesteps"] == pytest.approx(schedule.warp([1000, 500]).tolist())
    assert stages["dmd"]["timesteps"] == pytest.approx(schedule.warp([1000, 750, 500, 250]).tolist())
    assert stages["dmd"]["steps_per_block"] == 4
    assert stages["dmd"]["long_cache"]["window_frames"] == train_frames
    assert stages["dmd"]["long_cache"]["rope"] == "relative"
    for s in ("teacher", "teacher_forcing", "dmd"):
        t = stages[s]["timing_batch1"]
        assert t["batch_size"] == 1 and t["time_to_first_frame_ms"] > 0 and t["frames_per_s_per_video"] > 0

    keys = {(r["stage"], r["split"], r["length"]) for r in data["results"]}
    expected = {("teacher", sp, 1) for sp in ev.SPLITS}
    expected |= {(s, sp, n) for s in ("teacher_forcing", "dmd", "reference") for sp in ev.SPLITS for n in LENGTHS}
    assert keys == expected and len(data["results"]) == len(expected)
    for r in data["results"]:
        assert r["num_videos"] == 2
        assert r["latent_frames"] == r["pixel_frames"] == train_frames * r["length"]
        assert len(r["per_frame"]["frame_quality"]) == r["pixel_frames"]
        assert len(r["per_frame"]["velocity_match"]) == r["pixel_frames"] - 1
        for key in METRICS_01:
            assert 0.0 <= r[key] <= 1.0, (r["stage"], key, r[key])
        if r["stage"] == "reference":
            assert r["timing"] is None and r["overall"] > 0.9  # the evaluator's ceiling: the rendered truth
        else:
            assert r["timing"]["batch_size"] == 2 and r["timing"]["frames_per_s_batch"] > 0
            assert r["timing"]["time_to_first_frame_ms"] > 0


@pytest.mark.slow
def test_scores_do_not_depend_on_which_stages_are_evaluated(run, evaluated, tmp_path):
    _, full = evaluated
    alone = tmp_path / "dmd_only.json"
    assert ev.main(_eval_args(run, alone, "--stages", "dmd")) == 0
    single = json.loads(alone.read_text())
    assert set(single["stages"]) == {"dmd", "reference"}
    for r in single["results"]:
        match = sr.entry(full, r["stage"], r["split"], r["length"])
        for key in ("overall", "attribute_accuracy", "frame_quality"):
            assert r[key] == pytest.approx(match[key], abs=1e-6), (r["stage"], r["split"], r["length"], key)


@pytest.mark.slow
def test_fp8_evaluation_samples_with_fp8_blocks_and_is_not_merged_with_a_plain_one(run, evaluated, tmp_path, capsys):
    """`--fp8` (the FP8 lever's quality delta): the stage is sampled with FP8 block linears, its scores are its own
    (the same scenes: comparable entry by entry), and the results script refuses to mix it with a plain evaluation."""
    path, full = evaluated
    fp8_path = tmp_path / "eval_fp8.json"
    assert ev.main(_eval_args(run, fp8_path, "--stages", "dmd", "--fp8")) == 0
    fp8 = json.loads(fp8_path.read_text())
    assert fp8["settings"]["fp8"] is True and fp8["stages"]["dmd"]["fp8"] is True
    assert full["settings"]["fp8"] is False
    for r in fp8["results"]:
        assert 0.0 <= r["overall"] <= 1.0 and sr.entry(full, r["stage"], r["split"], r["length"]) is not None
    capsys.readouterr()
    assert sr.main(["--eval", str(path), "--eval", str(fp8_path)]) == 2
    assert "settings ['fp8'] differ" in capsys.readouterr().err


@pytest.mark.slow
def test_progress_is_written_after_each_stage(run, evaluated):
    """An evaluation may be cut short: the stages already scored are on disk."""
    _, full = evaluated
    seen = []
    settings = ev.EvalSettings(num_prompts=2, lengths=(1,), teacher_steps=2, baseline_steps=2, batch_size=2,
                               device="cpu")
    final = ev.evaluate_run(run, ["teacher", "dmd"], settings, log=lambda _: None,
                            on_progress=lambda doc: seen.append(json.loads(json.dumps(doc))))
    assert [sorted(d["stages"]) for d in seen] == [["teacher"], ["dmd", "teacher"]]
    assert [d["complete"] for d in seen] == [False, False] and final["complete"] and full["complete"]
    assert {r["stage"] for r in seen[0]["results"]} == {"teacher"}
    assert "reference" in final["stages"]


@pytest.mark.slow
def test_results_table_has_the_rows_and_numbers(evaluated, capsys):
    path, data = evaluated
    assert sr.main(["--eval", str(path)]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| Model | Steps / block") and all(f"Smoothness {n}x" in rows[0] for n in LENGTHS)
    labels = [row.split("|")[1].strip() for row in rows[1:]]
    assert labels == [sr.LABELS[s] for s in ("teacher", "teacher_forcing", "dmd", "reference")]
    dmd = rows[1 + labels.index(sr.LABELS["dmd"])].split("|")
    assert dmd[2].strip() == "4"
    assert dmd[3].strip() == f"{sr.metric(data, 'dmd', 'attribute_accuracy'):.2f}"
    claims = [line for line in out.splitlines() if line.startswith("- ")]
    verdicts = (": holds", ": does not hold", "cannot be checked")
    assert len(claims) == 3 and all(any(v in c for v in verdicts) for c in claims)


@pytest.mark.slow
def test_evaluations_made_apart_merge_into_the_same_table(run, evaluated, tmp_path, capsys):
    """The GPU recipe scores groups of stages in parallel processes; the table from their files equals the table
    from one evaluation of every stage, and files made with other settings are refused by name."""
    path, _ = evaluated
    parts = []
    for group, lengths in (("teacher", "1"), ("teacher_forcing,dmd", None)):  # a teacher is scored at 1x only
        parts.append(tmp_path / f"eval_{group}.json")
        extra = ["--lengths", lengths] if lengths else []
        assert ev.main(_eval_args(run, parts[-1], "--stages", group, *extra)) == 0
    capsys.readouterr()

    def table_without_timings(argv):  # the last two columns are latency and frames/s: measured, not recomputable
        assert sr.main(argv) == 0
        return [line.split("|")[:-3] if line.startswith("| ") else line
                for line in capsys.readouterr().out.splitlines()]
    whole = table_without_timings(["--eval", str(path)])
    assert table_without_timings(["--eval", str(parts[0]), "--eval", str(parts[1])]) == whole
    other = tmp_path / "other_seed.json"
    assert ev.main(_eval_args(run, other, "--stages", "dmd", "--seed", "5")) == 0
    capsys.readouterr()
    assert sr.main(["--eval", str(parts[0]), "--eval", str(other)]) == 2
    assert "settings ['seed'] differ" in capsys.readouterr().err


def test_bad_arguments_are_errors(tmp_path, capsys):
    assert ev.main(["--run", str(tmp_path / "missing")]) == 2
    assert "is not a folder" in capsys.readouterr().err
    assert ev.main(["--run", str(tmp_path), "--stages", "dmd,bogus"]) == 2
    assert "bogus" in capsys.readouterr().err
    assert ev.main(["--run", str(tmp_path), "--stages", "sid"]) == 2
    assert str(tmp_path / "sid" / "config.yaml") in capsys.readouterr().err
    assert ev.main(["--run", str(tmp_path), "--lengths", "1,0"]) == 2
    assert "--lengths" in capsys.readouterr().err
    assert ev.main(["--run", str(tmp_path)]) == 2
    assert "no finished stage" in capsys.readouterr().err
    bad = tmp_path / "not_eval.json"
    bad.write_text(json.dumps({"format": "something else"}))
    assert sr.main(["--eval", str(bad)]) == 2
    assert "format" in capsys.readouterr().err


def _config(frames: int, block: int, **extra):
    overrides = [f"image_or_video_shape=[1,{frames},12,16,16]", f"num_training_frames={frames}",
                 f"num_frame_per_block={block}", *[f"{k}={v}" for k, v in extra.items()]]
    return load_config(None, overrides)


def test_cache_policy_rolls_only_beyond_the_training_length():
    cfg = _config(12, 3)
    at1 = ev.causal_settings(cfg, [1000.0], 1)
    assert (at1.window_frames, at1.sink_frames, at1.rope) == (-1, 0, "absolute")
    long = ev.causal_settings(cfg, [1000.0], 10)
    assert (long.window_frames, long.sink_frames, long.rope) == (12, 3, "relative")
    # a sink that would leave no earlier block in the window is dropped
    assert ev.causal_settings(_config(6, 3), [1000.0], 3).sink_frames == 0
    assert ev.frames_at(cfg, 10) == 120
    assert ev.frames_at(_config(13, 3, independent_first_frame="true"), 3) == 37


def test_step_lists():
    schedule = FlowMatchSchedule(5.0)
    ode = _config(12, 3, denoising_step_list="[1000,750,500,250,0]", warp_denoising_step="true")
    four = schedule.warp([1000, 750, 500, 250]).tolist()
    assert ev.causal_steps("ode_init", ode, schedule, 16) == pytest.approx(four)  # the trailing 0 is no step
    assert ev.causal_steps("teacher_forcing", ode, schedule, 4) == pytest.approx(four)
    plain = _config(12, 3, warp_denoising_step="false")
    assert ev.causal_steps("diffusion_forcing", plain, schedule, 5) == [1000.0, 800.0, 600.0, 400.0, 200.0]


def _report(n: int, value: float, shape_value: float, frames: list[float]):
    return {"num_videos": n, **{k: value for k in sr.VIDEO_KEYS}, **{k: shape_value for k in sr.SHAPE_KEYS},
            "per_frame": {"frame_quality": frames, "velocity_match": frames[1:]}}


def test_pool_reports_weights_videos_and_shapes():
    pooled = sr.pool_reports([_report(3, 1.0, 0.0, [1.0] * 8), _report(1, 0.0, float("nan"), [0.0] * 8)], [5, 1])
    assert pooled["num_videos"] == 4
    assert pooled["overall"] == pytest.approx(0.75)
    assert pooled["jitter"] == pytest.approx(0.0)  # NaN batches are left out, not averaged in
    pooled = sr.pool_reports([_report(1, 0.5, 1.0, [1.0, 1.0, 0.5, 0.5, 0.5, 0.5, 0.0, 0.0])], [1])
    assert pooled["frame_quality_first"] == pytest.approx(1.0) and pooled["frame_quality_last"] == pytest.approx(0.0)


def _synthetic(scores: dict[str, dict[int, float]], teacher_steps: int = 48) -> dict:
    results = [{"stage": s, "split": "train", "length": n, "overall": v} for s, by_len in scores.items()
               for n, v in by_len.items()]
    stages = {s: {"steps_per_block": teacher_steps if s == "teacher" else 4} for s in scores}
    return {"results": results, "stages": stages}


def test_claims_follow_the_numbers():
    good = _synthetic({"teacher": {1: 0.82}, "dmd": {1: 0.80, 10: 0.75}, "sid": {1: 0.79, 10: 0.74},
                       "teacher_forcing": {1: 0.60, 10: 0.30}, "diffusion_forcing": {1: 0.65, 10: 0.35}})
    wins, grows, close = sr.claims(good)
    assert ": holds" in wins and "0.800" in wins and "0.650" in wins
    assert ": holds" in grows and "(monotone)" in grows
    assert ": holds" in close and "4-step" in close and "48-step" in close and "+0.020" in close
    bad = _synthetic({"teacher": {1: 0.90}, "dmd": {1: 0.60, 10: 0.50}, "teacher_forcing": {1: 0.62, 10: 0.58}})
    wins, grows, close = sr.claims(bad)
    assert ": does not hold" in wins and ": does not hold" in grows and ": does not hold" in close
    partly = _synthetic({"dmd": {1: 0.70}, "gan": {1: 0.50}, "teacher_forcing": {1: 0.60}})
    assert ": holds partly" in sr.claims(partly)[0]
    assert all("cannot be checked" in c for c in sr.claims(_synthetic({"dmd": {1: 0.7}})))
