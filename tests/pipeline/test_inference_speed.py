"""The inference speed levers give the numbers of the plain path: relative RoPE without re-rotating the window,
the `InferenceOptions` switches, compiled layer pieces, the CUDA-graph runner's plumbing and streamed decoding."""
from __future__ import annotations

import shutil

import pytest
import torch

from model.wan_block import InferenceOptions
from pipeline.denoiser import Denoiser
from pipeline.rollout import RolloutOptions, rollout
from pipeline.schedule import FlowMatchSchedule
from tests.tiny import tiny_model

SCHEDULE = FlowMatchSchedule(5.0)
STEPS = SCHEDULE.warp([1000, 750, 500, 250]).tolist()


def run_rollout(model, blocks: int, frames_per_block: int = 2, *, window: int = -1, sink: int = 0,
                rope: str = "absolute", rerotate: bool = False, steps=STEPS, context=None, denoiser=None,
                seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(1, blocks * frames_per_block, model.config.in_dim, 4, 6, generator=g)
    context = torch.randn(1, 6, model.config.text_dim, generator=g) if context is None else context
    frames = blocks * frames_per_block
    cache = model.new_kv_cache(1, 4, 6, window if window != -1 else frames, window_frames=window, sink_frames=sink,
                               rope=rope, rerotate_window=rerotate)
    renoise = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        return rollout(denoiser or Denoiser(model, SCHEDULE), noise, context, cache, RolloutOptions(
            steps=steps, frames_per_block=frames_per_block,
            noise_fn=lambda x: torch.randn(x.shape, generator=renoise))).latents


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.slow
def test_relative_rope_rotates_only_the_sink_and_equals_window_rerotation_past_the_table():
    # 60 blocks of 2 frames through a 6-frame window with 2 sink frames, past a 64-position RoPE table.
    model = tiny_model(rope_max_positions=64)
    kwargs = {"blocks": 60, "window": 6, "sink": 2, "rope": "relative", "steps": STEPS[:2]}
    reference = run_rollout(model, rerotate=True, **kwargs)
    fast = run_rollout(model, **kwargs)
    assert torch.isfinite(fast).all()
    torch.testing.assert_close(fast, reference, atol=2e-5, rtol=2e-5)


def test_relative_rope_equals_rerotation_across_a_prompt_switch():
    # The switch re-caches the sink blocks, then jumps to the window: held keys are re-rotated by the jump.
    model = tiny_model()
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(1, 6, 16, generator=g), torch.randn(1, 6, 16, generator=g)
    outs = []
    for rerotate in (True, False):
        outs.append(run_rollout(model, 8, window=6, sink=3, rope="relative", rerotate=rerotate,
                                context=[(0, a), (5, b)], steps=STEPS[:2]))
    torch.testing.assert_close(outs[1], outs[0], atol=2e-5, rtol=2e-5)


# On the CPU gelu_epilogue must keep the plain path: there `_addmm_activation` applies the erf GELU, which differs.
# fused_cache_write runs both ways here: the sink block goes through `KVCache.write`, the others in place.
@pytest.mark.parametrize("lever", ["fused_rope", "reuse_text", "cache_pass_kv_only", "fused_qkv", "gelu_epilogue",
                                   "fused_cache_write", "all"])
def test_each_inference_option_matches_the_plain_path(lever):
    model = tiny_model()
    model.inference_options = InferenceOptions.all_off()
    reference = run_rollout(model, 3, window=4, sink=1, rope="relative")
    if lever == "all":
        model.inference_options = InferenceOptions(fused_qkv=True, gelu_epilogue=True, fused_cache_write=True)
    else:
        model.inference_options = InferenceOptions.all_off()
        setattr(model.inference_options, lever, True)
    fast = run_rollout(model, 3, window=4, sink=1, rope="relative")
    torch.testing.assert_close(fast, reference, atol=1e-5, rtol=1e-5)


def test_residual_stream_is_row_major_in_every_layer_and_mode():
    # A transposed stream (the patch embedding's channels-first output, viewed) made every norm a column reduction.
    from model.attention import BlockCausal
    model = tiny_model()
    layouts = []
    for block in model.blocks:
        block.register_forward_pre_hook(lambda module, args: layouts.append(args[0].is_contiguous()))
    x, t, context = torch.randn(1, 4, 4, 4, 6), torch.full((1, 4), 500.0), torch.randn(1, 6, 16)
    cache = model.new_kv_cache(1, 4, 6, 4)
    with torch.no_grad():
        model(x, t[:, 0], context)
        model(x, t, context, block_causal=BlockCausal(frames_per_block=2))
        model.forward_cached(x[:, :2], t[:, :2], context, cache, 0)
    assert len(layouts) == 3 * len(model.blocks) and all(layouts)


def test_fused_qkv_follows_weight_updates():
    model = tiny_model()
    model.inference_options = InferenceOptions(fused_qkv=True)
    before = run_rollout(model, 2)
    with torch.no_grad():
        model.blocks[0].self_attn.k.weight.mul_(1.5)  # in place, as an optimizer step
    after = run_rollout(model, 2)
    model.inference_options = InferenceOptions()
    torch.testing.assert_close(after, run_rollout(model, 2), atol=1e-5, rtol=1e-5)
    assert (after - before).abs().max() > 1e-4


def test_cache_write_with_and_without_the_kv_only_lever_writes_the_same_cache():
    model = tiny_model()
    x = torch.randn(1, 2, 4, 4, 6)
    t = torch.zeros(1, 2)
    context = torch.randn(1, 6, 16)
    caches = []
    for kv_only in (False, True):
        model.inference_options = InferenceOptions(cache_pass_kv_only=kv_only)
        cache = model.new_kv_cache(1, 4, 6, 4)
        heads = []
        hook = model.head.register_forward_hook(lambda *_: heads.append(1))
        with torch.no_grad():
            assert model.write_cache(x, t, context, cache, 0) is None
        hook.remove()
        assert len(heads) == (0 if kv_only else 1)  # the lever stops before the output head
        caches.append(cache)
    torch.testing.assert_close(caches[1].k, caches[0].k)
    torch.testing.assert_close(caches[1].v, caches[0].v)


@pytest.mark.parametrize("policy, positions", [({}, 4), ({"window": 4, "sink": 1, "rope": "relative"}, 2)])
def test_graph_runner_replays_each_plan_with_fresh_inputs(policy, positions):
    from pipeline.cuda_graphs import GraphedDiT
    model = tiny_model()
    reference = run_rollout(model, 4, **policy)
    graphed = GraphedDiT(model, emulate=True)
    out = run_rollout(model, 4, denoiser=Denoiser(graphed, SCHEDULE), **policy)
    torch.testing.assert_close(out, reference, atol=1e-6, rtol=1e-6)
    # 4 blocks x (4 steps + a cache pass): one capture per (cache plan, kind of call), the rest replays. A rolling
    # cache has the same plan from the block that fills it on.
    assert not graphed.errors
    assert (graphed.captures, graphed.replays) == (positions * 2, 4 * 5 - positions * 2)


def test_graph_runner_frees_its_captures_without_the_cyclic_collector(monkeypatch):
    # A capture held by a reference cycle dies whenever the collector runs, possibly during another capture.
    import gc
    import weakref

    from pipeline import cuda_graphs
    model = tiny_model()
    graphed = cuda_graphs.GraphedDiT(model, emulate=True)
    gc_during_capture = []
    real_init = cuda_graphs._Captured.__init__

    def init(self, *args):
        gc_during_capture.append(gc.isenabled())
        real_init(self, *args)

    monkeypatch.setattr(cuda_graphs._Captured, "__init__", init)
    run_rollout(model, 2, denoiser=Denoiser(graphed, SCHEDULE))
    captured = [weakref.ref(c) for c in graphed._graphs.values() if c]
    assert captured and gc_during_capture and not any(gc_during_capture) and gc.isenabled()
    gc.disable()
    try:
        del graphed
        assert all(ref() is None for ref in captured)
    finally:
        gc.enable()


def test_graph_runner_refills_the_prompt_after_a_switch():
    from pipeline.cuda_graphs import GraphedDiT
    model = tiny_model()
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(1, 6, 16, generator=g), torch.randn(1, 6, 16, generator=g)
    schedule = [(0, a), (2, b)]
    reference = run_rollout(model, 4, window=4, sink=1, rope="relative", context=schedule)
    graphed = GraphedDiT(model, emulate=True)
    out = run_rollout(model, 4, window=4, sink=1, rope="relative", context=schedule,
                      denoiser=Denoiser(graphed, SCHEDULE))
    torch.testing.assert_close(out, reference, atol=1e-6, rtol=1e-6)


@pytest.mark.slow
@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")), reason="inductor on CPU needs a C++ compiler")
def test_compiled_pieces_match_and_compile_once_for_every_layer_and_block_position():
    from torch._dynamo.utils import counters

    from pipeline.compile import compile_pieces
    from pipeline.cuda_graphs import GraphedDiT
    torch._dynamo.reset()
    counters.clear()
    model = tiny_model()
    reference = run_rollout(model, 3, window=4, sink=1, rope="relative")
    compile_pieces(model)
    model.inference_options = InferenceOptions(fused_cache_write=False)
    compiled = run_rollout(model, 3, window=4, sink=1, rope="relative")
    torch.testing.assert_close(compiled, reference, atol=1e-5, rtol=1e-5)
    # Three pieces per layer, each compiled once: shared by both layers, all block positions and kinds of call.
    assert counters["stats"]["unique_graphs"] == 3
    graphed = run_rollout(model, 3, window=4, sink=1, rope="relative",
                          denoiser=Denoiser(GraphedDiT(model, emulate=True), SCHEDULE))
    torch.testing.assert_close(graphed, reference, atol=1e-5, rtol=1e-5)
    assert counters["stats"]["unique_graphs"] == 3
    # Writing K/V into the cache slots from the piece: one more graph (the writing variant of the first piece), not
    # one per slot position (the slots are views at a different offset each block).
    model.inference_options = InferenceOptions(fused_cache_write=True)
    fused = run_rollout(model, 4)
    model.inference_options = InferenceOptions(fused_cache_write=False)
    torch.testing.assert_close(fused, run_rollout(model, 4), atol=1e-5, rtol=1e-5)
    assert counters["stats"]["unique_graphs"] == 4


def tiny_codec(kind: str):
    from diffusers import AutoencoderKLWan

    from model.pixel_codec import PixelShuffleCodec
    from model.taehv import TAEHV, TAEHVCodec
    from model.vae import WAN21_VAE_CONFIG, WanVAE
    torch.manual_seed(0)
    if kind == "wan_vae":
        return WanVAE(AutoencoderKLWan(**dict(WAN21_VAE_CONFIG, base_dim=8)).eval())
    if kind == "taehv":
        return TAEHVCodec(TAEHV(decoder_n_f=(8, 8, 4, 4), encoder_width=4).eval())
    return PixelShuffleCodec(spatial_factor=2)


def decode_blocks(decoder, latents: torch.Tensor, block: int = 2) -> list[torch.Tensor]:
    for start in range(0, latents.shape[1], block):
        decoder.submit(start // block, latents[:, start:start + block])
    return decoder.finish()


@pytest.mark.parametrize("kind", ["pixel", "wan_vae", "taehv"])
def test_block_decoder_hands_out_every_block_in_order_with_a_first_frame_time(kind):
    from pipeline.streaming import BlockDecoder
    codec = tiny_codec(kind)
    latents = torch.randn(1, 6, codec.latent_channels, 4, 6, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        whole = decode_blocks(BlockDecoder(codec.stream_decoder(), torch.device("cpu"), first_frame_alone=False),
                              latents)
        seen = []
        decoder = BlockDecoder(codec.stream_decoder(), torch.device("cpu"), on_frames=lambda i, f: seen.append(i))
        frames = decode_blocks(decoder, latents)
    # The first latent frame is decoded (and handed out) alone: the same frames, block 0 in two parts.
    assert seen == [0, 0, 1, 2] and frames[0].shape[1] == 1
    torch.testing.assert_close(torch.cat(frames, dim=1), torch.cat(whole, dim=1), atol=1e-5, rtol=1e-5)
    assert torch.cat(frames, dim=1).shape[1] == 1 + codec.temporal_factor * 5
    assert decoder.time_to_first_frame_ms is not None and decoder.time_to_first_frame_ms >= 0


def test_every_decoder_of_a_device_shares_one_side_stream(monkeypatch):
    """The caching allocator reuses a freed block only on the stream it was made on: a side stream per video would
    cache every video's decoder activations apart. Every BlockDecoder of a device gets the same stream (CUDA objects
    replaced by stand-ins; nothing runs)."""
    from pipeline import streaming

    class FakeStream:
        def __init__(self, device):
            self.device = device

    class FakeEvent:
        def __init__(self, **kwargs):
            pass

        def record(self, stream=None):
            pass

    monkeypatch.setattr(torch.cuda, "Stream", FakeStream)
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    streaming._decode_stream.cache_clear()
    try:
        first = streaming.BlockDecoder(None, torch.device("cuda"))
        second = streaming.BlockDecoder(None, torch.device("cuda", 0))
        other = streaming.BlockDecoder(None, torch.device("cuda", 1))
        inline = streaming.BlockDecoder(None, torch.device("cuda"), side_stream=False)
    finally:
        streaming._decode_stream.cache_clear()
    assert isinstance(first.stream, FakeStream) and first.stream is second.stream
    assert other.stream is not first.stream and other.stream.device == torch.device("cuda", 1)
    assert inline.stream is None


@pytest.mark.slow
@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")), reason="inductor on CPU needs a C++ compiler")
def test_training_compile_runs_cached_calls_as_shared_pieces_whatever_the_depth():
    """Training's `compile: true` (`pipeline.compile.compile_blocks`) compiles whole blocks; a whole block guards on
    the layer index and the cache's Python state, so a KV-cached rollout recompiled per layer and, past dynamo's limit
    of 8 graphs, ran eager. Cached calls now run the shared pieces: the same few graphs at 2 and 6 layers, the same
    numbers and gradients as eager."""
    import copy

    from torch._dynamo.utils import counters

    from pipeline.compile import compile_blocks
    graphs = {}
    for layers in (2, 6):
        torch._dynamo.reset()
        counters.clear()
        eager = tiny_model(num_layers=layers)
        model = copy.deepcopy(eager)
        compile_blocks(model)
        torch.testing.assert_close(run_rollout(model, 3), run_rollout(eager, 3), atol=1e-5, rtol=1e-5)
        grads = []
        for net in (eager, model):  # one cached call with gradients, as the rollout's last denoising step
            net.zero_grad()
            x = torch.randn(1, 2, net.config.in_dim, 4, 6, generator=torch.Generator().manual_seed(3))
            context = torch.randn(1, 6, net.config.text_dim, generator=torch.Generator().manual_seed(4))
            cache = net.new_kv_cache(1, 4, 6, 2)
            net.forward_cached(x, torch.full((1,), 500.0), context, cache).square().sum().backward()
            grads.append([p.grad.clone() for p in net.parameters() if p.grad is not None])
        assert len(grads[0]) == len(grads[1]) > 0
        for a, b in zip(*grads):
            torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)
        graphs[layers] = counters["stats"]["unique_graphs"]
    assert graphs[2] == graphs[6] <= 6, graphs
