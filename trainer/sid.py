"""Self Forcing with Score identity Distillation (docs/method.md, "SiD"), `distribution_loss: sid`.

Same rollout, teacher, critic and critic loss as DMD; the generator loss differentiates THROUGH the teacher and the
critic: `L = (r - f) * ((r - x) - alpha (r - f)) / mean|x - r|`, with only the normaliser under stop-gradient.

Fixes of the original (each commented where it happens):
  * the gradient mask of longer rollouts is applied (the original ignored it);
  * every setting the loss needs comes from the config (the original never set `num_training_frames` /
    `min_score_timestep` and crashed; its shipped `self_forcing_sid.yaml` even selected DMD);
  * `dmdtrain_gradient_norm` logs the mean |(f - r) / normaliser| instead of a zero placeholder.

The generator step differentiates through the critic's forward, so the critic's parameters receive gradients there
too (as in the original); the loop clears each role's gradients before that role's own update, so they never train
the critic.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from trainer.base import Logs, Models
from trainer.common import guided_x0, masked_mean
from trainer.dmd import DMD
from trainer.self_forcing import GeneratorOutput


def sid_loss(x: Tensor, fake_x0: Tensor, real_x0: Tensor, alpha: float,
             mask: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """(loss, normalised score difference `(f - r) / n`) for x, fake/real x0 predictions `[B, F, C, H, W]`.

    `L = (r - f) * ((r - x) - alpha * (r - f)) / n` in float64, `n = mean_{F,C,H,W} |x - r|` per sample without
    gradient, NaN/inf -> finite; mean over the elements where `mask` is True (all if None).
    """
    x, f, r = x.double(), fake_x0.double(), real_x0.double()
    with torch.no_grad():
        n = (x - r).abs().mean(dim=tuple(range(1, x.dim())), keepdim=True)
    elementwise = torch.nan_to_num((r - f) * ((r - x) - alpha * (r - f)) / n)
    # Fix: the original averaged over every element, ignoring the mask of longer rollouts.
    return masked_mean(elementwise, mask), ((f - r) / n).detach()


class SiD(DMD):
    name = "sid"

    def __init__(self, cfg, models: Models, cache_dtype: Optional[torch.dtype] = None):
        super().__init__(cfg, models, cache_dtype)
        self.alpha = float(cfg.distillation.sid.alpha)
        # Gradients flow through the teacher's activations, so it is checkpointed like the generator and critic.
        if cfg.compute.gradient_checkpointing and hasattr(models.teacher.model, "set_gradient_checkpointing"):
            # Plain recomputation: the kept attention outputs of a 14B teacher would be ~13 GB (utils/distributed.py).
            models.teacher.model.set_gradient_checkpointing(True, keep_self_attention=False)

    def distribution_matching_loss(self, sample: GeneratorOutput, context: Tensor,
                                   negative: Tensor) -> tuple[Tensor, Logs]:
        x = sample.latents
        t = self.score_t(x, sample)
        # x_t depends on x (not under no_grad): SiD's gradient passes through both score networks into x.
        x_t = self.models.generator.schedule.add_noise(x, self.draws.normal_like(x), t)
        # Critic parameters collect gradients here too; the loop clears a role's gradients before its own update.
        fake = guided_x0(self.models.critic, x_t, t, context, negative, self.fake_guidance_scale)
        real = guided_x0(self.models.teacher, x_t, t, context, negative, self.real_guidance_scale)
        loss, direction = sid_loss(x, fake, real, self.alpha, sample.gradient_mask)
        return loss, {"dmdtrain_gradient_norm": float(direction.abs().mean()), "score_timestep": float(t.mean())}
