"""Two CPU processes (gloo) with FSDP2 through `train.main`: sharded models, rank-averaged logs, sharded checkpoint
save + resume, and the same result as one process with the same global batch."""
from __future__ import annotations

import contextlib
import json
import os

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from tests.ranks import free_port, spawn_ranks
from tests.trainer.test_loop import FakeAlgorithm, ListDataset
from trainer import train_state as ts
from trainer.data import ShardedBatches

pytestmark = pytest.mark.distributed

CONFIG = """\
image_or_video_shape: [1, 6, 4, 4, 6]
num_training_frames: 6
num_frame_per_block: 2
seed: 11
lr: 1.0e-2
lr_critic: 2.0e-2
weight_decay: 0.01
max_grad_norm_generator: 0.5
max_grad_norm_critic: 0.5
dfake_gen_update_ratio: 2
ema_weight: 0.5
ema_start_step: 1
log_iters: 2
keep_checkpoints: 0
gradient_checkpointing: true
"""


def _run(argv: list[str], out_json: str):
    """train.main with tiny networks, the fake algorithm and an in-memory dataset; writes the returned logs."""
    import train
    from tests.tiny import tiny_models

    sharded = {}

    def algorithm(cfg, models):
        from torch.distributed.fsdp import FSDPModule
        net = models.generator.model
        sharded["fsdp"] = isinstance(net, FSDPModule) and isinstance(net.blocks[0], FSDPModule)
        local = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in net.parameters())
        sharded["fraction"] = local / sum(p.numel() for p in net.parameters())
        return FakeAlgorithm(cfg, models, use_rng=False)

    def data(cfg, rank, world, seed):
        return ShardedBatches(ListDataset(8), cfg.optimiser.batch_size, rank, world, seed)

    trainer = train.main(argv, models=lambda cfg: tiny_models(cfg, teacher=False), algorithm_factory=algorithm,
                         data=data)
    with open(out_json, "w") as f:
        json.dump({"logs": trainer.last_logs, "step": trainer.step, **sharded}, f)


def _worker(rank: int, argv: list[str], out_prefix: str) -> None:
    _run(argv, f"{out_prefix}{rank}.json")


def _spawn(argv: list[str], out_prefix: str) -> list[dict]:
    spawn_ranks(_worker, 2, argv, out_prefix)
    return [json.load(open(f"{out_prefix}{r}.json")) for r in range(2)]


def test_two_ranks_match_one_process_and_resume(tmp_path):
    (tmp_path / "cfg.yaml").write_text(CONFIG)
    base = ["--config_path", str(tmp_path / "cfg.yaml"), "--disable-wandb"]
    _run(base + ["--logdir", str(tmp_path / "single"), "batch_size=2", "max_steps=4"], str(tmp_path / "single.json"))
    single = json.load(open(tmp_path / "single.json"))

    dist_dir = str(tmp_path / "dist")
    first = _spawn(base + ["--logdir", dist_dir, "batch_size=1", "max_steps=2"], str(tmp_path / "first"))
    assert all(r["fsdp"] for r in first) and all(r["fraction"] < 0.75 for r in first)
    resumed = _spawn(base + ["--logdir", dist_dir, "batch_size=1", "max_steps=4", "--resume"],
                     str(tmp_path / "resumed"))
    assert [r["step"] for r in resumed] == [4, 4]
    assert resumed[0]["logs"] == resumed[1]["logs"]  # rank-averaged: the same loss on both ranks
    for key in ("critic_loss", "critic_grad_norm"):
        assert resumed[0]["logs"][key] == pytest.approx(single["logs"][key], rel=1e-4), key

    for stem in ("generator", "generator_ema", "critic"):
        a = load_file(ts.checkpoint_dir(tmp_path / "single", 4) / f"{stem}.safetensors")
        b = load_file(ts.checkpoint_dir(dist_dir, 4) / f"{stem}.safetensors")
        assert a.keys() == b.keys()
        # Adam turns float noise in near-zero gradients into weight differences of up to ~4e-4 at lr 2e-2 (one
        # element in a thousand, on some CPUs); a real fault (gradients not averaged, a shard missed) moves ~lr.
        for k in a:
            torch.testing.assert_close(a[k], b[k], atol=1e-3, rtol=1e-4, msg=f"{stem}: {k}")
    state = ts.load_training_state(ts.checkpoint_dir(dist_dir, 4))
    assert state["world_size"] == 2 and len(state["rng"]) == 2
    assert set(state["optimizers"]["generator"]["state"]) == set(a)  # full, name-keyed optimizer state


def test_cpu_text_encoder_of_a_gpu_rank_gets_its_share_of_the_host_threads(monkeypatch):
    """torchrun sets OMP_NUM_THREADS=1 per rank: a UMT5-XXL kept on the CPU must not encode on one thread."""
    from types import SimpleNamespace

    from utils.config import load_config
    from utils.distributed import DistState, host_threads, parallelize_models

    placed = {}

    class Text:
        def place(self, device, keep_on_cpu=False):
            placed.update(device=device, keep_on_cpu=keep_on_cpu)

    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    assert [host_threads(n) for n in (1, 2, 8, 32)] == [16, 8, 2, 1]
    models = SimpleNamespace(generator=None, critic=None, teacher=None, discriminator_heads=None, codec=None,
                             text=Text(), extra={})
    state = DistState(local_world_size=2, world_size=2, device=torch.device("cuda", 0))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        parallelize_models(models, load_config(None, ["text_encoder_cpu_offload=true"]), state)
        assert placed == {"device": torch.device("cuda", 0), "keep_on_cpu": True}
        assert torch.get_num_threads() == 8
        torch.set_num_threads(1)
        parallelize_models(models, load_config(None, ["text_encoder_cpu_offload=false"]), state)
        assert torch.get_num_threads() == 1  # an encoder on the GPU leaves the host threads alone
    finally:
        torch.set_num_threads(before)


def test_real_dmd_recipe_under_torchrun_on_two_ranks(tmp_path):
    """The path of the real-size GPU run at tiny size: Wan folders on disk -> FSDP2 over 2 gloo ranks -> the real
    DMD algorithm (rollout exit steps chosen on every rank alike) -> one checkpoint written, finite rank-averaged
    losses, generator and critic both trained."""
    import math
    import subprocess
    import sys

    from tests.entry.test_train_cli import TINY, write_model_root
    from utils.config import REPO_ROOT

    root = tmp_path / "wan_models"
    write_model_root(root)
    (tmp_path / "prompts.txt").write_text("a red circle\na blue square\na green triangle\na white cat\n")
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(TINY + f"data_path: {tmp_path / 'prompts.txt'}\nsharding_strategy: full\n")
    logdir = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           str(REPO_ROOT / "train.py"), "--config_path", str(recipe), "--logdir", str(logdir), "--disable-wandb",
           "max_steps=2", f"model_root={root}", "model_kwargs.model_name=TinyWan", "real_name=TinyWan",
           "fake_name=TinyWan"]
    out = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in (logdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]  # written once (rank 0), not once per rank
    losses = [rows[0]["generator_loss"], rows[1]["critic_loss"]]
    assert all(math.isfinite(v) for v in losses)
    ckpt = ts.checkpoint_dir(logdir, 2)
    initial = load_file(root / "TinyWan" / "diffusion_pytorch_model.safetensors")
    for stem in ("generator", "critic"):
        trained = load_file(ckpt / f"{stem}.safetensors")
        assert set(trained) == set(initial), stem  # full (gathered) state dicts with the original key names
        assert any(not torch.equal(trained[k].float(), initial[k].float()) for k in trained), f"{stem} did not train"


def _gather_worker(rank: int, out: str) -> None:
    from tests.tiny import tiny_inputs, tiny_model
    from utils.distributed import cleanup_distributed, gathered_across_forwards, init_distributed, shard_module
    state = init_distributed(device="cpu")
    model = tiny_model().train()
    x, context = tiny_inputs(model, batch=1, frames=4)
    t = torch.full((1,), 500.0)
    shard_module(model, state, mixed_precision=False, strategy="full")
    groups = [unit._get_fsdp_state()._fsdp_param_group for unit in (*model.blocks, model)]  # the root too

    def loss_and_grads(inside: bool):
        model.zero_grad()
        with gathered_across_forwards(model, "full") if inside else contextlib.nullcontext():
            with torch.no_grad():
                first = model(x, t, context)
            gathered_between = all(g.is_unsharded for g in groups)
            second = model(x, t, context)  # with grad: its backward runs after the context
        sharded_after = all(g.is_sharded for g in groups)
        loss = (second * first).mean()
        loss.backward()
        grads = [p.grad.full_tensor().clone() for p in model.parameters()]
        return loss.item(), grads, gathered_between, sharded_after

    plain = loss_and_grads(False)
    kept = loss_and_grads(True)
    again = loss_and_grads(False)  # the strategy's behaviour is back
    cleanup_distributed(state)
    result = {"losses": [plain[0], kept[0], again[0]], "gathered": [plain[2], kept[2], again[2]],
              "sharded_after": [plain[3], kept[3], again[3]],
              "grads_equal": all(torch.equal(a, b) for a, b in zip(plain[1], kept[1]))}
    with open(f"{out}{rank}.json", "w") as f:
        json.dump(result, f)


def test_rollout_forwards_gather_each_unit_once_with_the_same_numbers(tmp_path):
    spawn_ranks(_gather_worker, 2, str(tmp_path / "r"))
    for rank in range(2):
        r = json.load(open(tmp_path / f"r{rank}.json"))
        assert r["gathered"] == [False, True, False]  # between forwards: freed, kept, freed again
        assert r["sharded_after"] == [True, True, True]
        assert r["losses"][0] == r["losses"][1] == r["losses"][2] and r["grads_equal"]


def _modes_worker(rank: int, out: str) -> None:
    """Every mode of a sharded WanDiT (FSDP gathers the root's parameters around each entry point, not only around
    `forward`) against the same network unsharded."""
    import copy

    from model.attention import BlockCausal
    from tests.tiny import tiny_inputs, tiny_model
    from utils.distributed import cleanup_distributed, init_distributed, shard_module
    state = init_distributed(device="cpu")
    whole = tiny_model()
    sharded = shard_module(copy.deepcopy(whole), state, mixed_precision=False, strategy="full")
    x, context = tiny_inputs(whole, batch=1, frames=4)
    t = torch.full((1, 4), 500.0)
    mask = BlockCausal(2)

    def modes(net):
        cache = net.new_kv_cache(1, 4, 6, 4)
        with torch.no_grad():
            net.write_cache(x[:, :2], t[:, :2], context, cache, 0)
            flow, hidden, e = net.features(x, t[:, 0], context, (1,))
            return {"forward": net(x, t, context, block_causal=mask),
                    "teacher_forcing": net.forward_teacher_forcing(x, t, context, x.flip(1), mask),
                    "cached": net.forward_cached(x[:, 2:], t[:, 2:], context, cache, 2),
                    "features": torch.cat([flow.flatten(), hidden[0].flatten(), e.flatten()]),
                    "cache_keys": cache.k.clone()}

    expected, got = modes(whole), modes(sharded)
    result = {name: bool(torch.allclose(got[name], expected[name], atol=1e-5, rtol=1e-5)) for name in expected}
    cleanup_distributed(state)
    with open(f"{out}{rank}.json", "w") as f:
        json.dump(result, f)


def test_every_mode_of_a_sharded_model_matches_the_whole_model(tmp_path):
    spawn_ranks(_modes_worker, 2, str(tmp_path / "r"))
    for rank in range(2):
        result = json.load(open(tmp_path / f"r{rank}.json"))
        assert result == {name: True for name in ("forward", "teacher_forcing", "cached", "features",
                                                  "cache_keys")}, f"rank {rank}"


def _failing_worker(rank: int, message: str) -> None:
    if rank == 1:
        raise RuntimeError(message)


def test_a_failing_rank_fails_the_spawn_with_its_message():
    """spawn_ranks leaves a finished rank without finalizing; a rank that raises must still fail the test."""
    with pytest.raises(mp.ProcessRaisedException, match="rank 1 fails"):
        spawn_ranks(_failing_worker, 2, "rank 1 fails")


def test_cpu_offload_without_fsdp_is_an_error_not_ignored():
    """compute.cpu_offload is FSDP's parameter offload: a run without FSDP (one process) refuses it by name."""
    from types import SimpleNamespace

    from utils.config import load_config
    from utils.distributed import DistState, parallelize_models
    from utils.errors import InputError
    models = SimpleNamespace(generator=None, critic=None, teacher=None, discriminator_heads=None, codec=None,
                             text=None, extra={})
    with pytest.raises(InputError, match="compute.cpu_offload offloads the parameters FSDP shards; this run has no "
                                         "FSDP"):
        parallelize_models(models, load_config(None, ["compute.cpu_offload=true"]), DistState())
    parallelize_models(models, load_config(None), DistState())
