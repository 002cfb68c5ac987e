"""CUDA checks: every attention path in float32 and bfloat16 on the GPU, against the CPU/dense references."""
from __future__ import annotations

import copy

import pytest
import torch

from model.attention import BlockCausal
from tests.model.test_wan_golden import build_model
from tests.tiny import tiny_inputs, tiny_model

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def exact_matmul():
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.golden
@pytest.mark.parametrize("layout", ["bidirectional", "block_causal", "local", "teacher_forcing"])
def test_golden_paths_on_cuda_float32(golden, layout):
    case = golden("wan_dit_causal_train" if layout != "bidirectional" else "wan_dit_bidirectional")
    model, _ = build_model(case)
    model = model.to(CUDA)
    io = {k: v.to(CUDA) for k, v in case.io.items()}
    meta = case.meta
    with torch.no_grad():
        if layout == "bidirectional":
            out, ref = model(io["noisy_input"], io["timestep"][:, 0], io["prompt_embeds"]), io["flow_pred"]
        else:
            spec = BlockCausal(meta["num_frame_per_block"], meta["independent_first_frame"],
                               meta["local_attn_size_variant"] if layout == "local" else -1)
            args = (io["noisy_input"], io["timestep"], io["prompt_embeds"])
            if layout == "teacher_forcing":
                out = model.forward_teacher_forcing(*args, io["clean_input"], spec)
            else:
                out = model(*args, block_causal=spec)
            ref = io[{"block_causal": "flow_pred", "local": "local_attn.flow_pred",
                      "teacher_forcing": "teacher_forcing.flow_pred"}[layout]]
    torch.testing.assert_close(out, ref, atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
def test_flex_block_causal_and_kv_cache_on_cuda(dtype, tol):
    cpu_model = tiny_model(num_heads=2, dim=64, ffn_dim=128)
    x, context = tiny_inputs(cpu_model, frames=8, height=8, width=12)
    t = torch.tensor([900.0, 900.0, 500.0, 500.0, 10.0, 10.0, 700.0, 700.0]).expand(2, 8).clone()
    with torch.no_grad():
        reference = cpu_model(x, t, context, block_causal=BlockCausal(2))
        model = cpu_model.to(CUDA, dtype)
        xc, cc, tc = x.to(CUDA, dtype), context.to(CUDA, dtype), t.to(CUDA)
        flex = model(xc, tc, cc, block_causal=BlockCausal(2))
        cache = model.new_kv_cache(2, 8, 12, capacity_frames=8)
        chunks = torch.cat([model.forward_cached(xc[:, s:s + 2], tc[:, s:s + 2], cc, cache, s)
                            for s in range(0, 8, 2)], dim=1)
    assert flex.dtype == dtype
    assert rel_err(flex.cpu(), reference) < tol
    assert rel_err(chunks.cpu(), reference) < tol


def test_training_backward_through_flex_on_cuda():
    model = tiny_model().to(CUDA, torch.bfloat16)
    model.set_gradient_checkpointing(True)
    x, context = tiny_inputs(model, frames=4)
    t = torch.full((2, 4), 500.0, device=CUDA)
    out = model(x.to(CUDA, torch.bfloat16), t, context.to(CUDA, torch.bfloat16), block_causal=BlockCausal(2))
    out.float().square().mean().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_levers_on_cuda_match_the_plain_path(dtype):
    """The CUDA-only levers (cuBLASLt's GELU epilogue, K/V stored from the compiled piece) under torch.compile and
    CUDA graphs give the plain path's numbers; the epilogue is the tanh GELU of Wan's FFN, not the erf one."""
    from model.wan_block import EAGER_PIECES, InferenceOptions, _ffn
    from pipeline.compile import CompiledPieces
    from pipeline.cuda_graphs import GraphedDiT
    from pipeline.denoiser import Denoiser
    from pipeline.rollout import RolloutOptions, rollout
    from tests.pipeline.test_inference_speed import SCHEDULE, STEPS
    model = tiny_model().to(CUDA, dtype)
    h = torch.randn(1, 40, model.config.dim, device=CUDA, dtype=dtype)
    ffn = model.blocks[0].ffn
    tanh_err = rel_err(_ffn(ffn, h, gelu_epilogue=True), ffn(h))
    erf = ffn[2](torch.nn.functional.gelu(ffn[0](h)))
    assert tanh_err < (1e-5 if dtype == torch.float32 else 1e-2)
    if dtype == torch.float32:
        assert rel_err(_ffn(ffn, h, gelu_epilogue=True), erf) > 10 * tanh_err

    g = torch.Generator(device=CUDA).manual_seed(0)
    noise = torch.randn(1, 8, 4, 4, 6, generator=g, device=CUDA, dtype=dtype)
    context = torch.randn(1, 6, 16, generator=g, device=CUDA, dtype=dtype)

    def run(options, graphs, compiled=False):
        model.inference_options = options
        model.cached_pieces = CompiledPieces() if compiled else EAGER_PIECES
        cache = model.new_kv_cache(1, 4, 6, 6, window_frames=6, sink_frames=2, rope="relative")
        renoise = torch.Generator(device=CUDA).manual_seed(1)
        with torch.no_grad():
            return rollout(Denoiser(GraphedDiT(model) if graphs else model, SCHEDULE), noise, context, cache,
                           RolloutOptions(steps=STEPS, frames_per_block=2, noise_fn=lambda x: torch.randn(
                               x.shape, generator=renoise, device=CUDA).to(x))).latents

    torch._dynamo.reset()
    plain = run(InferenceOptions(gelu_epilogue=False, fused_cache_write=False), graphs=False)
    fast = InferenceOptions(fused_qkv=True, gelu_epilogue=True, fused_cache_write=True)
    for graphs in (False, True):
        assert rel_err(run(fast, graphs, compiled=True), plain) < (1e-4 if dtype == torch.float32 else 2e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_rollout_and_side_stream_decode_match_eager(dtype):
    """Real CUDA-graph captures (one per cache plan) and decoding on a side stream give the eager numbers."""
    from model.pixel_codec import PixelShuffleCodec
    from pipeline.cuda_graphs import GraphedDiT
    from pipeline.denoiser import Denoiser
    from pipeline.rollout import RolloutOptions, rollout
    from pipeline.streaming import BlockDecoder
    from tests.pipeline.test_inference_speed import SCHEDULE, STEPS
    model = tiny_model().to(CUDA, dtype)
    g = torch.Generator(device=CUDA).manual_seed(0)
    noise = torch.randn(1, 8, 4, 4, 6, generator=g, device=CUDA, dtype=dtype)
    context = torch.randn(1, 6, 16, generator=g, device=CUDA, dtype=dtype)

    def run(net, decoder=None):
        cache = model.new_kv_cache(1, 4, 6, 6, window_frames=6, sink_frames=2, rope="relative")
        renoise = torch.Generator(device=CUDA).manual_seed(1)
        on_block = (lambda i, s, x0: decoder.submit(i, x0)) if decoder is not None else None
        with torch.no_grad():
            return rollout(Denoiser(net, SCHEDULE), noise, context, cache, RolloutOptions(
                steps=STEPS, frames_per_block=2, on_block=on_block,
                noise_fn=lambda x: torch.randn(x.shape, generator=renoise, device=CUDA).to(x))).latents

    eager = run(model)
    graphed = GraphedDiT(model)
    codec = PixelShuffleCodec(spatial_factor=1, pixel_channels=4)  # the tiny model's 4 latent channels
    for _ in range(2):  # capture, then replay
        decoder = BlockDecoder(codec.stream_decoder(), CUDA)
        out = run(graphed, decoder)
        frames = torch.cat(decoder.finish(), dim=1)
    assert not graphed.errors and graphed.captures > 0 and graphed.replays > 0
    assert rel_err(out, eager) < (1e-5 if dtype == torch.float32 else 1e-2)
    decoded = (codec.decode_to_pixel(out.float()) * 0.5 + 0.5).clamp(0, 1)
    torch.testing.assert_close(frames, decoded, atol=1e-5, rtol=1e-5)
    assert decoder.time_to_first_frame_ms > 0
    # Frames copied to pinned host memory on the decode stream: CPU tensors, the same numbers, handed out in order.
    for side_stream in (True, False):
        handed = []
        decoder = BlockDecoder(codec.stream_decoder(), CUDA, side_stream=side_stream, frames_on_host=True,
                               on_frames=lambda i, px: handed.append((i, px)))
        run(graphed, decoder)
        host = decoder.finish()
        assert all(f.device.type == "cpu" and f.is_pinned() for f in host)
        assert [i for i, _ in handed] == sorted(i for i, _ in handed)
        torch.testing.assert_close(torch.cat(host, dim=1), decoded.cpu(), atol=1e-5, rtol=1e-5)


def test_fp8_linear_kernel_matches_its_cpu_emulation():
    """torch._scaled_mm with row-wise scales (FP8 tensor cores) computes what model/fp8.py emulates on the CPU."""
    from torch import nn

    from model.fp8 import Fp8Linear, fp8_matmul_supported
    if not fp8_matmul_supported(CUDA):
        pytest.skip("no FP8 tensor cores on this GPU")
    torch.manual_seed(0)
    linear = nn.Linear(1536, 8960).to(CUDA, torch.bfloat16)
    x = torch.randn(2, 520, 1536, device=CUDA, dtype=torch.bfloat16)
    layer = Fp8Linear(linear)
    with torch.no_grad():
        kernel = layer(x)
        reference = linear(x)
        # Module.cpu()/float() convert in place: the emulation gets its own fp32 copy on the CPU.
        emulated = Fp8Linear(copy.deepcopy(linear).cpu().float())(x.cpu().float())
    assert kernel.dtype == torch.bfloat16 and kernel.shape == (2, 520, 8960)
    assert rel_err(kernel.cpu(), emulated) < 1e-2  # bf16 output rounding and accumulation order
    assert rel_err(kernel, reference) < 6e-2


def test_channels_last_wan_vae_decode_on_cuda():
    """The NDHWC decoder (cuDNN's channels-last Conv3d kernels) gives the plain decoder's frames."""
    from tests.entry.test_speed_benchmark import benchmark_module
    random_codec = benchmark_module("common").random_codec  # both seeded alike: the same weights
    plain = random_codec("wan_vae", CUDA, torch.bfloat16, tiny=True)
    fast = random_codec("wan_vae_cl", CUDA, torch.bfloat16, tiny=True)
    latent = torch.randn(1, 3, plain.latent_channels, 12, 16, device=CUDA, dtype=torch.bfloat16)
    with torch.no_grad():
        a = plain.stream_decoder().decode_chunk(latent)
        b = fast.stream_decoder().decode_chunk(latent)
    assert rel_err(b, a) < 1e-2


def test_pipeline_wan_vae_decoder_on_cuda():
    """WanVAE.speed_up_decoder (NDHWC, padded channels and convolutions, regions compiled by inductor) streams the plain
    decoder's frames, through the steady calls too: against the plain decoder in float32 it is as close as the plain
    bf16 decoder is (inductor keeps its fused norms in float32, so the two bf16 roundings differ by ~2%, the CPU
    tests show the walk itself exact)."""
    from tests.entry.test_speed_benchmark import benchmark_module
    random_codec = benchmark_module("common").random_codec  # all seeded alike: the same weights
    exact = random_codec("wan_vae", CUDA, torch.float32, tiny=True)
    plain = random_codec("wan_vae", CUDA, torch.bfloat16, tiny=True)
    fast = random_codec("wan_vae_pipeline", CUDA, torch.bfloat16, tiny=True)
    latent = torch.randn(1, 9, plain.latent_channels, 12, 16, device=CUDA, dtype=torch.bfloat16)

    def stream(codec):
        decoder = codec.stream_decoder()
        return torch.cat([decoder.decode_chunk(latent[:, i:i + 3].to(next(codec.parameters()).dtype))
                          for i in range(0, 9, 3)], dim=1)

    with torch.backends.cudnn.flags(allow_tf32=False), torch.no_grad():
        reference, a, b = stream(exact), stream(plain), stream(fast)
        b_again = stream(fast)
    assert fast.decoder_steady is not None and a.shape == b.shape == reference.shape == (1, 33, 3, 96, 128)
    plain_err = rel_err(a, reference)
    assert plain_err < 3e-2 and rel_err(b, reference) < 1.5 * plain_err and rel_err(b_again, b) < 1e-3


def test_reserved_memory_stays_flat_over_videos_decoded_on_the_side_stream():
    """Every video's decoder runs on the one side stream of the device, so the activations the allocator cached for
    the first video serve the next ones: the reserved memory grows with the first video only (a stream per video
    kept each video's working set cached apart)."""
    from pipeline.streaming import BlockDecoder
    from tests.entry.test_speed_benchmark import benchmark_module
    codec = benchmark_module("common").random_codec("wan_vae", CUDA, torch.bfloat16, tiny=True)
    latent = torch.randn(1, 6, codec.latent_channels, 30, 52, device=CUDA, dtype=torch.bfloat16)
    torch.cuda.synchronize()
    before = torch.cuda.memory_reserved(CUDA)
    reserved = []
    with torch.no_grad():
        for _ in range(4):
            decoder = BlockDecoder(codec.stream_decoder(), CUDA)
            for start in range(0, latent.shape[1], 3):
                decoder.submit(start // 3, latent[:, start:start + 3])
            decoder.finish()
            del decoder
            torch.cuda.synchronize()
            reserved.append(torch.cuda.memory_reserved(CUDA))
    first_video = reserved[0] - before
    assert first_video > 0 and reserved[-1] - reserved[0] < 0.5 * first_video, (before, reserved)


@pytest.mark.parametrize("backend", ["sdpa_cudnn_halves", "flash_attn_halves"])
def test_key_halves_backends_match_cudnn_sdpa(backend):
    """The *_halves back-ends (keys in two halves as a batch of two, one kernel launch, merged by their log-sum-exps)
    against whole cuDNN attention on a block's shapes; short key sets take the plain path."""
    from model import attention as backends
    if backend.startswith("flash") and backends._flash_attn_func() is None:
        pytest.skip("no flash-attn installed")
    g = torch.Generator(device=CUDA).manual_seed(0)
    q = torch.randn(1, 520, 12, 128, device=CUDA, dtype=torch.bfloat16, generator=g)
    k, v = (torch.randn(1, 4160, 12, 128, device=CUDA, dtype=torch.bfloat16, generator=g) for _ in range(2))
    ref = backends._sdpa(q, k, v, "cudnn")
    backends.set_attention_backend(backend)
    try:
        with torch.no_grad():
            out = backends.attention(q, k, v)
            short = backends.attention(q, k[:, :512], v[:, :512])
    finally:
        backends.set_attention_backend("auto")
    assert out.shape == ref.shape and rel_err(out, ref) < 1e-2
    assert short.shape == q.shape and rel_err(short, backends._sdpa(q, k[:, :512], v[:, :512], "cudnn")) < 1e-2


def test_installed_flash_attn_matches_cudnn_sdpa_and_compiles_as_one_op():
    """Whichever flash-attn is installed (3, 4 or 2) against cuDNN SDPA on the rollout's shapes (queries of one block,
    keys of the whole cache; head dim 128): eager, inside a fullgraph compile, and under a CUDA graph capture of that
    compiled function. Each stage's error is collected so one run on a lent GPU reports all of them."""
    import traceback

    from model import attention as backends
    if backends._flash_attn_func() is None:
        pytest.skip("no flash-attn installed")
    g = torch.Generator(device=CUDA).manual_seed(0)
    q = torch.randn(1, 96, 4, 128, device=CUDA, dtype=torch.bfloat16, generator=g)
    k, v = (torch.randn(1, 480, 4, 128, device=CUDA, dtype=torch.bfloat16, generator=g) for _ in range(2))
    outcome: dict[str, object] = {}

    def stage(name, fn):
        try:
            outcome[name] = rel_err(fn(), outcome.get("scale", 1) * ref)
        except Exception:  # noqa: BLE001 - reported below with the other stages
            outcome[name] = traceback.format_exc(limit=6)

    try:
        backends.set_attention_backend("sdpa_cudnn")
        ref = backends.attention(q, k, v)
        backends.set_attention_backend("flash_attn")
        stage("eager", lambda: backends.attention(q, k, v))
        outcome["scale"] = 2
        compiled = torch.compile(lambda q, k, v: backends.attention(q, k, v) * 2, fullgraph=True)
        stage("compiled", lambda: compiled(q, k, v))
        graphed = torch.compile(lambda q, k, v: backends.attention(q, k, v) * 2, fullgraph=True,
                                mode="reduce-overhead")
        # warm-up, capture, replay
        stage("compiled+cudagraphs", lambda: [graphed(q, k, v).clone() for _ in range(3)][-1])
    finally:
        backends.set_attention_backend("auto")
    outcome.pop("scale")
    bad = {name: value for name, value in outcome.items() if not isinstance(value, float) or value >= 1e-2}
    assert not bad, "\n".join(f"{name}: {value}" for name, value in bad.items())
