"""The self-forcing training rollout (trainer/self_forcing.py, docs/method.md): shared random plan, gradient truncation,
loss window and gradient mask, and the KV-cache gradient modes (docs/original.md)."""
from __future__ import annotations

import pytest
import torch

from model.pixel_codec import PixelShuffleCodec
from tests.tiny import assert_window_gradients, recorded_calls, tiny_models, tiny_train_config
from trainer.self_forcing import RolloutPlan, SelfForcingRollout, rollout_steps

CODEC_CHANNELS = PixelShuffleCodec(spatial_factor=2).latent_channels


def _context(models, batch=2):
    return models.text([f"prompt {i}" for i in range(batch)])


def test_steps_are_warped_and_the_trailing_zero_dropped():
    cfg = tiny_train_config(denoising_step_list=[1000, 750, 500, 250, 0])
    models = tiny_models(cfg, teacher=False, critic=False)
    steps = rollout_steps(cfg, models.generator.schedule)
    assert steps == pytest.approx([1000.0, 937.5, 833.3333, 625.0], abs=1e-3)
    assert rollout_steps(cfg, models.generator.schedule, drop_final_zero=False)[-1] == 0.0


def test_plans_are_identical_for_identical_seeds_and_follow_the_config():
    cfg = tiny_train_config(num_training_frames=12, same_step_across_blocks=False)
    models = tiny_models(cfg, teacher=False, critic=False)
    a = SelfForcingRollout(cfg, models.generator)
    b = SelfForcingRollout(cfg, models.generator)
    plans_a = [a.sample_plan() for _ in range(20)]
    assert [b.sample_plan() for _ in range(20)] == plans_a  # two ranks, same seed: same plans
    g = torch.Generator().manual_seed(cfg.seed)  # an explicit generator seeded alike gives them too
    assert [b.sample_plan(g) for _ in range(20)] == plans_a
    b.seed(cfg.seed + 1)
    assert [b.sample_plan() for _ in range(20)] != plans_a
    # 3..6 blocks of 2 frames between the window (6) and num_training_frames (12); exit steps vary per block.
    assert {p.num_blocks for p in plans_a} <= {3, 4, 5, 6} and len({p.num_blocks for p in plans_a}) > 1
    assert all(len(p.exit_steps) == p.num_blocks and all(0 <= e < 4 for e in p.exit_steps) for p in plans_a)
    assert any(len(set(p.exit_steps)) > 1 for p in plans_a)
    # The shared generator's state can be saved and restored (exact resume).
    state = a.get_state()
    nxt = a.sample_plan()
    a.set_state(state)
    assert a.sample_plan() == nxt


@pytest.mark.parametrize("overrides, expect", [(dict(same_step_across_blocks=True), "same"),
                                               (dict(last_step_only=True), "last")])
def test_exit_step_options(overrides, expect):
    cfg = tiny_train_config(**overrides)
    models = tiny_models(cfg, teacher=False, critic=False)
    plans = [SelfForcingRollout(cfg, models.generator).sample_plan(torch.Generator().manual_seed(s)) for s in range(8)]
    for p in plans:
        assert p.num_blocks == 3  # default: always num_training_frames / num_frame_per_block
        assert len(set(p.exit_steps)) == 1
        if expect == "last":
            assert p.exit_steps == [3, 3, 3]
    if expect == "same":
        assert len({p.exit_steps[0] for p in plans}) > 1


def test_output_shapes_timestep_range_and_no_mask_by_default():
    cfg = tiny_train_config()
    models = tiny_models(cfg, teacher=False, critic=False)
    rollout = SelfForcingRollout(cfg, models.generator)
    out = rollout(_context(models), plan=RolloutPlan(3, [1, 1, 1]))
    assert out.latents.shape == (2, 6, 4, 4, 6) and out.latents.requires_grad
    assert out.gradient_mask is None and out.num_frames == 6
    assert (out.denoised_timestep_from, out.denoised_timestep_to) == (750, 500)  # docs/method.md, rollout (exit 1)
    assert rollout(_context(models), plan=RolloutPlan(3, [3, 3, 3])).denoised_timestep_to == 0
    with torch.no_grad():
        assert not rollout(_context(models), plan=RolloutPlan(3, [0, 0, 0])).latents.requires_grad


def test_gradients_only_from_exit_steps_inside_the_loss_window():
    # Window 6 frames, 10 generated (5 blocks of 2): grad_from_frame = 4, so blocks at frames 0 and 2 carry no graph.
    cfg = tiny_train_config(num_training_frames=10, image_or_video_shape=[1, 6, CODEC_CHANNELS, 4, 6])
    models = tiny_models(cfg, teacher=False, critic=False, codec=PixelShuffleCodec(spatial_factor=2),
                         in_dim=CODEC_CHANNELS, out_dim=CODEC_CHANNELS)
    rollout = SelfForcingRollout(cfg, models.generator, codec=models.codec)
    exits = [2, 0, 1, 3, 2]
    with recorded_calls(models.generator.model) as recorded:
        out = rollout(_context(models), plan=RolloutPlan(5, exits))
    calls = [(call.args[4], call.grad_enabled) for call in recorded]  # (start frame, gradients on)
    assert {call.mode for call in recorded} == {"forward_cached", "write_cache"}
    with_grad = [frame for frame, grad in calls if grad]
    assert with_grad == [4, 6, 8]  # exactly one differentiable forward per block in the window: its exit step
    # (exit + 1) denoising calls per block plus a cache pass for every block but the last.
    assert len(calls) == sum(e + 1 for e in exits) + len(exits) - 1
    assert out.num_frames == 10 and out.latents.shape == (2, 6, CODEC_CHANNELS, 4, 6)
    # Longer than the window: the first block's frames of the window are masked out of the loss, and the
    # re-encoded first frame comes from blocks outside the window: no path back to the generator.
    assert_window_gradients(out, models.generator.model, masked_frames=2)


def test_longer_rollouts_need_a_codec_and_bad_lengths_are_errors():
    cfg = tiny_train_config(num_training_frames=8)
    models = tiny_models(cfg, teacher=False, critic=False)
    with pytest.raises(NotImplementedError, match="codec"):
        SelfForcingRollout(cfg, models.generator)(_context(models), plan=RolloutPlan(4, [0] * 4))
    with pytest.raises(ValueError, match="num_training_frames"):
        SelfForcingRollout(tiny_train_config(num_training_frames=4), models.generator)
    with pytest.raises(ValueError, match="num_frame_per_block"):
        SelfForcingRollout(tiny_train_config(num_training_frames=7), models.generator)
    with pytest.raises(ValueError, match="kv_cache_grad"):
        SelfForcingRollout(tiny_train_config(kv_cache_grad="leaky"), models.generator)


def _rollout_grads(mode: str, checkpointing: bool, exits=(1, 2, 1)):
    cfg = tiny_train_config(kv_cache_grad=mode)
    models = tiny_models(cfg, teacher=False, critic=False)
    model = models.generator.model
    model.set_gradient_checkpointing(checkpointing)
    rollout = SelfForcingRollout(cfg, models.generator)
    torch.manual_seed(123)  # identical noise in every run
    out = rollout(_context(models), plan=RolloutPlan(3, list(exits)))
    weights = torch.randn(out.latents.shape, generator=torch.Generator().manual_seed(7))
    (out.latents * weights).sum().backward()
    grads = {n: torch.zeros_like(p) if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
    return out.latents.detach(), grads, model


def test_paper_mode_gradients_do_not_depend_on_checkpointing():
    x_plain, g_plain, _ = _rollout_grads("paper", checkpointing=False)
    x_ckpt, g_ckpt, _ = _rollout_grads("paper", checkpointing=True)
    torch.testing.assert_close(x_plain, x_ckpt, rtol=0, atol=0)
    for name in g_plain:
        torch.testing.assert_close(g_plain[name], g_ckpt[name], rtol=1e-5, atol=1e-7, msg=name)


def test_original_mode_same_outputs_but_gradients_leak_through_the_cache():
    x_paper, g_paper, _ = _rollout_grads("paper", checkpointing=True)
    x_orig, g_orig, model = _rollout_grads("original", checkpointing=True)
    torch.testing.assert_close(x_paper, x_orig, rtol=0, atol=0)
    # Without checkpointing the original reads the prompt's K/V from the cache filled by the first call, which was
    # not differentiable here (block 0 exits at step 1): the text embedding gets no gradient at all.
    x_plain, g_plain, _ = _rollout_grads("original", checkpointing=False)
    torch.testing.assert_close(x_plain, x_orig, rtol=0, atol=0)
    assert not g_plain["text_embedding.0.weight"].any() and g_orig["text_embedding.0.weight"].abs().sum() > 0

    def rel(name):
        return float((g_paper[name] - g_orig[name]).norm() / g_paper[name].norm())

    # The leak enters earlier blocks at their self-attention K/V projections: everything after them is unchanged ...
    last = len(model.blocks) - 1
    for name in ("head.head.weight", f"blocks.{last}.ffn.2.weight", f"blocks.{last}.cross_attn.q.weight"):
        torch.testing.assert_close(g_paper[name], g_orig[name], rtol=1e-5, atol=1e-7, msg=name)
    # ... while the K/V projections' gradients differ clearly.
    for layer in range(len(model.blocks)):
        assert rel(f"blocks.{layer}.self_attn.k.weight") > 1e-3
        assert rel(f"blocks.{layer}.self_attn.v.weight") > 1e-3
