"""WanDiT, the KV cache and the rollout against the original implementation's fixtures."""
from __future__ import annotations

import pytest
import torch

from model.attention import BlockCausal, block_causal_mask
from model.config import WanConfig
from model.rope import RotaryTables, apply_rope, sinusoidal_embedding
from model.wan import WanDiT
from pipeline.denoiser import Denoiser
from pipeline.rollout import RolloutOptions, rollout
from pipeline.schedule import FlowMatchSchedule

pytestmark = pytest.mark.golden
ATOL = RTOL = 1e-4
WRAPPER_SHIFT = 5.0  # the fixtures' wrappers were built with timestep_shift=5.0
CAUSAL_ROPE_PREFIX = "rope_causal.out_start_frame_"


def build_model(case, **drop) -> tuple[WanDiT, dict]:
    cfg = dict(case.meta["model_config"])
    causal = {k: cfg.pop(k) for k in ("local_attn_size", "sink_size") if k in cfg}
    model = WanDiT(WanConfig.from_dict(cfg))
    model.load_state_dict(case.weights(), strict=True)
    return model.eval(), causal


def close(actual, expected, atol=ATOL):
    torch.testing.assert_close(actual, expected, atol=atol, rtol=RTOL)


def test_tiny_weights_load_strictly(golden):
    case = golden("wan_dit_tiny.weights")
    model = WanDiT(WanConfig.from_dict(case.meta["config"]))
    sd = case.weights(case.meta["file"])
    assert set(model.state_dict()) == set(case.meta["keys"]) == set(sd)
    for key, shape in case.meta["keys"].items():
        assert list(model.state_dict()[key].shape) == shape, key
    assert sum(p.numel() for p in model.parameters()) == case.meta["num_params"]


def test_bidirectional_forward_and_intermediates(golden):
    case = golden("wan_dit_bidirectional")
    model, _ = build_model(case)
    io = case.io
    captured = {}
    hooks = [getattr(model, name).register_forward_hook(
        lambda m, i, o, name=name: captured.setdefault(name, o))
        for name in ("patch_embedding", "time_embedding", "time_projection", "text_embedding")]
    hooks += [blk.register_forward_hook(lambda m, i, o, n=n: captured.setdefault(f"blocks.{n}", o))
              for n, blk in enumerate(model.blocks)]
    hooks.append(model.head.head.register_forward_hook(lambda m, i, o: captured.setdefault("head", o)))
    denoiser = Denoiser(model, FlowMatchSchedule(WRAPPER_SHIFT), uniform_timestep=True)
    with torch.no_grad():
        flow, x0 = denoiser(io["noisy_input"], io["timestep"], io["prompt_embeds"])
    for h in hooks:
        h.remove()
    close(flow, io["flow_pred"])
    close(x0, io["pred_x0"])
    close(captured["patch_embedding"], io["intermediate.patch_embedding"])
    close(captured["time_embedding"], io["intermediate.time_embedding"])
    close(captured["time_projection"], io["intermediate.time_projection"])
    close(captured["text_embedding"], io["intermediate.text_embedding"])
    for n in range(model.config.num_layers):
        close(captured[f"blocks.{n}"], io[f"intermediate.blocks.{n}"])
    close(captured["head"], io["intermediate.head"])


def test_block_causal_training_paths(golden):
    case = golden("wan_dit_causal_train")
    meta, io = case.meta, case.io
    model, _ = build_model(case)
    spec = BlockCausal(meta["num_frame_per_block"], meta["independent_first_frame"])
    local = BlockCausal(meta["num_frame_per_block"], meta["independent_first_frame"], meta["local_attn_size_variant"])
    denoiser = Denoiser(model, FlowMatchSchedule(WRAPPER_SHIFT))
    args = (io["noisy_input"], io["timestep"], io["prompt_embeds"])
    with torch.no_grad():
        for prefix, (flow, x0) in [
                ("", denoiser(*args, block_causal=spec)),
                ("local_attn.", denoiser(*args, block_causal=local)),
                ("teacher_forcing.", denoiser.teacher_forcing(*args, io["clean_input"], spec)),
                ("teacher_forcing_aug.", denoiser.teacher_forcing(*args, io["clean_input"], spec, io["aug_timestep"]))]:
            close(flow, io[prefix + "flow_pred"])
            close(x0, io[prefix + "pred_x0"])


def test_block_causal_masks_match_exactly(golden):
    case = golden("wan_dit_causal_train")
    meta, io = case.meta, case.io
    frames, tokens = io["noisy_input"].shape[1], meta["tokens_per_latent_frame"]
    spec = BlockCausal(meta["num_frame_per_block"], meta["independent_first_frame"])
    local = BlockCausal(meta["num_frame_per_block"], meta["independent_first_frame"], meta["local_attn_size_variant"])
    cpu = torch.device("cpu")
    for mask, key in [(block_causal_mask(spec, frames, tokens, False, cpu), "mask.block_causal"),
                      (block_causal_mask(local, frames, tokens, False, cpu), "mask.block_causal_local"),
                      (block_causal_mask(spec, frames, tokens, True, cpu), "mask.teacher_forcing")]:
        assert torch.equal(mask.dense().to(torch.uint8), io[key]), key


@pytest.mark.parametrize("name", ["wan_dit_causal_kvcache", "wan_dit_causal_kvcache_rolling",
                                  "wan_dit_causal_kvcache_sink"])
def test_kv_cache_calls_replayed(golden, name):
    case = golden(name)
    meta, io = case.meta, case.io
    model, causal = build_model(case)
    h, w = meta["latent_hw"]
    cache = model.new_kv_cache(meta["batch_size"], h, w, meta["kv_cache"]["size_frames"],
                               window_frames=causal["local_attn_size"], sink_frames=causal["sink_size"])
    assert cache.capacity == meta["kv_cache"]["size_tokens"]
    denoiser = Denoiser(model, FlowMatchSchedule(WRAPPER_SHIFT))
    with torch.no_grad():
        for call in meta["calls"]:
            p = f"call{call['index']:02d}."
            flow, x0 = denoiser.cached(io[p + "noisy_input"], io[p + "timestep"], io["prompt_embeds"], cache,
                                       call["current_start_frame"])
            close(flow, io[p + "flow_pred"])
            close(x0, io[p + "pred_x0"])
            assert cache.global_end == call["cache_global_end_index_after"]
            assert cache.local_end == call["cache_local_end_index_after"]
    for layer in range(model.config.num_layers):
        close(cache.k[layer, :, :cache.local_end], io[f"final_kv_cache.layer{layer}.k"])
        close(cache.v[layer, :, :cache.local_end], io[f"final_kv_cache.layer{layer}.v"])


@pytest.mark.parametrize("name", ["wan_dit_causal_kvcache", "wan_dit_causal_kvcache_rolling",
                                  "wan_dit_causal_kvcache_sink"])
def test_rollout_reproduces_pipeline_output(golden, name):
    case = golden(name)
    meta, io = case.meta, case.io
    model, causal = build_model(case)
    h, w = meta["latent_hw"]
    schedule = FlowMatchSchedule(WRAPPER_SHIFT)
    steps = schedule.warp(meta["denoising_step_list_config"]) if meta["warp_denoising_step"] \
        else torch.tensor(meta["denoising_step_list_config"], dtype=torch.float32)
    close(steps, io["denoising_step_list"], atol=1e-6)
    cache = model.new_kv_cache(meta["batch_size"], h, w, meta["kv_cache"]["size_frames"],
                               window_frames=causal["local_attn_size"], sink_frames=causal["sink_size"])
    stored = iter(io[f"renoise{r['index']:02d}.noise"] for r in meta["renoise"])
    with torch.no_grad():
        result = rollout(Denoiser(model, schedule), io["noise"], io["prompt_embeds"], cache, RolloutOptions(
            steps=steps.tolist(), frames_per_block=meta["num_frame_per_block"], context_noise=meta["context_noise"],
            noise_fn=lambda x: next(stored).view_as(x)))
    close(result.latents, io["output_latents"])
    assert len(result.block_ms) == meta["num_blocks"]


def test_sinusoidal_and_rope_components(golden):
    case = golden("wan_dit_components")
    meta, io = case.meta, case.io
    torch.testing.assert_close(sinusoidal_embedding(meta["freq_dim"], io["sinusoidal.t"]),
                               io["sinusoidal.embedding_f64"], atol=1e-12, rtol=0)
    tables = RotaryTables(meta["head_dim"], io["rope.freqs_real_f64"].shape[0])
    assert [d // 2 for d in tables.axis_dims] == meta["rope_split_complex_pairs"]
    angles = torch.cat(tables.angles, dim=1)
    torch.testing.assert_close(angles.cos(), io["rope.freqs_real_f64"], atol=1e-12, rtol=0)
    torch.testing.assert_close(angles.sin(), io["rope.freqs_imag_f64"], atol=1e-12, rtol=0)
    f, hh, ww = meta["rope_grid_FHW"]
    cpu = torch.device("cpu")
    close(apply_rope(io["rope.x"], tables.rotation(0, f, hh, ww, cpu)), io["rope.out"], atol=1e-5)
    # the KV-cache path's first frame position is named by the key (`rope_causal.out_start_frame_<n>`)
    (key,) = [k for k in io if k.startswith(CAUSAL_ROPE_PREFIX)]
    start = int(key[len(CAUSAL_ROPE_PREFIX):])
    close(apply_rope(io["rope_causal.x"], tables.rotation(start, f, hh, ww, cpu)), io[key], atol=1e-5)
