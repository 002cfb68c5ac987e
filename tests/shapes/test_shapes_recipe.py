"""The shapes-world recipe end to end at smoke size on CPU: every stage runs through train.py, the export loads."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import inference
from pipeline.loading.model_folder import load_transformer
from scripts import shapes_world


@pytest.mark.slow
def test_smoke_recipe_runs_every_stage_and_exports_a_loadable_model(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    monkeypatch.setenv("SHAPES_OVERRIDES", "sample_every=3")  # every stage also draws its sample videos
    assert shapes_world.main(["--out", str(out), "--size", "smoke"]) == 0
    # The optional long-rollout stage, named on its own, continues the finished DMD stage.
    assert shapes_world.main(["--out", str(out), "--size", "smoke", "--stages", "dmd_long"]) == 0
    for stage in ("teacher", "dmd", "teacher_forcing"):  # bidirectional, few-step causal, many-step causal
        samples = sorted((out / stage / "logs" / "samples").glob("step_000003-*.mp4"))
        assert len(samples) == 2, stage
    for stage in shapes_world.TRAIN_STAGES:  # every training recipe of configs/shapes
        assert (out / stage / "generator.safetensors").is_file(), stage
        metrics = [json.loads(line) for line in (out / stage / "logs" / "metrics.jsonl").read_text().splitlines()]
        losses = [v for m in metrics for k, v in m.items() if k.endswith("_loss")]
        assert losses and all(torch.isfinite(torch.tensor(losses))), stage
    index = json.loads((out / "ode_pairs" / "index.json").read_text())
    assert index["num_pairs"] == shapes_world.SMOKE_ODE_PAIRS["num_prompts"]
    model, causal = load_transformer(out / "export")
    factor = json.loads((out / "export" / "codec" / "config.json").read_text())["spatial_factor"]
    assert causal["num_frame_per_block"] == 3 and model.config.in_dim == 3 * factor**2
    # The generator changed during distillation, the teacher did not take its place.
    from safetensors.torch import load_file
    before = load_file(str(out / "ode_init" / "generator.safetensors"))
    after = load_file(str(out / "dmd" / "generator.safetensors"))
    assert any(not torch.equal(before[k], after[k]) for k in before)
    capsys.readouterr()
    assert inference.main(["--model", str(out / "export"), "--output-dir", str(tmp_path / "videos"),
                           "--total-blocks", "2"]) == 0
    assert len(list((tmp_path / "videos").glob("*.mp4"))) == len(inference.BUILTIN_PROMPTS)
    # A rerun skips finished stages.
    assert shapes_world.main(["--out", str(out), "--size", "smoke", "--stages", "teacher,dmd"]) == 0
    assert capsys.readouterr().out.count("done, skipped") == 2


def test_every_shapes_config_is_a_stage_of_the_smoke_run():
    """A recipe added to configs/shapes/ is trained by the smoke test above only once it is a stage; base.yaml is the
    layer the stages share (its settings build the text encoder and codec of the `base` stage)."""
    recipes = {p.stem for p in shapes_world.CONFIGS.glob("*.yaml")} - {"base"}
    assert recipes == set(shapes_world.TRAIN_STAGES.values())
    assert set(shapes_world.TRAIN_STAGES) <= {*shapes_world.ALL_STAGES, *shapes_world.OPTIONAL_STAGES}


def test_shipped_base_codec_is_the_shapes_configs():
    """assets/shapes_base is what a ship command includes beside the student: its codec must be the recipe's."""
    from shapes.components import shapes_codec
    from utils.config import load_config
    cfg = load_config(shapes_world.CONFIGS / "base.yaml")
    shipped = json.loads((shapes_world.BASE_ASSET / "codec" / "config.json").read_text())
    assert shipped == shapes_codec(cfg).config()
    assert cfg.rollout.image_or_video_shape[2] == shapes_codec(cfg).latent_channels
    factor = cfg.model.codec_spatial_factor
    assert list(cfg.rollout.image_or_video_shape[3:]) == [cfg.inference.height // factor, cfg.inference.width // factor]


def test_base_folder_codec_is_the_configs(tmp_path, monkeypatch):
    """The shipped base folder lends its text encoder; the codec written beside it is the run's config's."""
    shipped = json.loads((shapes_world.BASE_ASSET / "codec" / "config.json").read_text())["spatial_factor"]
    other = 8 if shipped != 8 else 2
    monkeypatch.setenv("SHAPES_OVERRIDES", f"codec_spatial_factor={other}")
    shapes_world.run_base(tmp_path, "full")
    assert json.loads((tmp_path / "base" / "codec" / "config.json").read_text())["spatial_factor"] == other
    assert (tmp_path / "base" / "text_encoder" / "config.json").read_bytes() == (
        shapes_world.BASE_ASSET / "text_encoder" / "config.json").read_bytes()


@pytest.mark.parametrize("folder", ["shipped", "written"])
def test_shapes_text_encoder_tokens_carry_their_neighbouring_words(tmp_path, folder):
    """A random UMT5 is a bag of words: "magenta circle ... white background" would not say which colour is the
    background's. The world's encoder mixes each token with its neighbours only: the word "background" differs
    with the colour just before it, and words far before the colour do not change at all."""
    from model.text_encoder import TextEncoder
    from shapes.components import write_text_encoder
    root = shapes_world.BASE_ASSET
    if folder == "written":
        root = write_text_encoder(tmp_path, dim=64, text_len=32, seed=3)
    encoder = TextEncoder.from_diffusers_folder(root, text_len=32, device="cpu")
    colours = ["red", "green", "blue", "yellow", "cyan", "white", "black"]
    prompts = [f"a small magenta circle moves slowly left on a {c} background" for c in colours]
    ids, mask = encoder.tokenize(prompts)
    words = prompts[0].split()
    assert int(mask[0].sum()) >= len(words)            # one token per word (+ end of sequence)
    emb = encoder(prompts).float()
    def spread(position: int) -> tuple[float, float]:
        d = torch.cdist(emb[:, position], emb[:, position])
        off = d[~torch.eye(len(prompts), dtype=torch.bool)]
        return float(off.min()), float(off.max())
    background = words.index("background")
    assert spread(background)[0] > 2.0                 # (a bag-of-words encoder: ~1.3 apart, ~8 for the colour)
    for far in range(background - 5):                  # "a small magenta circle moves": out of reach
        assert spread(far)[1] < 1e-4, words[far]
