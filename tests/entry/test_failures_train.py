"""train.py under hostile use (CPU, tiny models): one run per logdir, no repeated metrics after a resume, bad values
refused in one line, bugs with their traceback."""
from __future__ import annotations

import json
import os

import pytest

import train
from tests.entry.test_train_cli import recipe  # noqa: F401  (fixture)
from tests.tiny import tiny_models
from trainer import train_state as ts
from utils.locks import try_lock


def run(recipe, logdir, *extra, models=tiny_models):
    return train.main(["--config_path", str(recipe), "--logdir", str(logdir), "--disable-wandb", *extra],
                      models=models)


def exits_2(capsys, *args, **kwargs) -> str:
    with pytest.raises(SystemExit) as info:
        run(*args, **kwargs)
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and err.startswith("train.py: error: "), err
    return err.splitlines()[-1]


def test_a_logdir_held_by_a_live_run_is_refused_and_left_alone(tmp_path, recipe, capsys):  # noqa: F811
    logdir = tmp_path / "run"
    logdir.mkdir()
    held = try_lock(logdir / train.LOCK_FILE)  # as a run in another process would hold it
    try:
        message = exits_2(capsys, recipe, logdir, "max_steps=1")
        assert f"logdir {logdir} is in use by process {os.getpid()}" in message
        assert sorted(p.name for p in logdir.iterdir()) == [train.LOCK_FILE]  # no metrics, no checkpoint
    finally:
        held.release()


def test_the_lock_is_held_while_training_and_released_after(tmp_path, recipe):  # noqa: F811
    logdir = tmp_path / "run"
    seen = []

    def models(cfg):
        seen.append(try_lock(logdir / train.LOCK_FILE))  # another run trying now
        return tiny_models(cfg)

    trainer = run(recipe, logdir, "max_steps=1", models=models)
    assert seen == [None] and trainer.step == 1
    assert not (logdir / train.LOCK_FILE).exists()
    lock = try_lock(logdir / train.LOCK_FILE)
    assert lock is not None
    lock.release()


def test_a_stale_lock_of_a_dead_run_is_taken_over(tmp_path, recipe):  # noqa: F811
    logdir = tmp_path / "run"
    logdir.mkdir()
    (logdir / train.LOCK_FILE).write_text(json.dumps({"pid": 999999999, "host": "gone"}))  # a SIGKILLed run's
    assert run(recipe, logdir, "max_steps=1").step == 1
    assert not (logdir / train.LOCK_FILE).exists()


def test_a_logdir_that_is_a_file(tmp_path, recipe, capsys):  # noqa: F811
    logdir = tmp_path / "run"
    logdir.write_text("not a folder")
    assert f"logdir {logdir} is a file" in exits_2(capsys, recipe, logdir)
    assert logdir.read_text() == "not a folder"


@pytest.mark.parametrize("extra, message", [
    (["max_steps=-1"], "override 'max_steps=-1': optimiser.max_steps must be >= 0, got -1"),
    (["max_steps=0", "--no_save"], "max_steps=0 with --no_save would do nothing"),
    (["fps=0"], "override 'fps=0': inference.fps must be >= 1"),
    (["height=40"], "override 'height=40': height/width 40x"),
    (["batch_size=abc"], "override 'batch_size=abc': bad value for 'optimiser.batch_size'"),
])
def test_bad_values_are_one_line_errors(tmp_path, recipe, capsys, extra, message):  # noqa: F811
    assert message in exits_2(capsys, recipe, tmp_path / "run", *extra)
    assert not (tmp_path / "run").exists() or not list(ts.list_checkpoints(tmp_path / "run"))


def test_a_yaml_list_config(tmp_path, capsys):
    config = tmp_path / "list.yaml"
    config.write_text("- lr: 1.0\n")
    assert f"{config}: expected a mapping of config keys" in exits_2(capsys, config, tmp_path / "run")


def test_metrics_have_no_repeated_steps_after_a_resume(tmp_path, recipe):  # noqa: F811
    logdir = tmp_path / "run"
    run(recipe, logdir, "max_steps=2")  # checkpoint at step 2
    metrics = logdir / "metrics.jsonl"
    rows = metrics.read_text().splitlines()
    # A run killed after logging steps 3 and 4 but before their checkpoint, mid-way through a line.
    with metrics.open("a") as handle:
        handle.write(json.dumps({"step": 3, "generator_loss": 1.0}) + "\n")
        handle.write(json.dumps({"step": 4, "critic_loss": 1.0}) + "\n")
        handle.write('{"step": 5, "critic_lo')
    resumed = run(recipe, logdir, "max_steps=4", "--resume")
    assert resumed.step == 4
    after = metrics.read_text().splitlines()
    assert after[:len(rows)] == rows
    assert [json.loads(line)["step"] for line in after] == [1, 2, 3, 4]


def test_a_bug_keeps_its_traceback_and_releases_the_logdir(tmp_path, recipe, monkeypatch):  # noqa: F811
    def broken(*args, **kwargs):
        raise KeyError("an internal lookup went wrong")
    monkeypatch.setattr(train, "_build", broken)
    with pytest.raises(KeyError, match="an internal lookup"):
        run(recipe, tmp_path / "run", "max_steps=1")
    assert not (tmp_path / "run" / train.LOCK_FILE).exists()


def test_a_run_that_fails_to_start_leaves_no_logdir_behind(tmp_path, recipe, capsys):  # noqa: F811
    logdir = tmp_path / "new" / "run"
    message = exits_2(capsys, recipe, logdir, f"data_path={tmp_path / 'absent.txt'}")
    assert "absent.txt" in message
    assert not (tmp_path / "new").exists()  # the folders this run created are gone again, lock included
