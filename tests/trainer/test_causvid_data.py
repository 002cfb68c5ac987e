"""The data-trained score-distillation recipes on the real dataset classes: CausVid on ODE-pair shards
(`ODEPairDataset`, items carry `ode_latent` only) and on clean latents (the shapes world's `ShapesBatches`), and i2v
distillation conditioned on the first latent frame of the data."""
from __future__ import annotations

import pytest
import torch

from tests.tiny import recorded_calls, tiny_models, tiny_train_config
from trainer.causvid import CausVid
from trainer.common import clean_latents
from trainer.data import build_data
from trainer.dmd import DMD
from trainer.ode_pairs import OdePairWriter, finalize_index
from trainer.registry import build_algorithm
from utils.config import ConfigError, load_config

STEPS = [1000, 750, 500, 0]  # a step of 0: CausVid may feed a block clean


def write_pairs(folder, clip_shape, num_pairs: int = 4, points: int = 4, seed: int = 0):
    """ODE-pair shards of `num_pairs` random trajectories `[points, *clip_shape]` (the last point is the clip)."""
    g = torch.Generator().manual_seed(seed)
    trajectories = torch.randn(num_pairs, points, *clip_shape, generator=g)
    with OdePairWriter(folder, shard_size=3, timesteps=[1000.0, 750.0, 500.0, 0.0][-points:],
                       dtype=torch.float32) as writer:
        writer.add([f"a red circle {i}" for i in range(num_pairs)], trajectories)
    finalize_index(folder)
    return folder


def train_both_roles(algo, batch, models):
    loss, logs = algo.generator_loss(batch, 0)
    assert torch.isfinite(loss)
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in models.generator.model.parameters())
    models.generator.model.zero_grad(set_to_none=True)
    models.critic.model.zero_grad(set_to_none=True)
    critic_loss, _ = algo.critic_loss(batch, 0)
    critic_loss.backward()
    assert torch.isfinite(critic_loss)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in models.critic.model.parameters())
    assert all(p.grad is None for p in models.generator.model.parameters())
    return logs


@pytest.mark.parametrize("teacher_forcing", [False, True])
def test_causvid_trains_on_ode_pair_shards(tmp_path, teacher_forcing):
    cfg = tiny_train_config(distribution_loss="causvid", denoising_step_list=STEPS, batch_size=2,
                            teacher_forcing=teacher_forcing, ode_data_path=str(tmp_path / "pairs"))
    write_pairs(tmp_path / "pairs", cfg.rollout.image_or_video_shape[1:])
    batch = next(build_data(cfg))
    assert "latents" not in batch and batch["ode_latent"].dim() == 6  # what the shards give
    models = tiny_models(cfg)
    algo = build_algorithm(cfg, models)
    assert isinstance(algo, CausVid)
    clean = batch["ode_latent"][:, -1]
    with recorded_calls(models.generator.model) as calls:
        train_both_roles(algo, batch, models)
    call = calls[0]  # the generator step's single block-causal forward
    x, t = call.args[:2]
    # Frames at timestep 0 are the clip itself, the others a noised version of it.
    at_zero = t == 0
    assert at_zero.any() and not at_zero.all(), "seeded draws give both clean and noisy blocks"
    torch.testing.assert_close(x[at_zero], clean[at_zero], rtol=0, atol=0)
    assert not torch.allclose(x[~at_zero], clean[~at_zero])
    if teacher_forcing:
        assert call.mode == "forward_teacher_forcing"
        torch.testing.assert_close(call.args[3], clean, rtol=0, atol=0)  # clean_x
    else:
        assert call.mode == "forward" and call.kwargs["block_causal"] is not None


def test_causvid_trains_on_clean_latents_of_the_shapes_world():
    from shapes.components import ShapesBatches
    channels = 12  # the shapes codec's latent channels at spatial factor 2
    cfg = tiny_train_config(distribution_loss="causvid", denoising_step_list=STEPS, teacher_forcing=True, batch_size=2,
                            world="shapes", codec_spatial_factor=2, height=8, width=12,
                            image_or_video_shape=[2, 6, channels, 4, 6])
    data = ShapesBatches(cfg, device="cpu")
    batch = next(data)
    assert set(batch) == {"prompts", "latents"} and batch["latents"].shape == (2, 6, channels, 4, 6)
    models = tiny_models(cfg, in_dim=channels, out_dim=channels)
    algo = CausVid(cfg, models)
    with recorded_calls(models.generator.model) as calls:
        train_both_roles(algo, batch, models)
    assert calls[0].mode == "forward_teacher_forcing"
    torch.testing.assert_close(calls[0].args[3], batch["latents"], rtol=0, atol=0)  # clean_x


def test_clean_latents_of_a_batch():
    g = torch.Generator().manual_seed(0)
    latents, trajectory = torch.randn(2, 6, 4, 4, 6, generator=g), torch.randn(2, 3, 6, 4, 6, 4, generator=g)
    assert clean_latents({"latents": latents, "ode_latent": trajectory}, "x") is latents
    torch.testing.assert_close(clean_latents({"ode_latent": trajectory}, "x"), trajectory[:, -1])
    with pytest.raises(KeyError, match="CausVid trains on data.*'latents'.*'ode_latent'.*prompts"):
        clean_latents({"prompts": ["a"]}, "CausVid")
    with pytest.raises(ValueError, match=r"ode_latent'\] must be \[B, K, F, C, H, W\]"):
        clean_latents({"ode_latent": latents}, "x")


# ----------------------------------------------------------------------------------------------------------- i2v
def i2v_config(tmp_path, **overrides):
    # One given frame, then 3 generated blocks of 2 frames: a 7-frame window.
    settings = dict(i2v=True, independent_first_frame=True, image_or_video_shape=[1, 7, 4, 4, 6],
                    num_training_frames=7, batch_size=2, ode_data_path=str(tmp_path / "pairs"))
    settings.update(overrides)
    cfg = tiny_train_config(**settings)
    write_pairs(tmp_path / "pairs", cfg.rollout.image_or_video_shape[1:])
    return cfg


@pytest.mark.parametrize("loss", ["dmd", "sid"])
def test_i2v_distillation_starts_every_rollout_from_the_first_data_frame(tmp_path, loss):
    cfg = i2v_config(tmp_path, distribution_loss=loss)
    batch = next(build_data(cfg))  # i2v needs data: the ODE-pair shards, not the prompt file
    assert "ode_latent" in batch
    image = batch["ode_latent"][:, -1][:, 0:1]
    models = tiny_models(cfg)
    algo = build_algorithm(cfg, models)
    seen = {}
    rollout = algo.rollout

    def recording_rollout(context, **kwargs):
        out = rollout(context, **kwargs)
        seen.setdefault("initial_latent", kwargs["initial_latent"])
        seen.setdefault("latents", out.latents)
        return out
    algo.rollout = recording_rollout
    with recorded_calls(models.generator.model) as calls:
        train_both_roles(algo, batch, models)
    torch.testing.assert_close(seen["initial_latent"], image, rtol=0, atol=0)
    # The first call primes the cache with the image at t = 0; the window starts with the image itself.
    x, t = calls[0].args[:2]
    torch.testing.assert_close(x, image, rtol=0, atol=0)
    assert calls[0].mode == "write_cache" and not t.any()
    torch.testing.assert_close(seen["latents"][:, :1], image, rtol=0, atol=0)
    assert seen["latents"].shape == (2, 7, 4, 4, 6)


def test_text_to_video_ignores_the_data_and_i2v_changes_the_samples(tmp_path):
    cfg = i2v_config(tmp_path)
    batch = next(build_data(cfg))
    context = tiny_models(cfg).text(batch["prompts"])
    outputs = {}
    for i2v in (True, False):
        cfg.data.i2v = i2v
        algo = DMD(cfg, tiny_models(cfg))
        torch.manual_seed(0)
        with torch.no_grad():
            outputs[i2v] = algo.generate(batch, context).latents
    image = batch["ode_latent"][:, -1][:, :1]
    assert torch.equal(outputs[True][:, :1], image) and not torch.allclose(outputs[False][:, :1], image)
    assert not torch.allclose(outputs[True][:, 1:], outputs[False][:, 1:])


def test_i2v_causvid_feeds_the_first_frame_clean(tmp_path):
    cfg = i2v_config(tmp_path, distribution_loss="causvid", independent_first_frame=False,
                     image_or_video_shape=[1, 6, 4, 4, 6], num_training_frames=6)
    batch = next(build_data(cfg))
    models = tiny_models(cfg)
    with recorded_calls(models.generator.model) as calls, torch.no_grad():
        out = CausVid(cfg, models).generate(batch, models.text(batch["prompts"]))
    clean = batch["ode_latent"][:, -1]
    x, t = calls[0].args[:2]
    torch.testing.assert_close(x[:, 0], clean[:, 0], rtol=0, atol=0)
    assert not t[:, 0].any() and t[:, 1:].all()
    torch.testing.assert_close(out.latents[:, 0], clean[:, 0], rtol=0, atol=0)


def test_i2v_and_raw_video_settings_are_checked(tmp_path):
    with pytest.raises(ConfigError, match="data.i2v = true needs rollout.independent_first_frame = true"):
        load_config(None, ["i2v=true"])
    with pytest.raises(ConfigError, match="data.i2v = true needs rollout.independent_first_frame"):
        load_config(None, ["i2v=true", "trainer=gan"])
    assert load_config(None, ["i2v=true", "distribution_loss=causvid"]).data.i2v  # no rollout: no block layout to fit
    with pytest.raises(ConfigError, match="load_raw_video = true is not supported.*ode_data_path"):
        load_config(None, ["load_raw_video=true"])
    cfg = load_config(None, ["i2v=true", "independent_first_frame=true", f"data_path={tmp_path / 'prompts.txt'}"])
    with pytest.raises(ValueError, match="ode_data_path"):  # a prompt file has no first frames
        build_data(cfg)
