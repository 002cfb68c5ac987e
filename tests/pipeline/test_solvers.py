"""Multi-step flow samplers: the original's UniPC and ODE-pair grids, and convergence on problems with a known
exact flow."""
from __future__ import annotations

import pytest
import torch

from pipeline.schedule import FlowMatchSchedule
from pipeline.solvers import (FlowEulerScheduler, euler_sampler_sigmas, euler_step, flow_sampling_loop,
                              make_unipc)


def _exact_velocity(scheduler, x0_posterior_mean):
    """velocity_fn for flow_sampling_loop with the exact flow `v = (x - E[x0 | x_sigma]) / sigma`.

    The i-th call belongs to `scheduler.sigmas[i]`; using the table (not `t / 1000`) keeps the field exact even
    for UniPC's int64-truncated timesteps.
    """
    sigmas = iter(scheduler.sigmas[:-1].tolist())

    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        assert t.dtype == torch.float32 and t.ndim == 0
        sigma = next(sigmas)
        assert abs(float(t) - 1000 * sigma) < 1.0        # t is on the 0..1000 scale
        return (x - x0_posterior_mean(x, sigma)) / sigma

    return velocity


def _gaussian_problem(mu: torch.Tensor, std: torch.Tensor):
    """Data x0 ~ N(mu, std^2) per dimension: posterior mean of x0 given x_sigma, and the exact ODE solution."""
    def posterior_mean(x, sigma):
        var = (1 - sigma) ** 2 * std**2 + sigma**2
        return mu + (1 - sigma) * std**2 / var * (x - (1 - sigma) * mu)

    def exact_endpoint(x_start, sigma_start):
        # the probability-flow ODE of a Gaussian keeps the standardised coordinate fixed
        var = (1 - sigma_start) ** 2 * std**2 + sigma_start**2
        return mu + std * (x_start - (1 - sigma_start) * mu) / var.sqrt()

    return posterior_mean, exact_endpoint


def test_euler_grid_matches_ode_pair_sampler():
    sigmas = euler_sampler_sigmas(48, 8.0)
    assert sigmas.shape == (49,) and sigmas.dtype == torch.float32 and float(sigmas[-1]) == 0.0
    t = 1000 * sigmas
    # the original's ODE-pair grid: t = 1000, 997.35, ..., 145.45; kept indices 0/12/24/36 = shift-8 warped
    # [1000, 750, 500, 250]
    assert float(t[0]) == 1000.0 and float(t[1]) == pytest.approx(997.35, abs=1e-2)
    assert float(t[47]) == pytest.approx(145.45, abs=1e-2)
    warped = FlowMatchSchedule(shift=8.0).warp([1000, 750, 500, 250])
    torch.testing.assert_close(t[[0, 12, 24, 36]], warped, atol=1e-3, rtol=0)
    sched = FlowEulerScheduler(48, 8.0)
    assert len(sched) == 48 and torch.equal(sched.timesteps, t[:-1])


def test_euler_step_and_scheduler_step():
    x, v = torch.ones(2, 3), torch.full((2, 3), 2.0)
    assert torch.equal(euler_step(x, v, 0.5, 0.25), torch.full((2, 3), 0.5))
    sched = FlowEulerScheduler(4, 1.0)                 # sigmas 1, .75, .5, .25, 0
    out = sched.step(v, sched.timesteps[3], x)[0]
    assert torch.allclose(out, x - 2.0 * 0.25)         # last step goes to sigma 0
    out = sched.step(v, torch.tensor(752.0), x)[0]     # nearest grid entry 750 -> 500
    assert torch.allclose(out, x - 2.0 * 0.25)
    with pytest.raises(ValueError, match="one timestep"):
        sched.step(v, torch.tensor([1000.0, 750.0]), x)


def test_unipc_timesteps_and_sigmas():
    sched = make_unipc(50, 8.0)
    ts = sched.timesteps
    assert ts.dtype == torch.int64 and ts.shape == (50,)
    assert int(ts[0]) == 999 and bool(torch.all(ts[1:] <= ts[:-1])) and int(ts[-1]) < int(ts[0]) - 500
    assert sched.sigmas.shape == (51,) and float(sched.sigmas[-1]) == 0.0
    # Wan's grid: shift applied once to linspace(0.999, 0, N + 1)[:-1]
    s0 = 8 * 0.999 / (1 + 7 * 0.999)
    assert float(sched.sigmas[0]) == pytest.approx(s0, abs=1e-6)
    u = 0.999 * (1 - 49 / 50)
    assert float(sched.sigmas[49]) == pytest.approx(8 * u / (1 + 7 * u), abs=1e-6)
    assert sched.config.prediction_type == "flow_prediction" and sched.config.solver_order == 2
    assert sched.config.solver_type == "bh2" and sched.config.lower_order_final


@pytest.mark.parametrize("kind", ["euler", "unipc"])
def test_solvers_reach_a_fixed_data_point(kind):
    g = torch.Generator().manual_seed(0)
    x_star = torch.randn(3, 16, generator=g)
    noise = torch.randn(3, 16, generator=g)
    sched = FlowEulerScheduler(12, 5.0) if kind == "euler" else make_unipc(12, 5.0)
    # data = one point: E[x0 | x] = x*, so v = (x - x*) / sigma = eps - x*, and both solvers are exact
    velocity = _exact_velocity(sched, lambda x, sigma: x_star)
    x_start = (1 - float(sched.sigmas[0])) * x_star + float(sched.sigmas[0]) * noise
    out = flow_sampling_loop(velocity, x_start, sched)
    assert out.shape == x_star.shape
    torch.testing.assert_close(out, x_star, atol=1e-5, rtol=0)


def _gaussian_errors(kind: str, num_steps: int, shift: float) -> float:
    mu = torch.linspace(-2.0, 2.0, 32)
    std = torch.linspace(0.3, 1.0, 32)
    posterior_mean, exact_endpoint = _gaussian_problem(mu, std)
    noise = torch.randn(64, 32, generator=torch.Generator().manual_seed(1))
    sched = FlowEulerScheduler(num_steps, shift) if kind == "euler" else make_unipc(num_steps, shift)
    sigma0 = float(sched.sigmas[0])
    x_start = (1 - sigma0) * mu + ((1 - sigma0) ** 2 * std**2 + sigma0**2).sqrt() * noise
    out = flow_sampling_loop(_exact_velocity(sched, posterior_mean), x_start, sched)
    return float((out - exact_endpoint(x_start, sigma0)).abs().max())


def test_unipc_beats_euler_on_gaussian_data():
    # Both solvers end with x0 = E[x0 | x] at the last non-zero sigma (Euler to sigma 0 and UniPC's lower-order
    # final step coincide there), so the gap comes from UniPC's second-order steps before it.
    euler, unipc = _gaussian_errors("euler", 10, 1.0), _gaussian_errors("unipc", 10, 1.0)
    assert unipc < 0.25 * euler, (unipc, euler)
    assert _gaussian_errors("unipc", 10, 3.0) < _gaussian_errors("euler", 10, 3.0)


def test_convergence_orders_on_gaussian_data():
    # halving the step: Euler's error halves (first order), UniPC-bh2's roughly quarters (second order)
    euler_ratio = _gaussian_errors("euler", 20, 1.0) / _gaussian_errors("euler", 40, 1.0)
    unipc_ratio = _gaussian_errors("unipc", 20, 1.0) / _gaussian_errors("unipc", 40, 1.0)
    assert 1.7 < euler_ratio < 2.5, euler_ratio
    assert unipc_ratio > 3.0, unipc_ratio


def test_flow_sampling_loop_refuses_a_used_unipc():
    sched = make_unipc(3, 5.0)
    x = torch.randn(2, 4)
    flow_sampling_loop(lambda x, t: torch.zeros_like(x), x, sched)
    with pytest.raises(ValueError, match="fresh"):
        flow_sampling_loop(lambda x, t: torch.zeros_like(x), x, sched)
    with pytest.raises(ValueError, match="num_steps"):
        make_unipc(0, 5.0)
