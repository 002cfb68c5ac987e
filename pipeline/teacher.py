"""Sampling from the bidirectional teacher: many-step ODE sampling with classifier-free guidance, and the few-step
bidirectional sampler.

Two many-step recipes of the original share `sample_bidirectional`:

* ODE pairs (`scripts/generate_ode_pairs.py`): 48 Euler steps, shift 8, CFG in x0 space, trajectory
  entries [0, 12, 24, 36, 48] recorded (t = 1000, 960, 888.89, 727.27 and the clean sample);
* bidirectional diffusion inference (the original's `pipeline/bidirectional_diffusion_inference.py`): 50 UniPC
  steps, shift 8, CFG in flow space.

The teacher is always called with one timestep per sample (the `Denoiser` should have `uniform_timestep=True`).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from pipeline.denoiser import Denoiser
from pipeline.solvers import FlowEulerScheduler, euler_sampler_sigmas, flow_sampling_loop, make_unipc

SAMPLERS = ("unipc", "euler")
CFG_SPACES = ("flow", "x0")


@dataclass
class SampleResult:
    """latents: the final sample `[B, F, C, H, W]` (sigma 0).
    trajectory: the recorded states `[B, K, F, C, H, W]` (K = len(record_steps)), or None.
    timesteps: `[num_steps + 1]` float32, the noise level (0..T scale, `T * sigma`) of the state before each step,
      then 0 for the final sample; `timesteps[record_steps]` belong to the trajectory entries. (UniPC feeds the
      teacher the int64-truncated values; these are the sampler's exact sigmas.)
    """

    latents: Tensor
    trajectory: Tensor | None
    timesteps: Tensor
    record_steps: tuple[int, ...] = ()

    @property
    def trajectory_timesteps(self) -> Tensor:
        """Timesteps `[K]` of the trajectory entries (0 for a final-sample entry)."""
        return self.timesteps[list(self.record_steps)]


def ode_pair_timesteps(num_steps: int = 48, shift: float = 8.0, record_steps: Sequence[int] = (0, 12, 24, 36, 48),
                       num_train_timesteps: int = 1000) -> list[float]:
    """Timesteps of the ODE-pair trajectory entries recorded by the Euler sampler (0 for the final clean sample).

    (48, 8, [0, 12, 24, 36, 48]) -> [1000, 960, 888.89, 727.27, 0] - the shift-8 warped [1000, 750, 500, 250, 0]
    that ODE regression trains on (docs/method.md, "ODE regression").
    """
    steps = _check_record_steps(record_steps, num_steps)
    t = euler_sampler_sigmas(num_steps, shift) * num_train_timesteps
    return [float(t[k]) for k in steps]


def _check_record_steps(record_steps: Sequence[int] | None, num_steps: int) -> tuple[int, ...]:
    if record_steps is None:
        return ()
    steps = tuple(int(k) for k in record_steps)
    if any(k != r for k, r in zip(steps, record_steps)) or any(not 0 <= k <= num_steps for k in steps):
        raise ValueError(f"record_steps must be integers in [0, {num_steps}] (num_steps = the final sample), "
                         f"got {list(record_steps)}")
    if any(b <= a for a, b in zip(steps, steps[1:])):
        raise ValueError(f"record_steps must be strictly increasing, got {list(record_steps)}")
    return steps


def _check_contexts(noise: Tensor, context: Tensor, negative_context: Tensor | None) -> Tensor | None:
    if noise.dim() != 5:
        raise ValueError(f"noise must be [B, F, C, H, W], got {list(noise.shape)}")
    if context.dim() != 3 or context.shape[0] != noise.shape[0]:
        raise ValueError(f"context must be [{noise.shape[0]}, L, D] for noise {list(noise.shape)}, "
                         f"got {list(context.shape)}")
    if negative_context is None:
        return None
    if negative_context.dim() != 3 or negative_context.shape[0] not in (1, noise.shape[0]) \
            or negative_context.shape[2] != context.shape[2]:
        raise ValueError(f"negative_context must be [1 or {noise.shape[0]}, L', {context.shape[2]}], "
                         f"got {list(negative_context.shape)}")
    # The original cached one negative-prompt embedding whatever the batch size; broadcast it.
    return negative_context.expand(noise.shape[0], -1, -1)


class _GuidedTeacher:
    """Cond / negative-prompt predictions of the teacher at one timestep, combined with CFG.

    `batch_cfg` runs both in one forward over the concatenated batch `[2B, ...]` (cond first) when the two
    contexts have the same length; otherwise (or when off, to halve peak activation memory) two forwards.
    """

    def __init__(self, denoiser: Denoiser, context: Tensor, negative_context: Tensor | None, guidance_scale: float,
                 batch_cfg: bool):
        self.denoiser = denoiser
        self.context = context
        self.guided = negative_context is not None and guidance_scale != 1.0
        self.negative_context = negative_context if self.guided else None
        self.scale = float(guidance_scale)
        self.batched = self.guided and batch_cfg and negative_context.shape[1] == context.shape[1]
        if self.batched:
            self.both_contexts = torch.cat([context, negative_context.to(context.dtype)])

    def predict(self, x: Tensor, t: float | Tensor) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        """`(flow_c, x0_c, flow_u, x0_u)` for x `[B, F, C, H, W]` at timestep t (uniform); uncond None if unguided."""
        tt = torch.full(x.shape[:2], float(t), device=x.device, dtype=torch.float32)
        if not self.guided:
            return (*self.denoiser(x, tt, self.context), None, None)
        if self.batched:
            flow, x0 = self.denoiser(torch.cat([x, x]), torch.cat([tt, tt]), self.both_contexts)
            (flow_c, flow_u), (x0_c, x0_u) = flow.chunk(2), x0.chunk(2)
            return flow_c, x0_c, flow_u, x0_u
        flow_c, x0_c = self.denoiser(x, tt, self.context)
        flow_u, x0_u = self.denoiser(x, tt, self.negative_context)
        return flow_c, x0_c, flow_u, x0_u

    def velocity(self, x: Tensor, t: float | Tensor, sigma: float, cfg_space: str) -> Tensor:
        """The guided flow for the sampler's step at noise level `sigma` (shape of x)."""
        flow_c, x0_c, flow_u, x0_u = self.predict(x, t)
        g = self.scale
        if cfg_space == "flow":
            # Bidirectional diffusion inference: v = v_u + g (v_c - v_u) on the raw flow predictions.
            return flow_c if flow_u is None else flow_u + g * (flow_c - flow_u)
        # ODE-pair script: guide the x0 predictions (each converted from flow with the TEACHER's 1000-point grid
        # sigma), then back to flow with the SAMPLER's exact sigma - the grid/exact sigma mismatch (a factor in
        # [0.9975, 1.0070]) is the original's quirk, reproduced on purpose.
        x0 = x0_c if x0_u is None else x0_u + g * (x0_c - x0_u)
        return ((x.double() - x0.double()) / sigma).to(x.dtype)


def sample_bidirectional(denoiser: Denoiser, noise: Tensor, context: Tensor, negative_context: Tensor | None = None,
                         *, sampler: str = "unipc", num_steps: int = 50, shift: float = 8.0,
                         guidance_scale: float = 5.0, cfg_space: str = "flow",
                         record_steps: Sequence[int] | None = None, progress: bool = False,
                         batch_cfg: bool = True) -> SampleResult:
    """Integrate the teacher's probability-flow ODE from pure noise to a clean sample, with CFG.

    noise: `[B, F, C, H, W]` (taken as the state at the sampler's first sigma, as the original does).
    context: `[B, L, text_dim]`; negative_context: `[B or 1, L', text_dim]` (the negative prompt) or None.
    sampler: "unipc" (Wan's flow UniPC, the diffusion-inference default) or "euler" (the ODE-pair sampler).
    cfg_space: "flow" (`v_u + g (v_c - v_u)`, diffusion inference) or "x0" (`x0_u + g (x0_c - x0_u)`, ODE pairs).
    guidance_scale 1 or no negative context: no CFG, one forward per step.
    record_steps: step indices whose current state (before the step) is recorded; `num_steps` records the final
      sample (ODE pairs: [0, 12, 24, 36, 48] with 48 Euler steps, shift 8).
    batch_cfg: run cond and negative prompt in one forward of batch 2B (when their lengths match).
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    if cfg_space not in CFG_SPACES:
        raise ValueError(f"cfg_space must be one of {CFG_SPACES}, got {cfg_space!r}")
    if int(num_steps) != num_steps or num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps}")
    record = _check_record_steps(record_steps, num_steps)
    negative_context = _check_contexts(noise, context, negative_context)
    T = denoiser.schedule.num_train_timesteps
    scheduler = (FlowEulerScheduler(num_steps, shift, T) if sampler == "euler"
                 else make_unipc(num_steps, shift, T, device=noise.device))
    sigmas = [float(s) for s in scheduler.sigmas]
    teacher = _GuidedTeacher(denoiser, context, negative_context, guidance_scale, batch_cfg)
    recorded: list[Tensor] = []
    step = 0
    bar = tqdm(total=num_steps, desc=f"teacher {sampler}", disable=not progress)

    # flow_sampling_loop calls this once per step, in order, with the state before that step.
    def velocity(x: Tensor, t: Tensor) -> Tensor:
        nonlocal step
        if step in record:
            recorded.append(x.clone())
        v = teacher.velocity(x, t, sigmas[step], cfg_space)
        step += 1
        bar.update(1)
        return v

    with torch.no_grad():
        latents = flow_sampling_loop(velocity, noise, scheduler)
    bar.close()
    if num_steps in record:
        recorded.append(latents.clone())
    trajectory = torch.stack(recorded, dim=1) if recorded else None
    timesteps = torch.tensor(sigmas, dtype=torch.float32) * T
    return SampleResult(latents=latents, trajectory=trajectory, timesteps=timesteps, record_steps=record)


def sample_bidirectional_few_step(denoiser: Denoiser, noise: Tensor, context: Tensor, steps: Sequence[float], *,
                                  generator: torch.Generator | None = None) -> Tensor:
    """Few-step sampling with a bidirectional (distilled) model over the whole clip -> x0 `[B, F, C, H, W]`.

    noise: `[B, F, C, H, W]`; context: `[B, L, text_dim]`; steps: the (warped) denoising timesteps, e.g. shift-5
    [1000, 937.5, 833.33, 625]. Each step predicts x0 and re-noises it to the next timestep with fresh noise
    (drawn from `generator`); the x0 of the LAST step is returned, so the model runs exactly len(steps) times.
    """
    # The original `BidirectionalInferencePipeline` looped over steps[:-1] and returned the x0 of the
    # second-to-last step, i.e. it skipped the final denoising step (docs/original.md); we run all of them.
    steps = [float(s) for s in steps]
    if not steps:
        raise ValueError("the denoising step list is empty")
    _check_contexts(noise, context, None)
    schedule = denoiser.schedule
    x = noise
    with torch.no_grad():
        for j, t in enumerate(steps):
            tt = torch.full(x.shape[:2], t, device=x.device, dtype=torch.float32)
            _, x0 = denoiser(x, tt, context)
            if j + 1 < len(steps):
                eps = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
                x = schedule.add_noise(x0, eps, torch.full_like(tt, steps[j + 1]))
    return x0
