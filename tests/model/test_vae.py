"""Wan2.1 VAE adapter: key conversion, config derivation, golden parity, streaming decode, loaders, bad input."""
from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKLWan
from safetensors.torch import save_file

from model.vae import (
    WAN21_VAE_CONFIG,
    LatentCodec,
    StreamDecoder,
    WanVAE,
    convert_wan_vae_state_dict,
    load_converted_state_dict,
    wan_vae_config_from_state_dict,
)

ATOL = 1e-4
STREAM_ATOL = 1e-5


def _to_vae_layout(x: torch.Tensor) -> torch.Tensor:
    """[B, F, C, H, W] <-> [B, C, F, H, W] (the permutation is its own inverse)."""
    return x.permute(0, 2, 1, 3, 4)


def _stats(case) -> tuple[list[float], list[float]]:
    norm = case.meta.get("latent_normalization") or case.json("wan_vae_latent_stats.json")
    return norm["mean"], norm["std"]


def _config_from_reference(ref: dict) -> dict:
    """The reference `_video_vae` kwargs expressed as AutoencoderKLWan kwargs."""
    return {
        "base_dim": ref["dim"],
        "z_dim": ref["z_dim"],
        "dim_mult": list(ref["dim_mult"]),
        "num_res_blocks": ref["num_res_blocks"],
        "attn_scales": list(ref["attn_scales"]),
        "temperal_downsample": list(ref["temperal_downsample"]),
        "dropout": ref["dropout"],
    }


@pytest.fixture(scope="module")
def vae_case():
    from tests.conftest import GoldenCase

    case = GoldenCase("wan_vae")
    sd = case.weights()
    vae = AutoencoderKLWan(**wan_vae_config_from_state_dict(sd))
    load_converted_state_dict(vae, convert_wan_vae_state_dict(sd), "wan_vae.weights.safetensors")
    mean, std = _stats(case)
    return case, WanVAE(vae.eval(), latents_mean=mean, latents_std=std)


@pytest.mark.golden
def test_config_derived_from_shapes(vae_case):
    case, _ = vae_case
    derived = wan_vae_config_from_state_dict(case.weights())
    for key, value in _config_from_reference(case.meta["model_config"]).items():
        assert derived[key] == value, key
    assert derived["decoder_base_dim"] is None


@pytest.mark.golden
def test_encode_matches_reference(vae_case):
    case, codec = vae_case
    video = case.io["video"]
    with torch.no_grad():
        latent = codec.encode_to_latent(video)
        mu = codec.vae.encode(video).latent_dist.mean
    expected = case.io["latent_mean_normalized"]
    assert latent.shape == _to_vae_layout(expected).shape
    torch.testing.assert_close(_to_vae_layout(latent), expected, atol=ATOL, rtol=ATOL)
    torch.testing.assert_close(mu, case.io["latent_mean_raw"], atol=ATOL, rtol=ATOL)
    # Factors of the codec interface agree with the fixture's pixel/latent shapes.
    f, t = expected.shape[2], video.shape[2]
    assert t == 1 + codec.temporal_factor * (f - 1)
    assert video.shape[-1] == codec.spatial_factor * expected.shape[-1]
    assert codec.latent_channels == expected.shape[1]


@pytest.mark.golden
def test_decode_matches_reference(vae_case):
    case, codec = vae_case
    latent = _to_vae_layout(case.io["latent_to_decode"])
    expected_raw = case.io["decoded_video_raw"]
    with torch.no_grad():
        raw = codec.decode_to_pixel(latent, clamp=False)
        pixels = codec.decode_to_pixel(latent)
    assert raw.shape == _to_vae_layout(expected_raw).shape
    torch.testing.assert_close(_to_vae_layout(raw), expected_raw, atol=ATOL, rtol=ATOL)
    torch.testing.assert_close(pixels, _to_vae_layout(expected_raw).clamp(-1, 1), atol=ATOL, rtol=ATOL)
    assert pixels.abs().max() <= 1.0
    assert raw.abs().max() > 1.0 or torch.equal(raw, pixels)


def _chunkings(num_frames: int) -> list[list[int]]:
    out = [[1, num_frames - 1], [1] * num_frames]
    for size in (2, 3):
        out.append([min(size, num_frames - s) for s in range(0, num_frames, size)])
    return [[c for c in sizes if c > 0] for sizes in out]


@pytest.mark.golden
@pytest.mark.parametrize("clamp", [False, True])
def test_streaming_decode_equals_full_decode(vae_case, clamp):
    case, codec = vae_case
    latent = _to_vae_layout(case.io["latent_to_decode"])
    num_frames = latent.shape[1]
    assert num_frames >= 2, "the fixture must have several latent frames to test streaming"
    stream = codec.stream_decoder(clamp=clamp)
    assert isinstance(stream, StreamDecoder)
    with torch.no_grad():
        full = codec.decode_to_pixel(latent, clamp=clamp)
        for sizes in _chunkings(num_frames):
            stream.reset()
            parts, start = [], 0
            for size in sizes:
                part = stream.decode_chunk(latent[:, start : start + size])
                expected_t = size * codec.temporal_factor - (codec.temporal_factor - 1 if start == 0 else 0)
                assert part.shape[1] == expected_t, sizes
                parts.append(part)
                start += size
            torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=STREAM_ATOL, rtol=0, msg=str(sizes))
        # An encode between chunks must not disturb the stream's cache.
        stream.reset()
        first = stream.decode_chunk(latent[:, :1])
        codec.encode_to_latent(case.io["video"])
        rest = stream.decode_chunk(latent[:, 1:])
    torch.testing.assert_close(torch.cat([first, rest], dim=1), full, atol=STREAM_ATOL, rtol=0)


@pytest.mark.golden
@pytest.mark.parametrize("frames_per_call", [2, 3, 8])
def test_several_frames_per_decoder_call_equal_the_reference_loop(vae_case, frames_per_call):
    """The reference decodes one latent frame per decoder call; several at once give the same frames (the first frame
    still passes alone), whatever the chunking of the stream."""
    case, codec = vae_case
    latent = _to_vae_layout(case.io["latent_to_decode"])
    calls = []
    hook = codec.vae.decoder.register_forward_pre_hook(lambda _, args, kwargs: calls.append(args[0].shape[2]),
                                                       with_kwargs=True)
    try:
        with torch.no_grad():
            reference = codec.stream_decoder(clamp=False, frames_per_call=1).decode_chunk(latent)
            assert calls == [1] * latent.shape[1]
            calls.clear()
            out = codec.stream_decoder(clamp=False, frames_per_call=frames_per_call).decode_chunk(latent)
    finally:
        hook.remove()
    rest = latent.shape[1] - 1
    full, tail = divmod(rest, frames_per_call)
    assert calls == [1] + [frames_per_call] * full + ([tail] if tail else [])
    torch.testing.assert_close(out, reference, atol=STREAM_ATOL, rtol=0)
    with pytest.raises(ValueError, match="frames_per_call"):
        codec.stream_decoder(frames_per_call=0)


@pytest.mark.golden
def test_batch_of_two_matches_single_samples(vae_case):
    case, codec = vae_case
    latent = _to_vae_layout(case.io["latent_to_decode"])
    batch = torch.cat([latent, 0.5 * latent.flip(-1)], dim=0)
    video = case.io["video"]
    videos = torch.cat([video, -video.flip(-2)], dim=0)
    with torch.no_grad():
        dec = codec.decode_to_pixel(batch, clamp=False)
        stream = codec.stream_decoder(clamp=False)
        streamed = torch.cat([stream.decode_chunk(batch[:, :1]), stream.decode_chunk(batch[:, 1:])], dim=1)
        enc = codec.encode_to_latent(videos)
        for i in range(2):
            single = codec.decode_to_pixel(batch[i : i + 1], clamp=False)
            torch.testing.assert_close(dec[i : i + 1], single, atol=STREAM_ATOL, rtol=0)
            torch.testing.assert_close(
                enc[i : i + 1], codec.encode_to_latent(videos[i : i + 1]), atol=STREAM_ATOL, rtol=0
            )
    torch.testing.assert_close(streamed, dec, atol=STREAM_ATOL, rtol=0)


@pytest.mark.golden
def test_codec_protocol(vae_case):
    _, codec = vae_case
    assert isinstance(codec, LatentCodec)
    assert isinstance(codec.stream_decoder(), StreamDecoder)


@pytest.mark.golden
def test_from_wan_checkpoint_pth_and_safetensors(vae_case, tmp_path):
    case, codec = vae_case
    sd = case.weights()
    torch.save(sd, tmp_path / "Wan2.1_VAE.pth")
    save_file(sd, str(tmp_path / "vae_original.safetensors"))
    mean, std = _stats(case)
    latent = _to_vae_layout(case.io["latent_to_decode"])
    with torch.no_grad():
        expected = codec.decode_to_pixel(latent)
        for name in ("Wan2.1_VAE.pth", "vae_original.safetensors"):
            loaded = WanVAE.from_wan_checkpoint(tmp_path / name, latents_mean=mean, latents_std=std)
            assert not any(p.is_meta for p in loaded.parameters())
            torch.testing.assert_close(loaded.decode_to_pixel(latent), expected, atol=0, rtol=0)


@pytest.mark.golden
def test_from_diffusers_folder(vae_case, tmp_path):
    case, codec = vae_case
    codec.vae.save_pretrained(str(tmp_path / "vae"))
    loaded = WanVAE.from_diffusers_folder(tmp_path)  # a model folder holding vae/
    video = case.io["video"]
    with torch.no_grad():
        mu = loaded.vae.encode(video).latent_dist.mean
        torch.testing.assert_close(mu, codec.vae.encode(video).latent_dist.mean, atol=0, rtol=0)
    torch.testing.assert_close(loaded.latents_mean, torch.tensor(codec.vae.config.latents_mean))
    with pytest.raises(FileNotFoundError, match="config.json"):
        WanVAE.from_diffusers_folder(tmp_path / "nowhere")


@pytest.mark.golden
def test_manifest_keys_convert_to_real_diffusers_model(golden):
    manifest = golden("wan_vae").json("manifest_wan2.1_vae.json")
    original = {k: torch.empty(shape, device="meta") for k, shape in manifest["keys"].items()}
    assert len(original) == manifest["num_tensors"]
    derived = wan_vae_config_from_state_dict(original, "manifest")
    assert derived == WAN21_VAE_CONFIG
    for key, value in _config_from_reference(manifest["config"]).items():
        assert WAN21_VAE_CONFIG[key] == value, key
    with torch.device("meta"):
        model = AutoencoderKLWan(**WAN21_VAE_CONFIG)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    converted = {k: tuple(v.shape) for k, v in convert_wan_vae_state_dict(original).items()}
    assert converted == expected
    assert sum(v.numel() for v in model.parameters()) == manifest["num_params"]


@pytest.mark.golden
def test_bad_shapes_raise_value_error(vae_case):
    case, codec = vae_case
    latent = _to_vae_layout(case.io["latent_to_decode"])
    video = case.io["video"]
    c = codec.latent_channels
    with pytest.raises(ValueError, match=rf"\[B, F>=1, {c}, h, w\]"):
        codec.decode_to_pixel(case.io["latent_to_decode"][:, :, :2])  # [B, C, F, h, w] with F != C
    with pytest.raises(ValueError, match=rf"\[B, F>=1, {c}, h, w\]"):
        codec.decode_to_pixel(latent[0])
    with pytest.raises(ValueError, match=r"\[B, 3, T=1\+"):
        codec.encode_to_latent(video[:, :2])
    with pytest.raises(ValueError, match=r"\[B, 3, T=1\+"):
        codec.encode_to_latent(video[0])
    with pytest.raises(ValueError, match=r"T=1\+"):
        codec.encode_to_latent(video[:, :, :2])
    stream = codec.stream_decoder()
    with torch.no_grad():
        stream.decode_chunk(latent[:, :1])
        with pytest.raises(ValueError, match="reset"):
            stream.decode_chunk(latent[:, 1:, :, :-1])


@pytest.mark.golden
def test_bad_checkpoints_name_the_key(vae_case, tmp_path):
    case, _ = vae_case
    sd = case.weights()
    with pytest.raises(KeyError, match="encoder.downsamples.0.residual.9.weight"):
        convert_wan_vae_state_dict({**sd, "encoder.downsamples.0.residual.9.weight": torch.zeros(1)})
    save_file({**sd, "decoder.extra_thing.weight": torch.zeros(1)}, str(tmp_path / "extra.safetensors"))
    with pytest.raises(KeyError, match=r"extra\.safetensors.*decoder\.extra_thing\.weight"):
        WanVAE.from_wan_checkpoint(tmp_path / "extra.safetensors")
    missing = dict(sd)
    del missing["decoder.head.0.gamma"]
    with pytest.raises(KeyError, match="decoder.norm_out.gamma"):
        WanVAE.from_state_dict(missing)
    with pytest.raises(KeyError, match="encoder.conv1.weight"):
        wan_vae_config_from_state_dict({k: v for k, v in sd.items() if k != "encoder.conv1.weight"})
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        WanVAE.from_wan_checkpoint(tmp_path / "missing.pth")


def _reference_layout(dim, z_dim, dim_mult, num_res_blocks, temperal_downsample) -> dict[str, tuple]:
    """Original-key shapes of the reference `WanVAE_` (wan/modules/vae.py) for any sizes, no attn_scales."""
    keys: dict[str, tuple] = {}

    def res(prefix, cin, cout):
        keys.update({f"{prefix}.residual.0.gamma": (cin, 1, 1, 1), f"{prefix}.residual.2.weight": (cout, cin, 3, 3, 3),
                     f"{prefix}.residual.2.bias": (cout,), f"{prefix}.residual.3.gamma": (cout, 1, 1, 1),
                     f"{prefix}.residual.6.weight": (cout, cout, 3, 3, 3), f"{prefix}.residual.6.bias": (cout,)})
        if cin != cout:
            keys.update({f"{prefix}.shortcut.weight": (cout, cin, 1, 1, 1), f"{prefix}.shortcut.bias": (cout,)})

    def middle(side, width):
        res(f"{side}.middle.0", width, width)
        attn = f"{side}.middle.1"
        keys.update({f"{attn}.norm.gamma": (width, 1, 1), f"{attn}.to_qkv.weight": (3 * width, width, 1, 1),
                     f"{attn}.to_qkv.bias": (3 * width,), f"{attn}.proj.weight": (width, width, 1, 1),
                     f"{attn}.proj.bias": (width,)})
        res(f"{side}.middle.2", width, width)

    def head(side, width, cout):
        keys.update({f"{side}.head.0.gamma": (width, 1, 1, 1), f"{side}.head.2.weight": (cout, width, 3, 3, 3),
                     f"{side}.head.2.bias": (cout,)})

    dims = [dim * u for u in [1] + dim_mult]
    keys.update({"encoder.conv1.weight": (dims[0], 3, 3, 3, 3), "encoder.conv1.bias": (dims[0],)})
    n = 0
    for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
        for _ in range(num_res_blocks):
            res(f"encoder.downsamples.{n}", cin, cout)
            cin, n = cout, n + 1
        if i != len(dim_mult) - 1:
            keys.update({f"encoder.downsamples.{n}.resample.1.weight": (cout, cout, 3, 3),
                         f"encoder.downsamples.{n}.resample.1.bias": (cout,)})
            if temperal_downsample[i]:
                keys.update({f"encoder.downsamples.{n}.time_conv.weight": (cout, cout, 3, 1, 1),
                             f"encoder.downsamples.{n}.time_conv.bias": (cout,)})
            n += 1
    middle("encoder", dims[-1])
    head("encoder", dims[-1], 2 * z_dim)
    keys.update({"conv1.weight": (2 * z_dim, 2 * z_dim, 1, 1, 1), "conv1.bias": (2 * z_dim,),
                 "conv2.weight": (z_dim, z_dim, 1, 1, 1), "conv2.bias": (z_dim,)})
    dims = [dim * u for u in [dim_mult[-1]] + dim_mult[::-1]]
    keys.update({"decoder.conv1.weight": (dims[0], z_dim, 3, 3, 3), "decoder.conv1.bias": (dims[0],)})
    middle("decoder", dims[0])
    temperal_upsample, n = temperal_downsample[::-1], 0
    for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
        cin = cin // 2 if i > 0 else cin  # the previous level's upsampler halved the width
        for _ in range(num_res_blocks + 1):
            res(f"decoder.upsamples.{n}", cin, cout)
            cin, n = cout, n + 1
        if i != len(dim_mult) - 1:
            keys.update({f"decoder.upsamples.{n}.resample.1.weight": (cout // 2, cout, 3, 3),
                         f"decoder.upsamples.{n}.resample.1.bias": (cout // 2,)})
            if temperal_upsample[i]:
                keys.update({f"decoder.upsamples.{n}.time_conv.weight": (cout * 2, cout, 3, 1, 1),
                             f"decoder.upsamples.{n}.time_conv.bias": (cout * 2,)})
            n += 1
    head("decoder", dims[-1], 3)
    return keys


@pytest.mark.golden
def test_reference_layout_helper_matches_fixtures(golden):
    case = golden("wan_vae")
    for shapes, cfg in ((case.meta["weights_keys"], case.meta["model_config"]),
                        (case.json("manifest_wan2.1_vae.json")["keys"], case.meta["real_model_config"])):
        layout = _reference_layout(cfg["dim"], cfg["z_dim"], cfg["dim_mult"], cfg["num_res_blocks"],
                                   cfg["temperal_downsample"])
        assert layout == {k: tuple(v) for k, v in shapes.items()}


@pytest.mark.parametrize(
    "dim, z_dim, dim_mult, num_res_blocks, temporal",
    [(4, 8, [1, 2, 2, 4], 1, [True, False, True]), (6, 16, [1, 2, 4], 3, [False, True]), (4, 4, [1, 2], 2, [True])],
)
def test_other_architectures_derive_and_convert(dim, z_dim, dim_mult, num_res_blocks, temporal):
    original = {k: torch.empty(s, device="meta") for k, s in
                _reference_layout(dim, z_dim, dim_mult, num_res_blocks, temporal).items()}
    cfg = wan_vae_config_from_state_dict(original)
    assert (cfg["base_dim"], cfg["z_dim"], cfg["dim_mult"], cfg["num_res_blocks"], cfg["temperal_downsample"]) == (
        dim, z_dim, dim_mult, num_res_blocks, temporal)
    with torch.device("meta"):
        model = AutoencoderKLWan(**cfg)
    converted = convert_wan_vae_state_dict(original)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in converted.items()} == expected
    if z_dim != len(WAN21_VAE_CONFIG["latents_mean"]):
        with pytest.raises(ValueError, match=f"z_dim={z_dim}"):
            WanVAE(model)
    else:
        assert WanVAE(model).temporal_factor == 2 ** sum(temporal)


def test_channels_last_decoder_streams_the_same_frames():
    """The NDHWC decode lever (WanVAE.decoder_to_channels_last) changes the layout, not the arithmetic."""
    from diffusers import AutoencoderKLWan

    from model.vae import WAN21_VAE_CONFIG
    torch.manual_seed(0)
    codec = WanVAE(AutoencoderKLWan(**dict(WAN21_VAE_CONFIG, base_dim=8)).eval()).requires_grad_(False)
    latent = torch.randn(1, 4, codec.latent_channels, 6, 8)
    with torch.no_grad():
        plain = codec.stream_decoder()
        reference = torch.cat([plain.decode_chunk(latent[:, :1]), plain.decode_chunk(latent[:, 1:])], dim=1)
        codec.decoder_to_channels_last()
        conv = codec.vae.decoder.conv_in
        assert conv.weight.is_contiguous(memory_format=torch.channels_last_3d)
        fast = codec.stream_decoder()
        out = torch.cat([fast.decode_chunk(latent[:, :1]), fast.decode_chunk(latent[:, 1:])], dim=1)
        codec.decoder_to_channels_last(False)
        assert conv.weight.is_contiguous() and not codec.decoder_channels_last
    assert out.shape == reference.shape == (1, 13, 3, 48, 64)
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)


def test_decoder_convs_padded_inside_stream_the_same_frames():
    """WanVAE.pad_decoder_convs_inside: spatial zero padding inside the convolutions, not in a padded copy; the same
    frames, streamed in blocks (frame 0 alone, a 1-frame cache, then full caches), in the NDHWC layout too."""
    from diffusers import AutoencoderKLWan

    from model.vae import WAN21_VAE_CONFIG
    torch.manual_seed(0)
    codec = WanVAE(AutoencoderKLWan(**dict(WAN21_VAE_CONFIG, base_dim=8)).eval()).requires_grad_(False)
    latent = torch.randn(1, 7, codec.latent_channels, 6, 8)

    def stream() -> torch.Tensor:
        decoder = codec.stream_decoder(clamp=False)
        return torch.cat([decoder.decode_chunk(latent[:, :3]), decoder.decode_chunk(latent[:, 3:])], dim=1)

    calls = []
    with torch.no_grad():
        reference = stream()
        codec.pad_decoder_convs_inside()
        assert codec.decoder_convs_padded_inside
        pads = []
        handle = torch.nn.modules.module.register_module_forward_hook(
            lambda m, args, out: calls.append(type(m).__name__))
        original_pad = torch.nn.functional.pad
        try:
            torch.nn.functional.pad = lambda x, pad, *a, **k: pads.append(tuple(pad)) or original_pad(x, pad, *a, **k)
            inside = stream()
        finally:
            torch.nn.functional.pad = original_pad
            handle.remove()
        codec.decoder_to_channels_last()
        inside_cl = stream()
        codec.pad_decoder_convs_inside(False)
        assert type(codec.vae.decoder.conv_in).__name__ == "WanCausalConv3d"
    assert "_InsidePaddedCausalConv3d" in calls and "WanCausalConv3d" not in calls
    assert pads and all(p[:4] == (0, 0, 0, 0) for p in pads)  # only time is padded outside the convolutions
    assert inside.shape == reference.shape == (1, 25, 3, 48, 64)
    torch.testing.assert_close(inside, reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(inside_cl, reference, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("from_second_call", [False, True])
@pytest.mark.parametrize("frames_per_call", [3, 1])
def test_steady_walk_decodes_the_same_frames(frames_per_call, from_second_call):
    """The steady decoder walk (`_SteadyDecoder`, what a regionally compiled decoder runs from a stream's third
    call on, or from its second with the caches completed by zero frames), uncompiled: the same frames as diffusers'
    decoder forward, with whole and 1-frame calls, and with the decoder padded to 16 channels in the NDHWC layout
    with convolutions padded inside."""
    from diffusers import AutoencoderKLWan

    from model.vae import WAN21_VAE_CONFIG, _SteadyDecoder
    torch.manual_seed(0)
    codec = WanVAE(AutoencoderKLWan(**dict(WAN21_VAE_CONFIG, base_dim=12)).eval()).requires_grad_(False)
    with torch.no_grad():  # non-zero biases and gammas, so a misplaced cache or layer would show
        for name, p in codec.vae.decoder.named_parameters():
            if name.endswith("bias") or name.endswith("gamma"):
                p.uniform_(0.5, 1.5)
    latent = torch.randn(1, 8, codec.latent_channels, 6, 8)
    steady_calls = []

    def stream() -> torch.Tensor:
        decoder = codec.stream_decoder(clamp=False, frames_per_call=frames_per_call)
        return torch.cat([decoder.decode_chunk(latent[:, i:i + 3]) for i in range(0, 8, 3)], dim=1)

    with torch.no_grad():
        reference = stream()
        class Recording(_SteadyDecoder):
            def __call__(self, x, caches):
                steady_calls.append(x.shape[2])
                return super().__call__(x, caches)

        codec.decoder_steady = Recording(codec.vae.decoder, from_second_call=from_second_call)
        out = stream()
        codec.decoder_to_channels_last().pad_decoder_channels(16).pad_decoder_convs_inside()
        out_fast = stream()
    # After frame 0 alone (and one more eager call unless from the second call on).
    expected_calls = ([2] if from_second_call else []) + [3, 2] if frames_per_call == 3 else (
        [1] * (7 if from_second_call else 6))
    assert steady_calls == expected_calls * 2
    assert out.shape == reference.shape == (1, 29, 3, 48, 64)
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_fast, reference, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("regional", [True, False])
def test_compiled_decoder_streams_the_same_frames_and_compiles_only_the_steady_calls(regional):
    """WanVAE.compile_decoder (dynamo tracing only here: the eager backend; inductor is timed on the GPU by
    benchmarks/decode.py): the same frames as the plain decoder; the first two calls, while the conv caches fill, run
    eagerly; the steady calls compile once, as one graph per distinct layer (regional: fewer graphs than layers
    walked) or one graph of the whole decoder; a second stream compiles nothing; dynamo's recompile limit is raised
    around the calls only."""
    from diffusers import AutoencoderKLWan
    from torch._dynamo.utils import counters

    from model.vae import WAN21_VAE_CONFIG
    torch.manual_seed(0)
    codec = WanVAE(AutoencoderKLWan(**dict(WAN21_VAE_CONFIG, base_dim=8)).eval()).requires_grad_(False)
    latent = torch.randn(1, 5, codec.latent_channels, 6, 8)
    torch._dynamo.reset()
    counters.clear()
    with torch.no_grad():
        plain = codec.stream_decoder()
        reference = torch.cat([plain.decode_chunk(latent[:, :1]), plain.decode_chunk(latent[:, 1:3]),
                               plain.decode_chunk(latent[:, 3:])], dim=1)
        codec.compile_decoder(regional=regional, backend="eager")
        assert codec.decoder_compiled and (codec.decoder_steady is not None) == regional
        limits = []
        # On the module diffusers' forward runs (the regional walk calls its layers, not it): not traced by dynamo.
        codec.vae.decoder.register_forward_pre_hook(lambda *_: limits.append(torch._dynamo.config.recompile_limit))
        fast = codec.stream_decoder()
        out = torch.cat([fast.decode_chunk(latent[:, :1]), fast.decode_chunk(latent[:, 1:3]),
                         fast.decode_chunk(latent[:, 3:])], dim=1)
        graphs = counters["stats"]["unique_graphs"]
        again = codec.stream_decoder()
        for start in (0, 1, 3):
            again.decode_chunk(latent[:, start:start + 2] if start else latent[:, :1])
    layers_walked = 2 + sum(len(b.resnets) + (b.upsamplers is not None) for b in codec.vae.decoder.up_blocks) + 3
    assert (1 < graphs < layers_walked) if regional else graphs == 1
    assert counters["stats"]["unique_graphs"] == graphs  # a second stream reuses them
    assert not any("recompile limit" in str(reason) for reason in counters["unimplemented"])
    assert not counters["graph_break"]
    # Per stream: frame 0 alone, then one call per chunk, the steady one through the walk when regional.
    assert len(limits) == (4 if regional else 6) and min(limits) >= 64
    assert torch._dynamo.config.recompile_limit == 8  # patched only around the decoder's calls
    torch._dynamo.reset()
    assert out.shape == reference.shape == (1, 17, 3, 48, 64)
    if not regional:
        with pytest.raises(ValueError, match="needs the regional walk"):
            codec.compile_decoder(regional=False, steady_from_second_call=True)
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("channels_last", [False, True])
def test_padded_decoder_channels_stream_the_same_frames(channels_last):
    """WanVAE.pad_decoder_channels: the full-resolution stage widened with zero channels decodes the same frames, in
    both layouts, streamed in blocks; a multiple it already meets changes nothing; a bad multiple is refused."""
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    codec = WanVAE(AutoencoderKLWan(**dict(WAN21_VAE_CONFIG, base_dim=12)).eval()).requires_grad_(False)
    with torch.no_grad():  # non-zero biases and gammas, so a wrongly padded channel would show
        for name, p in codec.vae.decoder.named_parameters():
            if name.endswith("bias") or name.endswith("gamma"):
                p.uniform_(0.5, 1.5)
    latent = torch.randn(1, 4, codec.latent_channels, 6, 8)

    def stream() -> torch.Tensor:
        decoder = codec.stream_decoder(clamp=False)
        return torch.cat([decoder.decode_chunk(latent[:, :3]), decoder.decode_chunk(latent[:, 3:])], dim=1)

    with torch.no_grad():
        reference = stream()
        if channels_last:
            codec.decoder_to_channels_last()
        stage = codec.vae.decoder.up_blocks[-1]
        assert stage.out_dim == 12 and codec.pad_decoder_channels(4).decoder_channels_padded is None  # 12 = 3 * 4
        assert codec.pad_decoder_channels(16).decoder_channels_padded == 16
        assert stage.resnets[0].conv1.weight.shape[:2] == (16, 16) and codec.vae.decoder.conv_out.weight.shape[1] == 16
        assert codec.vae.decoder.norm_out.gamma.shape[0] == 16
        if channels_last:
            assert stage.resnets[0].conv1.weight.is_contiguous(memory_format=torch.channels_last_3d)
        out = stream()
    assert out.shape == reference.shape == (1, 13, 3, 48, 64)
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="multiple must be >= 1"):
        codec.pad_decoder_channels(0)


@pytest.mark.parametrize("channels_last", [False, True])
def test_dense_caches_give_slices_fresh_strides_and_keep_dense_ones(channels_last):
    """The steady walk's caches get a dense tensor's strides (a 2-frame slice of a 4-frame input keeps the input's
    batch stride, on which dynamo guards), with the same values; dense caches and the "Rep"/None slots stay as they
    are."""
    from model.vae import _dense_caches
    memory_format = torch.channels_last_3d if channels_last else torch.contiguous_format
    longer = torch.randn(1, 6, 4, 3, 5).contiguous(memory_format=memory_format)
    sliced = longer[:, :, -2:]
    dense = torch.randn(1, 6, 2, 3, 5).contiguous(memory_format=memory_format)
    caches = [sliced, dense, None, "Rep"]
    _dense_caches(caches, channels_last)
    fresh = torch.empty(1, 6, 2, 3, 5, memory_format=memory_format)
    assert caches[0].stride() == fresh.stride() != sliced.stride() and torch.equal(caches[0], sliced)
    assert caches[1] is dense and caches[2:] == [None, "Rep"]
