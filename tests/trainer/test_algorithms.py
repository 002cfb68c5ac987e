"""The training algorithms as loss functions (trainer/*.py): finite losses, gradients reaching exactly the right
models, and the loss formulas of docs/method.md (DMD gradient, SiD mask, GAN losses, ODE and diffusion losses)."""
from __future__ import annotations

import pytest
import torch

import trainer.dmd as dmd_module
from model.gan_heads import GanHeads, default_taps
from tests.tiny import recorded_calls, tiny_config, tiny_models, tiny_train_config
from trainer.causvid import CausVid
from trainer.diffusion import Diffusion
from trainer.dmd import DMD, dmd_gradient, dmd_loss
from trainer.gan import GAN, discriminator_gan_loss, finite_difference_penalty, generator_gan_loss
from trainer.ode import ODERegression
from trainer.registry import build_algorithm
from trainer.self_forcing import GeneratorOutput
from trainer.sid import SiD, sid_loss

SHAPE = (2, 6, 4, 4, 6)  # [B, F, C, H, W] of tiny_train_config


def _batch(seed: int = 0, trajectory_points: int = 4):
    g = torch.Generator().manual_seed(seed)
    return {"prompts": ["a red circle moves left", "a blue square"], "latents": torch.randn(SHAPE, generator=g),
            "ode_latent": torch.randn(SHAPE[0], trajectory_points, *SHAPE[1:], generator=g)}


def _grads(module):
    return [p.grad for p in module.parameters()]


def _has_grad(module) -> bool:
    return any(g is not None and g.abs().sum() > 0 for g in _grads(module))


def _no_grad(module) -> bool:
    return all(g is None for g in _grads(module))


def _check_generator_step(algo, batch, models):
    loss, logs = algo.generator_loss(batch, 0)
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert all(isinstance(v, float) for v in logs.values())
    loss.backward()
    assert _has_grad(models.generator.model)
    if models.teacher is not None:  # the frozen teacher never gets gradients (the critic may: the loop clears them)
        assert _no_grad(models.teacher.model)
    return logs


def _check_critic_step(algo, batch, models, trained):
    loss, logs = algo.critic_loss(batch, 0)
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    assert _no_grad(models.generator.model)
    if models.teacher is not None:
        assert _no_grad(models.teacher.model)
    for module in trained:
        assert _has_grad(module)
    return logs


# --------------------------------------------------------------------------------------------------- DMD / SiD
@pytest.mark.parametrize("name", ["dmd", "sid", "causvid"])
def test_score_distillation_losses_train_the_right_models(name):
    cfg = tiny_train_config(distribution_loss=name)
    models = tiny_models(cfg)
    algo = build_algorithm(cfg, models)
    assert type(algo) is {"dmd": DMD, "sid": SiD, "causvid": CausVid}[name] and algo.has_critic
    logs = _check_generator_step(algo, _batch(), models)
    assert logs["dmdtrain_gradient_norm"] > 0
    for p in models.generator.model.parameters():
        p.grad = None
    _check_critic_step(algo, _batch(1), models, trained=[models.critic.model])
    params = algo.trainable_parameters()
    assert set(params) == {"generator", "critic"}
    assert len(params["critic"]) == len(list(models.critic.model.parameters()))
    assert all(p.requires_grad for p in models.critic.model.parameters())


def test_dmd_loss_gradient_is_the_normalised_score_difference():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(SHAPE, generator=g, requires_grad=True)
    fake, real = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
    grad = dmd_gradient(x.detach(), fake, real)
    normaliser = (x.detach().double() - real.double()).abs().mean(dim=(1, 2, 3, 4), keepdim=True)
    torch.testing.assert_close(grad, (fake.double() - real.double()) / normaliser)
    dmd_loss(x, grad).backward()
    torch.testing.assert_close(x.grad.double(), grad / x.numel(), rtol=1e-5, atol=1e-12)
    # With a mask: the same direction on the kept elements, over their count; zero elsewhere.
    mask = torch.ones(SHAPE, dtype=torch.bool)
    mask[:, :2] = False
    x.grad = None
    dmd_loss(x, grad, mask).backward()
    expected = torch.where(mask, grad / mask.sum(), torch.zeros_like(grad))
    torch.testing.assert_close(x.grad.double(), expected, rtol=1e-5, atol=1e-12)


def test_dmd_generator_step_applies_the_dmd_gradient_to_the_rollout_output(monkeypatch):
    cfg = tiny_train_config()
    models = tiny_models(cfg)
    algo = DMD(cfg, models)
    seen = {}

    def recording_gradient(x, fake, real):
        seen.update(x=x, fake=fake, real=real)
        return dmd_gradient(x, fake, real)
    monkeypatch.setattr(dmd_module, "dmd_gradient", recording_gradient)
    rollout = algo.rollout

    def rollout_keeping_grad(context, **kwargs):
        out = rollout(context, **kwargs)
        out.latents.retain_grad()
        seen["out"] = out.latents
        return out
    monkeypatch.setattr(algo, "rollout", rollout_keeping_grad)
    loss, _ = algo.generator_loss(_batch(), 0)
    loss.backward()
    x, fake, real = seen["x"].double(), seen["fake"].double(), seen["real"].double()
    expected = (fake - real) / (x - real).abs().mean(dim=(1, 2, 3, 4), keepdim=True) / x.numel()
    torch.testing.assert_close(seen["out"].grad.double(), expected, rtol=1e-5, atol=1e-12)
    # Classifier-free guidance with the negative prompt: real = cond + 3 (cond - uncond) differs from cond.
    assert algo.real_guidance_scale == 3.0 and algo.fake_guidance_scale == 0.0


def test_guidance_scales_follow_the_original_rules():
    cfg = tiny_train_config(real_guidance_scale=2.0, fake_guidance_scale=1.0)
    algo = DMD(cfg, tiny_models(cfg))
    assert (algo.real_guidance_scale, algo.fake_guidance_scale) == (2.0, 1.0)


def test_sid_loss_formula_and_mask():
    g = torch.Generator().manual_seed(3)
    x, fake, real = (torch.randn(SHAPE, generator=g) for _ in range(3))
    alpha = 0.7
    n = (x - real).abs().double().mean(dim=(1, 2, 3, 4), keepdim=True)
    elementwise = ((real - fake) * ((real - x) - alpha * (real - fake))).double() / n
    loss, _ = sid_loss(x, fake, real, alpha)
    torch.testing.assert_close(loss, elementwise.mean())
    mask = torch.zeros(SHAPE, dtype=torch.bool)
    mask[:, 2:] = True
    masked, _ = sid_loss(x, fake, real, alpha, mask)
    torch.testing.assert_close(masked, elementwise[:, 2:].mean())
    assert not torch.isclose(masked, loss)
    # alpha = 1 reduces to (r - f) * (f - x) / n.
    torch.testing.assert_close(sid_loss(x, fake, real, 1.0)[0], (((real - fake) * (fake - x)).double() / n).mean())


def test_sid_generator_step_uses_the_rollout_mask(monkeypatch):
    cfg = tiny_train_config(distribution_loss="sid")
    models = tiny_models(cfg)
    algo = SiD(cfg, models)
    rollout = algo.rollout
    mask = torch.ones(SHAPE, dtype=torch.bool)
    mask[:, :2] = False

    def run(with_mask):
        def fake_rollout(context, **kwargs):
            out = rollout(context, **kwargs)
            return GeneratorOutput(out.latents, mask if with_mask else None, out.denoised_timestep_from,
                                   out.denoised_timestep_to)
        monkeypatch.setattr(algo, "rollout", fake_rollout)
        torch.manual_seed(11)
        rollout.seed(0)
        return algo.generator_loss(_batch(), 0)[0]
    assert torch.isfinite(run(True)) and not torch.isclose(run(True), run(False))
    torch.testing.assert_close(run(True), run(True))


def test_causvid_input_uses_one_step_per_block_and_teacher_forcing_runs():
    cfg = tiny_train_config(distribution_loss="causvid", denoising_step_list=[1000, 750, 500, 0])
    models = tiny_models(cfg)
    algo = CausVid(cfg, models)
    with recorded_calls(models.generator.model) as calls:
        algo.generate(_batch(), models.text(["a", "b"]))
    call, = calls
    t = call.args[1]
    assert call.mode == "forward" and call.kwargs["block_causal"].frames_per_block == 2  # no teacher forcing
    assert torch.equal(t.view(2, 3, 2)[..., 0], t.view(2, 3, 2)[..., 1])  # one timestep per block
    assert set(t.unique().tolist()) <= set(algo.steps)
    cfg_tf = tiny_train_config(distribution_loss="causvid", teacher_forcing=True)
    models_tf = tiny_models(cfg_tf)
    _check_generator_step(CausVid(cfg_tf, models_tf), _batch(), models_tf)


def test_missing_models_and_unknown_names_are_errors():
    cfg = tiny_train_config()
    with pytest.raises(ValueError, match="teacher"):
        DMD(cfg, tiny_models(cfg, teacher=False))
    with pytest.raises(ValueError, match="trainer"):
        build_algorithm(tiny_train_config(trainer="distill"), tiny_models(cfg))
    with pytest.raises(ValueError, match="distribution_loss"):
        build_algorithm(tiny_train_config(distribution_loss="kl"), tiny_models(cfg))
    with pytest.raises(KeyError, match="prompts"):
        DMD(cfg, tiny_models(cfg)).generator_loss({}, 0)


# --------------------------------------------------------------------------------------------------------- GAN
def test_gan_heads_use_the_original_names_and_derived_sizes():
    assert default_taps(30) == [13, 21, 29]
    assert default_taps(40) == [18, 28, 39]
    assert default_taps(2) == [0, 0, 1]
    config = tiny_config()
    heads = GanHeads.for_critic(config, num_class=3, concat_time_embeddings=True)
    names = dict(heads.named_parameters())
    assert names["_register_tokens.register_tokens"].shape == (3, config.dim)
    assert "_register_tokens.rms_norm.weight" in names
    for key in ("norm3.weight", "norm3.bias", "cross_attn.q.weight", "cross_attn.k.bias", "cross_attn.v.weight",
                "cross_attn.o.weight", "cross_attn.norm_q.weight", "cross_attn.norm_k.weight", "ffn.0.weight",
                "ffn.2.bias"):
        assert f"_gan_ca_blocks.2.{key}" in names
    assert names["_gan_ca_blocks.0.ffn.0.weight"].shape == (config.dim * 16 // 3, config.dim)
    assert names["_cls_pred_branch.0.weight"].shape == (config.dim * 4,)  # 3 taps + the time token
    assert names["_cls_pred_branch.3.weight"].shape == (3, config.dim)
    hidden = [torch.randn(2, 10, config.dim) for _ in heads.unique_taps]
    assert heads(hidden, torch.randn(2, config.dim)).shape == (2, 3)
    with pytest.raises(ValueError, match="time embedding"):
        heads(hidden)


def test_gan_loss_formulas_on_mocked_logits():
    fake, real = torch.tensor([[0.5], [-1.0]]), torch.tensor([[2.0], [0.3]])
    sp = torch.nn.functional.softplus
    torch.testing.assert_close(generator_gan_loss(fake, real, False), sp(-fake).mean())
    torch.testing.assert_close(generator_gan_loss(fake, real, True), sp(-(fake - real)).mean())
    torch.testing.assert_close(discriminator_gan_loss(fake, real, False), sp(-real).mean() + sp(fake).mean())
    torch.testing.assert_close(discriminator_gan_loss(fake, real, True), sp(-(real - fake)).mean())
    torch.testing.assert_close(finite_difference_penalty(real + 0.02, real, 0.01), torch.tensor(4.0))


@pytest.mark.parametrize("relativistic", [False, True])
def test_gan_losses_train_the_right_models(relativistic):
    cfg = tiny_train_config(trainer="gan", relativistic_discriminator=relativistic, r1_weight=1.0, r2_weight=1.0,
                            concat_time_embeddings=relativistic)
    models = tiny_models(cfg, teacher=False)
    algo = build_algorithm(cfg, models)
    assert isinstance(algo, GAN) and models.discriminator_heads is algo.heads
    _check_generator_step(algo, _batch(), models)
    for p in models.generator.model.parameters():
        p.grad = None
    logs = _check_critic_step(algo, _batch(1), models, trained=[models.critic.model, algo.heads])
    assert logs["r1_loss"] > 0 and logs["r2_loss"] > 0
    assert len(algo.trainable_parameters()["critic"]) == (len(list(models.critic.model.parameters()))
                                                          + len(list(algo.heads.parameters())))


def test_gan_discriminator_warmup_trains_only_the_heads():
    cfg = tiny_train_config(trainer="gan", discriminator_warmup_steps=2, discriminator_lr_multiplier=5.0)
    models = tiny_models(cfg, teacher=False)
    algo = GAN(cfg, models)
    assert [algo.critic_phase(s) for s in (0, 1, 2)] == ["warmup", "warmup", "main"]
    warm = algo.critic_param_groups(0)
    assert len(warm) == 1 and warm[0]["betas"] == (0.9, 0.999) and warm[0]["lr_scale"] == 5.0
    assert len(warm[0]["params"]) == len(list(algo.heads.parameters()))
    main = algo.critic_param_groups(2)
    assert [g["lr_scale"] for g in main] == [1.0, 5.0] and all("betas" not in g for g in main)
    loss, _ = algo.critic_loss(_batch(), step=0)
    loss.backward()
    assert _has_grad(algo.heads)  # the trunk's gradients are computed but its parameters are in no warm-up group
    assert all(p.requires_grad for p in models.critic.model.parameters())


def test_gan_needs_real_latents_of_the_window_shape():
    cfg = tiny_train_config(trainer="gan")
    algo = GAN(cfg, tiny_models(cfg, teacher=False))
    with pytest.raises(KeyError, match="latents"):
        algo.critic_loss({"prompts": ["a", "b"]}, 0)
    with pytest.raises(ValueError, match="match"):
        algo.critic_loss({"prompts": ["a", "b"], "latents": torch.randn(2, 4, 4, 4, 6)}, 0)


# --------------------------------------------------------------------------------------------- ODE / diffusion
def test_ode_loss_excludes_clean_frames_and_matches_a_manual_computation():
    cfg = tiny_train_config(trainer="ode", denoising_step_list=[1000, 750, 500, 0])
    models = tiny_models(cfg, teacher=False, critic=False)
    algo = ODERegression(cfg, models)
    assert not algo.has_critic and algo.steps[-1] == 0
    batch = _batch()
    torch.manual_seed(5)
    loss, logs = algo.generator_loss(batch, 0)
    torch.manual_seed(5)
    inputs, t = algo.sample_inputs(batch["ode_latent"])
    assert torch.equal(t.view(2, 3, 2)[..., 0], t.view(2, 3, 2)[..., 1])
    _, x0 = models.generator(inputs, t, models.text(batch["prompts"]), block_causal=algo.block_causal)
    per_frame = ((x0 - batch["ode_latent"][:, -1]) ** 2).mean(dim=(2, 3, 4))
    keep = t != 0
    assert keep.any() and not keep.all(), "seed chosen so that some frames are clean"
    torch.testing.assert_close(loss, per_frame[keep].mean())
    assert all(k.startswith("loss_at_time_") for k in logs)
    loss.backward()
    assert _has_grad(models.generator.model)
    with pytest.raises(ValueError, match="denoising_step_list"):
        algo.generator_loss(_batch(trajectory_points=5), 0)


@pytest.mark.parametrize("overrides", [dict(), dict(causal=False),
                                       dict(teacher_forcing=True, noise_augmentation_max_timestep=100)])
def test_diffusion_loss_is_the_weighted_flow_matching_loss(overrides):
    cfg = tiny_train_config(trainer="diffusion", **overrides)
    models = tiny_models(cfg, teacher=False, critic=False)
    algo = build_algorithm(cfg, models)
    assert isinstance(algo, Diffusion) and not algo.has_critic
    schedule = models.generator.schedule
    batch = _batch()
    torch.manual_seed(9)
    loss, _ = algo.generator_loss(batch, 0)
    torch.manual_seed(9)
    t = algo.timesteps(2, 6, torch.device("cpu"))
    noise = torch.randn(SHAPE)
    assert t.dtype == torch.float32 and set(t.flatten().tolist()) <= set(schedule.timesteps.tolist())
    per = t.view(2, 3, 2) if cfg.pretraining.causal else t.view(2, 1, 6)
    assert torch.equal(per, per[..., :1].expand_as(per))  # one timestep per block (per sample if bidirectional)
    x0 = batch["latents"]
    net, x_t, context = models.generator.model, schedule.add_noise(x0, noise, t), models.text(batch["prompts"])
    if cfg.pretraining.teacher_forcing:
        aug_t = algo.augmentation_timesteps(2, 6, torch.device("cpu"))
        assert aug_t.max() < 100  # small augmentation really is small
        clean = schedule.add_noise(x0, torch.randn(SHAPE), aug_t)
        flow = net.forward_teacher_forcing(x_t, t, context, clean, algo.block_causal, aug_t)
    else:
        flow = net(x_t, t, context, block_causal=algo.block_causal if cfg.pretraining.causal else None)
    per_frame = ((flow - (noise - x0)) ** 2).mean(dim=(2, 3, 4))
    torch.testing.assert_close(loss, (per_frame * schedule.training_weight(t)).mean())
    loss.backward()
    assert _has_grad(models.generator.model)


def test_frame_causal_steps_of_a_bidirectional_model():
    """A `frame_causal_fraction` of a bidirectional model's steps attend frame-causally: chosen per step (the same
    choice on every rank and on resume), the loss of such a step is the one under that mask, the others unmasked."""
    from model.attention import BlockCausal
    cfg = tiny_train_config(trainer="diffusion", causal=False, frame_causal_fraction=0.3)
    models = tiny_models(cfg, teacher=False, critic=False)
    algo = build_algorithm(cfg, models)
    masks = [algo.attention_mask(step) for step in range(1000)]
    assert 250 < sum(m is not None for m in masks) < 350
    assert [algo.attention_mask(step) for step in range(1000)] == masks  # a function of the step
    assert all(m == BlockCausal(frames_per_block=1) for m in masks if m is not None)
    batch, x0 = _batch(), _batch()["latents"]
    for step in (masks.index(None), next(i for i, m in enumerate(masks) if m is not None)):
        torch.manual_seed(9)
        loss, _ = algo.generator_loss(batch, step)
        torch.manual_seed(9)
        t = algo.timesteps(2, 6, torch.device("cpu"))
        noise = torch.randn(SHAPE)
        kwargs = {} if masks[step] is None else {"block_causal": masks[step]}
        x_t = models.generator.schedule.add_noise(x0, noise, t)
        flow = models.generator.model(x_t, t[:, 0], models.text(batch["prompts"]), **kwargs)
        per_frame = ((flow - (noise - x0)) ** 2).mean(dim=(2, 3, 4))
        torch.testing.assert_close(loss, (per_frame * models.generator.schedule.training_weight(t)).mean())
    # frame-causal really is causal: the first frame's prediction ignores the later frames
    t = torch.full((2,), 500.0)
    x = torch.randn(SHAPE)
    later = x.clone()
    later[:, 1:] += 1.0
    net, context = models.generator.model, models.text(batch["prompts"])
    mask = BlockCausal(frames_per_block=1)
    with torch.no_grad():
        torch.testing.assert_close(net(x, t, context, block_causal=mask)[:, 0],
                                   net(later, t, context, block_causal=mask)[:, 0])
        assert not torch.allclose(net(x, t, context)[:, 0], net(later, t, context)[:, 0])
    cfg0 = tiny_train_config(trainer="diffusion", causal=False)
    assert build_algorithm(cfg0, tiny_models(cfg0, teacher=False, critic=False)).attention_mask(3) is None
    with pytest.raises(ValueError, match="frame_causal_fraction"):
        Diffusion(tiny_train_config(trainer="diffusion", causal=True, frame_causal_fraction=0.5), models)


def test_frame_causal_fraction_out_of_range_is_a_config_error():
    from utils.config import ConfigError, load_config
    with pytest.raises(ConfigError, match="frame_causal_fraction"):
        load_config(None, ["frame_causal_fraction=1.0"])


def test_diffusion_rejects_teacher_forcing_without_causal():
    cfg = tiny_train_config(trainer="diffusion", causal=False, teacher_forcing=True)
    with pytest.raises(ValueError, match="teacher_forcing"):
        Diffusion(cfg, tiny_models(cfg, teacher=False, critic=False))


def test_text_dropout_replaces_prompts_by_the_negative_prompt():
    cfg = tiny_train_config(trainer="diffusion", causal=False, text_dropout=0.5, negative_prompt="<empty>")
    algo = build_algorithm(cfg, tiny_models(cfg, teacher=False, critic=False))
    batch = {"prompts": [f"prompt {i}" for i in range(400)], "latents": None}
    torch.manual_seed(0)
    dropped = algo.drop_text(batch)["prompts"]
    n = sum(p == "<empty>" for p in dropped)
    assert 150 < n < 250  # about half
    assert all(p in ("<empty>", q) for p, q in zip(dropped, batch["prompts"]))  # kept ones untouched, in order
    assert batch["prompts"][0] == "prompt 0"  # the batch itself is not modified
    cfg0 = tiny_train_config(trainer="diffusion", causal=False)
    algo0 = build_algorithm(cfg0, tiny_models(cfg0, teacher=False, critic=False))
    assert algo0.drop_text(batch) is batch


def test_text_dropout_out_of_range_is_a_config_error(tmp_path):
    from utils.config import ConfigError, load_config
    with pytest.raises(ConfigError, match="text_dropout"):
        load_config(None, ["text_dropout=1.0"])
