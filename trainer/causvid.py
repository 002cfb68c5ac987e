"""CausVid baseline (docs/method.md, "CausVid"), `distribution_loss: causvid`: DMD where the generator's input
comes from DATA.

Every frame of the clean latent clip is noised to one of the few-step timesteps, the index drawn per block
("diffusion forcing": independent noise levels per block), and ONE block-causal forward (optionally teacher
forcing with the clean clip as context) predicts x0 for all frames. The DMD generator and critic losses of
`trainer.dmd` are applied to that prediction; score timesteps always span the full range.

The clean latents are those of `trainer.common.clean_latents`: `batch['latents']`, or the clean end of the ODE
trajectories of `ODEPairDataset` (`ode_latent[:, -1]`, the data `configs/causvid.yaml` trains on). With `i2v` the
first frame is fed clean (timestep 0) and conditions the rest of the clip through the block-causal attention.

Fixes of the original: the clean latents are read from the data (the original trainer passed None and crashed) and
the critic's flow-matching loss exists (the original never created it for CausVid).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from model.attention import BlockCausal
from trainer.base import Batch, Models
from trainer.common import Draws, clean_latents
from trainer.dmd import DMD
from trainer.self_forcing import GeneratorOutput, rollout_steps


def per_block_indices(batch_size: int, block_sizes: list[int], high: int, device: torch.device,
                      generator: Optional[torch.Generator] = None, draws: Optional[Draws] = None) -> Tensor:
    """Integer indices in [0, high) drawn per (sample, block) and repeated over each block's frames -> `[B, F]`
    (from `draws` if given, else from `generator` / the default RNG)."""
    shape = (batch_size, len(block_sizes))
    if draws is not None:
        draws = draws.integers(0, high, shape, device).reshape(shape)
    else:
        draws = torch.randint(0, high, shape, device=device, generator=generator)
    sizes = torch.tensor(block_sizes, device=device)
    return draws.repeat_interleave(sizes, dim=1)


class CausVid(DMD):
    name = "causvid"

    def __init__(self, cfg, models: Models, cache_dtype: Optional[torch.dtype] = None):
        super().__init__(cfg, models, cache_dtype)
        # The few-step list as configured (warped if asked); a step of 0 stands for the clean latent itself.
        self.steps = rollout_steps(cfg, models.generator.schedule, drop_final_zero=False)
        self.block_causal = BlockCausal(cfg.rollout.num_frame_per_block, cfg.rollout.independent_first_frame,
                                        cfg.rollout.local_attn_size)

    def _make_rollout(self, cache_dtype):
        return None  # no self-rollout: the generator input is built from data

    def generate(self, batch: Batch, context: Tensor) -> GeneratorOutput:
        schedule = self.models.generator.schedule
        clean = clean_latents(batch, "CausVid").to(next(self.models.generator.model.parameters()).device)
        b, f = clean.shape[:2]
        # Fresh noise per step, drawn for every candidate as the original does.
        candidates = [clean if s == 0 else schedule.add_noise(clean, self.draws.normal_like(clean),
                                                               torch.full((b, f), s, device=clean.device))
                      for s in self.steps]
        index = per_block_indices(b, self.block_causal.block_sizes(f), len(self.steps), clean.device,
                                  draws=self.draws)
        stacked = torch.stack(candidates, dim=1)  # [B, K, F, C, H, W]
        gather = index[:, None, :, None, None, None].expand(-1, 1, -1, *clean.shape[2:])
        noisy = stacked.gather(1, gather).squeeze(1)
        t = torch.tensor(self.steps, device=clean.device, dtype=torch.float32)[index]
        if self.cfg.data.i2v:  # the given first frame enters clean, as the original ODE regression feeds it
            noisy = torch.cat([clean[:, :1], noisy[:, 1:]], dim=1)
            t = torch.cat([torch.zeros_like(t[:, :1]), t[:, 1:]], dim=1)
        generator = self.models.generator
        if self.cfg.pretraining.teacher_forcing:
            _, x0 = generator.teacher_forcing(noisy, t, context, clean, self.block_causal)
        else:
            _, x0 = generator(noisy, t, context, block_causal=self.block_causal)
        if self.cfg.data.i2v:
            x0 = torch.cat([clean[:, :1].to(x0.dtype), x0[:, 1:]], dim=1)  # the condition itself is not generated
        # Score timesteps span the full range: there is no exit step to restrict them (from/to None).
        return GeneratorOutput(x0, None, None, None, num_frames=f)
