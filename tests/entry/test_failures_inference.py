"""inference.py under hostile use (CPU, a tiny model folder): every failure is a one-line message or a kept traceback,
and nothing finished is lost, silently kept under other settings, or left behind half-written."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import inference
from tests.tiny import save_tiny_model_folder
from utils import outputs
from utils.errors import InputError
from utils.locks import try_lock
from utils.video import StreamingVideoWriter, read_video

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_tiny_model_folder(tmp_path_factory.mktemp("model") / "tiny")


def run_cli(*argv) -> int:
    return inference.main([str(a) for a in argv])


def snapshot(path: Path) -> dict[str, int]:
    """Every file under `path` (hidden ones included) with its modification time."""
    return {str(p.relative_to(path)): p.stat().st_mtime_ns for p in sorted(path.rglob("*")) if p.is_file()}


def last_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert lines and lines[-1].startswith("error: "), err
    return lines[-1]


@pytest.fixture
def no_model_load(monkeypatch):
    """Errors that the command line alone decides must come before any weights load."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad input was reported")
    monkeypatch.setattr(inference, "build_pipeline", refuse)


# ------------------------------------------------------------------------------------------ reruns and settings
@pytest.mark.parametrize("flag, value, key, stored", [("--seed", "5", "seed", 5), ("--fps", "12", "fps", 12),
                                                      ("--total-blocks", "3", "latent_frames", 6)])
def test_a_rerun_with_other_settings_names_the_setting_and_keeps_the_old_video(folder, tmp_path, capsys, flag, value,
                                                                                  key, stored):
    out = tmp_path / "out"
    base = ["--model", folder, "--prompt", "a red circle moves left", "--output-dir", out]
    assert run_cli(*base, "--total-blocks", 2) == 0
    before = snapshot(out)
    args = [*base, "--total-blocks", 2, flag, value] if flag != "--total-blocks" else [*base, flag, value]
    capsys.readouterr()
    assert run_cli(*args) == 2
    message = last_error(capsys)
    assert f"was made with {key}=" in message and "--overwrite" in message
    assert snapshot(out) == before  # nothing regenerated, nothing deleted, nothing left behind
    assert run_cli(*args, "--overwrite") == 0  # asked for: regenerated under the new settings
    stats = json.loads(next(out.glob("stats_*.json")).read_text())
    assert stats["run_settings"][key] == stored
    assert run_cli(*args) == 0 and "(1 done)" in capsys.readouterr().out  # and is then finished work


def test_stats_without_a_settings_record_are_not_taken_for_finished(folder, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["--model", folder, "--prompt", "a red circle", "--output-dir", out, "--total-blocks", 1]
    assert run_cli(*args) == 0
    stats_path = next(out.glob("stats_*.json"))
    stats = json.loads(stats_path.read_text())
    del stats["run_settings"]
    stats_path.write_text(json.dumps(stats))
    capsys.readouterr()
    assert run_cli(*args) == 2
    assert "records no run_settings" in last_error(capsys)


# ------------------------------------------------------------------------------------------ prompts
@pytest.mark.parametrize("argv, message", [
    (["--prompt", ""], "--prompt is empty"),
    (["--prompt", "   "], "--prompt is empty"),
    (["--data_path", ""], "--data_path is empty"),
])
def test_an_empty_prompt_or_prompt_file_flag_is_an_error_not_the_built_in_prompts(tmp_path, capsys, no_model_load,
                                                                                    argv, message):
    out = tmp_path / "out"
    assert run_cli("--output-dir", out, *argv) == 2
    assert message in last_error(capsys)
    assert not out.exists()


def test_prompt_never_reads_a_file(tmp_path, capsys, no_model_load):
    secret = tmp_path / "notes"
    secret.write_text("not a prompt\n")
    for value in (str(secret), str(tmp_path / "absent.txt")):
        assert run_cli("--prompt", value, "--output-dir", tmp_path / "out") == 2
        message = last_error(capsys)
        assert "--prompt takes the prompt text" in message and f"--data_path {value}" in message
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------ checked before loading
@pytest.mark.parametrize("argv, message", [
    (["--fps", "0"], "--fps must be >= 1, got 0"),
    (["--fps", "65535"], "--fps must be at most 240"),
    (["--height", "0"], "--height must be >= 1, got 0"),
    (["--width", "-48"], "--width must be >= 1, got -48"),
    (["--total-blocks", "0"], "--total-blocks must be >= 1"),
    (["--num_samples", "0"], "--num_samples must be >= 1"),
    (["--device", "gpu"], "--device 'gpu' is not a device"),
    (["--text-encoder-device", "tpu9"], "--text-encoder-device 'tpu9' is not a device"),
    (["--device", "cpu", "--gpu-memory-limit-gib", "24"], "--gpu-memory-limit-gib 24 limits a CUDA device"),
])
def test_bad_values_are_errors_before_loading_never_replaced_by_defaults(tmp_path, capsys, no_model_load, argv,
                                                                          message):
    assert run_cli("--prompt", "a red circle", "--output-dir", tmp_path / "out", *argv) == 2
    assert message in last_error(capsys)
    assert not (tmp_path / "out").exists()


def test_an_output_dir_that_is_a_file_or_cannot_be_created(tmp_path, capsys, no_model_load):
    blocker = tmp_path / "file"
    blocker.write_text("keep me")
    assert run_cli("--prompt", "a red circle", "--output-dir", blocker) == 2
    assert f"--output-dir {blocker} is a file" in last_error(capsys)
    assert run_cli("--prompt", "a red circle", "--output-dir", blocker / "sub") == 2
    assert f"--output-dir {blocker / 'sub'} cannot be written" in last_error(capsys)
    assert blocker.read_text() == "keep me"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_output_dir(tmp_path, capsys, no_model_load):
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o555)
    try:
        assert run_cli("--prompt", "a red circle", "--output-dir", out) == 2
        assert "cannot be written" in last_error(capsys)
    finally:
        out.chmod(0o755)


def test_a_config_file_that_is_a_yaml_list(tmp_path, capsys):
    config = tmp_path / "list.yaml"
    config.write_text("- height: 32\n- width: 48\n")
    out = tmp_path / "out"
    # Without --model the config is read first, before any weights.
    assert run_cli("--config_path", config, "--prompt", "x", "--output-dir", out) == 2
    assert f"{config}: expected a mapping of config keys" in last_error(capsys)
    assert not out.exists()  # the folder this failed run created is gone again


def test_a_size_override_is_blamed_on_the_override(folder, tmp_path, capsys):
    assert run_cli("--model", folder, "--prompt", "x", "--output-dir", tmp_path / "out", "height=40") == 2
    message = last_error(capsys)
    assert message.startswith("error: override 'height=40': height/width 40x") and "default_config" not in message
    assert run_cli("--model", folder, "--prompt", "x", "--output-dir", tmp_path / "out", "--height", 30) == 2
    assert last_error(capsys).startswith("error: --height/--width (or the config's height/width): height/width 30x")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------ model folders
def broken_copy(folder: Path, tmp_path: Path, name: str) -> Path:
    copy = tmp_path / name
    shutil.copytree(folder, copy)
    return copy


def test_a_corrupt_text_encoder_file_names_it(folder, tmp_path, capsys):
    copy = broken_copy(folder, tmp_path, "corrupt")
    (weights,) = (copy / "text_encoder").glob("*.safetensors")
    weights.write_bytes(b"\x00garbage" * 10)
    assert run_cli("--model", copy, "--prompt", "x", "--output-dir", tmp_path / "out", "--total-blocks", 1) == 2
    assert f"text encoder {copy / 'text_encoder'}" in last_error(capsys)
    assert not (tmp_path / "out").exists()


def test_a_missing_tokenizer_names_its_folder(folder, tmp_path, capsys):
    copy = broken_copy(folder, tmp_path, "notok")
    shutil.rmtree(copy / "tokenizer")
    assert run_cli("--model", copy, "--prompt", "x", "--output-dir", tmp_path / "out") == 2
    assert f"{copy / 'tokenizer'} does not exist" in last_error(capsys)


def test_a_model_folder_without_text_encoder_is_reported_as_such(folder, tmp_path, capsys):
    copy = broken_copy(folder, tmp_path, "bare")
    shutil.rmtree(copy / "text_encoder")
    assert run_cli("--model", copy, "--prompt", "x", "--output-dir", tmp_path / "out",
                   "--model-root", tmp_path / "nowhere") == 2
    message = last_error(capsys)
    assert f"model folder {copy} has no text_encoder/" in message and "--include-base" in message


# ------------------------------------------------------------------------------------------ fps the mp4 cannot hold
def test_a_frame_rate_the_mp4_cannot_represent_is_an_error_and_leaves_nothing(tmp_path):
    path = tmp_path / "v.mp4"
    writer = StreamingVideoWriter(path, fps=65535)  # writes a file that decodes to no frames
    writer.append(torch.rand(3, 3, 16, 16))
    with pytest.raises(InputError, match="decodes to no frames"):
        writer.close()
    assert list(tmp_path.iterdir()) == []
    with StreamingVideoWriter(path, fps=16) as ok:
        ok.append(torch.rand(3, 3, 16, 16))
    assert read_video(path)[0].shape[0] == 3


# ------------------------------------------------------------------------------------------ concurrency, leftovers
def test_a_prompt_claimed_by_a_live_process_is_skipped_then_done_later(folder, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\na blue square\n")
    out = tmp_path / "out"
    out.mkdir()
    args = ["--model", folder, "--data_path", prompts, "--output-dir", out, "--total-blocks", 1]
    held = try_lock(outputs.claim_path(out, "0000-a-red-circle"))  # as another inference.py on this folder would
    try:
        assert run_cli(*args) == 0
        printed = capsys.readouterr().out
        assert f"skipping 0000-a-red-circle: process {os.getpid()}" in printed
        assert sorted(p.name for p in out.glob("*.mp4")) == ["0001-a-blue-square.mp4"]
    finally:
        held.release()
    assert run_cli(*args) == 0
    assert sorted(p.name for p in out.glob("*.mp4")) == ["0000-a-red-circle.mp4", "0001-a-blue-square.mp4"]
    assert not list(out.glob(".*"))  # no claim or temp file left


def test_two_processes_on_one_folder_do_each_prompt_once(folder, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("".join(f"a red circle number {i}\n" for i in range(4)))
    out = tmp_path / "out"
    cmd = [sys.executable, str(REPO / "inference.py"), "--model", str(folder), "--data_path", str(prompts),
           "--output-dir", str(out), "--total-blocks", "1", "--device", "cpu"]
    procs = [subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [r[1][-2000:] for r in results]
    planned = sum(int(line.split("] ")[1].split(" of ")[0]) for stdout, _ in results for line in stdout.splitlines()
                  if " prompts to generate " in line)
    skipped = sum(line.startswith("skipping ") for stdout, _ in results for line in stdout.splitlines())
    assert planned - skipped == 4  # each prompt generated by exactly one of the two
    assert len(list(out.glob("*.mp4"))) == 4
    assert sorted(json.loads(p.read_text())["prompt_seed"] for p in out.glob("stats_*.json")) == [0, 1, 2, 3]
    assert not list(out.glob(".*"))


def test_leftovers_of_killed_runs_are_swept_but_a_live_claim_is_respected(folder, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    dead_temp = out / ".0000-a-red-circle.mp4.k1ll3d00.tmp.mp4"
    dead_stats = out / ".stats_0000-a-red-circle.json.k1ll3d00.tmp.json"
    stale_claim = outputs.claim_path(out, "0000-a-red-circle")
    live_temp = out / ".0007-other.mp4.l1ve0000.tmp.mp4"
    for path in (dead_temp, dead_stats, live_temp):
        path.write_bytes(b"partial")
    stale_claim.write_text(json.dumps({"pid": 999999999, "host": "here"}))  # its process is gone: no lock held
    live = try_lock(outputs.claim_path(out, "0007-other"))
    try:
        assert run_cli("--model", folder, "--prompt", "a red circle", "--output-dir", out, "--total-blocks", 1) == 0
        assert "removed 3 file(s) an interrupted run left" in capsys.readouterr().out
        assert not dead_temp.exists() and not dead_stats.exists() and live_temp.exists()
        assert (out / "0000-a-red-circle.mp4").is_file()
    finally:
        live.release()


def test_an_interrupted_generation_leaves_no_temp_file_and_releases_its_claim(folder, tmp_path, monkeypatch):
    out = tmp_path / "out"

    def interrupted(self, prompts, request, delivery, overrides=None):
        delivery.on_frames(0, torch.rand(1, 2, 3, 32, 48))  # one block reaches the writer, then Ctrl+C
        raise KeyboardInterrupt

    from pipeline.inference import CausalInferencePipeline
    monkeypatch.setattr(CausalInferencePipeline, "generate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_cli("--model", folder, "--prompt", "a red circle", "--output-dir", out, "--total-blocks", 2)
    assert not out.exists()  # no temp file, no claim, and not the folder this run created
    out.mkdir()
    with pytest.raises(KeyboardInterrupt):  # into a folder that was there before: it stays, empty
        run_cli("--model", folder, "--prompt", "a red circle", "--output-dir", out, "--total-blocks", 2)
    assert list(out.iterdir()) == []


def test_a_full_disk_is_one_line_and_leaves_nothing(folder, tmp_path, monkeypatch, capsys):
    import errno

    import utils.video
    out = tmp_path / "out"

    def full(path, obj, indent=2):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))
    monkeypatch.setattr(utils.video, "write_json_atomic", full)
    assert run_cli("--model", folder, "--prompt", "a red circle", "--output-dir", out, "--total-blocks", 1) == 2
    assert "No space left on device" in last_error(capsys)
    assert not list(out.glob(".*"))


# ------------------------------------------------------------------------------------------ errors vs bugs
def test_a_bug_keeps_its_traceback(folder, tmp_path, monkeypatch):
    def broken(args, schedule=None):
        raise KeyError("an internal lookup went wrong")
    monkeypatch.setattr(inference, "collect_prompts", broken)
    with pytest.raises(KeyError, match="an internal lookup"):
        run_cli("--model", folder, "--prompt", "x", "--output-dir", tmp_path / "out")


def test_the_command_exits_2_with_one_line_for_a_user_error_and_1_with_a_traceback_for_a_bug(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    user = subprocess.run([sys.executable, str(REPO / "inference.py"), "--prompt", "", "--output-dir",
                           str(tmp_path / "o")], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    expected = "error: --prompt is empty; give the prompt text (--prompt) or a prompt file (--data_path)"
    assert user.returncode == 2 and user.stderr.strip().splitlines() == [expected]
    bug = subprocess.run([sys.executable, "-c", "import sys, inference\n"
                          "inference.collect_prompts = lambda args, schedule=None: {}['missing']\n"
                          "sys.exit(inference.main(sys.argv[1:]))", "--prompt", "x", "--output-dir",
                          str(tmp_path / "o")], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert bug.returncode == 1 and "Traceback" in bug.stderr and "KeyError: 'missing'" in bug.stderr


def test_sigterm_mid_video_leaves_no_temp_file_or_claim(folder, tmp_path):
    """A scheduler's SIGTERM during a video: the command unwinds (exit 143), the half-written mp4 and the claim go."""
    out = tmp_path / "out"
    script = (
        "import signal, sys, time, torch, inference\n"
        "from pipeline.inference import CausalInferencePipeline\n"
        "def slow(self, prompts, request, delivery, overrides=None):\n"
        "    delivery.on_frames(0, torch.rand(1, 2, 3, 32, 48))\n"
        "    print('writing', flush=True)\n"
        "    time.sleep(120)\n"
        "CausalInferencePipeline.generate = slow\n"
        "signal.signal(signal.SIGTERM, inference.exit_on_sigterm)\n"
        "sys.exit(inference.main(sys.argv[1:]))\n")
    proc = subprocess.Popen([sys.executable, "-c", script, "--model", str(folder), "--prompt", "a red circle",
                             "--output-dir", str(out), "--total-blocks", "2"], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
    try:
        for line in proc.stdout:
            if line.startswith("writing"):
                break
        assert any(p.name.endswith(".claim") for p in out.iterdir())  # generating under its claim
        deadline = time.monotonic() + 30
        while not any(p.name.endswith(".tmp.mp4") for p in out.iterdir()):  # the encoder thread has begun the file
            assert time.monotonic() < deadline, "no temp video appeared"
            time.sleep(0.05)
        proc.terminate()
        assert proc.wait(timeout=60) == 143
    finally:
        proc.kill()
    assert not out.exists()  # no temp file, no claim, and not the folder this run created


def test_every_sample_of_a_prompt_is_claimed(folder, tmp_path, capsys):
    """With several samples each output has its own temp files, so each is claimed: one held sample holds the
    prompt, and the sweep of another process leaves that sample's temp file alone."""
    out = tmp_path / "out"
    out.mkdir()
    live_temp = out / ".0000-a-red-circle-s1.mp4.l1ve0000.tmp.mp4"
    live_temp.write_bytes(b"partial")
    held = try_lock(outputs.claim_path(out, "0000-a-red-circle-s1"))
    try:
        assert run_cli("--model", folder, "--prompt", "a red circle", "--output-dir", out, "--total-blocks", 1,
                       "--num_samples", 2) == 0
        assert f"skipping 0000-a-red-circle-s0: process {os.getpid()}" in capsys.readouterr().out
        assert live_temp.exists() and not [p for p in out.glob("*.mp4") if not p.name.startswith(".")]
        assert sorted(p.name for p in out.iterdir()) == [".0000-a-red-circle-s1.claim", live_temp.name]
    finally:
        held.release()


def test_the_gpu_memory_limit_is_the_cards_share_and_checked_against_its_size(monkeypatch):
    import torch

    import inference
    card = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device: type("Props", (), {"total_memory": 80 * 2**30})())
    fractions = []
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda f, device: fractions.append((f, device)))
    inference.limit_gpu_memory(card, 24)
    assert fractions == [(0.3, card)]
    for bad in (0, -1, 81):
        with pytest.raises(inference.UsageError, match="must be above 0 and at most the card's 80.0 GiB"):
            inference.limit_gpu_memory(card, bad)
    assert len(fractions) == 1

