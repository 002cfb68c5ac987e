"""Wan2.1 video VAE adapter around `diffusers.AutoencoderKLWan`, plus the latent-codec interface.

Layouts: the codec interface speaks the DiT layout, latents `[B, F, C, h, w]` and pixels `[B, T, 3, H, W]`
in [-1, 1]; AutoencoderKLWan itself works on `[B, C, T, H, W]`, so the adapter permutes at its edges.
Pixel frames `T = 1 + temporal_factor * (F - 1)`: the first latent frame stands for one pixel frame.
"""
from __future__ import annotations

import contextlib
import re
from pathlib import Path
from typing import Any, Mapping, Protocol, Sequence, runtime_checkable

import torch
from diffusers import AutoencoderKLWan
from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d
from torch import nn

from model.weights import load_state_dict_strict

# Per-channel latent statistics of the released Wan2.1 VAE (the original's `utils/wan_wrapper.py`).
WAN21_LATENTS_MEAN = [
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
]
WAN21_LATENTS_STD = [
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
]

# Channels of the decoder's full-resolution stage are zero-padded to a multiple of this for cuDNN's Hopper kernels
# (`WanVAE.pad_decoder_channels`).
DECODER_PAD_MULTIPLE = 128

# `AutoencoderKLWan(**WAN21_VAE_CONFIG)` is the architecture of the released `Wan2.1_VAE.pth`.
WAN21_VAE_CONFIG: dict[str, Any] = {
    "base_dim": 96,
    "decoder_base_dim": None,
    "z_dim": 16,
    "dim_mult": [1, 2, 4, 4],
    "num_res_blocks": 2,
    "attn_scales": [],
    "temperal_downsample": [False, True, True],
    "dropout": 0.0,
    "in_channels": 3,
    "out_channels": 3,
    "latents_mean": WAN21_LATENTS_MEAN,
    "latents_std": WAN21_LATENTS_STD,
}


@runtime_checkable
class StreamDecoder(Protocol):
    """Stateful decoder: consecutive `decode_chunk` calls equal one decode of the concatenated latents."""

    def decode_chunk(self, latent_chunk: torch.Tensor) -> torch.Tensor:
        """`[B, f, C, h, w]` latents -> `[B, t, 3, H, W]` pixels in [-1, 1] (t depends on the stream position)."""
        ...

    def reset(self) -> None:
        """Forget all history; the next chunk starts a new video."""
        ...


@runtime_checkable
class LatentCodec(Protocol):
    """What pipelines need from a video latent codec (Wan VAE, pixel-unshuffle codec, TAEHV decoder).

    Attributes:
        latent_channels: C of the latent `[B, F, C, h, w]`.
        spatial_factor: H = spatial_factor * h, W = spatial_factor * w.
        temporal_factor: each latent frame after the first stands for this many pixel frames.
    """

    latent_channels: int
    spatial_factor: int
    temporal_factor: int

    def encode_to_latent(self, video: torch.Tensor) -> torch.Tensor:
        """`[B, 3, T, H, W]` in [-1, 1] -> normalized latent `[B, F, C, H/s, W/s]`, `T = 1 + temporal_factor*(F-1)`."""
        ...

    def decode_to_pixel(self, latent: torch.Tensor) -> torch.Tensor:
        """Normalized latent `[B, F, C, h, w]` -> pixels `[B, T, 3, s*h, s*w]` clamped to [-1, 1]."""
        ...

    def stream_decoder(self) -> StreamDecoder:
        """A fresh block-by-block decoder (see `StreamDecoder`)."""
        ...


# ---------------------------------------------------------------------------------------------------------
# Key conversion: original `Wan2.1_VAE.pth` names -> diffusers `AutoencoderKLWan` names.
# ---------------------------------------------------------------------------------------------------------

# Leaf renames inside one original module kind (original leaf -> diffusers leaf).
_CONV = {"weight": "weight", "bias": "bias"}
_NORM = {"gamma": "gamma"}
_RESBLOCK = {
    "residual.0.gamma": "norm1.gamma",
    "residual.2.weight": "conv1.weight",
    "residual.2.bias": "conv1.bias",
    "residual.3.gamma": "norm2.gamma",
    "residual.6.weight": "conv2.weight",
    "residual.6.bias": "conv2.bias",
    "shortcut.weight": "conv_shortcut.weight",
    "shortcut.bias": "conv_shortcut.bias",
}
_ATTN = {k: k for k in ("norm.gamma", "to_qkv.weight", "to_qkv.bias", "proj.weight", "proj.bias")}
_RESAMPLE = {k: k for k in ("resample.1.weight", "resample.1.bias", "time_conv.weight", "time_conv.bias")}
_LEVEL_ITEM = {**_RESBLOCK, **_RESAMPLE}

# THE conversion table: original module path (regex) -> diffusers module path, allowed leaves.
# "{up}" is resolved per checkpoint: the original decoder keeps its levels in one flat list
# (`upsamples.N`), diffusers nests them as `up_blocks.L.resnets.J` / `up_blocks.L.upsamplers.0`.
# The encoder's flat `downsamples.N` list maps one to one onto diffusers' flat `down_blocks.N`.
_KEY_TABLE: list[tuple[str, str, dict[str, str]]] = [
    (r"conv1", "quant_conv", _CONV),
    (r"conv2", "post_quant_conv", _CONV),
    (r"(encoder|decoder)\.conv1", r"\1.conv_in", _CONV),
    (r"(encoder|decoder)\.middle\.0", r"\1.mid_block.resnets.0", _RESBLOCK),
    (r"(encoder|decoder)\.middle\.1", r"\1.mid_block.attentions.0", _ATTN),
    (r"(encoder|decoder)\.middle\.2", r"\1.mid_block.resnets.1", _RESBLOCK),
    (r"(encoder|decoder)\.head\.0", r"\1.norm_out", _NORM),
    (r"(encoder|decoder)\.head\.2", r"\1.conv_out", _CONV),
    (r"encoder\.downsamples\.(\d+)", r"encoder.down_blocks.\1", _LEVEL_ITEM),
    (r"decoder\.upsamples\.(\d+)", "{up}", _LEVEL_ITEM),
]
_COMPILED_TABLE = [(re.compile(rf"({pat})\.(?P<leaf>.+)"), pat, new, leaves) for pat, new, leaves in _KEY_TABLE]


def _level_indices(sd: Mapping[str, Any], prefix: str) -> list[int]:
    pattern = re.compile(rf"{re.escape(prefix)}\.(\d+)\.")
    return sorted({int(m.group(1)) for k in sd if (m := pattern.match(k))})


def _decoder_up_paths(sd: Mapping[str, Any]) -> dict[int, str]:
    """Flat original `decoder.upsamples.N` index -> nested diffusers module path; a resample closes a level."""
    paths, level, res = {}, 0, 0
    for n in _level_indices(sd, "decoder.upsamples"):
        if f"decoder.upsamples.{n}.resample.1.weight" in sd:
            paths[n] = f"decoder.up_blocks.{level}.upsamplers.0"
            level, res = level + 1, 0
        else:
            paths[n] = f"decoder.up_blocks.{level}.resnets.{res}"
            res += 1
    return paths


def convert_wan_vae_state_dict(sd: Mapping[str, torch.Tensor], source: str = "state dict") -> dict[str, torch.Tensor]:
    """Rename an original Wan2.1 VAE state dict (`Wan2.1_VAE.pth` keys) to `AutoencoderKLWan` keys.

    Tensors are passed through untouched (no copy, any device incl. meta). Raises KeyError naming every
    key that no table row accepts (e.g. attention inside resolution levels, or a diffusers-format dict).
    """
    up_paths = _decoder_up_paths(sd)
    out, unknown = {}, []
    for key, value in sd.items():
        for regex, pat, new, leaves in _COMPILED_TABLE:
            m = regex.fullmatch(key)
            if m is None or m.group("leaf") not in leaves:
                continue
            module = m.group(1)
            if new == "{up}":
                target = up_paths[int(module.rsplit(".", 1)[1])]
            else:
                target = re.sub(rf"^{pat}$", new, module)
            out[f"{target}.{leaves[m.group('leaf')]}"] = value
            break
        else:
            unknown.append(key)
    if unknown:
        raise KeyError(
            f"{source}: {len(unknown)} key(s) are not part of an original Wan2.1 VAE checkpoint: {unknown[:10]}"
        )
    return out


def _require(sd: Mapping[str, torch.Tensor], key: str, source: str) -> torch.Tensor:
    if key not in sd:
        raise KeyError(f"{source}: missing key {key!r} (expected an original Wan2.1 VAE state dict)")
    return sd[key]


def wan_vae_config_from_state_dict(sd: Mapping[str, torch.Tensor], source: str = "state dict") -> dict[str, Any]:
    """Derive `AutoencoderKLWan` kwargs from the shapes of an ORIGINAL-key Wan2.1 VAE state dict.

    Starts from `WAN21_VAE_CONFIG` and overrides every size readable from the tensors (widths, levels,
    residual blocks per level, temporal downsampling). The latent statistics stay the Wan2.1 ones when
    z_dim is 16; otherwise they are dropped and must be given to `WanVAE` explicitly.
    """
    conv_in = _require(sd, "encoder.conv1.weight", source)
    base_dim, in_channels = int(conv_in.shape[0]), int(conv_in.shape[1])
    z_dim = int(_require(sd, "conv2.weight", source).shape[0])
    out_channels = int(_require(sd, "decoder.head.2.weight", source).shape[0])

    level_widths, level_blocks, temporal, n_res = [], [], [], 0
    for n in _level_indices(sd, "encoder.downsamples"):
        prefix = f"encoder.downsamples.{n}"
        if f"{prefix}.resample.1.weight" in sd:
            level_blocks.append(n_res)
            temporal.append(f"{prefix}.time_conv.weight" in sd)
            n_res = 0
        else:
            width = int(_require(sd, f"{prefix}.residual.2.weight", source).shape[0])
            if n_res == 0:
                level_widths.append(width)
            n_res += 1
    level_blocks.append(n_res)
    if not level_widths or len(level_widths) != len(level_blocks) or len(set(level_blocks)) != 1:
        raise ValueError(
            f"{source}: cannot read the encoder levels (residual blocks per level {level_blocks}, "
            f"widths {level_widths}); expected equal counts per level separated by resample layers"
        )
    if any(w % base_dim for w in level_widths):
        raise ValueError(f"{source}: level widths {level_widths} are not multiples of base width {base_dim}")
    dim_mult = [w // base_dim for w in level_widths]
    decoder_width = int(_require(sd, "decoder.conv1.weight", source).shape[0])
    decoder_base_dim = decoder_width // dim_mult[-1]

    config = dict(WAN21_VAE_CONFIG)
    config.update(
        base_dim=base_dim,
        decoder_base_dim=None if decoder_base_dim == base_dim else decoder_base_dim,
        z_dim=z_dim,
        dim_mult=dim_mult,
        num_res_blocks=level_blocks[0],
        attn_scales=[],
        temperal_downsample=temporal,
        in_channels=in_channels,
        out_channels=out_channels,
    )
    if z_dim != len(WAN21_LATENTS_MEAN):
        del config["latents_mean"], config["latents_std"]
    return config


def load_converted_state_dict(vae: AutoencoderKLWan, sd: Mapping[str, torch.Tensor], source: str) -> None:
    """Strictly load diffusers-keyed tensors into `vae` (assigned when it lives on the meta device); errors name
    `source` and the missing/unexpected keys (diffusers names) or mismatched shapes."""
    on_meta = any(p.is_meta for p in vae.parameters())
    load_state_dict_strict(vae, sd, f"{source} (diffusers names)", assign=on_meta)


# ---------------------------------------------------------------------------------------------------------
# The adapter.
# ---------------------------------------------------------------------------------------------------------


def _shape_error(what: str, expected: str, got: torch.Tensor) -> ValueError:
    return ValueError(f"{what}: expected a tensor of shape {expected}, got {tuple(got.shape)}")


class _InsidePaddedCausalConv3d(WanCausalConv3d):
    """`WanCausalConv3d` whose spatial zero padding happens inside the convolution (cuDNN treats out-of-range pixels as
    zero) instead of in a padded copy of the input; only the causal time padding (the cache, or zero frames) is still
    concatenated. The same arithmetic; `WanVAE.pad_decoder_convs_inside` swaps the class in."""

    def forward(self, x: torch.Tensor, cache_x: torch.Tensor | None = None) -> torch.Tensor:
        time_pad = self._padding[4]
        if cache_x is not None and time_pad > 0:
            x = torch.cat([cache_x.to(x.device), x], dim=2)
            time_pad -= cache_x.shape[2]
        if time_pad > 0:
            x = nn.functional.pad(x, (0, 0, 0, 0, time_pad, 0))
        return nn.functional.conv3d(x, self.weight, self.bias, self.stride, (0, self._padding[2], self._padding[0]),
                                    self.dilation, self.groups)


# The decoder's steady calls (every conv cache holding its 2 frames) as a walk over its layers: each layer runs through
# one of three region functions, so torch.compile builds one small graph per distinct layer shape (the 5 residual
# blocks at the lowest resolution share one) instead of one graph of the whole decoder, which took about a minute to
# compile cold (benchmarks/results/warmup_compile_pad_h100.json).
# The regions call diffusers' own forwards with a local cache list (same arithmetic, no guard on the caller's
# cache index); only the decoder's first and last convolutions, written inline in `WanDecoder3d.forward`, are
# restated here.


def _cached_layer(layer: nn.Module, x: torch.Tensor, caches: list) -> tuple[torch.Tensor, list]:
    """A residual block or resampler: its forward reads and replaces `len(caches)` conv caches from index 0."""
    caches = list(caches)
    return layer(x, feat_cache=caches, feat_idx=[0]), caches


def _plain_layer(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return layer(x)


def _cached_conv(conv: nn.Module, x: torch.Tensor, cache: torch.Tensor,
                 norm: nn.Module | None = None, act: nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`conv(act(norm(x)))` with its 2-frame cache, as `WanDecoder3d.forward` runs its first and last convolutions."""
    if norm is not None:
        x = act(norm(x))
    new_cache = (x if x.shape[2] >= 2 else torch.cat([cache[:, :, -1:], x], dim=2))[:, :, -2:].clone()
    return conv(x, cache), new_cache


def _fill_caches_with_zero_frames(feat_cache: list) -> None:
    """After a stream's first call: every conv cache to 2 frames, in place. A 1-frame cache gets a zero frame before it
    and the temporal upsamplers' "Rep" (run without a cache) 2 zero frames: the zeros the causal padding adds anyway,
    so the next call computes the same. A "Rep" takes the shape of the cache before it, the input of its up block's
    last convolution, which has the upsampler's input channels and size."""
    for i, cache in enumerate(feat_cache):
        if isinstance(cache, torch.Tensor) and cache.shape[2] == 1:
            feat_cache[i] = torch.cat([torch.zeros_like(cache), cache], dim=2)
        elif isinstance(cache, str):  # "Rep"
            feat_cache[i] = torch.zeros_like(feat_cache[i - 1])


def _dense_caches(feat_cache: list, channels_last: bool) -> None:
    """Every conv cache, in place, with the strides a fresh dense tensor of its shape has. A cache sliced from a longer
    input keeps that input's batch stride (meaningless at batch 1, but dynamo guards on it), so caches made by the
    eager first calls and by the compiled regions would otherwise make each region compile twice."""
    memory_format = torch.channels_last_3d if channels_last else torch.contiguous_format
    for i, cache in enumerate(feat_cache):
        if isinstance(cache, torch.Tensor):
            c, t, h, w = cache.shape[1:]
            dense = ((c * t * h * w, 1, h * w * c, w * c, c) if channels_last
                     else (c * t * h * w, t * h * w, h * w, w, 1))
            if cache.stride() != dense:
                feat_cache[i] = cache.clone(memory_format=memory_format)


class _SteadyDecoder:
    """`WanDecoder3d.forward(x, feat_cache, ...)` for a stream's calls after its first two (or after its first, with
    `from_second_call`), whose conv caches all hold 2 frames, as a walk over the layers in the decoder's cache order;
    the regions run compiled when built with `compile_kwargs`."""

    def __init__(self, decoder: nn.Module, compile_kwargs: dict | None = None, from_second_call: bool = False):
        self.decoder = decoder
        self.from_second_call = from_second_call
        wrap = (lambda fn: torch.compile(fn, **compile_kwargs)) if compile_kwargs is not None else (lambda fn: fn)
        self._cached_layer, self._plain_layer, self._cached_conv = map(
            wrap, (_cached_layer, _plain_layer, _cached_conv))

    def __call__(self, x: torch.Tensor, feat_cache: list) -> torch.Tensor:
        d, index = self.decoder, 1
        x, feat_cache[0] = self._cached_conv(d.conv_in, x, feat_cache[0])

        def cached(layer: nn.Module, x: torch.Tensor, count: int) -> torch.Tensor:
            """`layer` on `x` with the next `count` caches in the decoder's order."""
            nonlocal index
            out, feat_cache[index:index + count] = self._cached_layer(layer, x, feat_cache[index:index + count])
            index += count
            return out

        x = cached(d.mid_block.resnets[0], x, 2)
        for attention, resnet in zip(d.mid_block.attentions, d.mid_block.resnets[1:]):
            if attention is not None:
                x = self._plain_layer(attention, x)
            x = cached(resnet, x, 2)
        for up_block in d.up_blocks:
            for resnet in up_block.resnets:
                x = cached(resnet, x, 2)
            if up_block.upsamplers is not None:
                upsampler = up_block.upsamplers[0]
                x = cached(upsampler, x, 1 if upsampler.mode == "upsample3d" else 0)
        x, feat_cache[index] = self._cached_conv(d.conv_out, x, feat_cache[index], d.norm_out, d.nonlinearity)
        return x


class StreamingVAEDecoder:
    """Block-by-block Wan VAE decoding that keeps the causal conv cache between `decode_chunk` calls.

    The cache list is owned here and handed to the diffusers decoder through its `feat_cache`/`feat_idx`
    arguments rather than living in `AutoencoderKLWan._feat_map`: `AutoencoderKLWan.encode/decode` call
    `clear_cache()`, which would otherwise wipe a stream mid-video, and several streams can run at once.
    `frames_per_call` latent frames go through the decoder at once (3: one Self Forcing block; 1 is the reference's
    loop); more is faster and takes more activation memory.
    """

    def __init__(self, codec: "WanVAE", clamp: bool = True, frames_per_call: int = 3):
        if frames_per_call < 1:
            raise ValueError(f"frames_per_call must be >= 1, got {frames_per_call}")
        self.codec = codec
        self.clamp = clamp
        self.frames_per_call = frames_per_call
        self._num_convs = sum(isinstance(m, WanCausalConv3d) for m in codec.vae.decoder.modules())
        self.reset()

    def reset(self) -> None:
        self._feat_cache: list[Any] = [None] * self._num_convs
        self._grid: tuple[int, int, int] | None = None
        self.frames_decoded = 0

    def decode_chunk(self, latent_chunk: torch.Tensor) -> torch.Tensor:
        """Normalized latents `[B, f, C, h, w]` -> pixels `[B, t, 3, s*h, s*w]` (float32).

        t = 1 + temporal_factor*(f-1) for the first chunk after `reset()`, temporal_factor*f afterwards.
        Clamped to [-1, 1] unless the decoder was built with `clamp=False`.
        """
        codec = self.codec
        if latent_chunk.ndim != 5 or latent_chunk.shape[2] != codec.latent_channels or latent_chunk.shape[1] == 0:
            raise _shape_error("decode", f"[B, F>=1, {codec.latent_channels}, h, w]", latent_chunk)
        b, f, _, h, w = latent_chunk.shape
        if self._grid is not None and self._grid != (b, h, w):
            raise ValueError(
                f"decode_chunk: batch/grid (B, h, w) = {(b, h, w)} differs from this stream's {self._grid}; "
                "call reset() before decoding another video"
            )
        self._grid = (b, h, w)
        mean = codec.latents_mean.to(latent_chunk).view(1, -1, 1, 1, 1)
        inv_std = codec.latents_inv_std.to(latent_chunk).view(1, -1, 1, 1, 1)
        # The reference denormalizes as z / (1/std) + mean (not z * std + mean); kept for bit parity.
        z = latent_chunk.permute(0, 2, 1, 3, 4) / inv_std + mean
        param = next(codec.vae.parameters())
        z = z.to(device=param.device, dtype=param.dtype)
        if codec.decoder_channels_last:
            z = z.contiguous(memory_format=torch.channels_last_3d)
        x = codec.vae.post_quant_conv(z)
        frames = []
        # A compiled decoder compiles once per call shape and layer shape; more than dynamo's default limit of 8.
        limit = torch._dynamo.config.patch(recompile_limit=64) if codec.decoder_compiled else contextlib.nullcontext()
        with limit:
            start = 0
            while start < f:
                # The first frame of a video passes alone: the temporal upsamplers skip it (the "Rep" cache sentinel)
                # to emit a single frame. Later frames go up to `frames_per_call` at a time: every layer is causal in
                # time (a 2-frame conv cache) or per-frame, so this equals the reference's frame-by-frame loop, with
                # fewer, larger convolutions and less cache concatenation per frame.
                size = 1 if self.frames_decoded == 0 else min(self.frames_per_call, f - start)
                chunk = x[:, :, start : start + size]
                # The first two calls of a stream, while the conv caches fill (none, then one frame), run eagerly: a
                # compile for each of them would take longer than the whole video's decoding saves. From the third
                # on every cache holds 2 frames: the steady walk (compiled regions) or the compiled whole decoder.
                # With `steady_from_second_call` the caches are completed after the first call instead (exactly: the
                # missing frames are the zeros causal padding stands for), so the second call takes the walk too.
                steady = self.frames_decoded >= 2
                walk = codec.decoder_steady
                if walk is not None and self.frames_decoded == 1 and walk.from_second_call:
                    _fill_caches_with_zero_frames(self._feat_cache)
                    steady = True
                if steady and walk is not None:
                    _dense_caches(self._feat_cache, codec.decoder_channels_last)
                    frames.append(walk(chunk, self._feat_cache))
                else:
                    stance = (torch.compiler.set_stance("force_eager") if codec.decoder_compiled and not steady
                              else contextlib.nullcontext())
                    with stance:
                        frames.append(codec.vae.decoder(chunk, feat_cache=self._feat_cache, feat_idx=[0],
                                                        first_chunk=self.frames_decoded == 0))
                self.frames_decoded += size
                start += size
        out = torch.cat(frames, dim=2).permute(0, 2, 1, 3, 4).float()
        return out.clamp(-1.0, 1.0) if self.clamp else out


class WanVAE(nn.Module):
    """`AutoencoderKLWan` plus per-channel latent normalization, in the DiT's `[B, F, C, h, w]` layout.

    Implements `LatentCodec`. Parameters live in `self.vae` (diffusers keys, prefix `vae.`); the latent
    statistics are non-persistent float32 buffers.
    """

    def __init__(
        self,
        vae: AutoencoderKLWan,
        latents_mean: Sequence[float] | None = None,
        latents_std: Sequence[float] | None = None,
    ):
        super().__init__()
        self.vae = vae
        cfg = vae.config
        mean = list(cfg.latents_mean if latents_mean is None else latents_mean)
        std = list(cfg.latents_std if latents_std is None else latents_std)
        if len(mean) != cfg.z_dim or len(std) != cfg.z_dim:
            raise ValueError(
                f"latent statistics have {len(mean)} mean / {len(std)} std values, expected z_dim={cfg.z_dim} each"
            )
        self.register_buffer("latents_mean", torch.tensor(mean, dtype=torch.float32), persistent=False)
        # The reference stores 1/std (float32) and multiplies by it; keep the same rounding.
        self.register_buffer("latents_inv_std", 1.0 / torch.tensor(std, dtype=torch.float32), persistent=False)
        self.latent_channels = int(cfg.z_dim)
        self.spatial_factor = 2 ** (len(cfg.dim_mult) - 1)
        self.temporal_factor = 2 ** sum(bool(t) for t in cfg.temperal_downsample)
        self.pixel_channels = int(cfg.in_channels)
        self.decoder_channels_last = False
        self.decoder_compiled = False
        self.decoder_channels_padded: int | None = None
        self.decoder_convs_padded_inside = False
        self.decoder_steady: _SteadyDecoder | None = None

    def decoder_to_channels_last(self, enabled: bool = True) -> "WanVAE":
        """Decode in the channels-last 3-D layout (NDHWC): the same arithmetic, and cuDNN's fastest Conv3d kernels on
        recent GPUs take that layout (a speed lever for the streamed decode, measured by benchmarks/speed.py)."""
        layout = torch.channels_last_3d if enabled else torch.contiguous_format
        for conv in (m for m in (*self.vae.decoder.modules(), self.vae.post_quant_conv) if isinstance(m, nn.Conv3d)):
            conv.weight.data = conv.weight.data.contiguous(memory_format=layout)
        self.decoder_channels_last = enabled
        return self

    def pad_decoder_convs_inside(self, enabled: bool = True) -> "WanVAE":
        """Let the decoder's causal convolutions zero-pad height and width inside cuDNN rather than through a padded
        copy of every input (diffusers pads all three dimensions with `F.pad`, a full extra pass over each activation
        that torch.compile cannot always fuse into its producer). Exact: the same zeros enter the same sums."""
        cls = _InsidePaddedCausalConv3d if enabled else WanCausalConv3d
        for conv in (*self.vae.decoder.modules(), self.vae.post_quant_conv):
            if isinstance(conv, WanCausalConv3d):
                conv.__class__ = cls
        self.decoder_convs_padded_inside = enabled
        return self

    def pad_decoder_channels(self, multiple: int = DECODER_PAD_MULTIPLE) -> "WanVAE":
        """Zero-pad the channels of the decoder's full-resolution stage (96 in Wan2.1) up to a multiple of `multiple`:
        cuDNN runs 96-channel 3x3x3 convolutions with an Ampere kernel at ~230 TFLOP/s on an H100, and 128 lets it pick
        its Hopper ones (benchmarks/decode.py, compile_pad: 1132 -> 1037 ms for 81 frames at 480x832). Exact: the
        padded channels are zero into and out of every layer (zero weights, gamma and bias; the RMS norm's L2 norm and
        scale are unchanged; SiLU keeps 0), so the frames are the same. A decode-time rewrite: do not save this VAE's
        state dict afterwards."""
        if multiple < 1:
            raise ValueError(f"pad_decoder_channels: multiple must be >= 1, got {multiple}")
        decoder = self.vae.decoder
        stage, previous = decoder.up_blocks[-1], decoder.up_blocks[-2]
        upsample = previous.upsamplers[0].resample[1] if previous.upsamplers is not None else None
        channels = stage.out_dim
        padded = -(-channels // multiple) * multiple
        if padded == channels:
            return self
        if not isinstance(upsample, nn.Conv2d) or upsample.out_channels != channels or stage.in_dim != channels or any(
                not isinstance(r.conv_shortcut, nn.Identity) for r in stage.resnets):
            raise ValueError("pad_decoder_channels: expected the Wan2.1 decoder layout (a 2-D upsampling conv into a "
                             f"last stage of {channels} channels without shortcut convs)")

        def grow(param: nn.Parameter | float, sizes: dict[int, int]) -> nn.Parameter | float:
            if not isinstance(param, torch.Tensor):
                return param
            shape = list(param.shape)
            for dim, size in sizes.items():
                shape[dim] = size
            out = param.new_zeros(shape)
            out[tuple(slice(0, n) for n in param.shape)] = param.detach()
            return nn.Parameter(out, requires_grad=param.requires_grad)

        def grow_conv(conv: nn.Module, out_ch: int | None, in_ch: int | None) -> None:
            sizes = {k: v for k, v in ((0, out_ch), (1, in_ch)) if v is not None}
            conv.weight = grow(conv.weight, sizes)
            if conv.bias is not None and out_ch is not None:
                conv.bias = grow(conv.bias, {0: out_ch})
            conv.out_channels, conv.in_channels = out_ch or conv.out_channels, in_ch or conv.in_channels

        def grow_norm(norm: nn.Module) -> None:
            norm.gamma = grow(norm.gamma, {0: padded})
            norm.bias = grow(norm.bias, {0: padded})

        grow_conv(upsample, padded, None)
        for resnet in stage.resnets:
            grow_norm(resnet.norm1)
            grow_conv(resnet.conv1, padded, padded)
            grow_norm(resnet.norm2)
            grow_conv(resnet.conv2, padded, padded)
        grow_norm(decoder.norm_out)
        grow_conv(decoder.conv_out, None, padded)
        if self.decoder_channels_last:
            self.decoder_to_channels_last()
        self.decoder_channels_padded = padded
        return self

    def compile_decoder(self, regional: bool = True, steady_from_second_call: bool = False,
                        **compile_kwargs: Any) -> "WanVAE":
        """Run the decoder under `torch.compile`: its fp32 RMS norms, SiLUs, causal padding and cache copies fuse
        around the cuDNN convolutions (H100, 480x832, 81 frames in the NDHWC layout: 1867 ms eager, decode_h100.json;
        1132 ms compiled whole, decode_pad_h100.json). Only a stream's steady calls run compiled (its first two run
        eagerly while the conv caches fill). `regional` (default): one graph per distinct layer (`_SteadyDecoder`),
        which compiles in a fraction of the whole decoder's time; else the whole decoder as one graph.
        `steady_from_second_call` (regional only): the walk from a stream's second call on (its caches completed with
        zero frames), so the first block's second call runs compiled too, at the price of its own graphs (a second
        call has 2 latent frames, the steady ones 3). `compile_kwargs` go to `torch.compile` (default `dynamic=False`:
        static shapes)."""
        compile_kwargs = {"dynamic": False, **compile_kwargs}
        if steady_from_second_call and not regional:
            raise ValueError("compile_decoder: steady_from_second_call needs the regional walk (regional=True)")
        if regional:
            self.decoder_steady = _SteadyDecoder(self.vae.decoder, compile_kwargs, steady_from_second_call)
        else:
            self.vae.decoder.compile(**compile_kwargs)
        self.decoder_compiled = True
        return self

    def speed_up_decoder(self, pad_multiple: int = DECODER_PAD_MULTIPLE, **compile_kwargs: Any) -> "WanVAE":
        """Every decode lever the pipeline uses on CUDA, each exact (benchmarks/decode.py times them one by one): the
        NDHWC layout, the full-resolution channels padded to `pad_multiple`, spatial padding inside the convolutions,
        and the regionally compiled steady calls. A decode-time rewrite: do not save this VAE's state dict
        afterwards."""
        return (self.decoder_to_channels_last().pad_decoder_channels(pad_multiple).pad_decoder_convs_inside()
                .compile_decoder(**compile_kwargs))

    def encode_to_latent(self, video: torch.Tensor) -> torch.Tensor:
        """Pixels `[B, 3, T, H, W]` in [-1, 1] -> normalized posterior mean `[B, F, C, H/8, W/8]` float32.

        T must be 1 + temporal_factor*k, H and W multiples of spatial_factor. No sampling: mu only.
        """
        s, tf = self.spatial_factor, self.temporal_factor
        expected = f"[B, {self.pixel_channels}, T=1+{tf}k, H, W] with H, W multiples of {s}"
        if video.ndim != 5 or video.shape[1] != self.pixel_channels:
            raise _shape_error("encode", expected, video)
        if (video.shape[2] - 1) % tf or video.shape[3] % s or video.shape[4] % s:
            raise _shape_error("encode", expected, video)
        param = next(self.vae.parameters())
        mu = self.vae.encode(video.to(device=param.device, dtype=param.dtype)).latent_dist.mean
        mean = self.latents_mean.to(mu).view(1, -1, 1, 1, 1)
        inv_std = self.latents_inv_std.to(mu).view(1, -1, 1, 1, 1)
        return ((mu - mean) * inv_std).permute(0, 2, 1, 3, 4).float()

    def decode_to_pixel(self, latent: torch.Tensor, clamp: bool = True) -> torch.Tensor:
        """Normalized latent `[B, F, C, h, w]` -> pixels `[B, 1+temporal_factor*(F-1), 3, 8h, 8w]` float32.

        Clamped to [-1, 1] like the reference wrapper; `clamp=False` returns the raw decoder output.
        """
        return StreamingVAEDecoder(self, clamp=clamp).decode_chunk(latent)

    def stream_decoder(self, clamp: bool = True, frames_per_call: int = 3) -> StreamingVAEDecoder:
        """A fresh `StreamingVAEDecoder` over this VAE."""
        return StreamingVAEDecoder(self, clamp=clamp, frames_per_call=frames_per_call)

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, torch.Tensor], source: str = "state dict", **stats: Any) -> "WanVAE":
        """Build from an original-key state dict: derive the config, convert, strict-load (no random init)."""
        config = wan_vae_config_from_state_dict(sd, source)
        with torch.device("meta"):
            vae = AutoencoderKLWan(**config)
        load_converted_state_dict(vae, convert_wan_vae_state_dict(sd, source), source)
        return cls(vae.eval(), **stats)

    @classmethod
    def from_wan_checkpoint(
        cls,
        path: str | Path,
        dtype: torch.dtype = torch.float32,
        latents_mean: Sequence[float] | None = None,
        latents_std: Sequence[float] | None = None,
    ) -> "WanVAE":
        """Load an original `Wan2.1_VAE.pth` (weights_only) or a `.safetensors` with the original keys."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"Wan VAE checkpoint {path} does not exist")
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(sd, Mapping) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
            raise ValueError(f"{path}: expected a flat state dict of tensors (original Wan2.1 VAE keys)")
        sd = {k: v.to(dtype) for k, v in sd.items()}
        return cls.from_state_dict(sd, str(path), latents_mean=latents_mean, latents_std=latents_std)

    @classmethod
    def from_diffusers_folder(cls, folder: str | Path, dtype: torch.dtype = torch.float32) -> "WanVAE":
        """Load a diffusers `vae/` folder (`config.json` + weights), or a model folder holding `vae/`."""
        folder = Path(folder)
        if not (folder / "config.json").is_file() and (folder / "vae" / "config.json").is_file():
            folder = folder / "vae"
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"{folder}: no config.json of a diffusers AutoencoderKLWan folder")
        vae = AutoencoderKLWan.from_pretrained(str(folder), local_files_only=True, torch_dtype=dtype)
        return cls(vae.eval())
