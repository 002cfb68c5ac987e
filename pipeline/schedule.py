"""The flow-matching noise schedule of Self Forcing / Wan2.1 (docs/method.md, "Schedule").

Rectified-flow parameterisation: `x_t = (1 - sigma) * x0 + sigma * eps`, the network predicts the flow
`v = eps - x0`. Timesteps live on the `0..num_train_timesteps` scale (`t = T * sigma`).

`FlowMatchSchedule` reproduces the original `FlowMatchScheduler(shift, sigma_min=0, extra_one_step=True)` after
`set_timesteps(T, training=True)` bit for bit, including its nearest-grid sigma lookup. It is a plain object: its
tables stay on the CPU and every method moves what it needs to the device of its input.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

SIGMA_LOOKUPS = ("grid", "analytic")


def shifted_sigmas(num_steps: int, shift: float) -> Tensor:
    """Shifted flow sigmas `[num_steps]` (float32), from 1 down to `shift(1/num_steps)`, excluding 0.

    The un-shifted grid is `linspace(1, 0, num_steps + 1)[:-1]` (the original's `extra_one_step=True`), mapped
    through `s -> shift * s / (1 + (shift - 1) * s)`. Computed in float32 in the original's operation order so
    the table matches the reference bit for bit.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps}")
    if shift <= 0:
        raise ValueError(f"shift must be positive, got {shift}")
    base = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float32)[:-1]
    return shift * base / (1 + (shift - 1) * base)


def _as_tensor(t: Tensor | float | Sequence[float], device: torch.device | None = None) -> Tensor:
    if not isinstance(t, Tensor):
        t = torch.as_tensor(t, dtype=torch.float32)
    return t if device is None else t.to(device)


def _expand_to(values: Tensor, x: Tensor) -> Tensor:
    """Reshape per-leading-dim values `[*lead]` so they broadcast over `x` `[*lead, *rest]`."""
    return values.reshape(*values.shape, *([1] * (x.ndim - values.ndim)))


def _check_leading(t: Tensor, x: Tensor, name: str) -> None:
    if t.ndim > x.ndim or tuple(x.shape[: t.ndim]) != tuple(t.shape):
        raise ValueError(
            f"timestep shape {tuple(t.shape)} must equal the leading dims of {name} {tuple(x.shape)} "
            "(e.g. [B] or [B, F] for [B, F, C, H, W])"
        )


class FlowMatchSchedule:
    """Shifted flow-matching schedule with `num_train_timesteps` grid points.

    Attributes (CPU, float32): `sigmas` `[T]` (1 down to ~0.00498 for shift 5; 0 is NOT on the grid),
    `timesteps` `[T]` (`T * sigmas`, strictly decreasing from T) and `training_weights` `[T]` (sum T).

    `sigma_lookup="grid"` (default) maps any timestep to the sigma of the nearest grid timestep, as the original
    does everywhere (add_noise, training_weight, the wrapper's x0/flow conversions) - so t=0 maps to the LAST grid
    sigma, not to 0. `sigma_lookup="analytic"` uses `sigma = t / T` instead; it is an explicit departure from the
    original (no quantisation, t=0 is exactly clean) and breaks parity with reference checkpoints' training.
    """

    def __init__(self, shift: float = 5.0, num_train_timesteps: int = 1000, sigma_lookup: str = "grid"):
        if sigma_lookup not in SIGMA_LOOKUPS:
            raise ValueError(f"sigma_lookup must be one of {SIGMA_LOOKUPS}, got {sigma_lookup!r}")
        if int(num_train_timesteps) != num_train_timesteps or num_train_timesteps < 1:
            raise ValueError(f"num_train_timesteps must be a positive integer, got {num_train_timesteps}")
        self.shift = float(shift)
        self.num_train_timesteps = int(num_train_timesteps)
        self.sigma_lookup = sigma_lookup
        T = self.num_train_timesteps
        self.sigmas = shifted_sigmas(T, self.shift)
        self.timesteps = self.sigmas * T
        # The original's "bsmntw" weighting: a Gaussian bump over the (shifted) timesteps centred at T/2, shifted
        # to a zero minimum and normalised to sum T; operation order kept for bit parity.
        y = torch.exp(-2 * ((self.timesteps - T / 2) / T) ** 2)
        y_shifted = y - y.min()
        self.training_weights = y_shifted * (T / y_shifted.sum())
        self._cache: dict[tuple[str, torch.device, torch.dtype], Tensor] = {}

    def __repr__(self) -> str:
        return (f"FlowMatchSchedule(shift={self.shift}, num_train_timesteps={self.num_train_timesteps}, "
                f"sigma_lookup={self.sigma_lookup!r})")

    def _table(self, name: str, device: torch.device, dtype: torch.dtype = torch.float32) -> Tensor:
        key = (name, torch.device(device), dtype)
        if key not in self._cache:
            self._cache[key] = getattr(self, name).to(device=device, dtype=dtype)
        return self._cache[key]

    # ----------------------------------------------------------------------------------------------- lookups
    def grid_index(self, t: Tensor | float, compute_dtype: torch.dtype | None = None) -> Tensor:
        """Index of the nearest grid timestep (first index on ties) for every entry of `t` (any shape) -> int64.

        The distance is computed in `compute_dtype` (default: `t`'s float dtype promoted with float32), mirroring
        the dtype the original compared in (float32 for add_noise, float64 for the wrapper's conversions).
        """
        t = _as_tensor(t)
        if compute_dtype is None:
            compute_dtype = torch.promote_types(t.dtype, torch.float32) if t.is_floating_point() else torch.float32
        grid = self._table("timesteps", t.device, compute_dtype)
        return (t.to(compute_dtype).unsqueeze(-1) - grid).abs().argmin(dim=-1)

    def sigma(self, t: Tensor | float, compute_dtype: torch.dtype | None = None) -> Tensor:
        """Sigma for timesteps `t` (any shape, 0..T scale) -> same shape, float32 (or `compute_dtype`)."""
        t = _as_tensor(t)
        out_dtype = compute_dtype or torch.float32
        if self.sigma_lookup == "analytic":
            return t.to(torch.promote_types(out_dtype, torch.float32)) / self.num_train_timesteps
        return self._table("sigmas", t.device, out_dtype)[self.grid_index(t, compute_dtype)]

    def training_weight(self, t: Tensor | float) -> Tensor:
        """Loss weight of the nearest grid timestep for every entry of `t` -> same shape, float32."""
        t = _as_tensor(t)
        return self._table("training_weights", t.device)[self.grid_index(t)]

    # -------------------------------------------------------------------------------------------- noising
    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor | float) -> Tensor:
        """`(1 - sigma(t)) * x0 + sigma(t) * noise`, cast to `noise.dtype`.

        x0, noise: `[*lead, *rest]` (e.g. `[B, F, C, H, W]`); t: `[*lead]` (e.g. `[B, F]` or `[B]`) or a scalar.
        Computed in (at least) float32 like the original, whose float32 sigma table promotes bf16 inputs.
        """
        if x0.shape != noise.shape:
            raise ValueError(f"x0 {tuple(x0.shape)} and noise {tuple(noise.shape)} must have the same shape")
        t = _as_tensor(t, noise.device)
        _check_leading(t, noise, "noise")
        dtype = torch.promote_types(torch.promote_types(x0.dtype, noise.dtype), torch.float32)
        sigma = _expand_to(self.sigma(t).to(dtype), noise)
        return ((1 - sigma) * x0.to(dtype) + sigma * noise.to(dtype)).to(noise.dtype)

    @staticmethod
    def training_target(x0: Tensor, noise: Tensor) -> Tensor:
        """The flow-matching regression target `noise - x0` (same shape as the inputs)."""
        return noise - x0

    # ------------------------------------------------------------------------------------- conversions
    def x0_from_flow(self, flow: Tensor, xt: Tensor, t: Tensor | float) -> Tensor:
        """`x0 = xt - sigma(t) * flow`; flow, xt `[*lead, *rest]`, t `[*lead]`. Float64 inside (as the original
        wrapper), result in `flow.dtype`."""
        t = _as_tensor(t, flow.device)
        _check_leading(t, flow, "flow")
        sigma = _expand_to(self.sigma(t, torch.float64), flow)
        return (xt.double() - sigma * flow.double()).to(flow.dtype)

    def flow_from_x0(self, x0: Tensor, xt: Tensor, t: Tensor | float) -> Tensor:
        """`flow = (xt - x0) / sigma(t)`; x0, xt `[*lead, *rest]`, t `[*lead]`. Float64 inside, result in
        `x0.dtype`. With `sigma_lookup="analytic"` this is undefined (division by 0) at t=0."""
        t = _as_tensor(t, x0.device)
        _check_leading(t, x0, "x0")
        sigma = _expand_to(self.sigma(t, torch.float64), x0)
        return ((xt.double() - x0.double()) / sigma).to(x0.dtype)

    # ------------------------------------------------------------------------------ few-step step lists
    def warp(self, step_list: Sequence[int] | Tensor) -> Tensor:
        """Map config steps on the un-shifted 0..T scale to real timesteps on the shifted grid -> float32 `[K]`.

        `k -> cat(timesteps, [0])[T - k]`, i.e. `k -> T * shift(k / T)`; 0 maps to 0
        (e.g. shift 5: [1000, 750, 500, 250] -> [1000, 937.5, 833.33, 625]).
        """
        steps = torch.as_tensor(step_list)
        T = self.num_train_timesteps
        integral = steps.dtype != torch.bool and not steps.is_complex() and (
            not steps.is_floating_point() or bool(torch.all(steps == steps.round())))
        if steps.ndim != 1 or not integral:
            raise ValueError(f"step_list must be a 1-D list of integers in [0, {T}], got {step_list!r}")
        steps = steps.long()
        if bool(torch.any(steps < 0)) or bool(torch.any(steps > T)):
            raise ValueError(f"step_list entries must lie in [0, {T}], got {steps.tolist()}")
        extended = torch.cat([self.timesteps, torch.zeros(1, dtype=torch.float32)])
        return extended[T - steps]

    def denoising_steps(self, step_list: Sequence[int] | Tensor, warp: bool,
                        drop_final_zero: bool = False) -> list[float]:
        """The timesteps a few-step generator runs for a configured `step_list`: warped onto this grid when `warp`
        (docs/method.md, "Schedule"). `drop_final_zero` removes a trailing 0 (a call at t=0 would be wasted; the
        training rollout does so, the original inference does not; ODE regression keeps it: the clean trajectory
        end)."""
        steps = self.warp(step_list).tolist() if warp else [float(s) for s in step_list]
        steps = [float(s) for s in steps]
        if drop_final_zero and len(steps) > 1 and steps[-1] == 0:
            steps = steps[:-1]
        return steps

    def exit_step_range(self, step_list: Sequence[float] | Tensor, exit_index: int) -> tuple[int, int]:
        """`(denoised_timestep_from, denoised_timestep_to)` of the training rollout for an exit step.

        `step_list` is the list the rollout actually runs (warped if warping is on). Both values are
        `T - grid_index(step)` - with warping this recovers the un-warped 0..T config step - and `to` is 0 when
        the exit step is the last one (docs/method.md, "The rollout").
        """
        steps = _as_tensor(step_list).float()
        if steps.ndim != 1 or not 0 <= exit_index < steps.numel():
            raise ValueError(f"exit_index must lie in [0, {steps.numel()}) for step_list {steps.tolist()}, "
                             f"got {exit_index}")
        T = self.num_train_timesteps
        t_from = T - int(self.grid_index(steps[exit_index]))
        t_to = 0 if exit_index == steps.numel() - 1 else T - int(self.grid_index(steps[exit_index + 1]))
        return t_from, t_to

    # ------------------------------------------------------------------------ DMD / critic timesteps
    def score_timestep_range(self, denoised_from: int | None = None, denoised_to: int | None = None,
                             ts_schedule: bool = False, ts_schedule_max: bool = False,
                             min_score_timestep: int = 0) -> tuple[int, int]:
        """`[lo, hi)` of the integer score-timestep draw (docs/method.md, "Score timesteps")."""
        lo = denoised_to if ts_schedule and denoised_to is not None else min_score_timestep
        hi = denoised_from if ts_schedule_max and denoised_from is not None else self.num_train_timesteps
        return int(lo), int(hi)

    def shift_score_timesteps(self, t_int: Tensor, shift: float | None = None, min_fraction: float = 0.02,
                              max_fraction: float = 0.98) -> Tensor:
        """Analytic shift + clamp of integer score timesteps (any shape) -> float32, same shape.

        `t = T * s * (t_int / T) / (1 + (s - 1) * t_int / T)` (only if `s > 1`, as the original), then clamped to
        `[int(min_fraction * T), int(max_fraction * T)]` (= [20, 980] for T = 1000). Unlike the noising lookup this
        shift is analytic, so the networks see un-snapped float timesteps.
        """
        s = self.shift if shift is None else float(shift)
        T = self.num_train_timesteps
        t = t_int
        if s > 1:
            u = t / T
            t = s * u / (1 + (s - 1) * u) * T
        min_step, max_step = int(min_fraction * T), int(max_fraction * T)
        return t.clamp(min_step, max_step).to(torch.float32)

    def sample_score_timesteps(self, batch_size: int, generator: torch.Generator | None = None,
                               device: torch.device | str | None = None, lo: int = 0, hi: int | None = None,
                               shift: float | None = None, num_frames: int | None = None,
                               min_fraction: float = 0.02, max_fraction: float = 0.98) -> Tensor:
        """DMD / critic timestep sampling (docs/method.md, "Score timesteps") -> float32 `[B]`, or `[B, F]` (same
        value on every frame).

        Integer draws uniform in `[lo, hi)` (hi defaults to T), then `shift_score_timesteps`. `shift` defaults to
        this schedule's shift (the config's `timestep_shift`).
        """
        hi = self.num_train_timesteps if hi is None else hi
        if not 0 <= lo < hi <= self.num_train_timesteps:
            raise ValueError(f"need 0 <= lo < hi <= {self.num_train_timesteps}, got lo={lo}, hi={hi}")
        if device is None:
            device = generator.device if generator is not None else torch.device("cpu")
        t_int = torch.randint(lo, hi, (batch_size,), generator=generator, device=device, dtype=torch.long)
        t = self.shift_score_timesteps(t_int, shift, min_fraction, max_fraction)
        return t if num_frames is None else t[:, None].expand(batch_size, num_frames).contiguous()
