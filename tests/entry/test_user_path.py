"""What a user runs: the command line's speed levers are the benchmark's, presets leave the model alone, the memory
report has both peaks, and buffers are sized for the frames asked (CPU; a "cuda" device only where settings are
computed, never where a tensor is made)."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import demo
import inference
from model import attention
from model.wan_block import EAGER_PIECES, InferenceOptions
from pipeline import levers as levers_module
from pipeline.compile import CompiledPieces
from pipeline.cuda_graphs import GraphedDiT
from pipeline.denoiser import Denoiser
from pipeline.inference import CausalInferencePipeline, VideoRequest
from pipeline.levers import MEASURE, Levers, levers_for
from pipeline.loading import model_folder
from tests.entry.test_inference import load_pipe
from tests.entry.test_speed_benchmark import benchmark_module
from tests.tiny import save_tiny_model_folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_tiny_model_folder(tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture(autouse=True)
def restore_attention_backend():
    yield
    attention.set_attention_backend("auto")


@pytest.fixture(autouse=True)
def triton_installed(monkeypatch):
    """Settings for a CUDA machine with Triton, whatever this one has (nothing is compiled here)."""
    monkeypatch.setattr(levers_module, "compiler_available", lambda: True)


def cli_levers(argv: list[str], device_type: str, causal: dict | None = None) -> Levers:
    """The levers `inference.py argv` computes for a device, without loading anything."""
    args = inference.build_parser().parse_intermixed_args(argv)
    cfg = inference.resolve_config(args, causal or {}, device_type)
    return levers_for(cfg, device_type, fused_qkv=args.fused_qkv)


class FakeBench:
    """What `speed.apply_lever` asks of its bench: the back-end it measured."""

    def fastest_attention(self) -> str:
        return "sdpa_cudnn_halves"


# ------------------------------------------------------------------------------------------------ levers
def test_the_command_line_turns_on_every_lever_of_the_benchmark_on_cuda():
    speed = benchmark_module("speed")
    bench = speed.every_lever(FakeBench())
    user = cli_levers([], "cuda")
    assert user.inference_options() == bench.options  # fused q/k/v, RoPE tables, text K/V, epilogues ...
    assert dataclasses.astuple(bench.options) == tuple([True] * len(dataclasses.fields(InferenceOptions)))
    assert user.cuda_graphs and bench.graphs and user.compile and bench.compile
    assert bench.persistent_norms  # the pipeline's compiled pieces use the heuristic (`compile_pieces`' default)
    assert user.attention_backend == MEASURE and bench.backend == "sdpa_cudnn_halves"  # both time the back-ends
    assert bench.rerotate is False  # the pipeline's caches never re-rotate the window (KVCache default)
    assert user.decode_side_stream


def test_cpu_keeps_its_exact_defaults_and_flags_turn_cuda_levers_off():
    assert cli_levers([], "cpu") == Levers(compile=False, cuda_graphs=False, fused_qkv=False, attention_backend="auto")
    off = cli_levers(["--no-compile", "--no-cuda-graphs", "--no-fused-qkv", "--attention-backend", "sdpa"], "cuda")
    assert off == Levers(compile=False, cuda_graphs=False, fused_qkv=False, attention_backend="sdpa",
                         decode_frames_per_call=1)
    # A config key is the user's too: it wins over the device default, a flag over the key.
    assert not cli_levers(["compile=false"], "cuda").compile
    assert cli_levers(["compile=false", "--compile"], "cuda").compile
    assert cli_levers(["--compile"], "cpu").compile and not cli_levers(["--cuda-graphs"], "cpu").cuda_graphs


def test_run_options_put_the_flags_over_the_config_for_inference_and_demo(folder):
    argv = ["--model", str(folder), "--height", "64", "--fps", "8", "--total-blocks", "3", "--no-fused-qkv",
            "num_frame_per_block=2", "independent_first_frame=true"]
    args = inference.build_parser().parse_intermixed_args(argv)
    _, causal = model_folder.load_transformer(folder)
    cfg = inference.resolve_config(args, causal, "cuda")
    options = inference.run_options(args, cfg, "cuda")
    assert (options.height, options.width, options.fps) == (64, cfg.inference.width, 8) and cfg.inference.height != 64
    assert options.settings.frames_per_block == 2 and options.settings.independent_first_frame
    assert options.latent_frames == 3 * 2 + 1  # the independent first frame is a block of its own
    assert options.levers == levers_for(cfg, "cuda", fused_qkv=False) and options.levers.compile
    assert options.settings.steps == options.schedule.denoising_steps(cfg.rollout.denoising_step_list,
                                                                       cfg.rollout.warp_denoising_step)
    # demo.py has no --height, --fps or --total-blocks: the config's values.
    demo_args = demo.build_parser().parse_intermixed_args(["--model", str(folder)])
    shown = inference.run_options(demo_args, inference.resolve_config(demo_args, causal, "cpu"), "cpu")
    video = cfg.inference
    assert (shown.height, shown.width, shown.fps, shown.latent_frames) == (video.height, video.width, video.fps,
                                                                           cfg.rollout.image_or_video_shape[1])
    both = inference.build_parser().parse_intermixed_args(["--total-blocks", "2", "--num_output_frames", "4"])
    with pytest.raises(inference.UsageError, match="give --total-blocks or --num_output_frames, not both"):
        inference.run_options(both, cfg, "cpu")


def test_a_pipeline_configured_for_cuda_times_attention_and_graphs_the_generator(folder, monkeypatch):
    """`configure_levers` with a CUDA device (no tensor is made there: the timing is replaced) sets the generator's
    options and the process back-end; the pipeline built with them replays graphs."""
    timed = []

    def fake_timing(device, dtype, **shape):
        timed.append((device.type, dtype, shape))
        return {"ms": {"sdpa": 2.0, "sdpa_cudnn": 1.0}, "fastest": "sdpa_cudnn"}
    monkeypatch.setattr(levers_module, "fastest_attention_backend", fake_timing)
    args = inference.build_parser().parse_intermixed_args(["--model", str(folder), "--height", "64", "--width", "96"])
    generator, causal = model_folder.load_transformer(folder)
    cfg = inference.resolve_config(args, causal, "cuda")
    codec = model_folder.load_codec(folder)
    options = inference.run_options(args, cfg, "cuda")
    chosen = inference.configure_levers(options, generator, codec, torch.device("cuda"), torch.bfloat16)
    assert chosen.attention_backend == "sdpa_cudnn" and attention._backend == "sdpa_cudnn"
    tokens_per_frame = (64 // 2 // 2) * (96 // 2 // 2)  # x2 pixel codec, then 2x2 patches
    assert timed == [("cuda", torch.bfloat16, {"num_heads": 2, "head_dim": 16, "query_tokens": 2 * tokens_per_frame,
                                                "key_tokens": cfg.rollout.num_training_frames * tokens_per_frame})]
    assert generator.inference_options.fused_qkv and generator.cached_pieces is EAGER_PIECES
    pipe = CausalInferencePipeline(generator, None, codec, None, None, compile=chosen.compile,
                                   cuda_graphs=chosen.cuda_graphs)
    assert isinstance(pipe.denoiser.model, GraphedDiT)
    assert chosen.compile and isinstance(generator.cached_pieces, CompiledPieces)  # compiled by the pipeline


def test_the_built_cpu_pipeline_records_its_levers_in_the_stats(folder, tmp_path):
    out = tmp_path / "out"
    assert inference.main(["--model", str(folder), "--prompt", "a red circle", "--total-blocks", "1",
                           "--output-dir", str(out)]) == 0
    stats = json.loads(next(out.glob("stats_*.json")).read_text())
    assert stats["levers"] == dataclasses.asdict(Levers())
    assert stats["text_encoding_ms_all_prompts"] > 0


def test_demo_builds_through_the_same_levers_with_compile_left_to_the_page(folder, tmp_path):
    args = demo.build_parser().parse_intermixed_args(["--no-fused-qkv"])
    assert args.compile is None and args.fused_qkv is False and args.cuda_graphs is None
    cfg = inference.resolve_config(args, {}, "cuda")
    assert levers_for(cfg, "cuda", fused_qkv=args.fused_qkv) == Levers(compile=True, cuda_graphs=True,
                                                                        fused_qkv=False, attention_backend=MEASURE,
                                                                        decode_frames_per_call=1)
    # The pipeline stays uncompiled (a job that asks compiles a twin); --compile starts the page's switch on.
    for argv, page in (([], False), (["--compile"], True)):
        args = demo.build_parser().parse_intermixed_args(["--model", str(folder), "--output-dir", str(tmp_path),
                                                          *argv])
        service = demo.load_service(args)
        assert service.pipe.generator.cached_pieces is EAGER_PIECES and service.pipe.levers.compile is False
        assert service.info()["default_compile"] is page and service.default_compile is page


# ------------------------------------------------------------------------------------------------ presets
def test_long_preset_sets_the_rolling_cache_only_and_keeps_the_models_settings(folder):
    args = inference.build_parser().parse_intermixed_args(["--model", str(folder), "--preset", "long"])
    pipe, cfg, source, _ = inference.build_pipeline(args, torch.device("cpu"), torch.float32)
    assert source == str(folder)
    st = pipe.settings
    assert (st.window_frames, st.sink_frames, st.rope) == (21, 5, "relative")
    # The tiny folder's own rollout (2-frame blocks, 3 steps, 8 fps, pixel codec) is untouched.
    assert st.frames_per_block == 2 and len(st.steps) == 3
    assert cfg.inference.fps == 8 and cfg.inference.decoder == "pixel"


def test_long_preset_on_the_bundled_model_keeps_the_bundled_model(tmp_path):
    args = inference.build_parser().parse_intermixed_args(["--preset", "long"])
    pipe, _, source, _ = inference.build_pipeline(args, torch.device("cpu"), torch.float32)
    assert source == str(inference.DEFAULT_MODEL) and pipe.settings.window_frames == 21


def test_presets_with_wan_weights_lie_on_the_released_checkpoints_settings():
    """No model folder: the released checkpoint's rollout (warped steps, Wan VAE) under any preset."""
    for preset, decoder in (("long", "wan"), ("taehv", "taehv"), ("official", "wan")):
        args = inference.build_parser().parse_intermixed_args(["--preset", preset, "--checkpoint_path", "x.pt"])
        cfg = inference.resolve_config(args, None)
        assert cfg.rollout.warp_denoising_step and cfg.rollout.num_frame_per_block == 3, preset
        assert cfg.inference.decoder == decoder, preset
        assert cfg.rollout.local_attn_size == (21 if preset == "long" else -1)


# ------------------------------------------------------------------------------------------------ memory
def test_stats_and_summary_carry_both_memory_figures(folder, tmp_path, capsys):
    out = tmp_path / "out"
    assert inference.main(["--model", str(folder), "--prompt", "a red circle", "--total-blocks", "1",
                           "--output-dir", str(out)]) == 0
    stats = json.loads(next(out.glob("stats_*.json")).read_text())
    assert {"peak_allocated_gib", "peak_reserved_gib"} <= set(stats) and "peak_gpu_memory_gib" not in stats
    assert "block_reserved_gib" not in stats and "allocator" not in stats  # no GPU, no allocator to report
    assert "peak GPU memory: n/a (not on CUDA)" in capsys.readouterr().out


def test_model_parts_run_in_the_generators_precision(folder):
    args = inference.build_parser().parse_intermixed_args(["--model", str(folder)])
    pipe = inference.build_pipeline(args, torch.device("cpu"), torch.bfloat16).pipe
    assert pipe.dtype == torch.bfloat16
    assert next(pipe.text_encoder.encoder.parameters()).dtype == torch.bfloat16


def test_a_video_shorter_than_the_window_gets_a_cache_of_its_own_length_and_the_same_frames(folder):
    rolling = load_pipe(folder, window_frames=21, sink_frames=5, rope="relative")
    full = load_pipe(folder, rope="relative")
    a = rolling.generate(["a cat jumps"], VideoRequest(4, 32, 48, generator=torch.Generator().manual_seed(3)))
    b = full.generate(["a cat jumps"], VideoRequest(4, 32, 48, generator=torch.Generator().manual_seed(3)))
    tokens_per_frame = rolling.generator.tokens_per_frame(16, 24)
    assert rolling._kv.capacity == 4 * tokens_per_frame  # not the window's 21 frames
    assert torch.equal(a.latents, b.latents)
    # Longer than the window: the cache is the window's, and it rolls.
    rolling.generate(["a cat jumps"], VideoRequest(24, 32, 48, generator=torch.Generator().manual_seed(3)))
    assert rolling._kv.capacity == 21 * tokens_per_frame and rolling._kv.sink == 5 * tokens_per_frame


def test_a_replaced_cache_takes_its_graphs_with_it(folder):
    pipe = load_pipe(folder)
    graphed = GraphedDiT(pipe.generator, emulate=True)
    pipe.denoiser = Denoiser(graphed, pipe.schedule)
    for frames in (4, 4, 6):
        pipe.generate(["a cat jumps"], VideoRequest(frames, 32, 48, generator=torch.Generator().manual_seed(0)))
        # Every recorded plan is of the live cache: none keeps an old cache (and its memory) alive.
        assert {captured.kv_cache for captured in graphed._graphs.values()} == {pipe._kv}
    assert graphed.replays > 0


def test_help_names_the_ways_onto_a_small_card(capsys):
    with pytest.raises(SystemExit):
        inference.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--text-encoder-device" in text and "the way onto a card of 24 GB or less" in text
    assert "--offload-text-encoder" in text and "--no-compile" in text and "--no-cuda-graphs" in text


def test_offloading_the_text_encoder_returns_its_gpu_memory(monkeypatch):
    """`TextEncoder.offload` empties the allocator's cache once the weights left a CUDA device (faked here)."""
    from tests.tiny import tiny_text_encoder
    emptied = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(True))
    text = tiny_text_encoder()
    text.offload()
    assert emptied == []  # on the CPU already: nothing to give back
    param = next(text.encoder.parameters())
    monkeypatch.setattr(type(param), "is_cuda", property(lambda self: True))
    text.offload()
    assert emptied == [True]


def test_compile_is_no_cuda_default_without_triton(monkeypatch):
    monkeypatch.setattr(levers_module, "compiler_available", lambda: False)
    levers = cli_levers([], "cuda")
    assert not levers.compile and levers.cuda_graphs and levers.fused_qkv
    assert cli_levers(["--compile"], "cuda").compile  # asked for: tried, and its failure names the cause


def test_the_wan_vae_decodes_one_latent_frame_per_call_on_cuda_unless_asked():
    from pipeline.levers import CUDA_DECODE_FRAMES_PER_CALL
    from utils.config import load_config
    cfg = load_config(None, [])
    assert CUDA_DECODE_FRAMES_PER_CALL == 1
    assert levers_for(cfg, "cuda").decode_frames_per_call == 1
    assert levers_for(cfg, "cuda", decode_frames_per_call=3).decode_frames_per_call == 3
    assert levers_for(cfg, "cpu").decode_frames_per_call is None  # the decoder's own default, a block
    args = inference.build_parser().parse_intermixed_args(["--decode-frames-per-call", "3"])
    options = inference.run_options(args, inference.resolve_config(args, {}, "cuda"), "cuda")
    assert options.levers.decode_frames_per_call == 3


def test_cuda_graphs_are_never_on_off_cuda_even_when_asked():
    from utils.config import load_config
    cfg = load_config(None, ["compile=false", "cuda_graphs=true", "attention_backend=sdpa_flash"])
    assert levers_for(cfg, "cpu") == Levers(compile=False, cuda_graphs=False, fused_qkv=False,
                                            attention_backend="sdpa_flash")


@pytest.fixture(scope="module")
def tiny_wan_folder(tmp_path_factory):
    """A folder with the Wan VAE's architecture at toy widths (benchmarks/random_wan_folder.py --tiny)."""
    folder = tmp_path_factory.mktemp("wan") / "tiny_wan"
    benchmark_module("random_wan_folder").main(["--tiny", "--out", str(folder), "--device", "cpu"])
    return folder


def test_fewer_latent_frames_per_decoder_call_give_the_same_video(tiny_wan_folder):
    videos, calls = {}, {}
    for per_call in (None, 1):
        argv = ["--model", str(tiny_wan_folder)] + ([] if per_call is None else ["--decode-frames-per-call", "1"])
        args = inference.build_parser().parse_intermixed_args(argv)
        pipe = inference.build_pipeline(args, torch.device("cpu"), torch.float32).pipe
        assert pipe.levers.decode_frames_per_call == per_call
        seen = calls[per_call] = []
        hook = pipe.codec.vae.decoder.register_forward_pre_hook(
            lambda _, a, kw, seen=seen: seen.append(a[0].shape[2]), with_kwargs=True)
        request = VideoRequest(6, 64, 96, generator=torch.Generator().manual_seed(1))
        videos[per_call] = pipe.generate(["a cat walks"], request).video
        hook.remove()
    assert calls[1] == [1] * 6 and calls[None] == [1, 2, 3]  # block 0: its first frame alone, then 2; block 1: 3
    torch.testing.assert_close(videos[1], videos[None], atol=1e-5, rtol=0)
    assert inference.main(["--model", str(tiny_wan_folder), "--decode-frames-per-call", "0", "--prompt", "x"]) == 2


def test_a_demo_request_without_compile_takes_the_pages_default():
    from webdemo.jobs import parse_request
    body = {"prompt": "a red circle", "blocks": 1, "decoder": "pixel"}
    assert parse_request(body, max_blocks=4, decoders=["pixel"], default_compile=True).compile is True
    assert parse_request(body, max_blocks=4, decoders=["pixel"]).compile is False
    assert parse_request(dict(body, compile=False), max_blocks=4, decoders=["pixel"], default_compile=True).compile \
        is False
