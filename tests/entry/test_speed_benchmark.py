"""benchmarks/speed.py at tiny size on the CPU: the harness runs every lever, decode mode and the long rollout,
writes the JSON the GPU run will write, and every lever reproduces the eager rollout within the stated bound."""
from __future__ import annotations

import importlib
import json
import sys

import pytest
import torch

from model.config import WAN_1_3B
from tests.conftest import REPO_ROOT


def benchmark_module(name: str):
    """A module of benchmarks/ (scripts importing their siblings as top-level modules)."""
    if str(REPO_ROOT / "benchmarks") not in sys.path:
        sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
    return importlib.import_module(name)


LEVER_FIELDS = {"rollout_ms", "block_ms", "block6_ms", "frames_per_s_dit_only", "time_to_first_latents_ms",
                "warmup_s", "peak_gib", "rel_error_vs_eager", "within_bound", "options", "attention_backend"}


def test_analytic_flops_match_the_issue_figures():
    rollout_flops = benchmark_module("common").rollout_flops
    gemm, attn = rollout_flops(WAN_1_3B, 1560, 7, 3, 4)  # the issue's convention: a cache pass after every block
    assert (gemm + attn) / 1e12 == pytest.approx(990.7, rel=1e-3)
    assert (gemm / 797e12 + attn / 548e12) * 1000 == pytest.approx(1573, rel=1e-3)
    executed = sum(rollout_flops(WAN_1_3B, 1560, 7, 3, 4, final_context_pass=False, text_every_call=False))
    assert executed < gemm + attn


@pytest.mark.slow
def test_speed_benchmark_runs_every_lever_at_tiny_size(tmp_path, monkeypatch):
    speed = benchmark_module("speed")
    monkeypatch.setenv("OUT", str(tmp_path))
    result = speed.main(["--size", "tiny", "--repeats", "1", "--long", "--long-blocks", "8",
                         "--long-eager-blocks", "8", "--window", "6", "--sink", "1", "--fp8",
                         "--decode", "none,wan_vae,wan_vae_cl,taehv"])  # wan_vae_compiled: minutes of CPU compile
    saved = json.loads((tmp_path / "speed_tiny_cpu.json").read_text())
    assert saved["levers"].keys() == set(speed.LEVERS)
    for lever, entry in saved["levers"].items():
        assert "error" not in entry, (lever, entry.get("traceback"))
        assert LEVER_FIELDS <= entry.keys(), lever
        assert len(entry["block_ms"]) == 7
        assert entry["within_bound"] and entry["rel_error_vs_eager"] <= saved["rel_error_bound"], lever
    assert saved["rel_error_bound"] == speed.ERROR_BOUND[torch.float32]
    assert saved["flops"]["total_tflop"] > 0 and saved["flops"]["floor_ms"] > 0 and saved["floor_ratio"] > 0
    assert saved["block_alone"]["position"] == 6 and saved["block_alone"]["ms"] > 0
    profile = saved["profile"]
    assert "error" not in profile, profile.get("traceback")
    assert profile["top"] and profile["total_ms"] > 0
    assert sum(profile["by_family_ms"].values()) == pytest.approx(profile["total_ms"])
    assert "gemm" in profile["by_family_ms"]  # aten::addmm / mm on the CPU
    for kind in ("decode_wan_vae", "decode_wan_vae_cl", "decode_taehv"):
        decode = saved[kind]
        assert "error" not in decode, decode.get("traceback")
        assert decode["pixel_frames"] == 1 + 4 * 20 and decode["time_to_first_frame_ms"] > 0
        assert decode["warmup_s"] >= 0
    # The warm-up target counts the DiT's compiles and the slowest decoder warm-up (a compiled Wan VAE's, on a GPU).
    dit_warmup = sum(saved["levers"][k]["warmup_s"] for k in ("compile", "cudagraph"))
    decoder_warmup = max(saved[f"decode_{k}"]["warmup_s"] for k in ("wan_vae", "wan_vae_cl"))
    assert saved["targets"]["warmup_s<=60"]["value"] == pytest.approx(dit_warmup + decoder_warmup)
    assert saved["long"]["blocks"] == 8 and len(saved["long"]["block_ms"]) == 8 and saved["long"]["steady_block_ms"] > 0
    assert saved["long"]["within_bound"]
    fp8 = saved["fp8"]
    assert "error" not in fp8, fp8.get("traceback")
    assert fp8["converted_linears"] == 10 * saved["config"]["num_layers"] and not fp8["fp8_kernels"]
    assert 0 < fp8["rel_error_vs_eager"] < 0.2 and len(fp8["block_ms"]) == 7
    assert not saved["skipped"] and result["total_s"] > 0


def test_steady_block_is_the_median_once_the_rolling_window_is_full():
    steady_block_ms = benchmark_module("common").steady_block_ms
    # window 21 frames / 3 per block: blocks 8.. attend to a full window; the warm-up and filling blocks don't count
    blocks = [500.0, 90.0, 95.0, 100.0, 105.0, 110.0, 115.0, 120.0] + [200.0, 201.0, 199.0, 300.0, 202.0]
    assert steady_block_ms(blocks, window_frames=21, frames_per_block=3) == 201.0
    assert steady_block_ms([500.0, 50.0, 60.0, 70.0, 80.0, 90.0, 99.0], window_frames=-1) == 80.0  # last 5
    assert steady_block_ms([7.0, 9.0], window_frames=21) == 9.0  # shorter than the window: all blocks


@pytest.mark.slow
def test_pieces_benchmark_times_each_variant_against_the_first(tmp_path, monkeypatch):
    pieces = benchmark_module("pieces")
    monkeypatch.setenv("OUT", str(tmp_path))
    pieces.main(["--size", "tiny", "--repeats", "2", "--variants", "compiled,gelu_epilogue,fused_cache_write"])
    saved = json.loads((tmp_path / "pieces_tiny_cpu.json").read_text())
    assert list(saved["variants"]) == ["compiled", "gelu_epilogue", "fused_cache_write"]
    for name, entry in saved["variants"].items():
        assert "error" not in entry, (name, entry.get("traceback"))
        assert entry["call_ms"] > 0 and entry["compile_s"] > 0 and not entry["graph_errors"]
        # float32 on the CPU: the levers are exact there (the GELU epilogue keeps the plain path off CUDA)
        assert entry["rel_error_vs_first"] < 1e-5, name
        profile = entry["profile"]
        assert profile["top"] and sum(profile["by_family_ms"].values()) == pytest.approx(profile["total_ms"])
    # cumulative: each variant keeps the switches of the ones before
    assert saved["variants"]["fused_cache_write"]["options"] == {"fused_qkv": True, "compile": True,
                                                                 "gelu_epilogue": True, "fused_cache_write": True}
    attention = saved["attention_ms"]
    assert attention["self"] > 0 and attention["cross"] > 0 and attention["self_tflops"]["self"] > 0


@pytest.mark.slow
def test_decode_benchmark_times_each_codec_with_and_without_the_algorithm_search(tmp_path, monkeypatch):
    decode = benchmark_module("decode")
    monkeypatch.setenv("OUT", str(tmp_path))
    decode.main(["--size", "tiny", "--repeats", "1", "--codecs", "wan_vae_cl,taehv", "--blocks", "2", "--profile"])
    saved = json.loads((tmp_path / "decode_tiny_cpu.json").read_text())
    assert set(saved["codecs"]) == {"wan_vae_cl", "wan_vae_cl cudnn_benchmark", "taehv", "taehv cudnn_benchmark"}
    for label, entry in saved["codecs"].items():
        assert entry["pixel_frames"] == 1 + 4 * 5, label  # 6 latent frames: the first alone, then 4 per latent
        assert 0 < entry["first_block_ms"] <= entry["total_ms"], label
        assert entry["warmup_s"] > 0 and entry["profile"]["total_ms"] > 0, label
    assert not torch.backends.cudnn.benchmark  # restored
    # The compile setting is the Wan VAE decoder's (timed on the GPU: a tiny CPU compile takes minutes): recorded as an
    # error for TAEHV, and an unknown setting is refused with the choices.
    decode.main(["--size", "tiny", "--repeats", "1", "--codecs", "taehv", "--blocks", "1", "--settings", "compile"])
    saved = json.loads((tmp_path / "decode_tiny_cpu.json").read_text())
    assert "for the Wan VAE decoder" in saved["codecs"]["taehv compile"]["error"]
    with pytest.raises(SystemExit):
        decode.main(["--size", "tiny", "--settings", "plain,fast"])
    # Several --frames-per-call values: one entry each for the Wan VAE, labelled; TAEHV ignores the option.
    decode.main(["--size", "tiny", "--repeats", "1", "--codecs", "wan_vae,taehv", "--blocks", "2",
                 "--settings", "plain", "--frames-per-call", "1,3"])
    saved = json.loads((tmp_path / "decode_tiny_cpu.json").read_text())
    assert set(saved["codecs"]) == {"wan_vae 1/call", "wan_vae 3/call", "taehv"}
    assert [saved["codecs"][f"wan_vae {n}/call"]["frames_per_call"] for n in (1, 3)] == [1, 3]
    assert saved["codecs"]["wan_vae 3/call"]["pixel_frames"] == 1 + 4 * 5
    for bad in ("0", "x"):
        with pytest.raises(SystemExit):
            decode.main(["--size", "tiny", "--frames-per-call", bad])


def test_attention_split_benchmark_merges_key_parts_into_whole_attention(tmp_path, monkeypatch):
    """benchmarks/attention_split.py at tiny size: every block position and split, each merged result equal to
    whole attention (math partials on the CPU), and the query sweep recorded."""
    split = benchmark_module("attention_split")
    monkeypatch.setenv("OUT", str(tmp_path))
    split.main(["--size", "tiny", "--repeats", "1", "--splits", "2,3"])
    saved = json.loads((tmp_path / "attention_split.json").read_text())
    assert [b["block"] for b in saved["blocks"]] == list(range(7))
    for block in saved["blocks"]:
        assert set(block["rel_err"]) == {"cudnn", "cudnn_split2", "cudnn_split3", "cudnn_halves"}
        assert max(block["rel_err"].values()) < 1e-5
    assert saved["query_sweep"] and saved["query_sweep"][0]["lk"] == 4 * saved["blocks"][0]["lq"]
    # The split itself (parts of unequal length, merged by model/attention.py): whole attention; a wrong weighting of
    # the parts would not be.
    from model.attention import merge_attention_parts
    q, k, v = (torch.randn(1, n, 2, 8) for n in (5, 12, 12))
    whole = split.math_partial(q, k, v)[0]
    torch.testing.assert_close(split.split_attention(q, k, v, 5, split.math_partial, merge_attention_parts), whole)
    parts = [split.math_partial(q, k[:, a:b], v[:, a:b]) for a, b in ((0, 4), (4, 12))]
    assert not torch.allclose((parts[0][0] + parts[1][0]) / 2, whole, atol=1e-3)


def test_warmup_benchmark_times_a_cold_and_a_warm_process(tmp_path, monkeypatch):
    """benchmarks/warmup.py at tiny size without compile (the harness, not the figures): two fresh processes sharing
    one cache folder, each timing a cold and a warm DiT rollout and decode, then its videos."""
    warmup = benchmark_module("warmup")
    monkeypatch.setenv("OUT", str(tmp_path))
    warmup.main(["--size", "tiny", "--levers", "eager,rope_real", "--decode", "wan_vae", "--videos", "2",
                 "--cache-dir", str(tmp_path / "cache")])
    saved = json.loads((tmp_path / "warmup_tiny_cpu.json").read_text())
    assert list(saved["phases"]) == ["cold", "warm"]
    for phase in saved["phases"].values():
        assert len(phase["videos"]) == 2 and all(v["wall_ms"] > 0 for v in phase["videos"])
        assert phase["warmup_s"] == pytest.approx(phase["dit_first_s"] - phase["dit_warm_s"] + phase["decoder_first_s"]
                                                  - phase["decoder_warm_s"])
        assert min(phase["dit_warm_s"], phase["decoder_warm_s"]) > 0
        assert phase["options"]["fused_rope"] and not phase["compile"]
    with pytest.raises(SystemExit):
        warmup.main(["--size", "tiny", "--videos", "0"])


@pytest.mark.parametrize("name, family", [
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7_64x128x128_4x1x1_cga1x1x1_kernel0",
     "attention"),
    ("kernel_cutlass_kernel_flash_attncuteflash_fwd_sm90FlashAttentionForwardSm90_object_at__tensor0000o1",
     "attention"),
    ("nvjet_sm90_tst_192x144_64x5_2x1_v_bz_coopB_bias_TNT", "gemm"),
    ("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_ndhwc_kernel", "gemm"),
    ("triton_poi_fused_copy_copy__split_view_2", "copy"),
    ("triton_per_fused_add_mul_native_layer_norm_select_unsqueeze_view_0", "other"),
])
def test_profiles_sort_kernels_into_families(name, family):
    assert benchmark_module("common").kernel_family(name) == family
