"""Checkpoint readers/writers (pipeline/loading/checkpoint.py) and the Wan <-> diffusers key table
(model/dit_keys.py)."""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from model.config import WAN_1_3B, WAN_14B, WanConfig
from model.dit_keys import (diffusers_config_from_wan, diffusers_config_json, diffusers_to_wan,
                            is_diffusers_state_dict, wan_config_from_diffusers, wan_to_diffusers)
from pipeline.loading.checkpoint import (StateDictMismatchError, infer_wan_config, load_diffusers_transformer,
                                         load_dit_state_dict, load_self_forcing_pt, load_state_dict_strict,
                                         load_wan_safetensors, save_safetensors_atomic, save_wan_safetensors_sharded)
from utils.errors import InputError

diffusers = pytest.importorskip("diffusers")

# 2 layers, 4 heads x 16, text_dim 32, freq_dim 32, ffn 128.
TINY = WanConfig(dim=64, ffn_dim=128, num_heads=4, num_layers=2, text_dim=32, freq_dim=32, text_len=16)


def _wan_dit(cfg: WanConfig) -> torch.nn.Module:
    from model.wan import WanDiT  # imported lazily so the key-table tests run without the model
    return WanDiT(cfg)


def _tiny_diffusers(cfg: WanConfig = TINY, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = diffusers.WanTransformer3DModel(**diffusers_config_from_wan(cfg)).eval()
    with torch.no_grad():  # perturb so zero/one-initialised parameters are distinguishable
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def _shapes(sd: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in sd.items()}


def _fake_wan_sd(cfg: WanConfig = TINY) -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    return {k: torch.randn(v.shape) for k, v in diffusers_to_wan(
        diffusers.WanTransformer3DModel(**diffusers_config_from_wan(cfg)).state_dict()).items()}


# ------------------------------------------------------------------------------------------------ key table

def test_diffusers_round_trip_keys_and_shapes():
    dsd = _tiny_diffusers().state_dict()
    wsd = diffusers_to_wan(dsd)
    assert not is_diffusers_state_dict(wsd) and is_diffusers_state_dict(dsd)
    assert len(wsd) == len(dsd)
    ours = _wan_dit(TINY).state_dict()
    assert _shapes(wsd) == _shapes(ours)
    # diffusers' affine cross-attention norm is norm2; the original calls it norm3.
    assert torch.equal(wsd["blocks.1.norm3.weight"], dsd["blocks.1.norm2.weight"])
    assert torch.equal(wsd["blocks.0.modulation"], dsd["blocks.0.scale_shift_table"])
    assert torch.equal(wsd["head.modulation"], dsd["scale_shift_table"])
    assert torch.equal(wsd["head.head.weight"], dsd["proj_out.weight"])
    back = wan_to_diffusers(wsd)
    assert back.keys() == dsd.keys()
    assert all(torch.equal(back[k], dsd[k]) for k in dsd)


@pytest.mark.golden
def test_converted_keys_match_reference_tiny_weights(golden):
    meta = golden("wan_dit_tiny.weights").meta
    cfg = WanConfig.from_dict(meta["config"])
    wsd = diffusers_to_wan(diffusers.WanTransformer3DModel(**diffusers_config_from_wan(cfg)).state_dict())
    assert _shapes(wsd) == {k: tuple(v) for k, v in meta["keys"].items()}
    assert sum(v.numel() for v in wsd.values()) == meta["num_params"]


def test_fused_projections_and_ignored_norm():
    model = _tiny_diffusers()
    plain = diffusers_to_wan(model.state_dict())
    dsd = dict(model.state_dict())
    for key in [k for k in dsd if ".attn1.to_q." in k]:  # a fused-only checkpoint: q, k, v concatenated
        stem = key.replace(".to_q.", ".{}.")
        dsd[stem.format("to_qkv")] = torch.cat([dsd.pop(stem.format(n)) for n in ("to_q", "to_k", "to_v")])
    dsd["blocks.0.attn2.norm_added_q.weight"] = torch.ones(TINY.dim)
    converted = diffusers_to_wan(dsd)
    assert converted.keys() == plain.keys()
    assert all(torch.equal(converted[k], plain[k]) for k in plain)
    model.fuse_qkv_projections()  # fused and separate copies side by side
    assert any(".to_qkv." in k for k in model.state_dict())
    assert diffusers_to_wan(model.state_dict()).keys() == plain.keys()


def test_unknown_keys_are_named():
    with pytest.raises(KeyError, match="blocks.0.attn1.bogus.weight"):
        diffusers_to_wan({"blocks.0.attn1.bogus.weight": torch.zeros(1)})
    with pytest.raises(KeyError, match="lora_A"):
        wan_to_diffusers({"blocks.0.self_attn.q.lora_A.weight": torch.zeros(1), "not_a_key": torch.zeros(1)})


def test_config_round_trip():
    for cfg in (TINY, WAN_1_3B, WAN_14B):
        d = diffusers_config_from_wan(cfg)
        back = wan_config_from_diffusers(d, text_len=cfg.text_len)
        assert back.to_dict() == cfg.to_dict()
    model = diffusers.WanTransformer3DModel(**diffusers_config_from_wan(TINY))
    registered = {k: v for k, v in dict(model.config).items() if k != "_use_default_values"}
    assert wan_config_from_diffusers(registered, text_len=TINY.text_len).to_dict() == TINY.to_dict()
    with pytest.raises(KeyError, match="num_heads"):
        wan_config_from_diffusers({**diffusers_config_from_wan(TINY), "num_heads": 4})
    with pytest.raises(ValueError, match="image_dim"):
        wan_config_from_diffusers({**diffusers_config_from_wan(TINY), "image_dim": 1280})


def test_original_window_size_full_attention_only():
    """The original WanModel config carries `window_size` (flash-attention's local window); full attention, (-1, -1),
    is what every released model uses and the only value the DiT implements, so any other value is refused."""
    body = {"_class_name": "WanModel", **TINY.to_dict()}
    for full in ([-1, -1], (-1, -1)):
        cfg = WanConfig.from_dict({**body, "window_size": full}, source="orig/config.json")
        assert cfg.to_dict() == TINY.to_dict() and list(cfg.extra["window_size"]) == [-1, -1]
    for local in ([16, 16], [-1, 8], 16):
        with pytest.raises(ValueError, match=r"orig/config\.json: window_size=.*expected \[-1, -1\]"):
            WanConfig.from_dict({**body, "window_size": local}, source="orig/config.json")


def test_config_json_keeps_what_diffusers_has_no_key_for():
    x0 = dataclasses.replace(TINY, text_len=24, prediction="x0")
    body = diffusers_config_json(x0)
    assert (body["text_len"], body["prediction"]) == (24, "x0")
    assert wan_config_from_diffusers(body).to_dict() == x0.to_dict()  # no text_len argument: read from the body
    assert "prediction" not in diffusers_config_json(TINY)  # the default head writes nothing diffusers lacks
    assert wan_config_from_diffusers(diffusers_config_json(TINY)).to_dict() == TINY.to_dict()
    with pytest.raises(ValueError, match="prediction must be one of"):
        wan_config_from_diffusers({**body, "prediction": "eps"})


# ------------------------------------------------------------------------------------------------ manifests

@pytest.mark.golden
@pytest.mark.parametrize("name, preset", [("manifest_wan2.1_t2v_1.3b_dit", WAN_1_3B),
                                          ("manifest_wan2.1_t2v_14b_dit", WAN_14B)])
def test_meta_model_matches_manifest(golden, name, preset):
    manifest = golden(name).meta
    cfg = WanConfig.from_dict(manifest["config"])
    assert cfg.to_dict() == preset.to_dict()
    with torch.device("meta"):
        model = _wan_dit(cfg)
    sd = model.state_dict()
    assert _shapes(sd) == {k: tuple(v) for k, v in manifest["keys"].items()}
    assert len(sd) == manifest["num_tensors"]
    assert sum(p.numel() for p in model.parameters()) == manifest["num_params"]
    assert infer_wan_config(sd).to_dict() == cfg.to_dict()
    # the diffusers side of the table covers the real key set too
    assert diffusers_to_wan(wan_to_diffusers(sd)).keys() == sd.keys()


def test_infer_wan_config_needs_heads_for_odd_widths():
    sd = _fake_wan_sd()
    assert infer_wan_config(sd, num_heads=TINY.num_heads, text_len=TINY.text_len).to_dict() == TINY.to_dict()
    with pytest.raises(ValueError, match="num_heads"):
        infer_wan_config(sd)
    del sd["head.head.weight"]
    with pytest.raises(KeyError, match="head.head.weight"):
        infer_wan_config(sd, num_heads=4)


# ----------------------------------------------------------------------------------------- Self-Forcing .pt

def _write_self_forcing_pt(path: Path, wsd: dict[str, torch.Tensor]) -> None:
    torch.save({
        "generator": {f"model.{k}": v for k, v in wsd.items()},
        "generator_ema": {f"model._fsdp_wrapped_module.{k}": v + 1 for k, v in wsd.items()},
        "critic": {f"model.{k}": v + 2 for k, v in wsd.items()},
    }, path)


def test_self_forcing_pt(tmp_path):
    wsd = _fake_wan_sd()
    path = tmp_path / "model.pt"
    _write_self_forcing_pt(path, wsd)
    gen = load_self_forcing_pt(path)
    ema = load_self_forcing_pt(path, use_ema=True)
    critic = load_self_forcing_pt(path, key="critic")
    assert gen.keys() == ema.keys() == critic.keys() == wsd.keys()
    assert torch.equal(gen["blocks.1.ffn.2.weight"], wsd["blocks.1.ffn.2.weight"])
    assert torch.equal(ema["blocks.1.ffn.2.weight"], wsd["blocks.1.ffn.2.weight"] + 1)
    sd, cfg = load_dit_state_dict(path, use_ema=True)
    assert cfg is None and torch.equal(sd["head.modulation"], wsd["head.modulation"] + 1)
    # An entry named by key would replace the EMA choice: both together are refused, not one silently dropped.
    with pytest.raises(ValueError, match="give use_ema or key='critic', not both"):
        load_self_forcing_pt(path, use_ema=True, key="critic")
    sd, _ = load_dit_state_dict(tmp_path)  # a trainer's checkpoint_model_XXXXXX/ folder holding model.pt
    assert torch.equal(sd["head.modulation"], wsd["head.modulation"])

    torch.save({"generator": {f"model.{k}": v for k, v in wsd.items()}}, path)
    with pytest.raises(KeyError) as info:
        load_self_forcing_pt(path, use_ema=True)
    assert str(path) in str(info.value) and "'generator_ema'" in str(info.value)
    assert "top-level keys present: ['generator']" in str(info.value)
    # "model" fallback, then a raw state dict with compile/checkpoint infixes
    torch.save({"model": {f"model.{k}": v for k, v in wsd.items()}}, path)
    assert load_self_forcing_pt(path).keys() == wsd.keys()
    torch.save({f"_orig_mod.model._checkpoint_wrapped_module.{k}": v for k, v in wsd.items()}, path)
    assert load_self_forcing_pt(path).keys() == wsd.keys()


class _NotATensor:
    pass


def test_pickle_needing_code_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"generator": {"x": torch.zeros(1)}, "extra": _NotATensor()}, path)
    with pytest.raises(ValueError, match=r"evil\.pt.*weights_only"):
        load_self_forcing_pt(path)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"definitely not a checkpoint")
    with pytest.raises(ValueError, match=r"garbage\.pth"):
        load_dit_state_dict(garbage)


# ------------------------------------------------------------------------------------------------ safetensors

def test_sharded_round_trip_and_missing_shard(tmp_path):
    wsd = _fake_wan_sd()
    written = save_wan_safetensors_sharded(wsd, tmp_path, max_shard_bytes=40_000)
    index = tmp_path / "diffusion_pytorch_model.safetensors.index.json"
    assert index in written and len(written) > 3
    for source in (tmp_path, index):
        sd = load_wan_safetensors(source)
        assert sd.keys() == wsd.keys() and all(torch.equal(sd[k], wsd[k]) for k in wsd)
    shard = json.loads(index.read_text())["weight_map"]["head.head.weight"]
    (tmp_path / shard).unlink()
    with pytest.raises(FileNotFoundError, match=shard):
        load_wan_safetensors(tmp_path)


def test_truncated_safetensors_names_file(tmp_path):
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    save_safetensors_atomic(_fake_wan_sd(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"diffusion_pytorch_model\.safetensors"):
        load_wan_safetensors(tmp_path)
    with pytest.raises(FileNotFoundError):
        load_dit_state_dict(tmp_path / "nope.safetensors")


def test_save_atomic_shared_and_noncontiguous(tmp_path):
    base = torch.randn(4, 6)
    sd = {"a": base, "tied": base, "t": base.t(), "slice": base[1:3]}
    path = tmp_path / "sub" / "w.safetensors"
    save_safetensors_atomic(sd, path, metadata={"format": "pt"})
    back = load_file(str(path))
    assert all(torch.equal(back[k], v) for k, v in sd.items())
    assert [p.name for p in path.parent.iterdir()] == ["w.safetensors"]
    with pytest.raises(ValueError, match="metadata"):
        save_safetensors_atomic(sd, path, metadata={"step": 3})


def test_load_diffusers_and_original_folders(tmp_path):
    model = _tiny_diffusers()
    model.save_pretrained(tmp_path / "transformer")
    (tmp_path / "model_index.json").write_text("{}")
    cfg, sd = load_diffusers_transformer(tmp_path / "transformer")
    assert cfg.to_dict() == {**TINY.to_dict(), "text_len": 512}
    assert sd.keys() == diffusers_to_wan(model.state_dict()).keys()
    sd2, cfg2 = load_dit_state_dict(tmp_path)  # pipeline root -> transformer/
    assert cfg2.to_dict() == cfg.to_dict() and sd2.keys() == sd.keys()

    original = tmp_path / "wan"
    save_safetensors_atomic(sd, original / "diffusion_pytorch_model.safetensors")
    (original / "config.json").write_text(json.dumps({"_class_name": "WanModel", **TINY.to_dict()}))
    sd3, cfg3 = load_dit_state_dict(original / "diffusion_pytorch_model.safetensors")
    assert cfg3.to_dict() == TINY.to_dict() and sd3.keys() == sd.keys()
    with pytest.raises(ValueError, match="not a diffusers"):
        load_diffusers_transformer(original)
    with pytest.raises(ValueError, match="unrecognised"):
        load_dit_state_dict(original / "config.json")
    # One set of weights: asking for the EMA ones is an error naming the file, never the other set in silence.
    for source in (tmp_path, original, original / "diffusion_pytorch_model.safetensors"):
        with pytest.raises(InputError, match=r"holds one set of weights: the EMA choice") as info:
            load_dit_state_dict(source, use_ema=True)
        assert str(source if source != tmp_path else tmp_path / "transformer") in str(info.value)


def test_a_training_checkpoint_folder_loads_its_generator_or_its_ema(tmp_path):
    """`inference.py --checkpoint_path <logdir>/checkpoint_model_N [--use_ema]`, as docs/inference.md says."""
    folder = tmp_path / "checkpoint_model_000010"
    raw = {"head.head.weight": torch.ones(2, 3)}
    save_safetensors_atomic(raw, folder / "generator.safetensors")
    save_safetensors_atomic({"head.head.weight": torch.zeros(2, 3)}, folder / "critic.safetensors")
    (folder / "config.json").write_text(json.dumps(TINY.to_dict()))
    with pytest.raises(FileNotFoundError, match=r"generator_ema.safetensors does not exist: the checkpoint was saved "
                                                r"before EMA started"):
        load_dit_state_dict(folder, use_ema=True)
    save_safetensors_atomic({"head.head.weight": torch.full((2, 3), 0.5)}, folder / "generator_ema.safetensors")
    for use_ema, value in ((False, 1.0), (True, 0.5)):
        sd, cfg = load_dit_state_dict(folder, use_ema=use_ema)
        assert sd.keys() == {"head.head.weight"} and torch.equal(sd["head.head.weight"], torch.full((2, 3), value))
        assert cfg.to_dict() == TINY.to_dict()


# -------------------------------------------------------------------------------------------- strict loading

def test_load_state_dict_strict_message():
    module = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    sd = {k: v.clone() for k, v in module.state_dict().items()}
    load_state_dict_strict(module, sd, source="ok.pt")
    sd.pop("1.bias")
    sd["1.extra"] = torch.zeros(1)
    sd["0.weight"] = torch.zeros(5, 3)
    with pytest.raises(StateDictMismatchError) as info:
        load_state_dict_strict(module, sd, source="/ckpt/bad.safetensors")
    msg = str(info.value)
    assert "/ckpt/bad.safetensors" in msg and "1.bias" in msg and "1.extra" in msg
    assert "0.weight: expected (4, 3), got (5, 3)" in msg
    assert isinstance(info.value, KeyError) and isinstance(info.value, ValueError)


# ------------------------------------------------------------------------------------------------- parity

def test_diffusers_forward_matches_wan_dit():
    """Same weights, same input: diffusers' bidirectional output equals WanDiT's.

    diffusers does not zero-pad the text context to text_len (the original does and attends the padded
    rows), so the context is given with exactly text_len rows.
    """
    model = _tiny_diffusers(seed=3)
    ours = _wan_dit(TINY).eval()
    load_state_dict_strict(ours, diffusers_to_wan(model.state_dict()), source="tiny diffusers model")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, TINY.in_dim, 4, 6, generator=gen)
    t = torch.tensor([250.0, 875.0])
    context = torch.randn(2, TINY.text_len, TINY.text_dim, generator=gen)
    with torch.no_grad():
        ref = model(x.transpose(1, 2), t, context).sample.transpose(1, 2)
        out = ours(x, t[:, None].expand(-1, x.shape[1]), context)
    assert out.shape == x.shape
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.golden
def test_reference_weights_through_diffusers_match_golden(golden):
    """Original tiny weights -> diffusers keys -> diffusers model reproduces the reference WanModel output."""
    case = golden("wan_dit_bidirectional")
    cfg = WanConfig.from_dict(case.meta["model_config"])
    model = diffusers.WanTransformer3DModel(**diffusers_config_from_wan(cfg)).eval()
    load_state_dict_strict(model, wan_to_diffusers(case.weights()), source="wan_dit_tiny.weights.safetensors")
    io = case.io
    ctx = io["prompt_embeds"]
    ctx = F.pad(ctx, (0, 0, 0, cfg.text_len - ctx.shape[1]))  # diffusers does not pad to text_len itself
    with torch.no_grad():
        out = model(io["noisy_input"].transpose(1, 2), io["timestep"][:, 0], ctx).sample.transpose(1, 2)
    torch.testing.assert_close(out, io["flow_pred"], atol=1e-4, rtol=1e-4)
    assert math.isfinite(out.abs().max().item())
