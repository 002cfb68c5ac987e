"""TAEHV tiny video autoencoder: golden parity, streaming decode, real key layout, bad input."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from model.taehv import TAEHV, TAEHVCodec, load_taehv, read_state_dict, taehv_config_from_state_dict

ATOL = RTOL = 1e-4


def _golden_model(case) -> TAEHV:
    model = TAEHV(**case.meta["model_config"])
    model.load_weights(case.weights(), source=case.meta["weights_file"])
    return model.eval()


@pytest.mark.golden
def test_golden_decode_parallel_and_sequential(golden):
    case = golden("taehv")
    model = _golden_model(case)
    latent, expected = case.io["latent"], case.io["decoded"]
    with torch.no_grad():
        parallel = model.decode_video(latent, parallel=True)
        sequential = model.decode_video(latent, parallel=False)
    assert parallel.shape == expected.shape
    torch.testing.assert_close(parallel, expected, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(sequential, parallel, atol=1e-5, rtol=1e-5)


@pytest.mark.golden
def test_golden_encode(golden):
    case = golden("taehv")
    model = _golden_model(case)
    with torch.no_grad():
        encoded = model.encode_video(case.io["video"])
        sequential = model.encode_video(case.io["video"], parallel=False)
    assert encoded.shape == case.io["encoded"].shape
    torch.testing.assert_close(encoded, case.io["encoded"], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(sequential, encoded, atol=1e-5, rtol=1e-5)


@pytest.mark.golden
def test_golden_config_inferred_from_weights(golden):
    case = golden("taehv")
    weights = case.weights()
    config = taehv_config_from_state_dict(weights)
    assert config["decoder_n_f"] == list(case.meta["model_config"]["decoder_n_f"])
    assert config["encoder_width"] == case.meta["model_config"]["encoder_width"]
    assert config["latent_channels"] == case.meta["model_config"]["latent_channels"]
    TAEHV(**config).load_weights(weights)


@pytest.mark.golden
def test_manifest_real_taew2_1_layout(golden):
    manifest = golden("taehv").json("manifest_taehv.json")
    with torch.device("meta"):
        model = TAEHV()
    shapes = {key: list(t.shape) for key, t in model.state_dict().items()}
    assert shapes == {key: list(shape) for key, shape in manifest["keys"].items()}
    assert sum(p.numel() for p in model.parameters()) == manifest["num_params"]
    assert sum(p.numel() for p in model.decoder.parameters()) == manifest["num_params_decoder"]
    cfg = manifest["config"]
    assert model.latent_channels == cfg["latent_channels"]
    assert model.temporal_upscale == 2 ** sum(cfg["decoder_time_upscale"])
    assert model.spatial_upscale == 2 ** sum(cfg["decoder_space_upscale"])


# --- tiny random model for the rest ---------------------------------------------------------------------

@pytest.fixture
def tiny() -> TAEHV:
    torch.manual_seed(0)
    return TAEHV(decoder_n_f=(8, 8, 4, 4), encoder_width=4, latent_channels=6).eval()


def _latent(model: TAEHV, frames: int, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, frames, model.latent_channels, 2, 3, generator=torch.Generator().manual_seed(1))


def test_codec_frame_counts_and_range(tiny):
    codec = TAEHVCodec(tiny)
    latent = _latent(tiny, 4)
    with torch.no_grad():
        pixels = codec.decode_to_pixel(latent)
        raw = tiny.decode_video(latent)
    assert codec.temporal_factor == 4 and codec.spatial_factor == 8 and codec.latent_channels == 6
    assert pixels.shape == (2, 1 + 4 * 3, 3, 16, 24) and pixels.dtype == torch.float32
    assert pixels.min() >= -1 and pixels.max() <= 1
    torch.testing.assert_close(pixels, (raw[:, 3:] * 2 - 1).clamp(-1, 1))
    video = torch.rand(2, 3, 1 + 4 * 2, 16, 24) * 2 - 1  # the LatentCodec layout [B, 3, T, H, W]
    with torch.no_grad():
        assert codec.encode_to_latent(video).shape == (2, 3, 6, 2, 3)


@pytest.mark.parametrize("blocks", [[3, 3, 3], [1, 3, 2, 3], [2, 1, 1, 4]])
def test_stream_with_carried_memory_equals_whole_decode(tiny, blocks):
    codec = TAEHVCodec(tiny)
    latent = _latent(tiny, sum(blocks))
    with torch.no_grad():
        whole = codec.decode_to_pixel(latent)
    stream = codec.stream_decoder(context_frames=None)
    starts = [sum(blocks[:i]) for i in range(len(blocks))]
    chunks = [stream.decode_chunk(latent[:, s : s + n]) for s, n in zip(starts, blocks)]
    assert [c.shape[1] for c in chunks] == [4 * blocks[0] - 3] + [4 * n for n in blocks[1:]]
    torch.testing.assert_close(torch.cat(chunks, 1), whole, atol=1e-5, rtol=1e-5)
    stream.reset()
    torch.testing.assert_close(stream.decode_chunk(latent[:, : blocks[0]]), chunks[0], atol=1e-6, rtol=0)


@pytest.mark.parametrize("blocks", [[3, 3, 3, 3], [1, 3, 3]])
def test_stream_demo_scheme(tiny, blocks):
    """Demo scheme: frame counts of the whole decode; a later block = the last 4n frames of decoding
    [previous 3 latents | block]."""
    codec = TAEHVCodec(tiny)
    latent = _latent(tiny, sum(blocks))
    stream = codec.stream_decoder()
    starts = [sum(blocks[:i]) for i in range(len(blocks))]
    with torch.no_grad():
        whole = codec.decode_to_pixel(latent)
        chunks = [stream.decode_chunk(latent[:, s : s + n]) for s, n in zip(starts, blocks)]
    assert torch.cat(chunks, 1).shape == whole.shape
    torch.testing.assert_close(chunks[0], whole[:, : chunks[0].shape[1]], atol=1e-6, rtol=0)
    for s, n, chunk in zip(starts[1:], blocks[1:], chunks[1:]):
        context = min(3, s)
        with torch.no_grad():
            window = codec.decode_to_pixel(latent[:, s - context : s + n])
        assert chunk.shape[1] == 4 * n
        torch.testing.assert_close(chunk, window[:, -4 * n :], atol=1e-6, rtol=0)


def test_pth_and_safetensors_loaders_roundtrip(tiny, tmp_path):
    state = tiny.state_dict()
    torch.save(state, tmp_path / "tiny.pth")
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "tiny.safetensors"))
    latent = _latent(tiny, 2)
    with torch.no_grad():
        expected = tiny.decode_video(latent)
        for name in ("tiny.pth", "tiny.safetensors"):
            loaded = load_taehv(tmp_path / name)
            assert loaded.latent_channels == tiny.latent_channels
            torch.testing.assert_close(loaded.decode_video(latent), expected, atol=0, rtol=0)


def test_wrong_channel_count_raises(tiny):
    codec = TAEHVCodec(tiny)
    bad = torch.randn(1, 2, tiny.latent_channels + 1, 2, 3)
    with pytest.raises(ValueError, match="latent"):
        tiny.decode_video(bad)
    with pytest.raises(ValueError, match="latent"):
        codec.decode_to_pixel(bad)
    with pytest.raises(ValueError, match="latent"):
        codec.stream_decoder().decode_chunk(bad)
    with pytest.raises(ValueError, match="video"):
        tiny.encode_video(torch.rand(1, 4, 4, 16, 16))
    with pytest.raises(ValueError, match="pixels"):
        codec.encode_to_latent(torch.rand(1, 5, 1, 16, 16))


def test_unknown_and_misshapen_checkpoint_keys(tiny, tmp_path):
    state = dict(tiny.state_dict())
    state["decoder.99.weight"] = torch.zeros(1)
    path = tmp_path / "bad.safetensors"
    save_file(state, str(path))
    with pytest.raises(KeyError, match=r"decoder\.99\.weight") as err:
        load_taehv(path)
    assert "bad.safetensors" in str(err.value)
    state.pop("decoder.99.weight")
    state["decoder.22.bias"] = torch.zeros(7)
    with pytest.raises(ValueError, match=r"decoder\.22\.bias"):
        tiny.load_weights(state, source="edited")
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        read_state_dict(tmp_path / "missing.pth")
