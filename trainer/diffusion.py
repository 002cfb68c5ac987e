"""Flow-matching pre-training (docs/method.md), trainer key `diffusion`: a bidirectional teacher (`causal: false`) or a
causal model with diffusion forcing (`teacher_forcing: false`: each block at its own noise level, block-causal
attention) or teacher forcing (`teacher_forcing: true`: noisy blocks attend to the clean clip before them).

Timesteps: a grid index per block (per sample for the bidirectional model) uniform in 0..T-1, `t = timesteps[i]`;
loss = per-frame MSE of the flow prediction against `noise - x0`, weighted by the schedule's `training_weight(t)`.

`frame_causal_fraction` (bidirectional model only) runs that fraction of the steps with frame-causal attention (each
frame sees itself and the frames before it). Why: with 3-D RoPE alone a bidirectional DiT has no arrow of time; on the
shapes world it learnt each prompted motion's axis and speed but not its sign (as many clips moved against the prompt
as with it, and a clip reversed in time scored as well as the clip). Attention that peaks one frame back and at an
offset along the prompted direction helps only when BOTH halves are one-sided, so neither is learnt alone; the causal
steps make the one-sided spatial half pay on its own, after which the one-sided temporal half pays in the
bidirectional steps. The model stays bidirectional at inference.

`text_dropout` trains the unconditional branch that classifier-free guidance needs (the real Wan teacher was trained
with caption dropout; a teacher pre-trained here needs it too, else its negative-prompt prediction is meaningless).

Fixes of the original, each commented where it happens: timesteps stay float32 (it cast them to bf16, 937.5 -> 936);
teacher-forcing noise augmentation draws fresh noise (it reused the training noise) and really is small: the clean
context is noised to grid timesteps below `noise_augmentation_max_timestep` (it indexed the descending grid from the
noisy end, so "small" augmentation meant t ~ 1000).
"""
from __future__ import annotations

import random
from typing import Optional

import torch
from torch import Tensor, nn

from model.attention import BlockCausal
from trainer.base import Batch, Logs, Models
from trainer.causvid import per_block_indices
from trainer.common import clean_latents, text_conditions, trainable
from utils.errors import InputError


class Diffusion:
    has_critic = False
    name = "diffusion"

    def __init__(self, cfg, models: Models):
        self.cfg = cfg
        self.models = models
        self.block_causal = (BlockCausal(cfg.rollout.num_frame_per_block, cfg.rollout.independent_first_frame,
                                         cfg.rollout.local_attn_size) if cfg.pretraining.causal else None)
        if cfg.pretraining.teacher_forcing and not cfg.pretraining.causal:
            raise InputError("pretraining.teacher_forcing: true needs pretraining.causal: true (a bidirectional model "
                             "has no clean context)")
        if cfg.pretraining.frame_causal_fraction > 0 and cfg.pretraining.causal:
            raise InputError("pretraining.frame_causal_fraction is for a bidirectional model (pretraining.causal: "
                             "false); a causal one always attends block-causally")
        # one frame a block: every pair of frames is ordered
        self.arrow_of_time = BlockCausal(frames_per_block=1) if cfg.pretraining.frame_causal_fraction > 0 else None

    def attention_mask(self, step: int) -> Optional[BlockCausal]:
        """The attention of this step: the causal model's always; for a bidirectional one, frame-causal in a
        `frame_causal_fraction` of the steps (a function of the step alone: the same on every rank and on resume)."""
        if self.block_causal is not None:
            return self.block_causal
        if self.arrow_of_time is not None and random.Random(step).random() < self.cfg.pretraining.frame_causal_fraction:
            return self.arrow_of_time
        return None

    def _grid_indices(self, b: int, f: int, high: int, device: torch.device) -> Tensor:
        """Per block for the causal model, per sample for the bidirectional one -> `[B, F]`."""
        if self.block_causal is None:
            return torch.randint(0, high, (b, 1), device=device).expand(b, f)
        return per_block_indices(b, self.block_causal.block_sizes(f), high, device)

    def timesteps(self, b: int, f: int, device: torch.device) -> Tensor:
        schedule = self.models.generator.schedule
        index = self._grid_indices(b, f, schedule.num_train_timesteps, device)
        # Fix: float32 timesteps (the original cast them to bf16, e.g. 937.5 -> 936).
        return schedule.timesteps.to(device)[index]

    def augmentation_timesteps(self, b: int, f: int, device: torch.device) -> Optional[Tensor]:
        """Teacher-forcing context noise `[B, F]` (per block), or None without augmentation.

        Fix: drawn among the grid timesteps BELOW `noise_augmentation_max_timestep` (small noise, as intended); the
        original drew grid indices below it, i.e. the noisiest timesteps of the descending grid."""
        limit = self.cfg.pretraining.noise_augmentation_max_timestep
        if limit <= 0:
            return None
        grid = self.models.generator.schedule.timesteps.to(device)
        low = torch.nonzero(grid < limit).flatten()
        if low.numel() == 0:
            return None  # no grid timestep is that small: the context stays clean
        return grid[low[self._grid_indices(b, f, low.numel(), device)]]

    def drop_text(self, batch: Batch) -> Batch:
        """Replace a `text_dropout` fraction of the prompts by the negative prompt (per-rank RNG): classifier-free
        guidance later subtracts the model's prediction for that prompt, which it must have been trained on."""
        rate = self.cfg.pretraining.text_dropout
        if rate <= 0:
            return batch
        prompts = list(batch["prompts"])
        dropped = (torch.rand(len(prompts)) < rate).tolist()
        return {**batch, "prompts": [self.cfg.data.negative_prompt if d else p for p, d in zip(prompts, dropped)]}

    def generator_loss(self, batch: Batch, step: int) -> tuple[Tensor, Logs]:
        cfg = self.cfg
        x0 = clean_latents(batch, "diffusion training")
        context, _ = text_conditions(self.models, self.drop_text(batch))
        denoiser = self.models.generator
        schedule = denoiser.schedule
        b, f = x0.shape[:2]
        x0 = x0.to(next(denoiser.model.parameters()).device)
        t = self.timesteps(b, f, x0.device)
        noise = torch.randn_like(x0)
        x_t = schedule.add_noise(x0, noise, t)
        mask = self.attention_mask(step)
        if cfg.pretraining.teacher_forcing:
            clean, aug_t = x0, self.augmentation_timesteps(b, f, x0.device)
            if aug_t is not None:
                # Fix: fresh noise for the context (the original reused the training noise of the noisy input).
                clean = schedule.add_noise(x0, torch.randn_like(x0), aug_t)
            flow, _ = denoiser.teacher_forcing(x_t, t, context, clean, mask, aug_t)
        else:
            flow, _ = denoiser(x_t, t, context, block_causal=mask)
        target = schedule.training_target(x0, noise)
        per_frame = ((flow.float() - target.float()) ** 2).mean(dim=(2, 3, 4))  # [B, F]
        weight = schedule.training_weight(t)
        loss = (per_frame * weight).mean()
        return loss, {"unweighted_loss": float(per_frame.detach().mean()), "timestep": float(t.mean())}

    def critic_loss(self, batch: Batch, step: int) -> tuple[Tensor, Logs]:
        raise RuntimeError("diffusion training has no critic")

    def trainable_parameters(self) -> dict[str, list[nn.Parameter]]:
        return {"generator": trainable(self.models.generator.model)}
