"""The score-distillation formulas checked against independent computations on tiny networks: classifier-free
guidance of the real score, the critic's flow-matching loss, which networks SiD's generator step differentiates,
the GAN penalties' precision, and exit steps drawn alike on two ranks under the real DMD."""
from __future__ import annotations

import json

import pytest
import torch

from tests.ranks import spawn_ranks
from tests.tiny import tiny_models, tiny_recipe_yaml, tiny_train_config
from tests.trainer.test_training_golden import Recording
from trainer.dmd import DMD
from trainer.gan import GAN, finite_difference_penalty
from trainer.self_forcing import GeneratorOutput
from trainer.sid import SiD

SHAPE = (2, 6, 4, 4, 6)  # [B, F, C, H, W] of tiny_train_config with batch 2


class FixedDraws:
    """Draws for the losses: the given integers, then the given noise."""

    def __init__(self, integers: torch.Tensor, noise: torch.Tensor):
        self.integers_value, self.noise = integers, noise

    def integers(self, low, high, shape, device):
        assert bool(((self.integers_value >= low) & (self.integers_value < high)).all())
        return self.integers_value.reshape(shape)

    def normal_like(self, x):
        return self.noise.reshape(x.shape)


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g),
            torch.tensor([137, 802]), torch.Generator().manual_seed(seed + 1))


def grid_sigma(t: torch.Tensor, shift: float, steps: int = 1000) -> torch.Tensor:
    """sigma of the training grid entry nearest to t, written out: 1000 sigmas from 1 down, each shifted to
    s u / (1 + (s - 1) u)."""
    u = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)[:-1]
    sigmas = shift * u / (1 + (shift - 1) * u)
    nearest = (sigmas[None, :] * steps - t.double().reshape(-1, 1)).abs().argmin(dim=1)
    return sigmas[nearest].reshape(t.shape)


def shifted_score_t(t_int: torch.Tensor, shift: float) -> torch.Tensor:
    u = t_int.double() / 1000
    return (shift * u / (1 + (shift - 1) * u) * 1000).clamp(20, 980)


@pytest.mark.parametrize("overrides, real_scale", [({}, 3.0), ({"real_guidance_scale": 1.5}, 1.5)])
def test_real_score_uses_cfg_with_the_negative_prompt(overrides, real_scale):
    cfg = tiny_train_config(**overrides)
    models = tiny_models(cfg)
    algo = DMD(cfg, models)
    x, noise, t_int, _ = _inputs()
    algo.draws = FixedDraws(t_int, noise)
    teacher = algo.models.teacher = Recording(models.teacher)
    critic = algo.models.critic = Recording(models.critic)
    context, negative = models.text(["a red circle", "a cat"]), models.text.negative(2)
    x = x.requires_grad_(True)
    loss, _ = algo.distribution_matching_loss(GeneratorOutput(x, None, None, None), context, negative)
    loss.backward()
    cond, uncond = teacher.guidance_halves()  # one call at batch 2B: the prompt's half, the negative prompt's
    assert torch.equal(cond["context"], context) and torch.equal(uncond["context"], negative)
    assert torch.equal(cond["x_t"], uncond["x_t"]) and torch.equal(cond["t"], uncond["t"])
    assert len(critic.calls) == 1 and torch.equal(critic.calls[0]["context"], context)  # no CFG for the critic
    t = shifted_score_t(t_int, cfg.distillation.score_timestep_shift)[:, None].expand(SHAPE[:2])
    torch.testing.assert_close(cond["t"].double(), t, rtol=1e-6, atol=1e-4)
    sigma = grid_sigma(t, cfg.rollout.generator_shift)[..., None, None, None]
    torch.testing.assert_close(cond["x_t"].double(), (1 - sigma) * x.detach().double() + sigma * noise.double(),
                               rtol=1e-5, atol=1e-6)
    # The DMD gradient with real = cond + g (cond - uncond), written out.
    c, u, f, xd = cond["x0"].double(), uncond["x0"].double(), critic.calls[0]["x0"].double(), x.detach().double()
    real = c + real_scale * (c - u)
    expected = (f - real) / (xd - real).abs().mean(dim=(1, 2, 3, 4), keepdim=True) / x.numel()
    # (real is formed in float32 by the code, so elements with a tiny difference carry its rounding)
    torch.testing.assert_close(x.grad.double(), expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))
    assert not torch.allclose(c, real)


def test_critic_loss_is_flow_matching_on_the_generators_grid():
    cfg = tiny_train_config()
    models = tiny_models(cfg)
    algo = DMD(cfg, models)
    x, noise, t_int, _ = _inputs(3)
    algo.draws = FixedDraws(t_int, noise)
    context = models.text(["a red circle", "a cat"])
    loss, _ = algo.denoising_loss(GeneratorOutput(x, None, None, None), context)
    loss.backward()
    # Independently: noise on the generator's grid, the critic's raw flow turned into x0 on ITS grid (shift 8) and
    # back into flow on the generator's, regressed onto noise - x.
    t = shifted_score_t(t_int, cfg.distillation.score_timestep_shift)[:, None].expand(SHAPE[:2])
    sigma_g = grid_sigma(t, cfg.rollout.generator_shift)[..., None, None, None]
    sigma_c = grid_sigma(t, models.critic.schedule.shift)[..., None, None, None]
    x_t = ((1 - sigma_g) * x.double() + sigma_g * noise.double()).float()
    with torch.no_grad():
        raw = models.critic.model(x_t, t[:, 0].float(), context).double()
    flow = raw * sigma_c / sigma_g
    expected = ((flow - (noise.double() - x.double())) ** 2).mean()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=0)
    assert all(p.grad is None for p in models.generator.model.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in models.critic.model.parameters())


def test_sid_generator_step_differentiates_through_the_critic_but_dmd_does_not():
    """SiD's docstring: the critic's parameters receive gradients in the generator step (the loop clears them before
    the critic's own update); DMD runs both score networks without gradients. The teacher never gets any."""
    for cls, critic_gets_grad in ((SiD, True), (DMD, False)):
        cfg = tiny_train_config(distribution_loss=cls.name)
        models = tiny_models(cfg)
        algo = cls(cfg, models)
        x, noise, t_int, _ = _inputs(5)
        algo.draws = FixedDraws(t_int, noise)
        x = x.requires_grad_(True)
        context = models.text(["a", "b"])
        loss, _ = algo.distribution_matching_loss(GeneratorOutput(x, None, None, None), context,
                                                  models.text.negative(2))
        loss.backward()
        got = any(p.grad is not None and p.grad.abs().sum() > 0 for p in models.critic.model.parameters())
        assert got == critic_gets_grad, cls.__name__
        assert all(p.grad is None for p in models.teacher.model.parameters()), cls.__name__
        assert x.grad is not None and x.grad.abs().sum() > 0
    import trainer.sid as sid_module
    assert "critic's parameters receive gradients there" in " ".join(sid_module.__doc__.split())


def test_gan_penalty_under_bf16_autocast_is_not_rounding():
    cfg = tiny_train_config(trainer="gan", r1_weight=1.0, r2_weight=1.0)
    models = tiny_models(cfg, teacher=False)
    algo = GAN(cfg, models)
    g = torch.Generator().manual_seed(0)
    fake, real = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
    t = torch.full(SHAPE[:2], 500.0)
    context = models.text(["a red circle", "a cat"])

    def terms(bf16: bool):
        torch.manual_seed(5)  # the same perturbations in both runs
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            return algo._discriminator_terms(fake, real, t, context, context)
    exact, mixed = terms(False), terms(True)
    assert all(v.dtype == torch.float32 for v in mixed)
    for name, a, b in (("r1", exact[2], mixed[2]), ("r2", exact[3], mixed[3])):
        assert float(a) > 0
        assert abs(float(b) - float(a)) < 0.01 * float(a), (name, float(a), float(b))
    # What the penalty would be with both passes in bf16: rounding moves it by a large fraction, which is why the
    # passes run in float32.
    torch.manual_seed(5)
    noise = torch.randn_like(real)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        sigma = cfg.distillation.gan.r1_sigma
        clean, perturbed = algo.discriminate(real, t, context), algo.discriminate(real + sigma * noise, t, context)
    rounded = float(finite_difference_penalty(perturbed, clean, sigma))
    rounding_error, kept_error = abs(rounded - float(exact[2])), abs(float(mixed[2]) - float(exact[2]))
    assert rounding_error > 0.2 * float(exact[2]) and rounding_error > 20 * kept_error


def test_gan_penalties_refuse_a_bf16_sharded_critic():
    cfg = tiny_train_config(trainer="gan", r1_weight=1.0)
    models = tiny_models(cfg, teacher=False)
    models.extra["compute_dtype"] = torch.bfloat16
    with pytest.raises(ValueError, match="r1_weight / r2_weight need float32"):
        GAN(cfg, models)


# ------------------------------------------------------------------------------------------------ two ranks
RECIPE = tiny_recipe_yaml(same_step_across_blocks=False, sharding_strategy="no_shard", max_steps=4, log_iters=100,
                          seed=7)


def _dmd_rank(rank: int, argv: list[str], out: str) -> None:
    import train
    from trainer.registry import build_algorithm

    plans, first_values = [], []

    def recording_dmd(cfg, models):
        algo = build_algorithm(cfg, models)
        assert type(algo) is DMD
        rollout = algo.rollout

        def recorded(context, **kwargs):
            result = rollout(context, **kwargs)
            plans.append(result.plan.exit_steps)
            first_values.append(float(result.latents.flatten()[0]))
            return result
        algo.rollout = recorded
        return algo
    train.main(argv, models=tiny_models, algorithm_factory=recording_dmd)
    with open(f"{out}{rank}.json", "w") as f:
        json.dump({"plans": plans, "first_values": first_values}, f)


@pytest.mark.distributed
def test_dmd_exit_steps_are_chosen_alike_on_two_ranks(tmp_path):
    (tmp_path / "prompts.txt").write_text("a red circle\na blue square\na green triangle\na white cat\n")
    recipe = tmp_path / "dmd.yaml"
    recipe.write_text(RECIPE + f"data_path: {tmp_path / 'prompts.txt'}\n")
    argv = ["--config_path", str(recipe), "--logdir", str(tmp_path / "run"), "--disable-wandb", "--no_save"]
    spawn_ranks(_dmd_rank, 2, argv, str(tmp_path / "rank"))
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    plans = ranks[0]["plans"]
    # 4 critic steps and 2 generator steps, each with its own rollout.
    assert len(plans) == 6 and ranks[1]["plans"] == plans
    assert len({tuple(p) for p in plans}) > 1 and any(len(set(p)) > 1 for p in plans)
    # The noise is each rank's own: the samples differ.
    assert all(a != b for a, b in zip(ranks[0]["first_values"], ranks[1]["first_values"]))
