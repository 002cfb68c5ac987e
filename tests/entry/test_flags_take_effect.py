"""Every command-line flag takes effect or is an error naming it: a flag given where it cannot act (another flag or
another kind of model decides instead) is refused with a one-line reason, never accepted and dropped."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import demo
import inference
import train
from scripts import evaluate_shapes, export_hf, generate_ode_pairs, shapes_world
from tests.tiny import save_tiny_model_folder
from utils.errors import InputError

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_tiny_model_folder(tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture
def no_model_load(monkeypatch):
    """The errors below are decided by the command line alone, before any weights load."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the flag was judged")
    monkeypatch.setattr(inference, "build_pipeline", refuse)


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


# ---------------------------------------------------------------------------------------------------- inference.py
def test_video_with_an_image_prefix_is_an_error_not_a_dropped_video(tmp_path, capsys, no_model_load):
    argv = ["--video", "clip.mp4", "--i2v", "--image", "first.png", "--prompt", "x", "--output-dir", tmp_path / "o"]
    assert inference.main([str(a) for a in argv]) == 2
    assert "--video extends a video, --i2v/--image start from one image" in one_line_error(capsys)


@pytest.mark.parametrize("extra", [["--device", "cpu"], ["--text-encoder-device", "cpu"]])
def test_offloading_a_text_encoder_that_runs_on_the_cpu_is_an_error(tmp_path, capsys, no_model_load, extra):
    argv = ["--offload-text-encoder", *extra, "--prompt", "x", "--output-dir", tmp_path / "o"]
    assert inference.main([str(a) for a in argv]) == 2
    assert "--offload-text-encoder returns the text encoder's GPU memory" in one_line_error(capsys)


def test_model_root_with_a_complete_model_folder_is_an_error(folder, tmp_path, capsys):
    argv = ["--model", folder, "--model-root", tmp_path / "wan", "--prompt", "x", "--output-dir", tmp_path / "o"]
    assert inference.main([str(a) for a in argv]) == 2
    err = one_line_error(capsys)
    assert f"--model-root {tmp_path / 'wan'}: the model folder {folder} holds every part itself" in err
    assert not (tmp_path / "o").exists()


# The flag and the config key (either spelling) name the same folder: where one cannot act, neither can the other.
@pytest.mark.parametrize("given", ["--model-root", "model.model_root=", "model_root="])
def test_a_model_root_for_the_bundled_model_is_an_error_however_given(tmp_path, capsys, given):
    root = [given, str(tmp_path / "wan")] if given.startswith("--") else [f"{given}{tmp_path / 'wan'}"]
    assert inference.main([*root, "--prompt", "x", "--output-dir", str(tmp_path / "o")]) == 2
    assert f"{' '.join(root)} is the folder of the Wan weights that --checkpoint_path or --config_path load" \
        in one_line_error(capsys)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("given", ["model.model_root=", "model_root="])
def test_a_model_root_override_with_a_complete_model_folder_is_an_error(folder, tmp_path, capsys, given):
    override = f"{given}{tmp_path / 'wan'}"
    assert inference.main(["--model", str(folder), override, "--prompt", "x", "--output-dir", str(tmp_path / "o")]) == 2
    assert f"{override}: the model folder {folder} holds every part itself" in one_line_error(capsys)
    assert not (tmp_path / "o").exists()


def test_cuda_graphs_on_a_cpu_run_is_an_error_not_silently_off(folder):
    """Checked where the device is picked, which inference.py and demo.py both do before loading."""
    for command in (inference, demo):
        args = command.build_parser().parse_intermixed_args(["--model", str(folder), "--cuda-graphs",
                                                             "--device", "cpu"])
        with pytest.raises(inference.UsageError, match="--cuda-graphs records CUDA graphs; this run is on cpu"):
            inference.pick_device(args)


def test_decode_frames_per_call_without_a_wan_vae_is_an_error(folder, tmp_path, capsys):
    argv = ["--model", folder, "--decode-frames-per-call", "2", "--prompt", "x", "--output-dir", tmp_path / "o"]
    assert inference.main([str(a) for a in argv]) == 2
    assert "--decode-frames-per-call 2 sets the Wan VAE's decoder calls; this model decodes with PixelShuffleCodec" \
        in one_line_error(capsys)
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").glob("*.mp4"))


def test_demo_decode_frames_per_call_counts_a_wan_vae_among_its_decoders():
    class WanVAE:  # the demo's page may pick it per video: the flag then acts on those videos
        def stream_decoder(self, frames_per_call=None):
            return None

    class TAEHVCodec:
        def stream_decoder(self):
            return None

    args = demo.build_parser().parse_intermixed_args(["--decode-frames-per-call", "2"])
    inference.check_decode_frames_flag(args, [TAEHVCodec(), WanVAE()])
    with pytest.raises(inference.UsageError, match="this model decodes with TAEHVCodec"):
        inference.check_decode_frames_flag(args, [TAEHVCodec()])


def test_the_pixel_decoder_key_on_a_model_with_a_wan_vae_is_an_error(tmp_path):
    from tests.entry.test_speed_benchmark import benchmark_module
    wan = tmp_path / "tiny_wan"
    benchmark_module("random_wan_folder").main(["--tiny", "--out", str(wan), "--device", "cpu"])
    args = inference.build_parser().parse_intermixed_args(["--model", str(wan), "inference.decoder=pixel"])
    with pytest.raises(inference.UsageError, match=rf"inference.decoder pixel is the shapes world's codec; the model "
                                                   rf"{wan} decodes with WanVAE"):
        inference.build_pipeline(args, torch.device("cpu"), torch.float32)


def test_a_taehv_path_the_run_does_not_decode_with_is_an_error(folder, tmp_path, capsys):
    argv = ["--model", folder, "inference.taehv_path=taew2_1.pth", "--prompt", "x", "--output-dir", tmp_path / "o"]
    assert inference.main([str(a) for a in argv]) == 2
    assert "inference.taehv_path taew2_1.pth is read with inference.decoder taehv (or --preset taehv); this run " \
           "decodes with pixel" in one_line_error(capsys)


@pytest.mark.parametrize("extra", [[], ["--sequence-parallel-size", "1"]])
def test_sequence_parallel_with_one_process_per_video_is_an_error(tmp_path, capsys, no_model_load, extra):
    argv = ["--parallel", "sequence", *extra, "--prompt", "x", "--output-dir", tmp_path / "o"]
    assert inference.main([str(a) for a in argv]) == 2
    assert "--parallel sequence splits each video over several processes; here each has one (1 process(es), " \
           "sequence-parallel size 1)" in one_line_error(capsys)


@pytest.mark.parametrize("argv, use_ema", [
    (["generator_ckpt=sf.pt", "generator_ckpt_ema=true"], True),  # the config's checkpoint, its EMA weights
    (["generator_ckpt=sf.pt"], False),
    (["--checkpoint_path", "other.pt", "generator_ckpt=sf.pt", "generator_ckpt_ema=true"], False),  # the flag's file
    (["--checkpoint_path", "other.pt", "--use_ema"], True),
])
def test_the_config_checkpoints_ema_choice_reaches_the_wan_loader(monkeypatch, tmp_path, argv, use_ema):
    from pipeline.loading import wan_components
    seen = {}

    class Loaded(Exception):
        pass

    def load_wan_dit(folder, *, checkpoint=None, use_ema=False, **kwargs):
        seen.update(checkpoint=checkpoint, use_ema=use_ema)
        raise Loaded

    monkeypatch.setattr(wan_components, "load_wan_dit", load_wan_dit)
    config = str(REPO / "configs" / "inference_official.yaml")
    (tmp_path / "Wan2.1-T2V-1.3B").mkdir()  # the loader itself is replaced: an empty Wan folder is enough
    args = inference.build_parser().parse_intermixed_args(["--config_path", config, "--model-root", str(tmp_path),
                                                           *argv])
    with pytest.raises(Loaded):
        inference.build_pipeline(args, torch.device("cpu"), torch.float32)
    assert seen["use_ema"] is use_ema
    assert seen["checkpoint"] == ("other.pt" if "--checkpoint_path" in argv else "sf.pt")


# ---------------------------------------------------------------------------------------------------------- demo.py
def test_demo_taehv_path_over_a_pipeline_that_decodes_with_taehv_is_an_error(tmp_path):
    class TAEHVCodec:  # the name the demo knows a TAEHV decoder by
        pass

    args = demo.build_parser().parse_intermixed_args(["--taehv-path", str(tmp_path / "other.pth")])
    cfg = SimpleNamespace(inference=SimpleNamespace(taehv_path="checkpoints/taew2_1.pth"))
    with pytest.raises(inference.UsageError, match=r"--taehv-path .*other\.pth: the model already decodes with TAEHV "
                                                   r"from taehv_path checkpoints/taew2_1\.pth"):
        demo.load_decoders(args, cfg, SimpleNamespace(codec=TAEHVCodec()), "cpu", None)


# ---------------------------------------------------------------------------------------------------------- train.py
@pytest.mark.parametrize("wandb_off", [["--disable-wandb"], ["logging.disable_wandb=true"]])
def test_a_wandb_folder_with_wandb_off_is_an_error(tmp_path, wandb_off):
    args = train.parse_args(["--config_path", str(REPO / "configs" / "self_forcing_dmd.yaml"), "--logdir",
                             str(tmp_path / "run"), "--wandb-save-dir", str(tmp_path / "wandb"), *wandb_off])
    with pytest.raises(InputError, match=r"--wandb-save-dir .*wandb is off"):
        train.load_run_config(args)


# ----------------------------------------------------------------------------------------------------- export_hf.py
def test_export_private_without_push_to_hub_is_an_error(tmp_path, capsys):
    from tests.entry.test_export import fake_self_forcing_pt
    fake_self_forcing_pt(tmp_path / "sf.pt")
    argv = [str(tmp_path / "sf.pt"), "--output", str(tmp_path / "out"), "--num-heads", "2", "--text-len", "16",
            "--private"]
    assert export_hf.main(argv) == 2
    assert "--private makes the Hub repository of --push-to-hub private" in one_line_error(capsys)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flag, offset", [("--num-heads", 1), ("--text-len", 8)])
def test_export_shape_flags_against_a_stored_config_are_errors(folder, tmp_path, capsys, flag, offset):
    weights = tmp_path / "weights"
    shutil.copytree(folder / "transformer", weights)
    stored = json.loads((weights / "config.json").read_text())
    stored_value = stored["num_heads" if flag == "--num-heads" else "text_len"]
    source = next(weights.glob("*.safetensors"))
    assert export_hf.main([str(source), "--output", str(tmp_path / "out"), flag, str(stored_value + offset)]) == 2
    assert f"{flag} {stored_value + offset}: {source} states its own ({stored_value})" in one_line_error(capsys)
    # The value the source states is no contradiction.
    assert export_hf.main([str(source), "--output", str(tmp_path / "out"), flag, str(stored_value)]) == 0


def test_export_weights_generator_on_a_one_set_file_is_an_error(folder, tmp_path, capsys):
    source = next((folder / "transformer").glob("*.safetensors"))
    assert export_hf.main([str(source), "--output", str(tmp_path / "out"), "--weights", "generator"]) == 2
    assert f"--weights generator picks the generator entry of a Self-Forcing checkpoint or folder; {source} holds " \
           "one set of weights" in one_line_error(capsys)


# --------------------------------------------------------------------------------------------- generate_ode_pairs.py
@pytest.mark.parametrize("flag", ["--model-root", "--teacher-name"])
def test_ode_pairs_wan_root_flags_with_an_explicit_teacher_are_errors(folder, tmp_path, capsys, flag):
    (tmp_path / "prompts.txt").write_text("a red circle\n")
    argv = ["--teacher", str(folder), flag, "Somewhere", "--prompts", str(tmp_path / "prompts.txt"), "--output",
            str(tmp_path / "pairs"), "--num-frames", "2", "--num-steps", "2", "--record", "0", "2", "--device", "cpu"]
    assert generate_ode_pairs.main(argv) == 2
    assert f"{flag} Somewhere locates a teacher under the Wan model root; --teacher {folder}" in one_line_error(capsys)
    assert not (tmp_path / "pairs").exists()


def test_ode_pairs_negative_prompt_without_guidance_is_an_error(tmp_path):
    from pipeline.denoiser import Denoiser
    from pipeline.schedule import FlowMatchSchedule
    from tests.tiny import TinyText, tiny_model
    teacher = Denoiser(tiny_model(1), FlowMatchSchedule(8.0), uniform_timestep=True)
    with pytest.raises(InputError, match=r"negative_prompt \(--negative-prompt\) is the unconditional branch of CFG, "
                                         r"which guidance_scale \(--guidance-scale\) 1 turns off"):
        generate_ode_pairs.generate_ode_pairs(teacher, TinyText(teacher.model.config.text_dim), ["a cat"],
                                              tmp_path / "pairs", latent_shape=(2, 4, 2, 2), num_steps=2,
                                              record_steps=(0, 2), guidance_scale=1.0, negative_prompt="a dog",
                                              progress=False)
    assert not (tmp_path / "pairs").exists()


# ----------------------------------------------------------------------------------------------- evaluate_shapes.py
def test_evaluate_weights_with_a_model_folder_is_an_error(folder, tmp_path, capsys):
    argv = ["--model", str(folder), "--output", str(tmp_path / "eval.json"), "--weights", "raw", "--device", "cpu"]
    assert evaluate_shapes.main(argv) == 2
    assert f"--weights raw picks the generator_ema or generator weights of a --run's stages; the model folder " \
           f"--model {folder} holds one set" in one_line_error(capsys)


def test_evaluate_help_names_the_stages_each_stage_flag_tunes(capsys):
    with pytest.raises(SystemExit):
        evaluate_shapes.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "teacher sampling steps, used by the teacher stage (default: 48)" in text
    assert "steps per block for the teacher_forcing / diffusion_forcing stages only (default: 16)" in text


# -------------------------------------------------------------------------------------------------- shapes_world.py
@pytest.mark.parametrize("flags", [["--force"], ["--resume"], ["--stages", "base"]])
def test_shapes_world_stage_flags_with_a_recipe_are_errors(tmp_path, capsys, flags):
    recipe = REPO / "assets" / "shapes_world" / "recipe.json"
    with pytest.raises(SystemExit) as exit_info:
        shapes_world.main(["--recipe", str(recipe), "--out", str(tmp_path / "o"), *flags])
    assert exit_info.value.code == 2
    assert f"{flags[0]}: for the stages of a standard run; --recipe replays the recipe's own steps" in \
        capsys.readouterr().err
    assert not (tmp_path / "o").exists()
