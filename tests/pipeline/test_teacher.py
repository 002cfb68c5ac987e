"""Teacher sampling: many-step CFG samplers (ODE pairs, diffusion inference) and the few-step bidirectional sampler."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from pipeline.denoiser import Denoiser
from pipeline.schedule import FlowMatchSchedule
from pipeline.solvers import FlowEulerScheduler, flow_sampling_loop, make_unipc
from pipeline.teacher import ode_pair_timesteps, sample_bidirectional, sample_bidirectional_few_step
from tests.tiny import tiny_inputs, tiny_model

SHAPE = (2, 3, 4, 4, 6)  # [B, F, C, H, W]


class PointOracle(nn.Module):
    """Exact flow for data = one point x*: `v = (x - x*) / sigma(t)` (ignores the prompt)."""

    def __init__(self, x_star: torch.Tensor, sigma_fn):
        super().__init__()
        self.x_star, self.sigma_fn = x_star, sigma_fn

    def forward(self, x, t, context, **kwargs):
        assert t.shape == (x.shape[0],)  # the bidirectional teacher gets one timestep per sample
        sigma = self.sigma_fn(t).to(torch.float64).view(-1, 1, 1, 1, 1)
        x_star = self.x_star.repeat(x.shape[0] // self.x_star.shape[0], 1, 1, 1, 1)  # CFG doubles the batch
        return ((x.double() - x_star.double()) / sigma).to(x.dtype)


def sampler_sigma_fn(scheduler):
    """sigma of the sampler's own step for the timestep it hands the teacher (int64-truncated for UniPC)."""
    timesteps = scheduler.timesteps.to(torch.float64)
    sigmas = scheduler.sigmas[:-1].to(torch.float64)
    return lambda t: sigmas[(t.double()[:, None] - timesteps).abs().argmin(-1)]


class ContextConstant(nn.Module):
    """Mock teacher: the flow of sample b is the constant `context[b, 0, 0]`; logs the batch size of every call."""

    def __init__(self):
        super().__init__()
        self.batches: list[int] = []

    def forward(self, x, t, context, **kwargs):
        self.batches.append(x.shape[0])
        return context[:, 0, 0].view(-1, 1, 1, 1, 1).expand_as(x).clone()


class Recording(nn.Module):
    """Wraps a model and records the inputs of every call."""

    def __init__(self, model):
        super().__init__()
        self.model, self.calls = model, []

    def forward(self, x, t, context, **kwargs):
        self.calls.append((x.clone(), t.clone()))
        return self.model(x, t, context, **kwargs)


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)


def _const_context(values, length=3, dim=5):
    return torch.tensor(values, dtype=torch.float32).view(-1, 1, 1).expand(-1, length, dim).contiguous()


@pytest.mark.parametrize("sampler", ["euler", "unipc"])
@pytest.mark.parametrize("cfg_space", ["flow", "x0"])
def test_samplers_reach_the_data_point(sampler, cfg_space):
    x_star, noise = _data()
    num_steps, shift = 10, 8.0
    schedule = FlowMatchSchedule(shift=8.0)
    if cfg_space == "flow":  # exact raw flow on the sampler's own sigmas
        reference = FlowEulerScheduler(num_steps, shift) if sampler == "euler" else make_unipc(num_steps, shift)
        sigma_fn = sampler_sigma_fn(reference)
    else:  # exact x0 after the denoiser's grid conversion
        sigma_fn = lambda t: schedule.sigma(t, torch.float64)  # noqa: E731
    denoiser = Denoiser(PointOracle(x_star, sigma_fn), schedule, uniform_timestep=True)
    context, negative = torch.randn(2, 3, 5), torch.randn(1, 3, 5)
    out = sample_bidirectional(denoiser, noise, context, negative, sampler=sampler, num_steps=num_steps,
                               shift=shift, guidance_scale=5.0, cfg_space=cfg_space)
    assert out.latents.shape == noise.shape and out.trajectory is None
    torch.testing.assert_close(out.latents, x_star, atol=1e-4, rtol=0)


@pytest.mark.parametrize("sampler", ["euler", "unipc"])
@pytest.mark.parametrize("cfg_space", ["flow", "x0"])
def test_cfg_with_identical_prompts_equals_no_cfg(sampler, cfg_space):
    model = tiny_model()
    noise, context = tiny_inputs(model, frames=3)
    denoiser = Denoiser(model, FlowMatchSchedule(shift=8.0), uniform_timestep=True)
    kw = dict(sampler=sampler, num_steps=4, shift=8.0, cfg_space=cfg_space)
    guided = sample_bidirectional(denoiser, noise, context, context.clone(), guidance_scale=5.0, **kw).latents
    plain = sample_bidirectional(denoiser, noise, context, context, guidance_scale=1.0, **kw).latents
    unguided = sample_bidirectional(denoiser, noise, context, None, guidance_scale=5.0, **kw).latents
    assert torch.equal(plain, unguided)
    torch.testing.assert_close(guided, plain, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(plain, noise, atol=1e-2)  # the model actually moved the sample


@pytest.mark.parametrize("batch_cfg", [True, False])
@pytest.mark.parametrize("cfg_space", ["flow", "x0"])
def test_cfg_formula_and_batched_split(cfg_space, batch_cfg):
    cond_values, neg_values, g = [1.0, 2.0], [-0.5, 0.25], 3.0
    noise = _data()[1]
    mock = ContextConstant()
    schedule = FlowMatchSchedule(shift=8.0)
    denoiser = Denoiser(mock, schedule, uniform_timestep=True)
    num_steps = 4
    out = sample_bidirectional(denoiser, noise, _const_context(cond_values), _const_context(neg_values),
                               sampler="euler", num_steps=num_steps, shift=8.0, guidance_scale=g,
                               cfg_space=cfg_space, record_steps=range(num_steps + 1), batch_cfg=batch_cfg)
    assert mock.batches == ([4] * num_steps if batch_cfg else [2] * (2 * num_steps))
    guided = torch.tensor([u + g * (c - u) for c, u in zip(cond_values, neg_values)]).view(-1, 1, 1, 1, 1)
    sigmas = FlowEulerScheduler(num_steps, 8.0).sigmas.double()
    for k in range(num_steps):
        v = guided.double()
        if cfg_space == "x0":  # x0 from the 1000-grid sigma, back to flow with the sampler's sigma
            v = v * schedule.sigma(1000 * sigmas[k].float(), torch.float64) / sigmas[k]
        expected = out.trajectory[:, k].double() + v * (sigmas[k + 1] - sigmas[k])
        torch.testing.assert_close(out.trajectory[:, k + 1].double(), expected, atol=1e-5, rtol=0)


def test_cfg_negative_prompt_of_other_length_and_unipc():
    cond, neg, g = _const_context([1.0, 2.0], length=3), _const_context([-0.5], length=2), 4.0
    noise = _data()[1]
    mock = ContextConstant()
    denoiser = Denoiser(mock, FlowMatchSchedule(shift=8.0), uniform_timestep=True)
    out = sample_bidirectional(denoiser, noise, cond, neg, sampler="unipc", num_steps=5, guidance_scale=g)
    assert mock.batches == [2] * 10  # lengths differ: two forwards per step, the negative prompt broadcast
    guided = torch.tensor([-0.5 + g * 1.5, -0.5 + g * 2.5]).view(-1, 1, 1, 1, 1)
    expected = flow_sampling_loop(lambda x, t: guided.expand_as(x), noise, make_unipc(5, 8.0))
    torch.testing.assert_close(out.latents, expected, atol=1e-5, rtol=0)


def test_trajectory_recording():
    model = tiny_model()
    noise, context = tiny_inputs(model, frames=3)
    negative = torch.randn_like(context)
    denoiser = Denoiser(model, FlowMatchSchedule(shift=8.0), uniform_timestep=True)
    record = [0, 2, 4, 6, 8]
    out = sample_bidirectional(denoiser, noise, context, negative, sampler="euler", num_steps=8, shift=8.0,
                               guidance_scale=3.0, cfg_space="x0", record_steps=record)
    assert out.trajectory.shape == (noise.shape[0], len(record), *noise.shape[1:])
    assert torch.equal(out.trajectory[:, 0], noise) and torch.equal(out.trajectory[:, -1], out.latents)
    assert out.timesteps.shape == (9,) and float(out.timesteps[-1]) == 0.0
    assert out.trajectory_timesteps.tolist() == pytest.approx(ode_pair_timesteps(8, 8.0, record), abs=1e-3)
    # the intermediate entries are the states reached by a shorter run of the same sampler from the same noise
    partial = sample_bidirectional(denoiser, noise, context, negative, sampler="euler", num_steps=8, shift=8.0,
                                   guidance_scale=3.0, cfg_space="x0", record_steps=[0, 3])
    assert partial.trajectory.shape[1] == 2 and torch.equal(partial.latents, out.latents)
    assert not torch.allclose(partial.trajectory[:, 1], out.latents)
    again = sample_bidirectional(denoiser, noise, context, negative, sampler="euler", num_steps=8, shift=8.0,
                                 guidance_scale=3.0, cfg_space="x0", record_steps=record)
    assert torch.equal(again.trajectory, out.trajectory)  # deterministic given the noise


def test_ode_pair_timesteps():
    t = ode_pair_timesteps(48, 8.0, [0, 12, 24, 36, 48])
    assert t == pytest.approx([1000.0, 960.0, 888.8889, 727.2727, 0.0], abs=1e-3)
    assert ode_pair_timesteps(48, 8.0, [1])[0] == pytest.approx(997.35, abs=1e-2)
    warped = FlowMatchSchedule(shift=8.0).warp([1000, 750, 500, 250, 0])
    assert t == pytest.approx(warped.tolist(), abs=1e-3)


@pytest.mark.parametrize("record", [[0, 9], [3, 1], [2, 2], [-1], [1.5]])
def test_bad_record_steps(record):
    with pytest.raises(ValueError, match="record_steps"):
        ode_pair_timesteps(8, 8.0, record)


def test_bad_inputs():
    denoiser = Denoiser(ContextConstant(), FlowMatchSchedule(shift=8.0), uniform_timestep=True)
    noise, context = _data()[1], _const_context([1.0, 2.0])
    with pytest.raises(ValueError, match="sampler"):
        sample_bidirectional(denoiser, noise, context, sampler="dpm++")
    with pytest.raises(ValueError, match="cfg_space"):
        sample_bidirectional(denoiser, noise, context, cfg_space="eps")
    with pytest.raises(ValueError, match="num_steps"):
        sample_bidirectional(denoiser, noise, context, num_steps=0)
    with pytest.raises(ValueError, match="noise"):
        sample_bidirectional(denoiser, noise[0], context)
    with pytest.raises(ValueError, match="negative_context"):
        sample_bidirectional(denoiser, noise, context, _const_context([1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match="empty"):
        sample_bidirectional_few_step(denoiser, noise, context, [])


def test_progress_bar(capsys):
    denoiser = Denoiser(ContextConstant(), FlowMatchSchedule(shift=8.0), uniform_timestep=True)
    noise, context = _data()[1], _const_context([1.0, 2.0])
    sample_bidirectional(denoiser, noise, context, sampler="euler", num_steps=3, progress=True)
    assert "3/3" in capsys.readouterr().err
    sample_bidirectional(denoiser, noise, context, sampler="euler", num_steps=3)
    assert capsys.readouterr().err == ""


def test_few_step_runs_every_step_and_returns_the_last_x0():
    model = Recording(tiny_model())
    noise, context = tiny_inputs(model.model, frames=3)
    denoiser = Denoiser(model, FlowMatchSchedule(shift=5.0), uniform_timestep=True)
    steps = [1000.0, 937.5, 833.3333, 625.0]
    out = sample_bidirectional_few_step(denoiser, noise, context, steps,
                                        generator=torch.Generator().manual_seed(0))
    assert len(model.calls) == len(steps)  # the original skipped the last step (len - 1 calls)
    assert [float(t[0]) for _, t in model.calls] == pytest.approx(steps)
    assert torch.equal(model.calls[0][0], noise)
    last_x, last_t = model.calls[-1]
    _, x0 = denoiser(last_x, last_t[:, None].expand(-1, noise.shape[1]), context)
    torch.testing.assert_close(out, x0, atol=0, rtol=0)


def test_few_step_is_deterministic_with_a_generator():
    model = tiny_model()
    noise, context = tiny_inputs(model, frames=3)
    denoiser = Denoiser(model, FlowMatchSchedule(shift=5.0), uniform_timestep=True)
    steps = [1000.0, 937.5, 833.3333]

    def run(seed):
        return sample_bidirectional_few_step(denoiser, noise, context, steps,
                                             generator=torch.Generator().manual_seed(seed))

    assert torch.equal(run(3), run(3))
    assert not torch.allclose(run(3), run(4))
