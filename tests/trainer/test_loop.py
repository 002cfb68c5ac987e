"""The training loop on tiny DiTs with a fake algorithm: alternation, accumulation, non-finite guards, EMA, LoRA,
atomic checkpoints and exact resume; plus the sharded data iterator."""
from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file

from pipeline.loading.checkpoint import load_dit_state_dict, load_state_dict_strict
from tests.tiny import tiny_model, tiny_models, tiny_train_config
from trainer import train_state as ts
from trainer.data import PromptDataset, ShardedBatches
from trainer.ema import EMA
from trainer.loop import NonFiniteLossError, Trainer, micro_steps_for


class ListDataset:
    """`n` prompts "p0".."p{n-1}" with their index."""

    def __init__(self, n: int = 12):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        return {"prompts": f"p{i}", "idx": i}


class FakeAlgorithm:
    """Regression of tiny DiTs onto targets derived from the batch indices, so a batch gives the same loss in any
    world size. `use_rng` adds per-rank noise (global RNG) to test RNG restore; `use_shared` offsets the timesteps by a
    draw from the loop's shared generator (one per micro-batch). `nan_at`: {(role, step)} whose loss is NaN."""

    def __init__(self, cfg, models, has_critic: bool = True, use_rng: bool = True, nan_at=(), use_shared=True):
        self.cfg, self.models = cfg, models
        self.has_critic = has_critic
        self.use_rng, self.use_shared = use_rng, use_shared
        self.nan_at = set(nan_at)
        self.calls: list[tuple[str, int]] = []
        self.shared_generator = None

    def set_shared_generator(self, g: torch.Generator) -> None:
        self.shared_generator = g

    def _loss(self, denoiser, batch, role: str, step: int, salt: int):
        self.calls.append((role, step))
        gens = [torch.Generator().manual_seed(int(i) * 31 + salt) for i in batch["idx"]]
        shape = (2, denoiser.model.config.in_dim, 4, 4)
        x = torch.stack([torch.randn(shape, generator=g) for g in gens])
        target = torch.stack([torch.randn(shape, generator=g) for g in gens])
        t = torch.stack([100 + 800 * torch.rand(1, generator=g) for g in gens]).expand(-1, shape[0]).contiguous()
        if self.use_shared:
            t = t + float(torch.randint(0, 50, (1,), generator=self.shared_generator))
        if self.use_rng:
            x = x + 0.1 * torch.randn_like(x)
        flow, _ = denoiser(x, t, self.models.text(list(batch["prompts"])))
        loss = ((flow - target) ** 2).mean()
        if (role, step) in self.nan_at:
            loss = loss * float("nan")
        return loss, {"input_mean": float(x.mean())}

    def generator_loss(self, batch, step):
        return self._loss(self.models.generator, batch, "generator", step, 0)

    def critic_loss(self, batch, step):
        return self._loss(self.models.critic, batch, "critic", step, 1)

    def trainable_parameters(self):
        out = {"generator": [p for p in self.models.generator.model.parameters() if p.requires_grad]}
        if self.has_critic:
            out["critic"] = list(self.models.critic.model.parameters())
        return out


def make_trainer(tmp_path, *, has_critic=True, use_rng=True, use_shared=True, nan_at=(), n_items=12, **overrides):
    base = dict(logdir=str(tmp_path), seed=5, lr=1e-2, lr_critic=2e-2, max_steps=4, log_iters=0,
                dfake_gen_update_ratio=2, weight_decay=0.01, max_grad_norm_generator=0.5,
                max_grad_norm_critic=0.5, keep_checkpoints=0, disable_wandb=True)
    base.update(overrides)
    cfg = tiny_train_config(**base)
    models = tiny_models(cfg, teacher=False, critic=has_critic)
    if cfg.model.lora_rank > 0:
        from trainer.builders import prepare_injected_models
        prepare_injected_models(models, cfg)
    algorithm = FakeAlgorithm(cfg, models, has_critic=has_critic, use_rng=use_rng, nan_at=nan_at,
                              use_shared=use_shared)
    data = ShardedBatches(ListDataset(n_items), cfg.optimiser.batch_size, seed=cfg.seed)
    return Trainer(cfg, algorithm, data, logdir=tmp_path, seed=cfg.seed)


def weights(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_same(a: dict, b: dict, atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0.0 if atol == 0 else 1e-5, msg=k)


# ------------------------------------------------------------------------------------------------------ schedule

@pytest.mark.parametrize("ratio", [1, 3])
def test_generator_every_ratio_steps_before_the_critic(tmp_path, ratio):
    tr = make_trainer(tmp_path, dfake_gen_update_ratio=ratio, max_steps=7)
    tr.train()
    expected = []
    for s in range(7):
        expected += ([("generator", s)] if s % ratio == 0 else []) + [("critic", s)]
    assert tr.algorithm.calls == expected
    assert tr.step == 7


def test_logged_lines_average_the_interval_and_keep_generator_updates(tmp_path):
    tr = make_trainer(tmp_path, dfake_gen_update_ratio=5, max_steps=10, log_every=5)

    class Recorder:
        lines: list = []

        def log(self, step, scalars):
            self.lines.append((step, scalars))

        def progress(self, step, scalars):
            pass

        def close(self):
            pass

    tr.logger = Recorder()
    tr.train()
    # Steps 0 and 5 update the generator; the lines at steps 5 and 10 cover steps 0-4 and 5-9.
    assert [step for step, _ in tr.logger.lines] == [5, 10]
    assert all("generator_loss" in scalars and "critic_loss" in scalars for _, scalars in tr.logger.lines)


def test_without_critic_generator_every_step(tmp_path):
    tr = make_trainer(tmp_path, has_critic=False, dfake_gen_update_ratio=5, max_steps=3)
    tr.train()
    assert tr.algorithm.calls == [("generator", 0), ("generator", 1), ("generator", 2)]
    assert list(tr.optimizers) == ["generator"]


def test_optimizers_follow_config(tmp_path):
    tr = make_trainer(tmp_path, beta1=0.1, beta2=0.9, beta1_critic=0.2, beta2_critic=0.8, weight_decay=0.05)
    g, c = tr.optimizers["generator"].param_groups[0], tr.optimizers["critic"].param_groups[0]
    assert (g["lr"], g["betas"], g["weight_decay"]) == (1e-2, (0.1, 0.9), 0.05)
    assert (c["lr"], c["betas"], c["weight_decay"]) == (2e-2, (0.2, 0.8), 0.05)


def test_linear_warmup_and_logged_preclip_norm(tmp_path):
    tr = make_trainer(tmp_path, has_critic=False, lr_warmup_steps=4, max_grad_norm_generator=1e-6)
    lrs, norms = [], []
    for _ in range(5):
        logs = tr.train_step()
        lrs.append(logs["generator_lr"])
        norms.append(logs["generator_grad_norm"])
    assert lrs == pytest.approx([0.25e-2, 0.5e-2, 0.75e-2, 1e-2, 1e-2])
    assert min(norms) > 1e-3  # the norm before clipping, not the clipped 1e-6


def test_micro_steps_validation():
    cfg = tiny_train_config(batch_size=2, total_batch_size=8)
    assert micro_steps_for(cfg, 2) == 2
    with pytest.raises(ValueError, match="total_batch_size 8"):
        micro_steps_for(cfg, 3)


def test_accumulation_equals_a_bigger_batch(tmp_path):
    kw = dict(use_rng=False, use_shared=False, dfake_gen_update_ratio=1, max_steps=2)
    acc = make_trainer(tmp_path / "a", batch_size=1, total_batch_size=4, **kw)
    big = make_trainer(tmp_path / "b", batch_size=4, **kw)
    assert acc.micro_steps == 4 and big.micro_steps == 1
    la, lb = acc.train(), big.train()
    for key in ("generator_loss", "critic_loss", "generator_grad_norm", "critic_grad_norm"):
        assert la[key] == pytest.approx(lb[key], rel=1e-5), key  # a summed (not averaged) gradient shows here
    # Adam divides by sqrt(v): float noise in near-zero gradient entries can move single weights by up to the lr
    # (which entries depends on the CPU's summation order), so each tensor is compared as a whole.
    for role in ("generator", "critic"):
        wa, wb = weights(getattr(acc.algorithm.models, role).model), weights(getattr(big.algorithm.models, role).model)
        assert wa.keys() == wb.keys()
        for k in wa:
            assert float((wa[k] - wb[k]).norm()) <= 1e-3 * float(wb[k].norm()) + 1e-4, (role, k)


# --------------------------------------------------------------------------------------------- non-finite guards

def test_nan_loss_skips_the_update_with_a_warning(tmp_path):
    tr = make_trainer(tmp_path, nan_at={("generator", 2)}, max_steps=2)
    tr.train()
    before = weights(tr.algorithm.models.generator.model)
    tr.cfg.optimiser.max_steps = 3
    with pytest.warns(RuntimeWarning, match="non-finite generator loss"):
        logs = tr.train_step()
    assert logs["generator_skipped"] == 1.0 and "critic_loss" in logs
    assert_same(weights(tr.algorithm.models.generator.model), before)
    assert tr.nonfinite_run == 0  # the critic update that followed succeeded


def test_consecutive_nan_losses_abort(tmp_path):
    nan_all = {(role, s) for role in ("generator", "critic") for s in range(10)}
    tr = make_trainer(tmp_path, nan_at=nan_all, max_nonfinite_steps=3, max_steps=10)
    with pytest.warns(RuntimeWarning), pytest.raises(NonFiniteLossError, match="3 consecutive"):
        tr.train()
    assert ts.list_checkpoints(tmp_path) == []


def test_refuses_to_save_poisoned_weights(tmp_path):
    tr = make_trainer(tmp_path, log_iters=1)
    tr.train_step()
    with torch.no_grad():
        next(tr.algorithm.models.generator.model.parameters()).fill_(float("inf"))
    with pytest.raises(NonFiniteLossError, match="poisoned"):
        tr.save_checkpoint()
    assert ts.list_checkpoints(tmp_path) == []


# ---------------------------------------------------------------------------------------------------------- EMA

def test_ema_math():
    p = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    ema = EMA(0.9)
    ema.start({"w": p})
    with torch.no_grad():
        p.copy_(torch.tensor([3.0, -2.0]))
    ema.update({"w": p})
    torch.testing.assert_close(ema.shadow["w"], torch.tensor([0.9 * 1 + 0.1 * 3, 0.9 * 2 - 0.1 * 2]))
    assert ema.shadow["w"].dtype == torch.float32 and ema.num_updates == 1
    with pytest.raises(ValueError, match="ema_weight"):
        EMA(1.0)


def test_ema_starts_at_ema_start_step_with_clean_keys(tmp_path):
    d = 0.8
    tr = make_trainer(tmp_path, has_critic=False, ema_weight=d, ema_start_step=3, log_iters=1, max_steps=4)
    tr.train()
    first = ts.checkpoint_dir(tmp_path, 3)
    assert not (first / "generator_ema.safetensors").exists()  # EMA starts at the beginning of step 3
    w3 = load_file(first / "generator.safetensors")
    last = ts.checkpoint_dir(tmp_path, 4)
    w4 = load_file(last / "generator.safetensors")
    ema = load_file(last / "generator_ema.safetensors")
    for k in w4:
        torch.testing.assert_close(ema[k], d * w3[k] + (1 - d) * w4[k])
    # Clean keys: the EMA loads strictly into a plain WanDiT, with its architecture from config.json.
    sd, config = load_dit_state_dict(last / "generator_ema.safetensors")
    assert config == tr.algorithm.models.generator.model.config
    load_state_dict_strict(tiny_model(), sd, "generator_ema")


def test_lora_trains_adapters_and_saves_merged_clean_weights(tmp_path):
    tr = make_trainer(tmp_path, has_critic=False, lora_rank=2, lora_alpha=4, ema_weight=0.5, max_steps=2)
    net = tr.algorithm.models.generator.model
    frozen_before = {n: p.detach().clone() for n, p in net.named_parameters() if not p.requires_grad}
    tr.train()
    for n, p in net.named_parameters():
        if n in frozen_before:
            assert torch.equal(p, frozen_before[n]), n
    folder = ts.checkpoint_dir(tmp_path, 2)
    adapters = load_file(folder / "lora_adapter.safetensors")
    assert adapters and all(".lora_" in k for k in adapters)
    plain = tiny_model()
    for stem in ("generator", "generator_ema"):
        load_state_dict_strict(plain, load_dit_state_dict(folder / f"{stem}.safetensors")[0], stem)
    x = torch.randn(1, 2, 4, 4, 4)
    t, ctx = torch.full((1, 2), 500.0), torch.randn(1, 6, 16)
    load_state_dict_strict(plain, load_file(folder / "generator.safetensors"), "generator")
    torch.testing.assert_close(plain(x, t, ctx), net(x, t, ctx), atol=1e-5, rtol=1e-5)


# -------------------------------------------------------------------------------------------------- checkpoints

def test_crash_mid_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    tr = make_trainer(tmp_path, log_iters=2, max_steps=2)
    tr.train()
    good = ts.checkpoint_dir(tmp_path, 2)
    before = {p.name: p.read_bytes() for p in good.iterdir()}

    def crash(obj, path):
        path.write_bytes(b"half a training state")
        raise OSError("disk full")

    monkeypatch.setattr(ts, "_save_torch", crash)
    tr.cfg.optimiser.max_steps = 4
    with pytest.raises(OSError, match="disk full"):
        tr.train()
    assert ts.latest_checkpoint(tmp_path) == good
    assert {p.name: p.read_bytes() for p in good.iterdir()} == before
    assert os.listdir(tmp_path) == ["checkpoint_model_000002"]  # no half-written folder, no temporary left


def test_killed_save_leftovers_are_ignored_and_cleaned(tmp_path):
    stale = tmp_path / ".tmp-checkpoint_model_000009-1-abc"
    stale.mkdir(parents=True)
    (stale / "generator.safetensors").write_bytes(b"partial")
    (tmp_path / "checkpoint_model_000008").mkdir()  # no training state: never finished
    assert ts.latest_checkpoint(tmp_path) is None
    tr = make_trainer(tmp_path, max_steps=1)
    tr.train()
    assert not stale.exists()
    assert ts.latest_checkpoint(tmp_path) == ts.checkpoint_dir(tmp_path, 1)


def test_keep_last_n_checkpoints(tmp_path):
    tr = make_trainer(tmp_path, log_iters=1, max_steps=4, keep_checkpoints=2)
    tr.train()
    assert [s for s, _ in ts.list_checkpoints(tmp_path)] == [3, 4]
    state = ts.load_training_state(ts.checkpoint_dir(tmp_path, 4))
    assert state["step"] == 4 and set(state["optimizers"]) == {"generator", "critic"}


@pytest.mark.parametrize("lora", [0, 2])
def test_resume_is_exact(tmp_path, lora):
    kw = dict(total_batch_size=2, ema_weight=0.7, ema_start_step=1, lr_warmup_steps=3, log_iters=2, max_steps=5,
              lora_rank=lora, n_items=5)
    full = make_trainer(tmp_path / "full", **kw)
    full.train()
    first = make_trainer(tmp_path / "cut", **{**kw, "max_steps": 3})
    first.train()
    torch.manual_seed(1234)  # a new process would start from other RNG states
    resumed = make_trainer(tmp_path / "cut", **kw)
    resumed.resume(ts.latest_checkpoint(tmp_path / "cut"))
    assert resumed.step == 3
    resumed.train()
    assert resumed.algorithm.calls == [c for c in full.algorithm.calls if c[1] >= 3]
    for stem in ("generator", "generator_ema", "critic"):
        assert_same(load_file(ts.checkpoint_dir(tmp_path / "full", 5) / f"{stem}.safetensors"),
                    load_file(ts.checkpoint_dir(tmp_path / "cut", 5) / f"{stem}.safetensors"))
    sa = ts.load_training_state(ts.checkpoint_dir(tmp_path / "full", 5))
    sb = ts.load_training_state(ts.checkpoint_dir(tmp_path / "cut", 5))
    assert sa["data"] == sb["data"] and torch.equal(sa["shared_rng"], sb["shared_rng"])
    for role in ("generator", "critic"):
        for name, st in sa["optimizers"][role]["state"].items():
            for key, value in st.items():
                assert torch.equal(value, sb["optimizers"][role]["state"][name][key]), (role, name, key)


# ---------------------------------------------------------------------------------------------------------- data

def test_sharded_batches_split_the_global_batch_and_reshuffle_each_epoch():
    ds = ListDataset(6)
    ranks = [ShardedBatches(ds, 2, rank=r, world_size=2, seed=3) for r in range(2)]
    single = ShardedBatches(ds, 4, seed=3)
    for _ in range(4):  # 16 items over 6: batches straddle epochs
        parts = [next(it)["idx"].tolist() for it in ranks]
        assert parts[0] + parts[1] == next(single)["idx"].tolist()
    order = ShardedBatches(ds, 6, seed=3)
    epoch0, epoch1 = next(order)["idx"].tolist(), next(order)["idx"].tolist()
    assert sorted(epoch0) == sorted(epoch1) == list(range(6)) and epoch0 != epoch1
    assert next(ShardedBatches(ds, 6, seed=3))["idx"].tolist() == epoch0


def test_sharded_batches_resume_position():
    it = ShardedBatches(ListDataset(5), 2, seed=1)
    for _ in range(3):
        next(it)
    state = it.state_dict()
    expected = [next(it)["idx"].tolist() for _ in range(4)]
    again = ShardedBatches(ListDataset(5), 2, seed=99)
    again.load_state_dict(state)
    assert [next(again)["idx"].tolist() for _ in range(4)] == expected
    with pytest.raises(ValueError, match="5 items"):
        ShardedBatches(ListDataset(7), 2).load_state_dict(state)


def test_prompt_dataset_with_extended_prompts(tmp_path):
    (tmp_path / "p.txt").write_text("a cat\n\na dog\n")
    (tmp_path / "e.txt").write_text("a fluffy cat\na loud dog\n")
    ds = PromptDataset(tmp_path / "p.txt", tmp_path / "e.txt")
    assert len(ds) == 2 and ds[1] == {"prompts": "a dog", "idx": 1, "extended_prompts": "a loud dog"}
    batch = next(ShardedBatches(ds, 2, shuffle=False))
    assert batch["prompts"] == ["a cat", "a dog"] and batch["idx"].tolist() == [0, 1]
    (tmp_path / "short.txt").write_text("only one\n")
    with pytest.raises(ValueError, match="short.txt"):
        PromptDataset(tmp_path / "p.txt", tmp_path / "short.txt")
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        PromptDataset(tmp_path / "missing.txt")


def test_seed_zero_draws_a_seed_and_rng_state_round_trips(tmp_path):
    import random

    import numpy as np

    from utils.distributed import resolve_seed, rng_state, seed_everything, set_rng_state

    assert resolve_seed(42) == 42
    drawn = {resolve_seed(0) for _ in range(3)}
    assert all(0 < s < 10_000_000 for s in drawn) and len(drawn) > 1
    seed_everything(3)
    torch.save(rng_state(), tmp_path / "rng.pt")
    expected = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expected


def test_time_limit_stops_early_and_checkpoints(tmp_path, monkeypatch):
    import trainer.loop as loop
    clock = iter(float(i) for i in range(1000))  # every perf_counter() call advances one "second"
    monkeypatch.setattr(loop.time, "perf_counter", lambda: next(clock))
    trainer = make_trainer(tmp_path, max_steps=50, time_limit_s=4.5, keep_checkpoints=0)
    trainer.train()
    assert 0 < trainer.step < 50
    assert ts.latest_checkpoint(tmp_path) == ts.checkpoint_dir(tmp_path, trainer.step)
