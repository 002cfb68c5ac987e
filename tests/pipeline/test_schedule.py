"""FlowMatchSchedule: golden parity with the original FlowMatchScheduler, lookups, warping, score timesteps."""
from __future__ import annotations

import pytest
import torch

from pipeline.schedule import FlowMatchSchedule, shifted_sigmas

ATOL = 1e-6


def _schedule_from(case) -> FlowMatchSchedule:
    c = case.meta["construction"]
    return FlowMatchSchedule(shift=c["shift"], num_train_timesteps=c["num_train_timesteps"])


def _close(actual: torch.Tensor, expected: torch.Tensor, atol: float = ATOL) -> None:
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    torch.testing.assert_close(actual, expected, atol=atol, rtol=1e-6)


# ------------------------------------------------------------------------------------------------- golden
@pytest.mark.golden
def test_golden_tables(golden):
    case = golden("scheduler")
    s = _schedule_from(case)
    _close(s.sigmas, case.io["sigmas"])
    _close(s.timesteps, case.io["timesteps"], atol=1e-6 * s.num_train_timesteps)
    _close(s.training_weights, case.io["training_weights"])
    # bit parity is the stated goal for the float32 formula
    assert torch.equal(s.sigmas, case.io["sigmas"])
    assert torch.equal(s.timesteps, case.io["timesteps"])


@pytest.mark.golden
def test_golden_lookup_and_add_noise_1d(golden):
    case = golden("scheduler")
    s, io = _schedule_from(case), case.io
    t = io["add_noise.timestep"]
    assert torch.equal(s.grid_index(t), io["add_noise.grid_index"])
    _close(s.sigma(t), io["add_noise.sigma_used"])
    _close(s.training_weight(t), io["training_weight.out"])
    _close(s.add_noise(io["add_noise.x0"], io["add_noise.noise"], t), io["add_noise.out"])
    _close(s.training_target(io["add_noise.x0"], io["add_noise.noise"]), io["training_target.out"])


@pytest.mark.golden
def test_golden_add_noise_2d(golden):
    case = golden("scheduler")
    s, io = _schedule_from(case), case.io
    t2 = io["add_noise_2d.timestep"]                          # [B, F]
    n = t2.numel()
    rest = io["add_noise.x0"].shape[1:]
    x0 = io["add_noise.x0"][:n].reshape(*t2.shape, *rest)     # the original flattens [B, F] against [B*F, ...]
    noise = io["add_noise.noise"][:n].reshape(*t2.shape, *rest)
    out = s.add_noise(x0, noise, t2)
    _close(out.reshape(n, *rest), io["add_noise_2d.out"])


@pytest.mark.golden
def test_golden_conversions(golden):
    case = golden("scheduler")
    s, io = _schedule_from(case), case.io
    t = io["convert.timestep"]
    _close(s.x0_from_flow(io["convert.flow_pred"], io["convert.xt"], t), io["convert.x0_from_flow"])
    # (xt - x0) / sigma amplifies by 1/sigma_min ~ 200: compare relative to the output's scale
    expected = io["convert.flow_from_x0"]
    _close(s.flow_from_x0(io["convert.x0"], io["convert.xt"], t), expected,
           atol=ATOL * max(1.0, float(expected.abs().max())))


@pytest.mark.golden
def test_golden_warped_lists_and_exit_ranges(golden):
    case = golden("scheduler")
    s = _schedule_from(case)
    lists = case.meta["warped_lists"]
    assert lists
    for name, entry in lists.items():
        warped = s.warp(entry["config"])
        _close(warped, case.io[f"warped_denoising_step_list.{name}"])
        _close(warped, torch.tensor(entry["warped"], dtype=torch.float32))
        assert s.grid_index(warped).tolist() == entry["grid_index"]
    table = case.meta["self_forcing_training_denoised_timestep_from_to_4step"]
    config = next(e["config"] for e in lists.values() if len(e["config"]) == len(table))
    step_list = s.warp(config)
    for row in table:
        got = s.exit_step_range(step_list, row["exit_index"])
        assert got == (row["denoised_timestep_from"], row["denoised_timestep_to"])


@pytest.mark.golden
def test_golden_dmd_shift(golden):
    case = golden("scheduler")
    s, io = _schedule_from(case), case.io
    t_int = io["dmd_shift.t_int"]
    unclamped = s.shift_score_timesteps(t_int, min_fraction=0.0, max_fraction=1.0)
    _close(unclamped, io["dmd_shift.shifted"], atol=1e-6 * s.num_train_timesteps)
    _close(s.shift_score_timesteps(t_int), io["dmd_shift.clamped"], atol=1e-6 * s.num_train_timesteps)


# ---------------------------------------------------------------------------------------- behaviour
@pytest.mark.parametrize("shift, t, expected", [
    (5.0, 20.0, 19.6850), (8.0, 20.0, 23.5064), (5.0, 50.0, 48.0769), (8.0, 50.0, 53.3842),
    (5.0, 980.0, 979.9048), (8.0, 937.5, 937.4551),
])
def test_nearest_grid_matches_spec_appendix_a(shift, t, expected):
    s = FlowMatchSchedule(shift=shift)
    assert float(s.sigma(t)) * 1000 == pytest.approx(expected, abs=1e-3)
    assert float(s.timesteps[s.grid_index(t)]) == pytest.approx(expected, abs=1e-3)


def test_analytic_lookup_differs_from_grid_by_the_quantisation():
    grid, analytic = FlowMatchSchedule(5.0), FlowMatchSchedule(5.0, sigma_lookup="analytic")
    t = torch.tensor([20.0])
    assert float(analytic.sigma(t)) == pytest.approx(0.02, abs=1e-8)
    # the original's table: t=20 snaps to 19.6850 on the shift-5 grid -> sigma 0.019685, 3.15e-4 below t/1000
    assert float(analytic.sigma(t) - grid.sigma(t)) == pytest.approx(0.02 - 0.019685, abs=2e-6)
    x0, noise = torch.ones(1, 3), torch.zeros(1, 3)
    assert torch.equal(analytic.add_noise(x0, noise, torch.zeros(1)), x0)


def test_t0_snaps_to_last_grid_sigma():
    s = FlowMatchSchedule(5.0)
    assert int(s.grid_index(0.0)) == s.num_train_timesteps - 1
    assert float(s.sigma(torch.tensor(0.0))) == pytest.approx(0.00498, abs=1e-5)
    x0, noise = torch.zeros(2, 4), torch.ones(2, 4)
    out = s.add_noise(x0, noise, torch.zeros(2))
    assert torch.allclose(out, torch.full_like(out, float(s.sigmas[-1])))   # NOT the identity


@pytest.mark.parametrize("shift, last", [(5.0, 4.9801), (8.0, 7.9444), (3.0, 2.994)])
def test_grid_ends(shift, last):
    s = FlowMatchSchedule(shift)
    assert float(s.timesteps[0]) == 1000.0 and float(s.timesteps[-1]) == pytest.approx(last, abs=1e-3)
    assert bool(torch.all(s.timesteps[1:] < s.timesteps[:-1]))
    assert float(s.training_weights.sum()) == pytest.approx(1000.0, rel=1e-5)


def test_num_train_timesteps_is_not_hard_coded():
    s = FlowMatchSchedule(shift=5.0, num_train_timesteps=100)
    assert s.sigmas.shape == (100,) and float(s.timesteps[0]) == 100.0
    assert torch.equal(s.sigmas, shifted_sigmas(100, 5.0))
    assert s.warp([100, 50]).tolist() == pytest.approx([100.0, 100 * 5 * 0.5 / (1 + 4 * 0.5)])
    assert s.warp([0]).tolist() == [0.0]
    assert s.score_timestep_range() == (0, 100)
    clamped = s.shift_score_timesteps(torch.tensor([0, 99]))
    assert clamped.tolist() == pytest.approx([2.0, 98.0])
    assert float(s.training_weights.sum()) == pytest.approx(100.0, rel=1e-5)


def test_add_noise_shapes_dtypes_and_errors():
    s = FlowMatchSchedule(5.0)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 3, 4, 5, generator=g)
    noise = torch.randn(2, 3, 4, 5, generator=g)
    t = torch.tensor([[1000.0, 500.0, 0.0], [250.0, 937.5, 20.0]])
    out = s.add_noise(x0, noise, t)
    sig = s.sigma(t)[..., None, None]
    assert torch.allclose(out, (1 - sig) * x0 + sig * noise)
    # [B] timesteps broadcast over every trailing dim
    out_b = s.add_noise(x0, noise, t[:, 0])
    assert torch.allclose(out_b[1], (1 - s.sigma(250.0)) * x0[1] + s.sigma(250.0) * noise[1])
    assert s.add_noise(x0.bfloat16(), noise.bfloat16(), t).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="leading dims"):
        s.add_noise(x0, noise, torch.zeros(3))
    with pytest.raises(ValueError, match="same shape"):
        s.add_noise(x0, noise[:1], t)


def test_conversions_round_trip():
    s = FlowMatchSchedule(5.0)
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(2, 3, 8, generator=g), torch.randn(2, 3, 8, generator=g)
    t = torch.tensor([[1000.0, 600.0, 100.0], [833.3333, 20.0, 0.0]])
    xt = s.add_noise(x0, noise, t)
    flow = s.training_target(x0, noise)
    assert torch.allclose(s.x0_from_flow(flow, xt, t), x0, atol=1e-5)
    assert torch.allclose(s.flow_from_x0(x0, xt, t), flow, atol=1e-3)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="sigma_lookup"):
        FlowMatchSchedule(sigma_lookup="nearest")
    with pytest.raises(ValueError, match="num_train_timesteps"):
        FlowMatchSchedule(num_train_timesteps=0)
    s = FlowMatchSchedule(5.0)
    with pytest.raises(ValueError, match="integers"):
        s.warp([937.5])
    with pytest.raises(ValueError, match=r"\[0, 1000\]"):
        s.warp([1001])
    with pytest.raises(ValueError, match="exit_index"):
        s.exit_step_range(s.warp([1000, 750]), 2)
    with pytest.raises(ValueError, match="lo < hi"):
        s.sample_score_timesteps(2, lo=500, hi=500)


def test_sample_score_timesteps_distribution_and_range():
    s = FlowMatchSchedule(5.0)
    g = torch.Generator().manual_seed(0)
    t = s.sample_score_timesteps(20000, generator=g)
    assert t.dtype == torch.float32 and t.shape == (20000,)
    assert float(t.min()) >= 20.0 and float(t.max()) <= 980.0
    # docs/method.md, "Score timesteps": mean ~745.7, about 9.2 % clamped at 980
    assert float(t.mean()) == pytest.approx(745.7, abs=5.0)
    assert float((t == 980.0).float().mean()) == pytest.approx(0.092, abs=0.01)
    t_bf = s.sample_score_timesteps(3, generator=torch.Generator().manual_seed(1), num_frames=4)
    assert t_bf.shape == (3, 4) and bool(torch.all(t_bf == t_bf[:, :1]))
    # the integer draw must honour [lo, hi): the restricted range of ts_schedule / ts_schedule_max
    lo, hi = s.score_timestep_range(denoised_from=500, denoised_to=250, ts_schedule=True, ts_schedule_max=True)
    assert (lo, hi) == (250, 500)
    t_r = s.sample_score_timesteps(1000, generator=g, lo=lo, hi=hi)
    assert float(t_r.min()) >= float(s.shift_score_timesteps(torch.tensor(250)))
    assert float(t_r.max()) <= float(s.shift_score_timesteps(torch.tensor(499)))
    # shift <= 1 leaves the integer draw unchanged (only clamped)
    assert s.shift_score_timesteps(torch.tensor([3, 500, 990]), shift=1.0).tolist() == [20.0, 500.0, 980.0]


def test_denoising_steps_warp_and_trailing_zero():
    schedule = FlowMatchSchedule(shift=5.0)
    assert schedule.denoising_steps([1000, 750, 500, 250, 0], True) == pytest.approx([1000.0, 937.5, 833.3333, 625.0, 0.0])
    assert schedule.denoising_steps([1000, 750, 0], True, drop_final_zero=True) == pytest.approx([1000.0, 937.5])
    assert schedule.denoising_steps([1000, 500], False) == [1000.0, 500.0]
