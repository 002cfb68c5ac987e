"""The denoiser: a DiT plus a schedule, turning flow predictions into x0 predictions (and back)."""
from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from pipeline.schedule import FlowMatchSchedule


class Denoiser:
    """`(flow, x0) = denoiser(x_t, t, context)` for latents `[B, F, C, H, W]` and timesteps `[B, F]`.

    The network never sees the schedule (it predicts flow = noise - x0); this object owns the conversion, per
    (sample, frame), with this network's own schedule (the original gives each network its own shift table).
    `uniform_timestep` (bidirectional teacher/critic): the network gets one timestep per sample, `t[:, 0]`.
    """

    def __init__(self, model: nn.Module, schedule: FlowMatchSchedule, uniform_timestep: bool = False):
        self.model = model
        self.schedule = schedule
        self.uniform_timestep = uniform_timestep

    def __call__(self, x_t: Tensor, t: Tensor, context: Tensor, **model_kwargs: Any) -> tuple[Tensor, Tensor]:
        if t.dim() != 2 or tuple(t.shape) != tuple(x_t.shape[:2]):
            raise ValueError(f"timesteps must be [B, F] = {list(x_t.shape[:2])}, got {list(t.shape)}")
        flow = self.model(x_t, t[:, 0] if self.uniform_timestep else t, context, **model_kwargs)
        return flow, self.schedule.x0_from_flow(flow, x_t, t)

    def cache_pass(self, x_t: Tensor, t: Tensor, context: Tensor, **model_kwargs: Any) -> None:
        """A call that only writes K/V into the KV cache (the clean-context pass, priming, re-caching): the model
        may skip everything after the last layer's keys and values."""
        if t.dim() != 2 or tuple(t.shape) != tuple(x_t.shape[:2]):
            raise ValueError(f"timesteps must be [B, F] = {list(x_t.shape[:2])}, got {list(t.shape)}")
        self.model(x_t, t[:, 0] if self.uniform_timestep else t, context, cache_only=True, **model_kwargs)

    def flow_from_x0(self, x0: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        return self.schedule.flow_from_x0(x0, x_t, t)
