"""Training against the original's training code: the self-forcing rollout's gradients (both KV-cache gradient
modes, with and without checkpointing), the DMD, critic, SiD and ODE-regression losses and their gradients.

Every size comes from the fixtures' JSON (another fixture set runs through SF_GOLDEN_DIR); the recipe settings the
fixtures were made with are those of `configs/self_forcing_dmd.yaml`. Recorded random draws are replayed in order
through the algorithms' `draws` and the rollout's `noise` / `noise_fn`.
"""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from model.config import WanConfig
from model.wan import WanDiT
from pipeline.denoiser import Denoiser
from pipeline.schedule import FlowMatchSchedule
from tests.tiny import recorded_calls
from trainer.base import Models
from trainer.dmd import DMD
from trainer.ode import ODERegression
from trainer.self_forcing import GeneratorOutput, RolloutPlan, SelfForcingRollout
from trainer.sid import SiD
from utils.config import REPO_ROOT, load_config

pytestmark = pytest.mark.golden
RECIPE = REPO_ROOT / "configs" / "self_forcing_dmd.yaml"
RTOL = 1e-4
GRAD_ATOL = 1e-5  # times the largest stored gradient of the file (float32 accumulation over a whole rollout)
LOSS_RTOL = 1e-5


class Replay:
    """The recorded draws `rng.NN.randint` / `rng.NN.randn` of a case, handed out in call order."""

    def __init__(self, case):
        self.entries = [(entry, case.io[entry["key"]]) for entry in case.meta["rng"]]
        self.used = 0

    def _next(self, kind: str):
        assert self.used < len(self.entries), "more random draws than the original made"
        entry, value = self.entries[self.used]
        assert entry["key"].endswith(kind), f"draw {self.used} is {entry['key']}, expected a {kind} draw"
        self.used += 1
        return entry, value

    def integers(self, low, high, shape, device):
        entry, value = self._next("randint")
        assert list(entry["low_high"]) == [low, high], f"{entry['key']}: range {entry['low_high']} vs [{low}, {high})"
        return value.reshape(shape).to(device)

    def normal_like(self, x):
        return self._next("randn")[1].reshape(x.shape).to(x)

    def remaining(self) -> int:
        return len(self.entries) - self.used


def network(case, role: str) -> WanDiT:
    model = WanDiT(WanConfig.from_dict(case.meta["model_config"]))
    model.load_state_dict(case.weights(case.meta["weights"][role]["file"]), strict=True)
    return model


def recipe(case, *overrides: str, window: int | None = None):
    """`configs/self_forcing_dmd.yaml` at the case's sizes (loss window `window` frames, default all), float32.

    The score losses take their frame count from the latents, and the original runs them on any count; the recipe's
    rollout (built with every algorithm) only generates whole blocks, so for a loss case it is sized to the next
    whole block."""
    spec, hw = case.meta["spec"], case.meta["latent_hw"]

    def load(frames: int, window: int):
        shape = [spec["batch"], window, case.meta["model_config"]["in_dim"], *hw]
        options = [f"{key}={str(spec[key]).lower()}" for key in ("ts_schedule", "ts_schedule_max") if key in spec]
        return load_config(RECIPE, ["mixed_precision=false", f"image_or_video_shape={shape}".replace(" ", ""),
                                    f"num_training_frames={frames}", *options, *overrides])
    frames = spec["num_frames"]
    cfg = load(frames, window or frames)
    block = cfg.rollout.num_frame_per_block
    if window is None and frames % block:
        whole = -(-frames // block) * block
        cfg = load(whole, whole)
    return cfg


def score_models(case) -> Models:
    """Generator schedule (shift of the recipe) for noising; teacher and critic as the original's score wrappers. The
    critic case has no teacher weights: the critic's stand in for the teacher DMD requires (and never calls there)."""
    cfg = recipe(case)
    generator = Denoiser(WanDiT(WanConfig.from_dict(case.meta["model_config"])),
                         FlowMatchSchedule(cfg.rollout.generator_shift))
    teacher_role = "real_score" if "real_score" in case.meta["weights"] else "fake_score"
    score_schedule = FlowMatchSchedule(cfg.model.score_network_shift)
    teacher = Denoiser(network(case, teacher_role), score_schedule, uniform_timestep=True)
    critic = Denoiser(network(case, "fake_score").requires_grad_(True), score_schedule, uniform_timestep=True)
    return Models(generator=generator, text=None, teacher=teacher, critic=critic)


def generated(case, latents) -> GeneratorOutput:
    """The generated latents of a loss case with the rollout facts the original's call was given."""
    spec = case.meta["spec"]
    mask = case.io["gradient_mask"].bool() if spec.get("gradient_mask") else None
    return GeneratorOutput(latents, mask, spec["denoised_timestep_from"], spec["denoised_timestep_to"])


class Recording:
    """A denoiser that records the x0 it returns and the context it was given, call by call."""

    def __init__(self, denoiser: Denoiser):
        self.denoiser, self.calls = denoiser, []
        self.model, self.schedule, self.uniform_timestep = denoiser.model, denoiser.schedule, denoiser.uniform_timestep

    def __call__(self, x_t, t, context, **kwargs):
        flow, x0 = self.denoiser(x_t, t, context, **kwargs)
        self.calls.append({"x_t": x_t.detach(), "t": t, "context": context, "flow": flow.detach(), "x0": x0.detach()})
        return flow, x0

    def guidance_halves(self) -> tuple[dict, dict]:
        """The (prompt, negative prompt) halves of the one recorded call that ran both CFG branches at twice the
        batch (the original makes a call for each)."""
        assert len(self.calls) == 1, f"expected one batched CFG call, got {len(self.calls)}"
        return tuple({key: value.chunk(2)[half] for key, value in self.calls[0].items()} for half in (0, 1))


def grads_file(case, key: str) -> dict[str, torch.Tensor]:
    return load_file(str(case.root / case.meta["files"][key]))


def assert_grads(model, expected: dict[str, torch.Tensor], what: str, names=None) -> None:
    scale = max(float(g.abs().max()) for g in expected.values())
    names = list(expected) if names is None else names
    params = dict(model.named_parameters())
    assert set(params) == set(expected), what
    for name in names:
        grad = params[name].grad
        grad = torch.zeros_like(params[name]) if grad is None else grad
        torch.testing.assert_close(grad, expected[name], rtol=RTOL, atol=GRAD_ATOL * scale, msg=f"{what}: {name}")


def assert_loss(actual, expected) -> None:
    torch.testing.assert_close(actual.detach().double().reshape(1), expected.double().reshape(1), rtol=LOSS_RTOL,
                               atol=0)


# ------------------------------------------------------------------------------------------------ the rollout
def run_rollout(golden, mode: str, checkpointing: bool, weights_of=None):
    """The original's training rollout (`inference_with_trajectory`) with its exit steps and noise, then backward
    of the stored objective (or of `weights_of(objective_weights)`). Returns (case, model, latents, replay, calls)
    with calls = [(timestep, grad enabled), ...] of every generator forward."""
    case = golden("train_self_forcing_rollout")
    io, spec = case.io, case.meta["spec"]
    model = network(case, "generator")
    model.set_gradient_checkpointing(checkpointing)
    frames = spec["num_frames"]
    has_grad = io["frame_has_grad"].bool()
    # The loss window: frames from the first one whose exit forward was differentiable (the original: the last 21).
    window = frames - int(has_grad.nonzero()[0])
    cfg = recipe(case, f"kv_cache_grad={mode}", f"num_frame_per_block={spec['num_frame_per_block']}",
                 f"same_step_across_blocks={str(spec['same_step_across_blocks']).lower()}", window=window)
    rollout = SelfForcingRollout(cfg, Denoiser(model, FlowMatchSchedule(cfg.rollout.generator_shift)))
    torch.testing.assert_close(torch.tensor(rollout.steps), io["warped_denoising_step_list"], rtol=0, atol=1e-4)
    replay = Replay(case)
    blocks = frames // spec["num_frame_per_block"]
    plan = rollout.plan_from_draws(blocks, replay.integers(0, len(rollout.steps), (blocks,), "cpu").tolist())
    # `exit_flags` is the original's draw, one per block; with same_step_across_blocks every block takes the first.
    drawn = spec["exit_flags"]
    assert plan.exit_steps == ([drawn[0]] * blocks if spec["same_step_across_blocks"] else drawn)
    for key in ("denoised_timestep_from", "denoised_timestep_to"):
        if case.meta[key] is not None:
            exit_range = rollout.generator.schedule.exit_step_range(rollout.steps, plan.exit_steps[0])
            assert case.meta[key] == exit_range[key.endswith("_to")], key
    with recorded_calls(model, ("forward_cached", "write_cache")) as recorded:
        latents = rollout.generate_frames(io["prompt_embeds"], plan, noise=io["noise"], noise_fn=replay.normal_like)
    calls = [(float(call.args[1].flatten()[0]), call.grad_enabled) for call in recorded]
    weights = io["objective_weights"] if weights_of is None else weights_of(io["objective_weights"])
    (latents * weights).sum().backward()
    return case, model, latents, replay, calls


@pytest.mark.parametrize("checkpointing", [True, False])
def test_rollout_in_original_mode_matches_the_original_gradients(golden, checkpointing):
    case, model, latents, replay, calls = run_rollout(golden, "original", checkpointing)
    io = case.io
    torch.testing.assert_close(latents.detach(), io["output_latents"], rtol=RTOL, atol=RTOL)
    torch.testing.assert_close((latents.detach() * io["objective_weights"]).sum().reshape(1), io["objective"],
                               rtol=1e-5, atol=1e-4)
    # The same forwards at the same timesteps, differentiable exactly where the original's were. The original also
    # runs (and re-noises for) a cache pass after the last block, which nothing reads: that call and draw are all
    # we leave out.
    expected = [(c["timestep"], c["grad_enabled"]) for c in case.meta["calls"]]
    assert [t for t, _ in calls] == pytest.approx([t for t, _ in expected[:-1]], abs=1e-3)
    assert [g for _, g in calls] == [g for _, g in expected[:-1]] and expected[-1] == (0.0, False)
    assert replay.remaining() == 1
    key = "grads" if checkpointing else "grads_no_checkpointing"
    assert_grads(model, grads_file(case, key), f"original mode, checkpointing {checkpointing}")
    without = case.meta["params_without_grad" + ("" if checkpointing else "_no_checkpointing")]
    assert all(p.grad is None or not p.grad.any() for n, p in model.named_parameters() if n in without)


def _downstream_of_every_cached_key(model) -> list[str]:
    """Parameters that act only after the last layer's self-attention keys/values: the head and the last layer's
    query, output projection, cross-attention and FFN. No KV-cache read lies between them and the output."""
    last = f"blocks.{len(model.blocks) - 1}."
    parts = ("self_attn.q.", "self_attn.o.", "self_attn.norm_q.", "cross_attn.", "norm3.", "ffn.")
    return [n for n, _ in model.named_parameters()
            if n.startswith("head.") or (n.startswith(last) and n[len(last):].startswith(parts))]


def test_rollout_in_paper_mode_differs_from_the_original_by_the_kv_cache_path_only(golden):
    case, model, latents, _, _ = run_rollout(golden, "paper", checkpointing=True)
    torch.testing.assert_close(latents.detach(), case.io["output_latents"], rtol=RTOL, atol=RTOL)
    expected = grads_file(case, "grads")
    scale = max(float(g.abs().max()) for g in expected.values())
    # Parameters that no cached key or value depends on get exactly the original's gradients ...
    downstream = _downstream_of_every_cached_key(model)
    assert downstream and all(n.startswith("head.") or n.startswith("blocks.") for n in downstream)
    assert_grads(model, expected, "paper mode, downstream of the cache", downstream)
    # ... the self-attention key/value projections, which the leaked gradient enters, clearly differ.
    for layer in range(len(model.blocks)):
        for proj in ("k", "v"):
            name = f"blocks.{layer}.self_attn.{proj}.weight"
            diff = float((dict(model.named_parameters())[name].grad - expected[name]).abs().max())
            assert diff > 100 * GRAD_ATOL * scale, name


def test_paper_mode_plus_the_kv_cache_path_is_the_original(golden, monkeypatch):
    """Paper mode with one path added by hand: every read of an earlier block's cache slots (holding its clean-context
    keys/values) passes its gradient straight through to that block's exit-step keys/values. That alone turns the
    paper gradients into the original's."""
    from model.kv_cache import KVCache
    exit_writes = {}  # (layer, first slot, end slot) -> the exit-step (k, v) with their graph
    write, past = KVCache.write, KVCache.past

    def recording_write(self, layer, plan, k, v):
        if torch.is_grad_enabled() and k.requires_grad:
            exit_writes[(layer, plan.write_start, plan.write_end)] = (k, v)
        write(self, layer, plan, k, v)

    def straight_through_past(self, layer, plan):
        past_k, past_v = past(self, layer, plan)
        if not torch.is_grad_enabled():
            return past_k, past_v
        dk, dv = torch.zeros_like(past_k), torch.zeros_like(past_v)
        for (written_layer, first, end), (k, v) in exit_writes.items():
            if written_layer == layer and plan.read_start <= first and end <= plan.write_start:
                dk[:, first - plan.read_start:end - plan.read_start] = k - k.detach()
                dv[:, first - plan.read_start:end - plan.read_start] = v - v.detach()
        return past_k + dk, past_v + dv
    monkeypatch.setattr(KVCache, "write", recording_write)
    monkeypatch.setattr(KVCache, "past", straight_through_past)
    case, model, latents, _, _ = run_rollout(golden, "paper", checkpointing=False)
    torch.testing.assert_close(latents.detach(), case.io["output_latents"], rtol=RTOL, atol=RTOL)
    assert exit_writes
    # Prompt K/V are recomputed in differentiable paper-mode calls, as the original does with checkpointing.
    assert_grads(model, grads_file(case, "grads"), "paper mode + the KV-cache path")


def test_rollout_modes_agree_when_no_block_reads_an_earlier_one(golden):
    """The first differentiable block reads no differentiable earlier cache write: an objective on it alone gets
    identical gradients in both modes, so the modes differ by the cache path and nothing else."""
    case = golden("train_self_forcing_rollout")
    start = int(case.io["frame_has_grad"].bool().nonzero()[0])
    end = start + case.meta["spec"]["num_frame_per_block"]

    def first_block_only(weights):
        kept = torch.zeros_like(weights)
        kept[:, start:end] = weights[:, start:end]
        return kept
    _, paper, _, _, _ = run_rollout(golden, "paper", True, first_block_only)
    _, original, _, _, _ = run_rollout(golden, "original", True, first_block_only)
    for (name, a), (_, b) in zip(paper.named_parameters(), original.named_parameters()):
        a, b = (torch.zeros_like(p) if p.grad is None else p.grad for p in (a, b))
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in paper.parameters())


# ------------------------------------------------------------------------------------------------ score losses
def test_dmd_loss_gradient_and_guidance_match_the_original(golden):
    case = golden("train_dmd_loss")
    io = case.io
    models = score_models(case)
    algo = DMD(recipe(case), models)
    algo.draws = replay = Replay(case)
    teacher = algo.models.teacher = Recording(models.teacher)
    critic = algo.models.critic = Recording(models.critic)
    x = io["generated_latents"].clone().requires_grad_(True)
    loss, logs = algo.distribution_matching_loss(generated(case, x), io["prompt_embeds"],
                                                 io["negative_prompt_embeds"])
    loss.backward()
    assert replay.remaining() == 0
    assert len(critic.calls) == case.meta["fake_score_calls"]
    # The original's two teacher calls (prompt, negative prompt) are one call at twice the batch here.
    assert case.meta["real_score_calls"] == 2
    cond, uncond = teacher.guidance_halves()
    torch.testing.assert_close(cond["t"], io["timestep"], rtol=0, atol=1e-4)
    torch.testing.assert_close(uncond["t"], io["timestep"], rtol=0, atol=1e-4)
    torch.testing.assert_close(cond["x_t"], io["noisy_latent"], rtol=RTOL, atol=1e-5)
    assert torch.equal(cond["x_t"], uncond["x_t"])
    # Classifier-free guidance: the conditional pass gets the prompt, the unconditional one the NEGATIVE prompt
    # (each zero-padded to the longer of the two, which the network does anyway).
    for half, prompt in ((cond, io["prompt_embeds"]), (uncond, io["negative_prompt_embeds"])):
        length = prompt.shape[1]
        assert torch.equal(half["context"][:, :length], prompt) and not half["context"][:, length:].any()
    torch.testing.assert_close(cond["x0"], io["pred_real_cond_x0"], rtol=RTOL, atol=RTOL)
    torch.testing.assert_close(uncond["x0"], io["pred_real_uncond_x0"], rtol=RTOL, atol=RTOL)
    torch.testing.assert_close(critic.calls[0]["x0"], io["pred_fake_x0"], rtol=RTOL, atol=RTOL)
    assert_loss(loss, io["loss_f64"])
    scale = float(io["grad_generated_latents"].abs().max())
    torch.testing.assert_close(x.grad, io["grad_generated_latents"], rtol=RTOL, atol=1e-5 * scale)
    assert logs["dmdtrain_gradient_norm"] == pytest.approx(float(io["dmdtrain_gradient_norm"]), rel=1e-4)
    # No score network trains in this step.
    assert all(p.grad is None for p in models.critic.model.parameters())


def test_guidance_formula_on_the_original_predictions(golden):
    """real = cond + g (cond - uncond) with the recipe's g, on the original's own predictions."""
    case = golden("train_dmd_loss")
    io = case.io
    g = recipe(case).distillation.guidance_scale
    cond, uncond = io["pred_real_cond_x0"].double(), io["pred_real_uncond_x0"].double()
    torch.testing.assert_close(cond + g * (cond - uncond), io["pred_real_x0"].double(), rtol=1e-5, atol=1e-5)
    x = io["generated_latents"].double()
    real = io["pred_real_x0"].double()
    grad = (io["pred_fake_x0"].double() - real) / (x - real).abs().mean(dim=tuple(range(1, x.dim())), keepdim=True)
    torch.testing.assert_close(grad.float(), io["dmd_grad"], rtol=1e-4, atol=1e-6)


def test_critic_loss_and_gradients_match_the_original(golden):
    case = golden("train_critic_loss")
    io = case.io
    models = score_models(case)
    algo = DMD(recipe(case), models)
    algo.draws = replay = Replay(case)
    critic = algo.models.critic = Recording(models.critic)
    loss, _ = algo.denoising_loss(generated(case, io["generated_latents"]), io["prompt_embeds"])
    loss.backward()
    assert replay.remaining() == 0
    call, = critic.calls
    torch.testing.assert_close(call["t"], io["critic_timestep"], rtol=0, atol=1e-4)
    torch.testing.assert_close(call["x_t"], io["noisy_generated_latents"], rtol=RTOL, atol=1e-5)
    torch.testing.assert_close(call["flow"], io["pred_fake_flow"], rtol=RTOL, atol=RTOL)
    torch.testing.assert_close(call["x0"], io["pred_fake_x0"], rtol=RTOL, atol=RTOL)
    assert_loss(loss, io["loss"])
    assert_grads(models.critic.model, grads_file(case, "grads"), "critic")


def test_sid_loss_and_gradients_match_the_original(golden):
    case = golden("train_sid_loss")
    io = case.io
    models = score_models(case)
    algo = SiD(recipe(case, "distribution_loss=sid", f"sid_alpha={case.meta['spec']['sid_alpha']}"), models)
    algo.draws = replay = Replay(case)
    x = io["generated_latents"].clone().requires_grad_(True)
    loss, _ = algo.distribution_matching_loss(generated(case, x), io["prompt_embeds"],
                                              io["negative_prompt_embeds"])
    loss.backward()
    assert replay.remaining() == 0
    assert_loss(loss, io["loss_f64"])
    scale = float(io["grad_generated_latents"].abs().max())
    torch.testing.assert_close(x.grad, io["grad_generated_latents"], rtol=RTOL, atol=1e-5 * scale)
    # SiD differentiates through the critic: its parameters get the original's gradients in the generator step
    # (the loop clears them before the critic's own update); the frozen teacher gets none.
    assert_grads(models.critic.model, grads_file(case, "grads"), "SiD critic")
    assert all(p.grad is None for p in models.teacher.model.parameters())


# ------------------------------------------------------------------------------------------------ ODE regression
def test_ode_regression_loss_and_gradients_match_the_original(golden):
    case = golden("train_ode_regression_loss")
    io, spec = case.io, case.meta["spec"]
    steps = [*spec["denoising_step_list"], 0]  # our list names the clean end of the trajectory too
    cfg = recipe(case, "trainer=ode", f"denoising_step_list={steps}".replace(" ", ""),
                 f"warp_denoising_step={str(spec['warp_denoising_step']).lower()}")
    model = network(case, "generator")
    model.set_gradient_checkpointing(spec["gradient_checkpointing"])
    algo = ODERegression(cfg, Models(generator=Denoiser(model, FlowMatchSchedule(cfg.rollout.generator_shift)),
                                     text=None))
    assert algo.steps[:-1] == case.meta["denoising_step_list_used"]
    # The original draws one index per frame and copies the first of each block over the block.
    replay = Replay(case)
    raw = replay.integers(0, len(spec["denoising_step_list"]), tuple(case.meta["rng"][0]["shape"]), "cpu")
    sizes = algo.block_causal.block_sizes(spec["num_frames"])
    starts = torch.tensor([0, *sizes[:-1]]).cumsum(0)
    index = raw[:, starts].repeat_interleave(torch.tensor(sizes), dim=1)
    recorder = Recording(algo.models.generator)
    algo.models.generator = recorder
    loss, _ = algo.regression_loss(io["ode_latent"], io["prompt_embeds"], index=index)
    loss.backward()
    call, = recorder.calls
    torch.testing.assert_close(call["x_t"], io["noisy_input"], rtol=0, atol=0)
    torch.testing.assert_close(call["t"], io["timestep"], rtol=0, atol=1e-4)
    torch.testing.assert_close(call["flow"], io["flow_pred"], rtol=RTOL, atol=RTOL)
    torch.testing.assert_close(call["x0"], io["pred_x0"], rtol=RTOL, atol=RTOL)
    assert_loss(loss, io["loss"])
    assert_grads(model, grads_file(case, "grads"), "ODE regression")
