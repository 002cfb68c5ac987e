"""Multi-step flow samplers for the bidirectional teacher (ODE pairs, multi-step comparisons; docs/method.md).

Two schedulers with the same `timesteps` / `sigmas` / `step(...)` interface as diffusers schedulers:

* `FlowEulerScheduler` - the Euler sampler the original uses to produce ODE pairs
  (`FlowMatchScheduler(shift=8, sigma_min=0, extra_one_step=True).set_timesteps(48)`);
* `make_unipc` - diffusers' `UniPCMultistepScheduler` configured as Wan's `FlowUniPCMultistepScheduler`.

`flow_sampling_loop` runs a velocity function through either of them.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import numpy as np
import torch
from torch import Tensor

from pipeline.schedule import shifted_sigmas

VelocityFn = Callable[[Tensor, Tensor], Tensor]

if TYPE_CHECKING:  # only for annotations: Euler sampling must not need diffusers
    from diffusers import UniPCMultistepScheduler


def euler_sampler_sigmas(num_steps: int = 48, shift: float = 8.0) -> Tensor:
    """Sigmas `[num_steps + 1]` (float32) of the ODE-pair sampler: `shift(1 - k / num_steps)`, k = 0..num_steps-1,
    followed by the terminal 0 (for 48 steps and shift 8: t = 1000, 997.35, ..., 145.45, then clean)."""
    return torch.cat([shifted_sigmas(num_steps, shift), torch.zeros(1, dtype=torch.float32)])


def euler_step(x: Tensor, velocity: Tensor, sigma: Tensor | float, sigma_next: Tensor | float) -> Tensor:
    """One Euler step of the flow ODE `dx/dsigma = v`: `x + v * (sigma_next - sigma)` (shapes broadcast)."""
    return x + velocity * (sigma_next - sigma)


class FlowEulerScheduler:
    """Euler sampler on the shifted `num_steps` grid, as the original's `FlowMatchScheduler.step`.

    `sigmas` `[N + 1]` (terminal 0 included), `timesteps` `[N]` float32 on the 0..T scale. Stateless: `step`
    finds the grid entry nearest to the given timestep and moves to the next one (sigma 0 after the last).
    """

    def __init__(self, num_steps: int = 48, shift: float = 8.0, num_train_timesteps: int = 1000):
        self.num_train_timesteps = int(num_train_timesteps)
        self.sigmas = euler_sampler_sigmas(num_steps, shift)
        self.timesteps = self.sigmas[:-1] * self.num_train_timesteps

    def __len__(self) -> int:
        return self.timesteps.numel()

    def index_for_timestep(self, timestep: Tensor | float) -> int:
        t = torch.as_tensor(timestep, dtype=torch.float32).reshape(-1)
        if t.numel() != 1 and not bool(torch.all(t == t[0])):
            raise ValueError(f"FlowEulerScheduler.step needs one timestep per call, got {t.tolist()}")
        return int((self.timesteps - t[0].cpu()).abs().argmin())

    def step(self, model_output: Tensor, timestep: Tensor | float, sample: Tensor, return_dict: bool = False,
             to_final: bool = False) -> tuple[Tensor]:
        """Euler step for flow `model_output` at `timestep` -> `(prev_sample,)` (same shape as `sample`).

        `return_dict` is accepted for interface parity with diffusers; a tuple is always returned.
        """
        i = self.index_for_timestep(timestep)
        sigma_next = 0.0 if to_final else float(self.sigmas[i + 1])
        return (euler_step(sample, model_output, float(self.sigmas[i]), sigma_next),)


def make_unipc(num_steps: int = 50, shift: float = 8.0, num_train_timesteps: int = 1000,
               device: torch.device | str | None = None) -> "UniPCMultistepScheduler":
    """diffusers UniPC configured as Wan's flow UniPC, timesteps set for `num_steps` steps with `shift`.

    Wan's sampler: x0-prediction from the flow (`x0 = x - sigma * v`), order 2, `bh2`, corrector on, lower-order
    final steps, final sigma 0, int64 timesteps. Its un-shifted grid is `linspace(sigma_max, 0, N + 1)[:-1]` with
    `sigma_max = 1 - 1/T` (float32, the first entry of its `1 - linspace(1, 1/T, T)` training table), which differs
    from diffusers' own flow grid `linspace(1, 1/T, N + 1)`, so the grid is passed in explicitly and diffusers only
    applies the shift. A fresh scheduler is needed for every sampling run (UniPC keeps a history).
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps}")
    from diffusers import UniPCMultistepScheduler  # imported here: Euler sampling needs no diffusers

    scheduler = UniPCMultistepScheduler(
        num_train_timesteps=num_train_timesteps, solver_order=2, prediction_type="flow_prediction",
        predict_x0=True, solver_type="bh2", lower_order_final=True, use_flow_sigmas=True, flow_shift=float(shift),
        final_sigmas_type="zero",
    )
    sigma_max = float(np.float32(1.0 - 1.0 / num_train_timesteps))
    base = np.linspace(sigma_max, 0.0, num_steps + 1)[:-1].copy()
    scheduler.set_timesteps(sigmas=base, device=device)
    # Start at index 0 explicitly: diffusers otherwise locates the first step by timestep value and, when the
    # int64-truncated timesteps repeat (large shifts), takes the SECOND match, silently skipping a step.
    scheduler.set_begin_index(0)
    return scheduler


def flow_sampling_loop(velocity_fn: VelocityFn, x: Tensor,
                       scheduler: "FlowEulerScheduler | UniPCMultistepScheduler") -> Tensor:
    """Integrate the flow ODE from `x` (noise at the scheduler's first timestep) to sigma 0.

    x: `[B, ...]` (UniPC needs at least 2 dims). `velocity_fn(x, t)` gets `t` as a 0-dim float32 tensor on the
    0..T scale, on `x`'s device - for UniPC the int64 timestep Wan's teacher receives - and returns the flow
    prediction shaped like `x` (guidance, if any, is the caller's business). Returns the sample at sigma 0.
    """
    if getattr(scheduler, "step_index", None) is not None:
        raise ValueError("the UniPC scheduler has already been stepped; build a fresh one with make_unipc()")
    for t in scheduler.timesteps:
        velocity = velocity_fn(x, t.to(device=x.device, dtype=torch.float32))
        x = scheduler.step(velocity, t, x, return_dict=False)[0]
    return x
