"""The inference pipeline and the `inference.py` command on a tiny random model folder (CPU)."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import inference
from pipeline.inference import CallOverrides, CausalInferencePipeline, CausalSettings, Delivery, VideoRequest
from pipeline.loading import model_folder
from pipeline.rollout import RolloutOptions, recache, rollout
from pipeline.schedule import FlowMatchSchedule
from tests.tiny import save_tiny_model_folder
from utils.video import read_video

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_tiny_model_folder(tmp_path_factory.mktemp("model") / "tiny")


def load_pipe(folder, **settings) -> CausalInferencePipeline:
    generator, causal = model_folder.load_transformer(folder)
    schedule = FlowMatchSchedule(5.0)
    st = CausalSettings(steps=schedule.warp(causal["denoising_step_list"]).tolist(),
                        frames_per_block=causal["num_frame_per_block"], **settings)
    text = model_folder.load_text_encoder(folder, generator.config.text_len)
    return CausalInferencePipeline(generator, text, model_folder.load_codec(folder), schedule, st)


def run_cli(*argv) -> int:
    return inference.main([str(a) for a in argv])


def test_prompt_file_to_mp4_and_stats_then_resume(folder, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle moves left\n\n  a blue square moves up  \n", encoding="utf-8")
    out = tmp_path / "out"
    assert run_cli("--model", folder, "--data_path", prompts, "--output-dir", out, "--total-blocks", 3) == 0
    videos = sorted(out.glob("*.mp4"))
    assert [v.name for v in videos] == ["0000-a-red-circle-moves-left.mp4", "0001-a-blue-square-moves-up.mp4"]
    frames, fps = read_video(videos[0])
    assert frames.shape == (6, 32, 48, 3) and fps == pytest.approx(8)
    stats = json.loads((out / "stats_0000-a-red-circle-moves-left.json").read_text())
    assert stats["pixel_frames"] == 6 and len(stats["block_ms"]) == 3 and stats["time_to_first_frame_ms"] > 0
    assert stats["prompt"] == "a red circle moves left" and stats["steps"][1] == pytest.approx(937.5)
    mtime = videos[0].stat().st_mtime_ns
    capsys.readouterr()
    assert run_cli("--model", folder, "--data_path", prompts, "--output-dir", out, "--total-blocks", 3) == 0
    assert "0 of 2 prompts to generate (2 done)" in capsys.readouterr().out
    assert videos[0].stat().st_mtime_ns == mtime


def test_fp8_flag_writes_a_close_video_and_warns_when_emulated(folder, tmp_path, capsys):
    args = ("--model", folder, "--prompt", "a red circle moves left", "--total-blocks", 2)
    assert run_cli(*args, "--output-dir", tmp_path / "plain") == 0
    capsys.readouterr()
    assert run_cli(*args, "--output-dir", tmp_path / "fp8", "--fp8") == 0
    assert "--fp8 on cpu is emulated" in capsys.readouterr().out
    (plain,), (fp8,) = sorted((tmp_path / "plain").glob("*.mp4")), sorted((tmp_path / "fp8").glob("*.mp4"))
    a, b = read_video(plain)[0].float(), read_video(fp8)[0].float()
    assert a.shape == b.shape and 0 < (a - b).abs().mean() < 12  # uint8 frames: close, not equal


def test_same_seed_same_video_bitwise(folder):
    pipe = load_pipe(folder)
    runs = [pipe.generate(["a cat jumps"], VideoRequest(4, 32, 48, generator=torch.Generator().manual_seed(7)))
            for _ in range(2)]
    assert torch.equal(runs[0].latents, runs[1].latents) and torch.equal(runs[0].video, runs[1].video)
    other = pipe.generate(["a cat jumps"], VideoRequest(4, 32, 48, generator=torch.Generator().manual_seed(8)))
    assert not torch.equal(other.latents, runs[0].latents)


def test_streamed_frames_equal_full_decode(folder):
    pipe = load_pipe(folder)
    seen = []
    request = VideoRequest(6, 32, 48, generator=torch.Generator().manual_seed(0))
    result = pipe.generate(["a dog"], request, Delivery(on_frames=lambda i, px: seen.append(i)))
    full = pipe.codec.decode_to_pixel(result.latents) * 0.5 + 0.5
    torch.testing.assert_close(result.video, full.clamp(0, 1))
    assert seen == [0, 0, 1, 2]  # the first frame is handed out on its own, then the rest of block 0
    pipe.first_frame_alone = False
    seen.clear()
    again = pipe.generate(["a dog"], dataclasses.replace(request, generator=torch.Generator().manual_seed(0)),
                          Delivery(on_frames=lambda i, px: seen.append(i)))
    torch.testing.assert_close(again.video, result.video)
    assert seen == [0, 1, 2]


def test_long_rollout_with_window_and_sink_is_finite_and_bounded(folder):
    pipe = load_pipe(folder, window_frames=4, sink_frames=2, rope="relative", max_frames_without_window=6)
    result = pipe.generate(["a cat"], VideoRequest(40, 32, 48, generator=torch.Generator().manual_seed(0)))
    assert result.latents.shape[1] == 40 and torch.isfinite(result.latents).all()
    assert pipe._kv.capacity == 4 * pipe._kv.tokens_per_frame  # memory bounded by the window, not the length
    with pytest.raises(ValueError, match="rolling window"):
        load_pipe(folder, max_frames_without_window=6).generate(["a cat"], VideoRequest(8, 32, 48))


def test_per_call_settings_match_a_pipeline_built_with_them_and_leave_the_pipeline_as_it_is(folder):
    rolling = dict(window_frames=4, sink_frames=2, rope="relative", max_frames_without_window=6)
    built = load_pipe(folder, **rolling).generate(["a cat"], VideoRequest(12, 32, 48,
                                                                         generator=torch.Generator().manual_seed(3)))
    pipe = load_pipe(folder, max_frames_without_window=6)
    before = (pipe.settings, pipe.codec, pipe.denoiser)
    per_call = pipe.generate(["a cat"], VideoRequest(12, 32, 48, generator=torch.Generator().manual_seed(3)),
                             overrides=CallOverrides(settings=load_pipe(folder, **rolling).settings))
    torch.testing.assert_close(per_call.latents, built.latents, rtol=0, atol=0)
    assert (pipe.settings, pipe.codec, pipe.denoiser) == before
    with pytest.raises(ValueError, match="rolling window"):  # the pipeline's own settings still hold
        pipe.generate(["a cat"], VideoRequest(12, 32, 48))


def test_video_extension_keeps_the_given_frames(folder):
    pipe = load_pipe(folder)
    prefix = torch.randn(1, 2, 12, 16, 24).clamp(-2, 2)
    result = pipe.generate(["a cat"], VideoRequest(4, 32, 48, initial_latent=prefix,
                                                   generator=torch.Generator().manual_seed(0)))
    assert result.latents.shape[1] == 6 and torch.equal(result.latents[:, :2], prefix)
    assert result.video.shape[1] == 6


def test_image_to_video_preserves_first_frame(folder, tmp_path):
    import numpy as np
    from PIL import Image
    image = np.zeros((32, 48, 3), dtype=np.uint8)
    image[:, :24] = (200, 30, 30)
    Image.fromarray(image).save(tmp_path / "first.png")
    out = tmp_path / "out"
    assert run_cli("--model", folder, "--prompt", "a red square", "--i2v", "--image", tmp_path / "first.png",
                   "--output-dir", out, "--total-blocks", 2, "independent_first_frame=true") == 0
    frames, _ = read_video(next(out.glob("*.mp4")))
    assert frames.shape[0] == 1 + 2 * 2  # the image frame, then two blocks of two frames
    assert (frames[0].float() - torch.from_numpy(image).float()).abs().mean() < 8  # codec + H.264 round trip


def test_i2v_image_text_pair_folder_of_the_original(folder, tmp_path):
    import json

    import numpy as np
    from PIL import Image
    data = tmp_path / "pairs"
    (data / "16_9").mkdir(parents=True)
    colours = {"red.png": (200, 30, 30), "blue.png": (30, 30, 200)}
    for name, colour in colours.items():
        image = np.zeros((64, 96, 3), dtype=np.uint8)
        image[:, :] = (255, 255, 255)
        image[16:48, 24:72] = colour  # the crop box below cuts out exactly this rectangle
        Image.fromarray(image).save(data / "16_9" / name)
    items = [{"file_name": name, "caption": f"a {name[:-4]} square", "type": "image",
              "target_crop": {"target_bbox": [24, 16, 72, 48], "target_ratio": "16_9"}} for name in colours]
    (data / "target_crop_info_16_9.json").write_text(json.dumps(items))
    out = tmp_path / "out"
    assert run_cli("--model", folder, "--i2v", "--data_path", data, "--output-dir", out, "--total-blocks", 1,
                   "independent_first_frame=true") == 0
    videos = sorted(out.glob("*.mp4"))
    assert [v.name for v in videos] == ["0000-a-red-square.mp4", "0001-a-blue-square.mp4"]
    for video, colour in zip(videos, colours.values()):
        frames, _ = read_video(video)
        first = frames[0].float().reshape(-1, 3).mean(0)
        assert (first - torch.tensor(colour, dtype=torch.float32)).abs().max() < 12  # the crop, not the white border


def test_i2v_pair_folder_errors_name_the_problem(folder, tmp_path, capsys):
    data = tmp_path / "pairs"
    data.mkdir()
    assert run_cli("--model", folder, "--i2v", "--data_path", data, "--output-dir", tmp_path / "o",
                   "independent_first_frame=true") == 2
    assert "exactly one target_crop_info_<ratio>.json" in capsys.readouterr().err
    (data / "target_crop_info_1_1.json").write_text('[{"file_name": "missing.png", "caption": "a cat"}]')
    assert run_cli("--model", folder, "--i2v", "--data_path", data, "--output-dir", tmp_path / "o",
                   "independent_first_frame=true") == 2
    err = capsys.readouterr().err
    assert "item 0" in err and "missing.png" in err
    assert run_cli("--model", folder, "--data_path", data, "--output-dir", tmp_path / "o") == 2
    assert "need --i2v" in capsys.readouterr().err.replace("needs", "need")
    assert not (tmp_path / "o").exists() or not list((tmp_path / "o").glob("*.mp4"))


def test_prompt_switch_recaches_under_the_new_prompt(folder):
    pipe = load_pipe(folder)
    a, b = pipe.encode_prompts(["a cat"]), pipe.encode_prompts(["a dog"])
    noise = torch.randn(1, 6, 12, 16, 24, generator=torch.Generator().manual_seed(3))
    steps = pipe.settings.steps
    fresh = lambda x: torch.zeros_like(x)  # noqa: E731 - deterministic re-noising for the comparison
    cache = pipe.generator.new_kv_cache(1, 16, 24, 6)
    options = RolloutOptions(steps=steps, frames_per_block=2, noise_fn=fresh)
    switched = rollout(pipe.denoiser, noise, [(0, a), (2, b)], cache, options).latents
    only_a = rollout(pipe.denoiser, noise[:, :4], a, pipe.generator.new_kv_cache(1, 16, 24, 6), options).latents
    torch.testing.assert_close(switched[:, :4], only_a)  # blocks before the switch are untouched
    manual = pipe.generator.new_kv_cache(1, 16, 24, 6)
    recache(pipe.denoiser, manual, [(0, only_a[:, :2]), (2, only_a[:, 2:4])], b)
    rest = rollout(pipe.denoiser, noise[:, 4:], b, manual, dataclasses.replace(options, start_frame=4)).latents
    torch.testing.assert_close(switched[:, 4:], rest)


def test_live_prompt_source_switches_like_the_same_schedule(folder):
    pipe = load_pipe(folder)
    asked = []

    def source(block: int) -> str:  # what a prompt box would answer at each block boundary
        asked.append(block)
        return "a cat" if block < 2 else "a dog"

    live = pipe.generate(["x"], VideoRequest(8, 32, 48, prompt_source=source,
                                             generator=torch.Generator().manual_seed(5)))
    scheduled = pipe.generate(["x"], VideoRequest(8, 32, 48, prompt_schedule=[(0, "a cat"), (2, "a dog")],
                                                  generator=torch.Generator().manual_seed(5)))
    assert asked == [0, 1, 2, 3]  # once per block, in order
    assert live.stats["prompt_switches"] == [(0, "a cat"), (2, "a dog")]
    torch.testing.assert_close(live.latents, scheduled.latents, rtol=0, atol=0)
    unswitched = pipe.generate(["a cat"], VideoRequest(8, 32, 48, generator=torch.Generator().manual_seed(5)))
    torch.testing.assert_close(live.latents[:, :4], unswitched.latents[:, :4], rtol=0, atol=0)
    assert not torch.equal(live.latents[:, 4:], unswitched.latents[:, 4:])
    with pytest.raises(ValueError, match="not both"):
        pipe.generate(["x"], VideoRequest(8, 32, 48, prompt_source=source, prompt_schedule=[(0, "a")]))


def test_should_stop_ends_between_blocks_with_the_frames_so_far(folder):
    pipe = load_pipe(folder)
    full = pipe.generate(["a cat"], VideoRequest(8, 32, 48, generator=torch.Generator().manual_seed(1)))
    seen = []
    stopped = pipe.generate(["a cat"], VideoRequest(8, 32, 48, generator=torch.Generator().manual_seed(1)),
                            Delivery(keep_video=False,
                                     on_frames=lambda i, px: seen.append((i, px)),  # block 0 may come in two calls
                                     should_stop=lambda: len({i for i, _ in seen}) == 2))
    assert stopped.stats["stopped"] and not full.stats["stopped"]
    assert stopped.latents.shape[1] == 4 and len(stopped.stats["block_ms"]) == 2
    torch.testing.assert_close(stopped.latents, full.latents[:, :4], rtol=0, atol=0)
    assert stopped.video is None and stopped.stats["pixel_frames"] == 4  # streamed, not kept
    torch.testing.assert_close(torch.cat([px for _, px in seen], dim=1), full.video[:, :4])
    nothing = pipe.generate(["a cat"], VideoRequest(8, 32, 48), Delivery(should_stop=lambda: True))
    assert nothing.latents.shape[1] == 0 and nothing.video is None and nothing.stats["stopped"]


def test_latent_frames_for_blocks(folder):
    pipe = load_pipe(folder)
    assert pipe.latent_frames_for_blocks(3) == 6
    pipe.settings.independent_first_frame = True  # the first frame is a block of its own, unless given
    assert pipe.latent_frames_for_blocks(3) == 7 and pipe.latent_frames_for_blocks(3, with_initial_latent=True) == 6
    with pytest.raises(ValueError, match=">= 1"):
        pipe.latent_frames_for_blocks(0)


def test_schedule_from_cli(folder, tmp_path):
    schedule = tmp_path / "schedule.txt"
    schedule.write_text("0: a red circle\n2: a blue square\n")
    out = tmp_path / "out"
    assert run_cli("--model", folder, "--prompt", "a red circle", "--prompt-schedule", schedule,
                   "--output-dir", out, "--total-blocks", 3) == 0
    stats = json.loads(next(out.glob("stats_*.json")).read_text())
    assert stats["prompt_schedule"] == [[0, "a red circle"], [2, "a blue square"]]


def test_a_schedule_alone_makes_one_video_named_after_its_first_prompt(folder, tmp_path):
    """Without --prompt or --data_path the schedule is the video, not the built-in prompts' four copies of it."""
    out = tmp_path / "out"
    assert run_cli("--model", folder, "--prompt-schedule", "0: a red circle\n2: a blue square",
                   "--output-dir", out, "--total-blocks", 3) == 0
    assert sorted(p.name for p in out.glob("*.mp4")) == ["0000-a-red-circle.mp4"]
    stats = json.loads((out / "stats_0000-a-red-circle.json").read_text())
    assert stats["prompt"] == "a red circle" and stats["prompt_schedule"] == [[0, "a red circle"], [2, "a blue square"]]


def test_a_model_root_with_nothing_to_load_from_it_is_an_error(tmp_path, capsys):
    """--model-root alone would run the bundled model and ignore the Wan weights it names."""
    assert run_cli("--model-root", tmp_path, "--prompt", "x", "--output-dir", tmp_path / "out") == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"error: --model-root {tmp_path} is the folder of the Wan weights that --checkpoint_path")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@pytest.mark.parametrize("argv, message", [
    (["--data_path", "{tmp}/missing.txt"], "missing.txt"),
    (["--data_path", "{tmp}/empty.txt"], "empty.txt"),
    (["--prompt", "x", "--height", "30"], "multiples of"),
    (["--prompt", "x", "lr_typo=1"], "lr_typo"),
    (["--prompt", "x", "--total-blocks", "20"], "rolling window"),
    (["--prompt", "x", "--num_output_frames", "5"], "5 latent frames cannot be split into blocks of 2"),
    (["--prompt", "x", "--checkpoint_path", "{tmp}/garbage.pt"], "garbage.pt"),
    (["--prompt", "x", "attention_backend=fastest"], "attention_backend"),
    (["--prompt", "x", "--cuda-graphs", "--device", "cpu"], "--cuda-graphs records CUDA graphs; this run is on cpu"),
    (["--prompt", "x", "--use_ema"], "--use_ema picks generator_ema from a --checkpoint_path (.pt or training"),
])
def test_bad_inputs_are_one_line_errors_and_write_nothing(folder, tmp_path, capsys, argv, message):
    (tmp_path / "empty.txt").write_text("\n \n")
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    out = tmp_path / "out"
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert run_cli("--model", folder, "--output-dir", out, *argv) == 2
    err = capsys.readouterr().err.strip()
    last = err.splitlines()[-1]
    assert last.startswith("error:") and message in last and "Traceback" not in err
    assert not out.exists() or not any(out.iterdir())


def test_attention_backend_flag_pins_the_process_backend(folder, tmp_path, capsys):
    """--attention-backend (config key attention_backend) is set process-wide before generating; the key-halves
    back-end is plain SDPA on the CPU, so the video is the default one; a flash-attn back-end without flash-attn is a
    one-line error."""
    from model import attention
    out_default, out_halves = tmp_path / "default", tmp_path / "halves"
    try:
        assert run_cli("--model", folder, "--prompt", "a red circle", "--output-dir", out_default,
                       "--total-blocks", 2) == 0
        assert attention._backend == "auto"
        assert run_cli("--model", folder, "--prompt", "a red circle", "--output-dir", out_halves, "--total-blocks", 2,
                       "--attention-backend", "sdpa_cudnn_halves") == 0
        assert attention._backend == "sdpa_cudnn_halves"
        if attention._flash_attn_func() is None:
            capsys.readouterr()
            assert run_cli("--model", folder, "--prompt", "x", "--output-dir", tmp_path / "flash",
                           "--attention-backend", "flash_attn_halves") == 2
            assert "flash_attn_halves: none of flash-attn" in capsys.readouterr().err
    finally:
        attention.set_attention_backend("auto")
    (a, _), (b, _) = (read_video(next(d.glob("*.mp4"))) for d in (out_default, out_halves))
    assert a.shape == b.shape and (a == b).all()


def test_bare_run_without_default_model_says_what_it_needs(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(inference, "DEFAULT_MODEL", tmp_path / "absent")
    assert inference.main([]) == 2
    assert "--model" in capsys.readouterr().err


@pytest.mark.distributed
def test_torchrun_shards_prompts_over_two_ranks_exactly_once(folder, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(f"a cat number {i}" for i in range(5)) + "\n")
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517",
           str(REPO / "inference.py"), "--model", str(folder), "--data_path", str(prompts), "--output-dir", str(out),
           "--total-blocks", "1", "--device", "cpu"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    indices = sorted(int(p.name[:4]) for p in out.glob("*.mp4"))
    assert indices == [0, 1, 2, 3, 4]
