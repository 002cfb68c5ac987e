"""ODE-regression initialisation of the causal generator (docs/method.md, "ODE regression"), trainer key `ode`.

Each batch holds teacher ODE trajectories `ode_latent [B, K, F, C, H, W]` recorded at the K timesteps of
`denoising_step_list` (warped like the generator's; the last entry is 0 = the clean sample). Per sample and per
block a random trajectory index picks the block's input and timestep; one block-causal forward predicts x0 for all
frames; the loss is the MSE to the clean sample over the frames whose timestep is not 0 (clean-input frames only
serve as context). Logs the per-sample loss bucketed by its mean timestep (`loss_at_time_{0,250,500,750}`).

Fixes of the original: construction works (its `_initialize_models` signature did not match the base class) and
the schedule used for warping is the generator's own.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from model.attention import BlockCausal
from trainer.base import Batch, Logs, Models
from trainer.causvid import per_block_indices
from trainer.common import text_conditions, trainable
from trainer.self_forcing import rollout_steps
from utils.errors import InputError

NUM_LOG_BUCKETS = 4


class ODERegression:
    has_critic = False
    name = "ode"

    def __init__(self, cfg, models: Models):
        self.cfg = cfg
        self.models = models
        self.steps = rollout_steps(cfg, models.generator.schedule, drop_final_zero=False)
        self.block_causal = BlockCausal(cfg.rollout.num_frame_per_block, cfg.rollout.independent_first_frame,
                                        cfg.rollout.local_attn_size)

    def sample_inputs(self, trajectory: Tensor, generator: Optional[torch.Generator] = None,
                      index: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        """(inputs `[B, F, C, H, W]`, timesteps `[B, F]`) picked from `trajectory` `[B, K, F, C, H, W]`.

        index: the trajectory entry of every frame `[B, F]` (default: one random entry per sample and block)."""
        b, k, f = trajectory.shape[:3]
        if k != len(self.steps):
            raise InputError(f"ode_latent holds {k} trajectory points but denoising_step_list has {len(self.steps)} "
                             f"entries ({self.steps}); they must correspond one to one")
        if index is None:
            index = per_block_indices(b, self.block_causal.block_sizes(f), k, trajectory.device, generator)
            if self.cfg.data.i2v:
                index[:, 0] = k - 1  # image-to-video: the first frame is the given clean image
        gather = index[:, None, :, None, None, None].expand(-1, 1, -1, *trajectory.shape[3:])
        inputs = trajectory.gather(1, gather).squeeze(1)
        t = torch.tensor(self.steps, device=trajectory.device, dtype=torch.float32)[index]
        return inputs, t

    def generator_loss(self, batch: Batch, step: int) -> tuple[Tensor, Logs]:
        trajectory = batch.get("ode_latent")
        if trajectory is None or trajectory.dim() != 6:
            raise KeyError("ODE regression needs batch['ode_latent'] [B, K, F, C, H, W] (teacher trajectories)")
        context, _ = text_conditions(self.models, batch)
        return self.regression_loss(trajectory, context)

    def regression_loss(self, trajectory: Tensor, context: Tensor,
                        index: Optional[Tensor] = None) -> tuple[Tensor, Logs]:
        """The loss on trajectories `[B, K, F, C, H, W]` (entry `index` `[B, F]` of each frame, drawn if None)."""
        trajectory = trajectory.to(next(self.models.generator.model.parameters()).device)
        inputs, t = self.sample_inputs(trajectory, index=index)
        _, x0 = self.models.generator(inputs, t, context, block_causal=self.block_causal)
        target = trajectory[:, -1].to(x0.dtype)
        per_frame = ((x0.float() - target.float()) ** 2).mean(dim=(2, 3, 4))  # [B, F]
        noisy = t != 0  # clean-input frames are context only
        if not bool(noisy.any()):
            loss = per_frame.sum() * 0.0  # every frame clean: nothing to regress (keeps the graph for backward)
        else:
            loss = per_frame[noisy].mean()
        return loss, self._bucket_logs(per_frame.detach(), noisy, t)

    def _bucket_logs(self, per_frame: Tensor, noisy: Tensor, t: Tensor) -> Logs:
        """Mean per-sample loss (over its noisy frames) per bucket of the sample's mean timestep."""
        width = self.models.generator.schedule.num_train_timesteps // NUM_LOG_BUCKETS
        per_sample = (per_frame * noisy).sum(1) / noisy.sum(1).clamp(min=1)
        buckets = (t.mean(1) // width * width).long().clamp(max=width * (NUM_LOG_BUCKETS - 1))
        logs: Logs = {}
        for value in buckets.unique().tolist():
            logs[f"loss_at_time_{value}"] = float(per_sample[buckets == value].mean())
        return logs

    def critic_loss(self, batch: Batch, step: int) -> tuple[Tensor, Logs]:
        raise RuntimeError("ODE regression has no critic")

    def trainable_parameters(self) -> dict[str, list[nn.Parameter]]:
        return {"generator": trainable(self.models.generator.model)}
