"""Self Forcing with Distribution Matching Distillation (paper Sec. 3.3; docs/method.md, "DMD").

Generator loss: a self-forcing rollout `x` (with gradients through the exit steps), noised at a random score
timestep; the frozen teacher (real score, CFG with the negative prompt) and the critic (fake score) predict x0; the
DMD gradient `(fake - real) / mean|x - real|` is applied through `0.5 * mean((x - sg(x - grad))^2)`, so that
`d loss / d x = grad / N`. Critic loss: flow matching of the critic on a separate no-grad rollout.

`DMD` is also the base of `SiD` (another generator loss) and `CausVid` (another way to get `x`).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from trainer.base import Batch, Logs, Models, frozen
from trainer.common import (Draws, guidance_scales, guided_x0, image_condition, masked_mean, require, score_timesteps,
                            switch_conditions, text_conditions, trainable)
from trainer.self_forcing import GeneratorOutput, SelfForcingRollout, window_context


def dmd_gradient(x: Tensor, fake_x0: Tensor, real_x0: Tensor) -> Tensor:
    """The DMD gradient `(fake - real) / mean_{F,C,H,W} |x - real|` (per-sample normaliser), float64,
    NaN/inf -> finite. All `[B, F, C, H, W]`."""
    x, fake_x0, real_x0 = x.double(), fake_x0.double(), real_x0.double()
    normaliser = (x - real_x0).abs().mean(dim=tuple(range(1, x.dim())), keepdim=True)
    return torch.nan_to_num((fake_x0 - real_x0) / normaliser)


def dmd_loss(x: Tensor, grad: Tensor, mask: Optional[Tensor] = None) -> Tensor:
    """`0.5 * mean((x - sg(x - grad))^2)` in float64 over the elements where `mask` is True (all if None); its
    gradient w.r.t. x is `grad / N` on those elements and 0 elsewhere."""
    x = x.double()
    target = (x - grad.double()).detach()
    return 0.5 * masked_mean((x - target) ** 2, mask)


class DMD:
    """Self Forcing + DMD. `models`: generator (causal, trained), teacher (frozen), critic (trained), text."""

    has_critic = True
    name = "dmd"

    def __init__(self, cfg, models: Models, cache_dtype: Optional[torch.dtype] = None):
        require(models, "teacher", "critic", algorithm=type(self).__name__)
        self.cfg = cfg
        self.models = models
        self.draws = Draws()  # score timesteps and noise of the losses (tests replay recorded draws through it)
        frozen(models.teacher.model)
        self.real_guidance_scale, self.fake_guidance_scale = guidance_scales(cfg)
        self.rollout = self._make_rollout(cache_dtype)

    def _make_rollout(self, cache_dtype: Optional[torch.dtype]):
        return SelfForcingRollout(self.cfg, self.models.generator, codec=self.models.codec, cache_dtype=cache_dtype)

    # --------------------------------------------------------------------------------------------- samples
    def generate(self, batch: Batch, context: Tensor) -> GeneratorOutput:
        """Generator samples for the losses; differentiable where the rollout policy says (if grad mode is on).
        With `i2v` the rollout starts from the first clean latent frame of the batch's data; with prompt switches
        (long rollouts) it may switch to the embeddings of the batch's `switch_prompts`."""
        return self.rollout(context, initial_latent=image_condition(self.cfg, batch, type(self).__name__),
                            switch_context=switch_conditions(self.cfg, self.models, batch))

    def score_t(self, x: Tensor, sample: GeneratorOutput) -> Tensor:
        """Score timesteps `[B, F]` for samples x `[B, F, C, H, W]` (docs/method.md, "Score timesteps")."""
        return score_timesteps(self.models.generator, self.cfg, x.shape[0], x.shape[1], x.device,
                               sample.denoised_timestep_from, sample.denoised_timestep_to, draws=self.draws)

    def _noised(self, x: Tensor, sample: GeneratorOutput) -> tuple[Tensor, Tensor, Tensor]:
        """(score timesteps `[B, F]`, noise, x_t). Noising uses the GENERATOR's schedule (its grid sigma), while the
        networks see the un-snapped float timesteps - as the original."""
        t = self.score_t(x, sample)
        noise = self.draws.normal_like(x)
        return t, noise, self.models.generator.schedule.add_noise(x, noise, t)

    # --------------------------------------------------------------------------------------------- losses
    def generator_loss(self, batch: Batch, step: int) -> tuple[Tensor, Logs]:
        context, negative = text_conditions(self.models, batch)
        sample = self.generate(batch, context)
        return self.distribution_matching_loss(sample, window_context(sample, context), negative)

    def distribution_matching_loss(self, sample: GeneratorOutput, context: Tensor,
                                   negative: Tensor) -> tuple[Tensor, Logs]:
        """The generator loss on generated latents `sample.latents` (the original's
        `compute_distribution_matching_loss`): score timestep and noise drawn, both score networks under no_grad."""
        x = sample.latents
        with torch.no_grad():
            t, _, x_t = self._noised(x.detach(), sample)
            fake = guided_x0(self.models.critic, x_t, t, context, negative, self.fake_guidance_scale)
            real = guided_x0(self.models.teacher, x_t, t, context, negative, self.real_guidance_scale)
            grad = dmd_gradient(x, fake, real)
        loss = dmd_loss(x, grad, sample.gradient_mask)
        logs = {"dmdtrain_gradient_norm": float(grad.abs().mean()), "score_timestep": float(t.float().mean())}
        return loss, logs

    def critic_loss(self, batch: Batch, step: int) -> tuple[Tensor, Logs]:
        context, _ = text_conditions(self.models, batch)
        with torch.no_grad():  # the critic step runs its own complete rollout (as the original)
            sample = self.generate(batch, context)
        return self.denoising_loss(sample, window_context(sample, context))

    def denoising_loss(self, sample: GeneratorOutput, context: Tensor) -> tuple[Tensor, Logs]:
        """The critic's flow-matching loss on generated latents `sample.latents` (their gradient is not used)."""
        x = sample.latents.detach()
        t, noise, x_t = self._noised(x, sample)
        _, fake_x0 = self.models.critic(x_t, t, context)
        # [QUIRK, reproduced] the critic's x0 (from its own schedule) is turned back into flow with the GENERATOR's
        # schedule, so the regressed flow is the raw prediction times sigma_critic / sigma_generator
        # (docs/method.md, "Critic loss").
        flow = self.models.generator.schedule.flow_from_x0(fake_x0, x_t, t)
        target = noise - x
        loss = ((flow.float() - target.float()) ** 2).mean()
        return loss, {"critic_timestep": float(t.float().mean())}

    def trainable_parameters(self) -> dict[str, list[nn.Parameter]]:
        return {"generator": trainable(self.models.generator.model), "critic": trainable(self.models.critic.model)}
