"""Small pieces shared by the training algorithms: text conditions, score timesteps (docs/method.md), classifier-free
guidance on x0 predictions, the clean latents of a batch (and the i2v image taken from them), the random draws of
the losses, and parameter bookkeeping.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.denoiser import Denoiser
from trainer.base import Batch, Models


def trainable(module: nn.Module) -> list[nn.Parameter]:
    """Parameters with `requires_grad` (LoRA or partial freezing leave the rest out)."""
    return [p for p in module.parameters() if p.requires_grad]


def text_conditions(models: Models, batch: Batch) -> tuple[Tensor, Tensor]:
    """(prompt embeddings, negative-prompt embeddings), both `[B, L, text_dim]`, computed without gradients."""
    prompts = batch.get("prompts")
    if not prompts:
        raise KeyError("batch['prompts'] (a non-empty list of strings) is required")
    with torch.no_grad():
        context = models.text(list(prompts))
        negative = models.text.negative(len(prompts))
    return context, negative


def switch_conditions(cfg, models: Models, batch: Batch) -> Optional[Tensor]:
    """Prompt embeddings `[B, L, text_dim]` a long rollout may switch to (`prompt_switch_prob` > 0; LongLive's
    prompt switches): those of `batch['switch_prompts']`, one per sample; None when rollouts never switch."""
    if cfg.rollout.prompt_switch_prob == 0:
        return None
    switch = batch.get("switch_prompts")
    prompts = batch.get("prompts") or []
    if not switch or len(switch) != len(prompts):
        raise KeyError(f"rollout.prompt_switch_prob = {cfg.rollout.prompt_switch_prob} needs batch['switch_prompts'] "
                       f"(one prompt per sample, {len(prompts)} here); got keys {sorted(batch)}")
    with torch.no_grad():
        return models.text(list(switch))


def require(models: Models, *names: str, algorithm: str) -> None:
    missing = [n for n in names if getattr(models, n) is None]
    if missing:
        raise ValueError(f"{algorithm} needs the model(s) {missing} in the Models bundle")


def clean_latents(batch: Batch, algorithm: str) -> Tensor:
    """The clean data latents of a batch, `[B, F, C, H, W]`: `batch['latents']` (encoded clips, the shapes world),
    else the clean end of the ODE trajectories `batch['ode_latent'][:, -1]` (`trainer.ode_pairs.ODEPairDataset`, as the
    original read its latent LMDB shards). Every recipe that trains on data reads them here."""
    if batch.get("latents") is not None:
        latents = batch["latents"]
    elif batch.get("ode_latent") is not None:
        trajectory = batch["ode_latent"]
        if trajectory.dim() != 6:
            raise ValueError(f"{algorithm}: batch['ode_latent'] must be [B, K, F, C, H, W], "
                             f"got {list(trajectory.shape)}")
        latents = trajectory[:, -1]
    else:
        raise KeyError(f"{algorithm} trains on data: the batch needs 'latents' [B, F, C, H, W] (clean latents) or "
                       "'ode_latent' [B, K, F, C, H, W]; got keys " + str(sorted(batch)))
    if latents.dim() != 5:
        raise ValueError(f"{algorithm}: data latents must be [B, F, C, H, W], got {list(latents.shape)}")
    return latents


def image_condition(cfg, batch: Batch, algorithm: str) -> Optional[Tensor]:
    """Image-to-video distillation (`i2v: true`): the first clean latent frame of the data, `[B, 1, C, H, W]`, which
    the rollout starts from (the original's `ode_latent[:, -1][:, 0:1]`); None for text-to-video."""
    if not cfg.data.i2v:
        return None
    return clean_latents(batch, f"{algorithm} with i2v: true")[:, 0:1]


class Draws:
    """The random draws of the losses, from the per-rank default RNG. Tests replace an algorithm's `draws` to replay
    recorded draws in order."""

    def integers(self, low: int, high: int, shape: tuple[int, ...], device: torch.device) -> Tensor:
        """int64 uniform in `[low, high)`."""
        return torch.randint(low, high, shape, device=device, dtype=torch.long)

    def normal_like(self, x: Tensor) -> Tensor:
        return torch.randn_like(x)


def score_timesteps(denoiser: Denoiser, cfg, batch_size: int, num_frames: int, device: torch.device,
                    denoised_from: Optional[int] = None, denoised_to: Optional[int] = None,
                    shift: Optional[float] = None, draws: Optional[Draws] = None) -> Tensor:
    """DMD / critic / GAN timesteps `[B, F]` (one value per sample, repeated over frames; docs/method.md, "Score
    timesteps"): integers in the (optionally exit-step restricted) range, analytic shift by
    `distillation.score_timestep_shift` (or `shift`), clamp to [0.02 T, 0.98 T].
    Drawn from the per-rank RNG (the original draws these on every rank independently)."""
    schedule = denoiser.schedule
    settings = cfg.distillation
    lo, hi = schedule.score_timestep_range(denoised_from, denoised_to, settings.ts_schedule, settings.ts_schedule_max,
                                           settings.min_score_timestep)
    if not 0 <= lo < hi <= schedule.num_train_timesteps:
        raise ValueError(f"score timestep range [{lo}, {hi}) is empty or outside [0, {schedule.num_train_timesteps})")
    t_int = (draws or Draws()).integers(lo, hi, (batch_size,), device)
    shift = settings.score_timestep_shift if shift is None else shift
    t = schedule.shift_score_timesteps(t_int.reshape(batch_size), shift)
    return t[:, None].expand(batch_size, num_frames).contiguous()


def guided_x0(denoiser: Denoiser, x_t: Tensor, t: Tensor, context: Tensor, negative: Tensor,
              scale: float) -> Tensor:
    """x0 prediction with classifier-free guidance in x0 space, `cond + scale * (cond - uncond)` (the original's
    form: scale 3 is standard CFG 4); the unconditional branch is the NEGATIVE prompt. `scale == 0`: one pass.

    Both branches run as ONE call at batch 2B (the original makes two calls): each network unit is entered and its
    weights read once, and the kernels get twice the rows. The prompts are zero-padded to a common length first,
    which changes nothing: the network pads every prompt with zero rows to its text length anyway."""
    if scale == 0:
        return denoiser(x_t, t, context)[1]
    length = max(context.shape[1], negative.shape[1])
    prompts = torch.cat([F.pad(context, (0, 0, 0, length - context.shape[1])),
                         F.pad(negative, (0, 0, 0, length - negative.shape[1]))])
    _, x0 = denoiser(torch.cat([x_t, x_t]), torch.cat([t, t]), prompts)
    cond, uncond = x0.chunk(2)
    return cond + scale * (cond - uncond)


def guidance_scales(cfg) -> tuple[float, float]:
    """(real, fake) guidance scales (docs/method.md, "DMD"): `real_guidance_scale`/`fake_guidance_scale` when
    the former is set, else `guidance_scale` for the teacher and none for the critic."""
    if cfg.distillation.real_guidance_scale is not None:
        return float(cfg.distillation.real_guidance_scale), float(cfg.distillation.fake_guidance_scale or 0.0)
    return float(cfg.distillation.guidance_scale), 0.0


def masked_mean(values: Tensor, mask: Optional[Tensor]) -> Tensor:
    """Mean over all elements, or over those where the boolean `mask` (same shape) is True."""
    return values.mean() if mask is None else values[mask].mean()
