"""benchmarks/ablation_position.py: the coordinate-channel codec and the two variants it compares."""
from __future__ import annotations

import torch

from shapes import render, sample_scenes, world
from tests.entry.test_speed_benchmark import benchmark_module


def test_coordinate_codec_adds_readable_positions_and_decodes_back():
    ablation = benchmark_module("ablation_position")
    _, plain, _ = ablation.build("rope", 32, 1)
    _, codec, net = ablation.build("coords_noised", 32, 1)
    assert codec.latent_channels == plain.latent_channels + 2 == net.config.in_dim == net.config.out_dim
    video = render(sample_scenes(2, torch.Generator().manual_seed(0)), 1, 32, 32)
    latent = codec.encode_to_latent(video)
    torch.testing.assert_close(latent[:, :, :-2], plain.encode_to_latent(video))
    x, y = latent[0, 0, -2], latent[0, 0, -1]
    assert x[0, 0] == -1 and x[0, -1] == 1 and y[0, 0] == -1 and y[-1, 0] == 1  # x along width, y along height
    assert torch.equal(x, x[:1].expand_as(x)) and torch.equal(y, y[:, :1].expand_as(y))
    torch.testing.assert_close(codec.decode_to_pixel(latent), plain.decode_to_pixel(plain.encode_to_latent(video)))


def test_clean_coordinates_reach_the_network_beside_the_noisy_latent():
    ablation = benchmark_module("ablation_position")
    _, codec, net = ablation.build("coords", 32, 1)
    channels = codec.latent_channels
    assert net.config.in_dim == channels + 2
    seen = []
    net.net.patch_embedding.register_forward_hook(lambda module, args, out: seen.append(args[0]))
    x = torch.randn(2, 1, channels, 16, 16)
    out = net(x, torch.full((2,), 900.0), torch.zeros(2, 32, 64))
    assert out.shape == x.shape
    fed = seen[0]  # the patch embedding's input, [B, C + 2, F, h, w]
    torch.testing.assert_close(fed[:, :channels].transpose(1, 2), x)
    torch.testing.assert_close(fed[:, channels:].transpose(1, 2), ablation.coordinates(x))


def test_a_short_run_probes_every_attribute_and_restores_the_world(monkeypatch):
    ablation = benchmark_module("ablation_position")
    monkeypatch.setattr(world, "START_MARGIN", 0.3)
    result = ablation.run("coords", 1.0, dim=32, layers=1, num_scenes=4)
    assert world.START_MARGIN == 0.3
    assert result["variant"] == "coords" and result["steps"] >= 1 and result["frames"] == 1
    assert result["device"] == "cpu" and set(result["by_timestep"]) == {"1000", "900", "700", "500"}
    changes = result["by_timestep"]["1000"]["prompt_change"]  # pure noise in: the prompt's mean clip out
    assert set(changes) == {"direction", "speed", "colour", "shape", "size"}
    assert all(v["prediction_change"] >= 0 for v in changes.values())
