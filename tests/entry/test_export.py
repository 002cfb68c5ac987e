"""Hub export round trips on tiny models: checkpoint -> export -> load -> same outputs."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import inference
from pipeline.loading import model_folder
from scripts import export_hf
from tests.tiny import save_tiny_model_folder, tiny_model

TINY_CONFIG = """
denoising_step_list: [1000, 750, 500]
warp_denoising_step: true
num_frame_per_block: 2
height: 32
width: 48
fps: 8
decoder: pixel
trainer: score_distillation
distribution_loss: dmd
lr: 1.0e-4
"""


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return save_tiny_model_folder(tmp_path_factory.mktemp("base") / "tiny")


def fake_self_forcing_pt(path: Path, seed: int = 3):
    """A checkpoint as the original writes it: `generator`/`generator_ema`, keys prefixed by the wrapper."""
    gen, ema = tiny_model(seed, in_dim=12, out_dim=12, text_len=16), tiny_model(seed + 1, in_dim=12, out_dim=12,
                                                                                   text_len=16)
    torch.save({"generator": {f"model.{k}": v for k, v in gen.state_dict().items()},
                "generator_ema": {f"model._fsdp_wrapped_module.{k}": v for k, v in ema.state_dict().items()}}, path)
    return gen, ema


def test_export_pt_with_base_then_inference(base, tmp_path):
    _, ema = fake_self_forcing_pt(tmp_path / "sf.pt")
    (tmp_path / "tiny.yaml").write_text(TINY_CONFIG)
    out = tmp_path / "export"
    assert export_hf.main([str(tmp_path / "sf.pt"), "--config", str(tmp_path / "tiny.yaml"), "--output", str(out),
                           "--include-base", str(base), "--num-heads", "2", "--text-len", "16"]) == 0
    loaded, causal = model_folder.load_transformer(out)
    for key, value in ema.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert causal["num_frame_per_block"] == 2 and causal["denoising_step_list"] == [1000, 750, 500]
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: self-forcing\n") and "pipeline_tag: text-to-video" in card
    assert "base_model: Wan-AI/Wan2.1-T2V-1.3B" in card and "`distribution_loss: dmd`" in card
    assert inference.main(["--model", str(out), "--prompt", "a red circle", "--output-dir", str(tmp_path / "v"),
                           "--total-blocks", "2"]) == 0
    assert len(list((tmp_path / "v").glob("*.mp4"))) == 1


def test_diffusers_format_loads_in_diffusers_and_matches(tmp_path):
    from diffusers import WanTransformer3DModel
    gen, _ = fake_self_forcing_pt(tmp_path / "sf.pt")
    out = tmp_path / "export"
    assert export_hf.main([str(tmp_path / "sf.pt"), "--weights", "generator", "--output", str(out),
                           "--format", "diffusers", "--num-heads", "2", "--text-len", "16"]) == 0
    theirs = WanTransformer3DModel.from_pretrained(out / "transformer").eval()
    ours, _ = model_folder.load_transformer(out)
    x = torch.randn(1, 2, 12, 8, 12)
    t = torch.tensor([600.0])
    context = torch.randn(1, gen.config.text_len, gen.config.text_dim)  # diffusers does not pad to text_len
    with torch.no_grad():
        expected = gen(x, t, context)
        torch.testing.assert_close(ours(x, t, context), expected)
        flow = theirs(x.transpose(1, 2), t, context, return_dict=False)[0].transpose(1, 2)
    torch.testing.assert_close(flow, expected, atol=1e-4, rtol=1e-4)


def test_sharded_export_reloads_and_truncated_file_is_a_clear_error(tmp_path):
    gen, _ = fake_self_forcing_pt(tmp_path / "sf.pt")
    out = tmp_path / "export"
    assert export_hf.main([str(tmp_path / "sf.pt"), "--weights", "generator", "--output", str(out),
                           "--max-shard-size", "40KB", "--num-heads", "2", "--text-len", "16"]) == 0
    shards = sorted((out / "transformer").glob("*.safetensors"))
    assert len(shards) > 1 and (out / "transformer" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    loaded, _ = model_folder.load_transformer(out)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in gen.state_dict().items())
    shards[0].write_bytes(shards[0].read_bytes()[:100])
    with pytest.raises(ValueError, match=shards[0].name):
        model_folder.load_transformer(out)


def test_failed_upload_keeps_the_local_folder(tmp_path, monkeypatch, capsys):
    import huggingface_hub
    fake_self_forcing_pt(tmp_path / "sf.pt")

    class Offline:
        def __init__(self, token=None):
            pass

        def create_repo(self, *a, **k):
            raise ConnectionError("no network")

    monkeypatch.setattr(huggingface_hub, "HfApi", Offline)
    out = tmp_path / "export"
    assert export_hf.main([str(tmp_path / "sf.pt"), "--output", str(out), "--num-heads", "2", "--text-len", "16",
                           "--push-to-hub", "someone/model"]) == 1
    err = capsys.readouterr().err
    assert "someone/model" in err and "local folder" in err
    assert (out / "model_index.json").is_file() and (out / "README.md").is_file()


def test_missing_source_is_a_one_line_error(tmp_path, capsys):
    assert export_hf.main([str(tmp_path / "nothing.pt"), "--output", str(tmp_path / "o")]) == 2
    assert "nothing.pt" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_x0_prediction_survives_both_export_formats(tmp_path):
    """diffusers has no x0-predicting head: our folder keeps `prediction` beside its config and reads it back."""
    from tests.tiny import tiny_model
    model = tiny_model(prediction="x0", text_len=16)
    x = torch.randn(1, 2, model.config.in_dim, 4, 6)
    t = torch.tensor([600.0])
    context = torch.randn(1, 16, model.config.text_dim)
    for fmt in ("original", "diffusers"):
        out = tmp_path / fmt
        model_folder.save_model_folder(out, transformer=model, wan_config=model.config, causal={},
                                       transformer_format=fmt)
        loaded, _ = model_folder.load_transformer(out)
        assert loaded.config.prediction == "x0", fmt
        with torch.no_grad():
            torch.testing.assert_close(loaded.eval()(x, t, context), model(x, t, context))


def test_bare_weights_with_a_dit_config_export_its_architecture(tmp_path):
    """The GPU recipe brings back bare EMA weights and the stage's config.yaml: the architecture (heads, text length,
    x0 prediction) comes from the config's dit_config, which the weights alone cannot say."""
    from safetensors.torch import save_file

    from tests.tiny import tiny_model
    model = tiny_model(prediction="x0", text_len=16, dim=48, num_heads=3, ffn_dim=64, in_dim=48, out_dim=48)
    arch = {k: getattr(model.config, k) for k in ("dim", "ffn_dim", "num_heads", "num_layers", "text_dim", "text_len",
                                                  "freq_dim", "prediction")}
    weights = {k: v.to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    save_file(weights, tmp_path / "dmd.safetensors")
    config = f"world: shapes\ncodec_spatial_factor: 4\ndit_config: {json.dumps(arch)}\n"
    (tmp_path / "dmd_config.yaml").write_text(config)
    out = tmp_path / "export"
    assert export_hf.main([str(tmp_path / "dmd.safetensors"), "--config", str(tmp_path / "dmd_config.yaml"),
                           "--output", str(out)]) == 0
    loaded, _ = model_folder.load_transformer(out)
    assert loaded.config.prediction == "x0" and loaded.config.num_heads == 3 and loaded.config.text_len == 16


def test_model_card_evaluation_and_example_prompt():
    from pipeline.loading.hub import model_card
    causal = {"denoising_step_list": [1000, 750], "model_kwargs": {}}
    card = model_card(repo_name="m", base_model="b", config={"trainer": "ode", "dit_config": {"dim": 8},
                                                             "real_name": "Wan2.1-T2V-1.3B"},
                      weights="dmd.safetensors", step=None, causal=causal,
                      evaluation={"attribute_accuracy": 0.74, "settings": {"num_prompts": 64}, "runs": [1, 2]},
                      example_prompt="a large red circle moves slowly left on a blue background")
    assert "| attribute_accuracy | 0.74 |" in card and "num_prompts" not in card and "runs" not in card
    assert '--prompt "a large red circle moves slowly left on a blue background"' in card
    assert "real_name" not in card  # a dit_config network has no Wan teacher to name
    table = "| Model | Attribute acc. |\n|---|---:|\n| DMD | 0.74 |"
    written = model_card(repo_name="m", base_model="b", config=None, weights="w", step=None, causal=causal,
                         evaluation=table + "\n")
    assert written.rstrip().endswith(table)
