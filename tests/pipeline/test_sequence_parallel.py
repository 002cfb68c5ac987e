"""Sequence-parallel inference (pipeline/sequence_parallel.py) on CPU with gloo: several processes split the tokens of
one video and must produce the latents of one process (fp32, ~1e-5), with plain and rolling (window + sink) caches,
uneven token splits (padding), sequence groups inside data-parallel groups, and the `inference.py` command."""
from __future__ import annotations

import json
import os

import pytest
import torch

from pipeline.denoiser import Denoiser
from pipeline.rollout import RolloutOptions, rollout
from pipeline.schedule import FlowMatchSchedule
from pipeline.sequence_parallel import check_head_split, parallel_layout
from tests.ranks import spawn_ranks
from tests.tiny import tiny_model

pytestmark = pytest.mark.distributed

HEADS = {"dim": 96, "num_heads": 12, "ffn_dim": 64}  # 12 heads, as Wan 1.3B: splits over 2, 3, 4 and 6 ranks
STEPS = [1000.0, 937.5, 833.3]


def _init() -> None:
    torch.set_num_threads(1)  # several ranks share 2 cores


# ---------------------------------------------------------------------------------------------------- cases

CASES = {  # name: (frames, latent height, latent width, cache kwargs, prompt switch at block 2)
    "plain": (6, 4, 6, {"capacity_frames": 6}, False),
    "window_sink_relative": (12, 4, 6, {"capacity_frames": 4, "window_frames": 4, "sink_frames": 2,
                                        "rope": "relative"}, True),
    # 3 tokens per frame: padded on 2 and 4 ranks
    "window_sink_absolute": (10, 2, 6, {"capacity_frames": 6, "window_frames": 6, "sink_frames": 2}, False),
}


def run_case(model, name: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """The causal rollout of `CASES[name]` (batch 2, 2-frame blocks) and, for "plain", the two cache-free modes."""
    frames, h, w, cache_kw, switch = CASES[name]
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(2, frames, cfg.in_dim, h, w, generator=g)
    a, b = (torch.randn(2, cfg.text_len - 2, cfg.text_dim, generator=g) for _ in range(2))
    context = [(0, a), (2, b)] if switch else a
    cache = model.new_kv_cache(2, h, w, **cache_kw)
    renoise = torch.Generator().manual_seed(seed + 1)  # identical on every rank, as the pipeline's

    def noise_fn(x):
        return torch.randn(x.shape, generator=renoise)

    out = {}
    with torch.no_grad():
        out["latents"] = rollout(Denoiser(model, FlowMatchSchedule(5.0)), noise, context, cache,
                                 RolloutOptions(steps=STEPS, frames_per_block=2, noise_fn=noise_fn)).latents
        if name == "plain":
            from model.attention import BlockCausal
            t = torch.full((2, frames), 500.0)
            out["bidirectional"], hidden, _ = model.features(noise, t[:, 0], a, (1,))
            out["hidden"] = hidden[0]  # GAN heads tap the trunk: gathered to all tokens
            out["block_causal"] = model(noise, t, a, block_causal=BlockCausal(frames_per_block=2))
            out["teacher_forcing"] = model.forward_teacher_forcing(noise, t, a, noise.flip(1),
                                                                   BlockCausal(frames_per_block=2))
    return out


def _rollout_worker(rank: int, world: int, out_dir: str) -> None:
    import torch.distributed as dist

    from pipeline.sequence_parallel import enable_sequence_parallel, new_sequence_group
    _init()
    dist.init_process_group("gloo")
    results = {}
    model = tiny_model(0, **HEADS)
    enable_sequence_parallel(model)
    results["cache_heads"] = torch.tensor(model.new_kv_cache(1, 4, 6, 2).k.shape[3])
    for name in CASES:
        for key, value in run_case(model, name).items():
            results[f"{name}/{key}"] = value
    results["rotations_reused"] = torch.tensor(_local_rotation_is_reused(model))
    if world == 4:  # two data-parallel groups of 2-way sequence parallelism, each on its own video
        layout = parallel_layout(world, rank, 2)
        model = tiny_model(0, **HEADS)
        enable_sequence_parallel(model, new_sequence_group(layout))
        results["groups/latents"] = run_case(model, "window_sink_relative", seed=10 + layout.data_rank)["latents"]
    try:  # 12 heads split; 5 do not
        enable_sequence_parallel(tiny_model(0, dim=80, num_heads=5))
    except ValueError as err:
        results["error"] = str(err)
    torch.save(results, f"{out_dir}/rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


def _local_rotation_is_reused(model) -> bool:
    """Two calls on the same positions share this rank's slice of the RoPE tables (cut once), and it is the slice."""
    from model.wan_block import Context
    sp, tokens_per_frame = model.sequence_layout, 6
    rope = model.rope.rotation(0, 2, 2, 3, torch.device("cpu"))
    ctxs = [Context(1, rope) for _ in range(2)]
    for ctx in ctxs:
        with torch.no_grad():
            sp.split(torch.zeros(1, 2 * tokens_per_frame, 4), ctx, tokens_per_frame)
    fresh = ctxs[0].shard.split(rope.cos)
    return ctxs[0].rope is ctxs[1].rope and torch.equal(ctxs[0].rope.cos, fresh)


@pytest.fixture(scope="module")
def single():
    """The one-process results every sequence-parallel run must reproduce."""
    model = tiny_model(0, **HEADS)
    out = {}
    for name in CASES:
        out.update({f"{name}/{k}": v for k, v in run_case(model, name).items()})
    out["groups/latents/0"] = run_case(model, "window_sink_relative", seed=10)["latents"]
    out["groups/latents/1"] = run_case(model, "window_sink_relative", seed=11)["latents"]
    return out


# 6 tokens per frame: 3 + 3 on 2 ranks, padded to 4 x 2 on 4 ranks
@pytest.mark.parametrize("world", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_sequence_parallel_rollout_matches_one_process(single, tmp_path, world):
    spawn_ranks(_rollout_worker, world, world, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world)]
    for r, res in enumerate(ranks):
        assert int(res["cache_heads"]) == 12 // world  # each rank caches its own heads only
        assert bool(res["rotations_reused"])
        assert "5 heads cannot be split over" in res["error"] and f"over {world} ranks" in res["error"]
        for key in single:
            if key.startswith("groups/"):
                continue
            torch.testing.assert_close(res[key], single[key], atol=1e-5, rtol=1e-5, msg=f"rank {r}: {key}")
        if world == 4:
            torch.testing.assert_close(res["groups/latents"], single[f"groups/latents/{r // 2}"], atol=1e-5,
                                       rtol=1e-5, msg=f"rank {r}: data-parallel group {r // 2}")


def test_uneven_heads_and_layouts_are_clear_errors():
    check_head_split(12, 6)
    with pytest.raises(ValueError, match=r"12 heads cannot be split over 5 ranks .*\[1, 2, 3, 4, 6, 12\]"):
        check_head_split(12, 5)
    with pytest.raises(ValueError, match="sequence-parallel size 3 must divide the number of processes 4"):
        parallel_layout(4, 0, 3)
    layout = parallel_layout(6, 4, 3)
    assert (layout.data_size, layout.data_rank, layout.sequence_rank, layout.is_leader) == (2, 1, 1, False)
    assert parallel_layout(2, 0, None).sequence_size == 2


# ---------------------------------------------------------------------------------------------------- the CLI

def _cli_worker(rank: int, argv: list[str], out_dir: str) -> None:
    import inference
    _init()
    code = inference.main(argv)
    with open(f"{out_dir}/rc{rank}.json", "w") as f:
        json.dump(code, f)


@pytest.mark.slow
def test_inference_cli_sequence_parallel_writes_one_video_per_prompt(tmp_path):
    import inference
    from tests.tiny import save_tiny_model_folder
    from utils.video import read_video

    folder = save_tiny_model_folder(tmp_path / "model", seed=0)
    cfg = json.loads((folder / "transformer" / "config.json").read_text())
    assert cfg["num_heads"] == 2  # the tiny folder's model: 2 heads split over 2 ranks
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle moves left\na cat jumps\n")
    base = ["--model", str(folder), "--data_path", str(prompts), "--total-blocks", "2", "--device", "cpu",
            "--seed", "3"]
    assert inference.main(base + ["--output-dir", str(tmp_path / "one")]) == 0
    argv = base + ["--output-dir", str(tmp_path / "sp"), "--parallel", "sequence"]
    spawn_ranks(_cli_worker, 2, argv, str(tmp_path))
    assert [json.loads((tmp_path / f"rc{r}.json").read_text()) for r in range(2)] == [0, 0]
    one, sp = sorted((tmp_path / "one").iterdir()), sorted((tmp_path / "sp").iterdir())
    assert [p.name for p in sp] == [p.name for p in one] and len([p for p in sp if p.suffix == ".mp4"]) == 2
    for a, b in zip(one, sp):
        if a.suffix == ".mp4":
            fa, fb = read_video(a)[0], read_video(b)[0]
            assert fa.shape == fb.shape and (fa.int() - fb.int()).abs().max() <= 1, a.name
        else:
            stats = json.loads(b.read_text())
            assert stats["parallel"] == {"mode": "sequence", "sequence_size": 2, "data_size": 1}


@pytest.mark.parametrize("argv, message", [
    (["--sequence-parallel-size", "2"], "--sequence-parallel-size needs --parallel sequence"),
    (["--parallel", "sequence", "--sequence-parallel-size", "2"], "size 2 must divide the number of processes 1"),
])
def test_inference_cli_parallel_flags_are_checked(tmp_path, capsys, argv, message):
    import inference
    assert inference.main(["--prompt", "x", "--output-dir", str(tmp_path / "out"), *argv]) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------- real size, GPUs

def _real_size_rollouts(device: torch.device, sp: bool, config=None, latent=(60, 104)) -> dict[str, torch.Tensor]:
    """3 blocks of 3 frames at 480x832 with the Wan 1.3B architecture (random weights, seeded identically on every
    GPU), in float32 (TF32 off) and bfloat16; noise drawn on the CPU."""
    from model.config import WAN_1_3B
    from model.wan import WanDiT
    from pipeline.sequence_parallel import enable_sequence_parallel
    config = config or WAN_1_3B
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    with torch.device("meta"):
        model = WanDiT(config)
    model = model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("norm_q.weight", "norm_k.weight", "norm3.weight")):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    model.eval().requires_grad_(False)
    if sp:
        enable_sequence_parallel(model)
    schedule = FlowMatchSchedule(5.0)
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        model.to(dtype)
        g = torch.Generator().manual_seed(0)
        noise = torch.randn(1, 9, config.in_dim, *latent, generator=g).to(device, dtype)
        context = torch.randn(1, config.text_len, config.text_dim, generator=g).to(device, dtype)
        cache = model.new_kv_cache(1, *latent, 9)

        def noise_fn(x, g=g):
            return torch.randn(x.shape, generator=g).to(x)

        with torch.no_grad():
            options = RolloutOptions(steps=schedule.warp([1000, 750, 500, 250]).tolist(), frames_per_block=3,
                                     noise_fn=noise_fn)
            out[str(dtype)] = rollout(Denoiser(model, schedule), noise, context, cache, options).latents.float().cpu()
    return out


def _gpu_worker(rank: int, out_dir: str) -> None:
    import torch.distributed as dist
    _init()
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    device = torch.device("cuda", rank)
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", device_id=device)
    result = _real_size_rollouts(device, sp=True)
    if rank == 0:
        torch.save(result, f"{out_dir}/sp.pt")
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_two_gpus_match_one_gpu_at_real_size(tmp_path):
    spawn_ranks(_gpu_worker, 2, str(tmp_path))
    sp = torch.load(tmp_path / "sp.pt", weights_only=True)
    one = _real_size_rollouts(torch.device("cuda", 0), sp=False)
    for dtype, tol in (("torch.float32", 1e-3), ("torch.bfloat16", 5e-2)):
        err = ((sp[dtype] - one[dtype]).norm() / one[dtype].norm()).item()
        print(f"{dtype}: relative error {err:.2e}")
        assert err < tol, (dtype, err)
