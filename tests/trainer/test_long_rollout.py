"""Long self-rollouts (trainer/self_forcing.py, docs/training.md "Long self-rollouts"): a rollout of the window's
length is the standard recipe exactly; gradients only through the window; a cache whose size does not depend on
`rollout_frames`; prompt switches with KV re-cache and the prompt in force reaching the losses; config validation."""
from __future__ import annotations

import pytest
import torch

import trainer.self_forcing as self_forcing_module
from model.pixel_codec import PixelShuffleCodec
from tests.tiny import (assert_window_gradients, recorded_calls, tiny_models, tiny_recipe_yaml,
                        tiny_train_config)
from trainer.dmd import DMD
from trainer.gan import GAN
from trainer.self_forcing import RolloutPlan, SelfForcingRollout
from trainer.sid import SiD
from utils.config import ConfigError, load_config

CHANNELS = PixelShuffleCodec(spatial_factor=2).latent_channels
WINDOW = 6  # latent frames of the loss window (the teacher's horizon) in the tiny configs: 3 blocks of 2


def long_config(**overrides):
    """Tiny config for long rollouts: codec-sized latents, a rolling inference cache of 4 frames with 2 sink frames."""
    base = dict(image_or_video_shape=[1, WINDOW, CHANNELS, 4, 6], rollout_frames=3 * WINDOW, rollout_cache="inference",
                model_kwargs=dict(timestep_shift=5.0, local_attn_size=4, sink_size=2, rope="relative"))
    base.update(overrides)
    return tiny_train_config(**base)


def long_models(cfg, **kwargs):
    return tiny_models(cfg, codec=PixelShuffleCodec(spatial_factor=2), in_dim=CHANNELS, out_dim=CHANNELS, **kwargs)


def prompts(models, *texts):
    return models.text(list(texts))


# ------------------------------------------------------------------------------------- the horizon is the recipe
def _step(cls, cfg, batch):
    """Generator loss and gradients of one step, from fixed seeds."""
    models = long_models(cfg, critic=True, teacher=cls is not GAN)
    algo = cls(cfg, models)
    assert algo.rollout.long == (cfg.rollout.rollout_frames > 0)  # the long path runs (one piece: the whole window)
    torch.manual_seed(11)
    loss, _ = algo.generator_loss(batch, 0)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in models.generator.model.named_parameters() if p.grad is not None}
    return float(loss.detach()), grads


@pytest.mark.parametrize("cls", [DMD, SiD, GAN])
@pytest.mark.parametrize("window", ["latest", "uniform"])
def test_a_rollout_of_the_horizon_reproduces_the_standard_recipe(cls, window):
    trainer = {DMD: {}, SiD: dict(distribution_loss="sid"), GAN: dict(trainer="gan")}[cls]
    standard = long_config(rollout_frames=0, rollout_cache="training", same_step_across_blocks=False, **trainer)
    horizon = long_config(rollout_frames=WINDOW, rollout_window=window, rollout_cache="training",
                          same_step_across_blocks=False, **trainer)
    batch = {"prompts": ["a red circle", "a blue square"],
             "latents": torch.randn(2, WINDOW, CHANNELS, 4, 6, generator=torch.Generator().manual_seed(3))}
    loss_a, grads_a = _step(cls, standard, batch)
    loss_b, grads_b = _step(cls, horizon, batch)
    assert loss_a == loss_b and grads_a and grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=0, atol=0, msg=name)


def test_the_training_cache_limits_attention_but_never_uses_the_sink_or_relative_rope():
    """docs/training.md "Attention window": the original's cache holds every frame, so nothing is evicted: a sink and
    cache-relative RoPE leave the step unchanged to the bit, while the window itself changes it."""
    batch = {"prompts": ["a red circle", "a blue square"],
             "latents": torch.randn(2, WINDOW, CHANNELS, 4, 6, generator=torch.Generator().manual_seed(3))}

    def step(local_attn_size, sink_size, rope):
        return _step(DMD, long_config(rollout_frames=0, rollout_cache="training", same_step_across_blocks=False,
                                      model_kwargs=dict(timestep_shift=5.0, local_attn_size=local_attn_size,
                                                        sink_size=sink_size, rope=rope)), batch)

    loss, grads = step(4, 0, "absolute")
    loss_sink, grads_sink = step(4, 2, "relative")
    assert loss_sink == loss and grads.keys() == grads_sink.keys()
    for name in grads:
        torch.testing.assert_close(grads_sink[name], grads[name], rtol=0, atol=0, msg=name)
    assert step(-1, 0, "absolute")[0] != loss


def test_a_horizon_rollout_draws_the_standard_plans():
    models = long_models(long_config(), teacher=False, critic=False)
    standard = SelfForcingRollout(long_config(rollout_frames=0, same_step_across_blocks=False), models.generator)
    horizon = SelfForcingRollout(long_config(rollout_frames=WINDOW, rollout_window="uniform", prompt_switch_prob=0.5,
                                             same_step_across_blocks=False), models.generator)
    # No block boundary before the window: nothing more is drawn, so the shared stream stays the standard one.
    assert [horizon.sample_plan() for _ in range(10)] == [standard.sample_plan() for _ in range(10)]


# ------------------------------------------------------------------------------------- gradients and the window
@pytest.mark.parametrize("window", ["latest", "uniform"])
def test_gradients_flow_only_through_the_window(window):
    cfg = long_config(rollout_window=window)
    models = long_models(cfg, teacher=False, critic=False)
    rollout = SelfForcingRollout(cfg, models.generator, codec=models.codec)
    plans = [rollout.sample_plan() for _ in range(12)]
    blocks = {p.num_blocks for p in plans}
    # latest: the window ends where the rollout ends; uniform: at any block boundary from the horizon on.
    assert blocks == {9} if window == "latest" else (blocks <= set(range(3, 10)) and len(blocks) > 2)
    exits = [2, 0, 1, 3, 2, 1, 0, 3]  # 8 blocks of 2: 16 frames, the window is frames [10, 16)
    with recorded_calls(models.generator.model) as recorded:
        out = rollout(prompts(models, "a", "b"), plan=RolloutPlan(8, exits))
    with_grad = [call.args[4] for call in recorded if call.grad_enabled]
    assert with_grad == [10, 12, 14]  # one differentiable forward per window block: its exit step
    assert all(not call.grad_enabled for call in recorded if call.args[4] < 10)
    assert len([c for c in recorded if c.mode == "forward_cached"]) == sum(e + 1 for e in exits)
    assert out.num_frames == 16 and out.latents.shape == (2, WINDOW, CHANNELS, 4, 6)
    # The window's first frame is re-encoded from frames before it: no path back to the generator.
    assert_window_gradients(out, models.generator.model, masked_frames=2)


def test_the_window_rule_matches_the_standard_one_on_the_same_frames():
    # Same frames, same exits: the long rollout's window (a tail of the rollout) is the standard recipe's window of
    # a rollout of num_training_frames, whose cache holds everything (the window rule decodes all earlier frames).
    exits = [1, 2, 0, 3, 1]
    training_cache = dict(model_kwargs=dict(timestep_shift=5.0), rollout_cache="training")
    standard_cfg = long_config(rollout_frames=0, num_training_frames=10, **training_cache)
    long_cfg = long_config(rollout_frames=10, **training_cache)
    models = long_models(standard_cfg, teacher=False, critic=False)
    context = prompts(models, "a", "b")
    # The long rollout draws its initial noise piece by piece: both get the same noise for the comparison.
    noise = torch.randn(2, 10, CHANNELS, 4, 6, generator=torch.Generator().manual_seed(1))
    replay = []
    for cfg in (standard_cfg, long_cfg):
        draws = torch.Generator().manual_seed(2)
        rollout = SelfForcingRollout(cfg, models.generator, codec=models.codec)
        replay.append(rollout(context, plan=RolloutPlan(5, exits), noise=noise,
                              noise_fn=lambda x, g=draws: torch.randn(x.shape, generator=g)))
    torch.testing.assert_close(replay[0].latents, replay[1].latents, rtol=0, atol=1e-6)
    assert torch.equal(replay[0].gradient_mask, replay[1].gradient_mask)


# ------------------------------------------------------------------------------------- bounded memory
def _record_caches_and_pieces(monkeypatch, model):
    caches, pieces = [], []
    new_kv_cache = model.new_kv_cache

    def recording_cache(*args, **kwargs):
        caches.append(new_kv_cache(*args, **kwargs))
        return caches[-1]
    object.__setattr__(model, "new_kv_cache", recording_cache)
    rollout = self_forcing_module.rollout

    def recording_rollout(denoiser, noise, *args, **kwargs):
        result = rollout(denoiser, noise, *args, **kwargs)
        pieces.append((noise.shape[1], result.latents.shape[1]))
        return result
    monkeypatch.setattr(self_forcing_module, "rollout", recording_rollout)
    return caches, pieces


def test_cache_and_kept_frames_do_not_grow_with_rollout_frames(monkeypatch):
    sizes = []
    for horizons in (2, 5, 12):
        cfg = long_config(rollout_frames=horizons * WINDOW)
        models = long_models(cfg, teacher=False, critic=False)
        model = models.generator.model
        caches, pieces = _record_caches_and_pieces(monkeypatch, model)
        rollout = SelfForcingRollout(cfg, models.generator, codec=models.codec)
        with torch.no_grad():
            out = rollout(prompts(models, "a", "b"))
        object.__delattr__(model, "new_kv_cache")
        assert out.num_frames == horizons * WINDOW and out.latents.shape[1] == WINDOW
        (cache,) = caches
        assert cache.rolling and cache.capacity == 4 * cache.tokens_per_frame
        assert cache.sink == 2 * cache.tokens_per_frame
        sizes.append(cache.k.numel() + cache.v.numel() + cache.cross_k.numel() + cache.cross_v.numel())
        # Every piece of the rollout generates at most a window's frames.
        assert sum(n for n, _ in pieces) == horizons * WINDOW and max(n for n, _ in pieces) <= WINDOW
        assert all(n == m for n, m in pieces)
    assert len(set(sizes)) == 1


def test_the_training_cache_holds_every_frame_and_inference_cache_rolls(monkeypatch):
    cfg = long_config(rollout_frames=0, num_training_frames=WINDOW, rollout_cache="training")
    models = long_models(cfg, teacher=False, critic=False)
    caches, _ = _record_caches_and_pieces(monkeypatch, models.generator.model)
    for cache_kind in ("training", "inference"):
        cfg = long_config(rollout_frames=0, rollout_cache=cache_kind)
        with torch.no_grad():
            SelfForcingRollout(cfg, models.generator)(prompts(models, "a"), plan=RolloutPlan(3, [0, 0, 0]))
    training, inference = caches
    tpf = training.tokens_per_frame
    # The original's training cache: room for all 6 frames, attention over the last 4, nothing ever evicted.
    assert (training.capacity, training.window_frames) == (6 * tpf, 4)
    # The inference cache of the same model_kwargs: 4 slots, the oldest non-sink frames evicted, 2 sink frames.
    assert (inference.capacity, inference.window_frames, inference.sink) == (4 * tpf, 4, 2 * tpf)


# ------------------------------------------------------------------------------------- prompt switches
def test_a_prompt_switch_recaches_and_the_window_sees_the_new_prompt(monkeypatch):
    cfg = long_config(rollout_frames=4 * WINDOW, prompt_switch_prob=1.0)
    models = long_models(cfg, teacher=False, critic=False)
    model = models.generator.model
    rollout = SelfForcingRollout(cfg, models.generator, codec=models.codec)
    old, new = prompts(models, "a red circle", "a cat"), prompts(models, "a dog", "a blue square")
    recaches = []
    recache = self_forcing_module.recache

    def recording_recache(denoiser, cache, blocks, context, **kwargs):
        recaches.append(([start for start, _ in blocks], context, cache.global_end // cache.tokens_per_frame))
        return recache(denoiser, cache, blocks, context, **kwargs)
    monkeypatch.setattr(self_forcing_module, "recache", recording_recache)
    plan = RolloutPlan(12, [1] * 12, switch_block=5)  # blocks of 2: the switch at frame 10
    with pytest.raises(ValueError, match="switch_prompts"):
        rollout(old, plan=plan)
    with recorded_calls(model) as recorded, torch.no_grad():
        out = rollout(old, plan=plan, switch_context=new)
    (starts, context, held_to), = recaches
    assert context is new and held_to == 10
    # Replayed: the sink block (frames 0-1) and the blocks inside the 4-frame window's room (2 non-sink frames).
    assert starts[0] == 0 and starts[-1] == 8
    contexts = [(call.mode, call.args[4], call.args[2]) for call in recorded]
    before = [c for mode, frame, c in contexts if mode == "forward_cached" and frame < 10]
    after = [c for mode, frame, c in contexts if mode == "forward_cached" and frame >= 10]
    assert all(c is old for c in before) and after and all(c is new for c in after)
    replays = [frame for mode, frame, c in contexts if mode == "write_cache" and c is new][:2]
    assert replays == [0, 8]  # the re-cache replays the kept blocks under the new prompt before frame 10 is made
    assert out.context is new


def test_switch_draws_fall_before_the_window():
    cfg = long_config(rollout_frames=4 * WINDOW, rollout_window="uniform", prompt_switch_prob=0.5)
    models = long_models(cfg, teacher=False, critic=False)
    rollout = SelfForcingRollout(cfg, models.generator, codec=models.codec)
    plans = [rollout.sample_plan() for _ in range(60)]
    switched = [p for p in plans if p.switch_block is not None]
    assert 0 < len(switched) < len(plans)
    for p in switched:
        # The window is the last 3 blocks: the switch is at the latest at its first block.
        assert 1 <= p.switch_block <= p.num_blocks - 3
    assert all(p.switch_block is None for p in plans if p.num_blocks == 3)


@pytest.mark.parametrize("cls", [DMD, SiD, GAN])
def test_the_losses_see_the_prompt_in_force(cls, monkeypatch):
    extra = {DMD: {}, SiD: dict(distribution_loss="sid"), GAN: dict(trainer="gan")}[cls]
    cfg = long_config(rollout_frames=4 * WINDOW, prompt_switch_prob=1.0, **extra)
    models = long_models(cfg, teacher=cls is not GAN)
    algo = cls(cfg, models)
    batch = {"prompts": ["a red circle", "a cat"], "switch_prompts": ["a dog", "a blue square"],
             "latents": torch.randn(2, WINDOW, CHANNELS, 4, 6)}
    switched = models.text(batch["switch_prompts"])
    own = models.text(batch["prompts"])
    seen = {}
    for role in ("teacher", "critic"):
        denoiser = getattr(models, role)
        if denoiser is None:
            continue
        for mode in ("forward", "features"):
            def record(*args, _role=role, _method=getattr(denoiser.model, mode), **kwargs):
                seen.setdefault(_role, []).append(args[2])
                return _method(*args, **kwargs)
            object.__setattr__(denoiser.model, mode, record)
    algo.generator_loss(batch, 0)
    if cls is not GAN:
        # Conditional passes use the switched prompts; the guidance's unconditional ones the negative prompt (a
        # guided call is one pass at twice the batch: the conditional half first, prompts zero-padded alike).
        def conditional(c, prompts):
            return torch.equal(c[:len(prompts), :prompts.shape[1]], prompts)
        for role in ("teacher", "critic"):
            assert any(conditional(c, switched) for c in seen[role])
            assert not any(conditional(c, own) for c in seen[role])
        seen.clear()
        algo.critic_loss(batch, 0)
        assert all(torch.equal(c, switched) for c in seen["critic"])
    else:
        # One discriminator pass over [fake; real]: the window with the switched prompts, the data with its own.
        (context,) = seen["critic"]
        assert torch.equal(context, torch.cat([switched, own]))
    del batch["switch_prompts"]
    with pytest.raises(KeyError, match="switch_prompts"):
        algo.generator_loss(batch, 0)


# ------------------------------------------------------------------------------------- configuration
@pytest.mark.parametrize("overrides, key", [
    (["rollout_frames=4"], "rollout_frames"),  # shorter than the window of 6
    (["rollout_frames=13"], "rollout_frames"),  # not whole blocks of 2
    (["rollout_window=uniform"], "rollout_window"),  # no long rollout
    (["prompt_switch_prob=0.5"], "prompt_switch_prob"),
    (["rollout_frames=12", "prompt_switch_prob=1.5"], "prompt_switch_prob"),
    (["rollout_frames=6", "prompt_switch_prob=0.5"], "prompt_switch_prob"),  # no boundary before the window
    (["rollout_frames=6", "rollout_window=uniform"], "rollout_window"),  # one position only
    (["rollout_frames=12", "rollout_window=first"], "rollout_window"),
    (["rollout_frames=12", "num_training_frames=8"], "num_training_frames"),
    (["rollout_frames=12", "rollout_cache=training"], "rollout_cache"),  # a cache that grows with the rollout
    (["rollout_frames=12", "model_kwargs.local_attn_size=-1"], "model_kwargs.local_attn_size"),
    (["rollout_frames=12", "model_kwargs.sink_size=3"], "model_kwargs.sink_size"),
    (["rollout_frames=12", "trainer=ode", "rollout_cache=training"], "rollout_frames"),
    (["rollout_frames=0", "rollout_cache=inference", "trainer=diffusion"], "rollout_cache"),
])
def test_bad_long_rollout_settings_are_config_errors_naming_the_key(tmp_path, overrides, key):
    recipe = tmp_path / "long.yaml"
    recipe.write_text("image_or_video_shape: [1, 6, 12, 4, 6]\nnum_training_frames: 6\nnum_frame_per_block: 2\n"
                      "rollout_cache: inference\nmodel_kwargs: {local_attn_size: 4, sink_size: 2}\n")
    with pytest.raises(ConfigError, match=key.replace("[", r"\[")) as err:
        load_config(recipe, overrides)
    assert str(recipe) in str(err.value) or "override" in str(err.value)
    cfg = load_config(recipe, ["rollout_frames=24", "rollout_window=uniform", "prompt_switch_prob=0.3"])
    r = cfg.rollout
    assert (r.rollout_frames, r.rollout_window, r.prompt_switch_prob) == (24, "uniform", 0.3)


# ------------------------------------------------------------------------------------- the entry point
LONG_RECIPE = tiny_recipe_yaml(
    image_or_video_shape=[1, 6, 12, 4, 6], rollout_frames=18, rollout_window="uniform", prompt_switch_prob=1.0,
    rollout_cache="inference", model_kwargs=dict(timestep_shift=5.0, local_attn_size=4, sink_size=2, rope="relative"),
    sharding_strategy="no_shard", batch_size=2, max_steps=3, log_iters=100, seed=3)


def test_train_py_runs_long_rollouts_with_prompt_switches(tmp_path):
    import train
    from trainer.registry import build_algorithm

    (tmp_path / "prompts.txt").write_text("a red circle\na blue square\na green triangle\na white cat\n")
    recipe = tmp_path / "long.yaml"
    recipe.write_text(LONG_RECIPE + f"data_path: {tmp_path / 'prompts.txt'}\n")
    argv = ["--config_path", str(recipe), "--logdir", str(tmp_path / "run"), "--disable-wandb", "--no_save"]
    samples, before = [], {}

    def recording(cfg, models):
        algo = build_algorithm(cfg, models)
        before.update({n: p.detach().clone() for n, p in models.generator.model.named_parameters()})
        rollout = algo.rollout

        def recorded(context, **kwargs):
            out = rollout(context, **kwargs)
            samples.append((out.num_frames, out.plan.num_blocks, out.plan.switch_block, out.latents.shape,
                            out.context is kwargs.get("switch_context")))
            return out
        algo.rollout = recorded
        return algo
    trainer = train.main(argv, models=long_models, algorithm_factory=recording)
    assert trainer.step == 3 and len(samples) == 3 + 2  # every step a critic rollout, steps 0 and 2 a generator one
    for frames, blocks, switch, shape, switched in samples:
        assert frames == 2 * blocks and 6 <= frames <= 18 and shape == (2, 6, 12, 4, 6)
        # Every rollout past the horizon switched (probability 1) before its window, and its losses saw the switch.
        assert (switch is not None) == (frames > 6) and switched == (frames > 6)
    assert any(frames > 6 for frames, *_ in samples)
    after = dict(trainer.algorithm.models.generator.model.named_parameters())
    assert any(not torch.equal(before[n], after[n].detach()) for n in before)


def test_prompt_files_pair_every_prompt_with_another_one(tmp_path):
    from trainer.data import PromptDataset
    path = tmp_path / "prompts.txt"
    path.write_text("".join(f"prompt {i}\n" for i in range(7)))
    plain = PromptDataset(path)
    assert "switch_prompts" not in plain[0]
    a, b = PromptDataset(path, switch_seed=4), PromptDataset(path, switch_seed=4)
    partners = [a[i]["switch_prompts"] for i in range(7)]
    assert partners == [b[i]["switch_prompts"] for i in range(7)]  # fixed for a run: resumes need no state
    assert all(p != f"prompt {i}" for i, p in enumerate(partners))  # nobody switches to itself
    assert sorted(partners) == sorted(f"prompt {i}" for i in range(7))  # one cycle: every prompt is used once
    one = tmp_path / "one.txt"
    one.write_text("alone\n")
    with pytest.raises(ValueError, match="at least two prompts"):
        PromptDataset(one, switch_seed=0)


def test_shapes_batches_carry_switch_prompts_only_when_switching():
    from shapes.components import ShapesBatches
    from utils.config import unchecked_config
    base = dict(world="shapes", image_or_video_shape=[1, 4, 12, 16, 16], height=32, width=32, batch_size=3)
    plain = next(ShapesBatches(unchecked_config(base), seed=1))
    switching = next(ShapesBatches(unchecked_config(dict(base, rollout_frames=8, prompt_switch_prob=0.5)), seed=1))
    assert "switch_prompts" not in plain and plain["prompts"] == switching["prompts"]
    assert len(switching["switch_prompts"]) == 3 and switching["switch_prompts"] != switching["prompts"]


@pytest.mark.parametrize("recipe", ["configs/self_forcing_dmd_long.yaml", "configs/shapes/self_forcing_dmd_long.yaml"])
def test_the_long_recipes_load(recipe):
    from utils.config import REPO_ROOT
    cfg = load_config(REPO_ROOT / recipe)
    horizon = cfg.rollout.image_or_video_shape[1]
    assert cfg.rollout.rollout_frames == 4 * horizon and cfg.rollout.rollout_cache == "inference"
    assert cfg.rollout.local_attn_size == horizon and cfg.rollout.rope == "relative"
    assert 0 < cfg.rollout.prompt_switch_prob < 1 and cfg.rollout.rollout_window == "uniform"
    # Both continue from the EMA weights a user generates with: the Wan recipe takes them from the released .pt.
    assert cfg.model.generator_ckpt_ema or cfg.model.generator_ckpt.endswith("generator_ema.safetensors")


def test_a_long_wan_recipe_loads_the_codec_its_window_rule_needs():
    """The window's first frame is the last pixel frame before it, re-encoded: a long rollout needs the Wan VAE even
    when no samples are drawn (without it the first step failed)."""
    from trainer.builders import codec_needed
    from utils.config import REPO_ROOT
    quiet = ["no_visualize=true"]
    assert not codec_needed(load_config(REPO_ROOT / "configs/self_forcing_dmd.yaml", quiet))
    assert codec_needed(load_config(REPO_ROOT / "configs/self_forcing_dmd_long.yaml", quiet))
    assert codec_needed(load_config(REPO_ROOT / "configs/self_forcing_dmd.yaml", ["num_training_frames=27", *quiet]))
    assert codec_needed(load_config(REPO_ROOT / "configs/self_forcing_dmd.yaml", ["no_visualize=false",
                                                                                  "sample_every=100"]))


def test_the_shapes_recipe_runs_the_long_stage_only_when_named(tmp_path):
    import importlib.util
    from utils.config import REPO_ROOT
    spec = importlib.util.spec_from_file_location("shapes_world_script", REPO_ROOT / "scripts" / "shapes_world.py")
    sw = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sw)
    assert "dmd_long" not in sw.ALL_STAGES and "dmd_long" in sw.OPTIONAL_STAGES
    cfg = sw.load_stage_config("dmd_long", tmp_path, "smoke")  # smoke sizes: a 6-frame window
    assert cfg.rollout.rollout_frames == 48 and cfg.rollout.image_or_video_shape[1] == 6
    assert cfg.model.generator_ckpt == str(tmp_path / "dmd" / "generator_ema.safetensors")
    assert cfg.model.real_score_ckpt == str(tmp_path / "teacher" / "generator_ema.safetensors")
