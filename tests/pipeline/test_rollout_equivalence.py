"""One rollout, every way of running it: eager = compiled = CUDA graphs = sequence parallel, and FP8 within its
tolerance. Each way is applied from outside the model (`compile_pieces`, `compile_blocks`, `GraphedDiT`,
`enable_sequence_parallel`, `convert_to_fp8`); the causal rollout of the same noise, prompts and re-noising draws
must give the eager latents. The rollout covers what these ways must all get right: a rolling cache with sink
frames and relative RoPE, a prompt switch (re-caching), several denoising steps and the clean-context passes."""
from __future__ import annotations

import shutil

import pytest
import torch

from pipeline.cuda_graphs import GraphedDiT
from pipeline.denoiser import Denoiser
from pipeline.rollout import RolloutOptions, rollout
from pipeline.schedule import FlowMatchSchedule
from tests.ranks import spawn_ranks
from tests.tiny import tiny_model

SCHEDULE = FlowMatchSchedule(5.0)
STEPS = SCHEDULE.warp([1000, 750, 500]).tolist()
FRAMES, HEIGHT, WIDTH = 10, 4, 6
NET = {"dim": 64, "num_heads": 4, "ffn_dim": 96}  # 4 heads: a 2-way sequence-parallel split gives 2 each
EXACT = {"atol": 1e-5, "rtol": 1e-5}  # float32, different kernels or reduction orders only
FP8_REL = 0.1  # e4m3 weights and activations: a few percent of the latents' norm (tests/test_fp8.py)
needs_inductor = pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")),
                                    reason="inductor on CPU needs a C++ compiler")


def network(device: str = "cpu"):
    return tiny_model(0, **NET).to(device)


def rollout_latents(model, runner=None, device: str = "cpu") -> torch.Tensor:
    """The causal rollout of fixed noise and prompts with `model` (called through `runner` if given, e.g. a
    `GraphedDiT`), under no_grad: latents `[1, FRAMES, C, H, W]`."""
    cfg = model.config
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(1, FRAMES, cfg.in_dim, HEIGHT, WIDTH, generator=g).to(device)
    first, second = (torch.randn(1, cfg.text_len - 2, cfg.text_dim, generator=g).to(device) for _ in range(2))
    cache = model.new_kv_cache(1, HEIGHT, WIDTH, 6, window_frames=6, sink_frames=2, rope="relative")
    renoise = torch.Generator().manual_seed(1)  # identical draws in every run (and on every rank)
    with torch.no_grad():
        return rollout(Denoiser(runner or model, SCHEDULE), noise, [(0, first), (3, second)], cache, RolloutOptions(
            steps=STEPS, frames_per_block=2, renoise_context=True,
            noise_fn=lambda x: torch.randn(x.shape, generator=renoise).to(x))).latents


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.fixture(scope="module")
def eager() -> torch.Tensor:
    return rollout_latents(network())


# ------------------------------------------------------------------------------------------------- one process

def test_the_eager_rollout_depends_on_its_inputs(eager):
    """The reference itself: finite, and not a constant the other ways could match by accident."""
    assert torch.isfinite(eager).all() and eager.shape == (1, FRAMES, 4, HEIGHT, WIDTH)
    other = network()
    with torch.no_grad():
        other.head.head.bias.add_(0.1)
    assert rel_error(rollout_latents(other), eager) > 1e-3


@pytest.mark.slow
@needs_inductor
def test_compiled_pieces_give_the_eager_rollout(eager):
    """Inference's compile lever (`pipeline.compile.compile_pieces`, applied by the pipeline): the layer pieces
    through inductor."""
    from torch._dynamo.utils import counters

    from pipeline.compile import compile_pieces
    torch._dynamo.reset()
    counters.clear()
    model = compile_pieces(network())
    torch.testing.assert_close(rollout_latents(model), eager, **EXACT)
    assert counters["stats"]["unique_graphs"] >= 3  # the pieces around attention really ran compiled


@pytest.mark.slow
@needs_inductor
def test_compiled_blocks_give_the_eager_rollout(eager):
    """Training's regional compilation (`pipeline.compile.compile_blocks`): whole blocks compiled, KV-cached calls
    through the compiled pieces."""
    from torch._dynamo.utils import counters

    from pipeline.compile import compile_blocks
    torch._dynamo.reset()
    counters.clear()
    model = network()
    compile_blocks(model)
    torch.testing.assert_close(rollout_latents(model), eager, **EXACT)
    assert counters["stats"]["unique_graphs"] >= 3


def test_cuda_graph_runner_plumbing_gives_the_eager_rollout(eager):
    """`GraphedDiT` with emulated graphs: static buffers, planned calls and replays, on the CPU."""
    model = network()
    graphed = GraphedDiT(model, emulate=True)
    torch.testing.assert_close(rollout_latents(model, graphed), eager, **EXACT)
    assert graphed.captures > 0 and graphed.replays > 0 and not graphed.errors


def test_fp8_emulation_stays_within_its_tolerance(eager):
    """FP8 linears (the quantized arithmetic, multiplied in float32 off the GPU): close, not equal."""
    from model.fp8 import convert_to_fp8
    model = network()
    assert convert_to_fp8(model) > 0
    assert 0 < rel_error(rollout_latents(model), eager) < FP8_REL


# --------------------------------------------------------------------------------------------- several ranks

def _sequence_parallel_worker(rank: int, out_dir: str) -> None:
    import torch.distributed as dist

    from pipeline.sequence_parallel import enable_sequence_parallel
    torch.set_num_threads(1)  # the ranks share the machine's cores
    dist.init_process_group("gloo")
    model = network()
    enable_sequence_parallel(model)
    torch.save({"latents": rollout_latents(model), "cache_heads": model.new_kv_cache(1, 4, 6, 2).k.shape[3]},
               f"{out_dir}/rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.distributed
def test_sequence_parallel_on_two_ranks_gives_the_eager_rollout(eager, tmp_path):
    spawn_ranks(_sequence_parallel_worker, 2, str(tmp_path))
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert result["cache_heads"] == NET["num_heads"] // 2  # the tokens really were split over the ranks
        torch.testing.assert_close(result["latents"], eager, **EXACT, msg=f"rank {rank}")


# ------------------------------------------------------------------------------------------------------- CUDA

@pytest.mark.gpu
def test_cuda_eager_compiled_and_graphed_give_the_cpu_rollout(eager):
    """On CUDA: eager, compiled pieces, and compiled pieces replayed from real CUDA graphs."""
    from pipeline.compile import compile_pieces
    torch._dynamo.reset()
    model = network("cuda")
    # TF32 and fused CUDA kernels: float32 up to their rounding, not bit-for-bit the CPU's.
    assert rel_error(rollout_latents(model, device="cuda").cpu(), eager) < 1e-4
    compile_pieces(model)
    graphed = GraphedDiT(model)
    for _ in range(2):  # capture, then replay
        assert rel_error(rollout_latents(model, graphed, device="cuda").cpu(), eager) < 1e-4
    assert graphed.captures > 0 and graphed.replays > 0 and not graphed.errors


@pytest.mark.gpu
def test_fp8_kernel_stays_within_its_tolerance_of_the_cpu_rollout(eager):
    """FP8 tensor cores (`torch._scaled_mm`, compute capability 8.9+): within the FP8 tolerance."""
    from model.fp8 import convert_to_fp8, fp8_matmul_supported
    if not fp8_matmul_supported(torch.device("cuda")):
        pytest.skip("needs FP8 tensor cores (compute capability 8.9+)")
    model = network("cuda")
    convert_to_fp8(model)
    assert 0 < rel_error(rollout_latents(model, device="cuda").cpu(), eager) < FP8_REL
