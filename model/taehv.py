"""TAEHV: the tiny video autoencoder for Wan latents (madebyollin's `taew2_1.pth`), a fast alternative decoder.

The layer graph and the state-dict key names are those of the original (`encoder.N.*` / `decoder.N.*`
Sequential indices, MemBlock `conv.{0,2,4}` + `skip`, TPool/TGrow `conv`), so a real checkpoint loads
strictly. Every module here works on `[N, T, C, H, W]` video tensors. A MemBlock mixes each frame with the
previous frame's input (zeros before the first frame), which makes the whole network causal in time: a
decoder or encoder can therefore run on a whole clip at once, one frame at a time, or chunk by chunk with
carried state, and all three give the same numbers up to float rounding.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn

from model.weights import load_state_dict_strict

# Sequential positions of the layers whose weight shapes carry the widths (fixed by the checkpoint key layout).
_DEC_CONVS = (1, 8, 14, 20)  # latent->n_f[0], then the three bias-free stage projections
_DEC_TGROWS = (7, 13, 19)
_DEC_OUT = 22
_ENC_TPOOLS = (2, 7, 12)


def _conv3x3(n_in: int, n_out: int, stride: int = 1, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, stride=stride, padding=1, bias=bias)


def _per_frame(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Apply a 2-D layer to every frame of `[N, T, C, H, W]`."""
    n, t = x.shape[:2]
    y = layer(x.flatten(0, 1))
    return y.reshape(n, t, *y.shape[1:])


class Clamp(nn.Module):
    """Soft clamp of the latent to (-3, 3)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / 3) * 3


class MemBlock(nn.Module):
    """Residual block that sees the current frame and the previous frame's input."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.conv = nn.Sequential(
            _conv3x3(n_in * 2, n_out), nn.ReLU(), _conv3x3(n_out, n_out), nn.ReLU(), _conv3x3(n_out, n_out)
        )
        self.skip = nn.Conv2d(n_in, n_out, 1, bias=False) if n_in != n_out else nn.Identity()
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor, past: torch.Tensor) -> torch.Tensor:
        """x, past: `[N, T, C, H, W]` (past[:, t] is the input at frame t-1) -> `[N, T, n_out, H, W]`."""
        n, t = x.shape[:2]
        x4, past4 = x.flatten(0, 1), past.flatten(0, 1)
        y = self.act(self.conv(torch.cat([x4, past4], 1)) + self.skip(x4))
        return y.reshape(n, t, *y.shape[1:])


class TPool(nn.Module):
    """Temporal downsampling: `stride` consecutive frames stacked on channels, mixed by a 1x1 conv."""

    def __init__(self, n_f: int, stride: int):
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(n_f * stride, n_f, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`[N, T, C, H, W]` (T a multiple of stride) -> `[N, T/stride, C, H, W]`."""
        n, t, c, h, w = x.shape
        y = self.conv(x.reshape(n * (t // self.stride), self.stride * c, h, w))
        return y.reshape(n, t // self.stride, c, h, w)


class TGrow(nn.Module):
    """Temporal upsampling: a 1x1 conv emits `stride` frames' channels, unstacked in time order."""

    def __init__(self, n_f: int, stride: int):
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(n_f, n_f * stride, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`[N, T, C, H, W]` -> `[N, T*stride, C, H, W]`."""
        n, t, c, h, w = x.shape
        return self.conv(x.flatten(0, 1)).reshape(n, t * self.stride, c, h, w)


def run_with_memory(layers: nn.Sequential, x: torch.Tensor, memory: list) -> torch.Tensor | None:
    """Run `layers` over the next frames `x` `[N, T, C, H, W]` of a stream.

    `memory` (one slot per layer, `None` at the start of a stream) is updated in place: MemBlocks keep the
    last input frame, TPools keep frames that do not yet fill a stride. Returns `[N, T', C', H', W']`, or
    None when a TPool is still waiting for frames.
    """
    for i, layer in enumerate(layers):
        if isinstance(layer, MemBlock):
            prev = memory[i] if memory[i] is not None else torch.zeros_like(x[:, :1])
            past = torch.cat([prev, x[:, :-1]], 1)
            memory[i] = x[:, -1:]
            x = layer(x, past)
        elif isinstance(layer, TPool):
            if memory[i] is not None:
                x = torch.cat([memory[i], x], 1)
            usable = x.shape[1] // layer.stride * layer.stride
            memory[i] = x[:, usable:] if usable < x.shape[1] else None
            if usable == 0:
                return None
            x = layer(x[:, :usable])
        elif isinstance(layer, TGrow):
            x = layer(x)
        else:
            x = _per_frame(layer, x)
    return x


def apply_layers(layers: nn.Sequential, x: torch.Tensor, parallel: bool = True) -> torch.Tensor:
    """Run `layers` over a whole clip `[N, T, C, H, W]`: all frames at once, or one frame at a time."""
    memory: list = [None] * len(layers)
    if parallel:
        out = run_with_memory(layers, x, memory)
        outs = [] if out is None else [out]
    else:
        steps = (run_with_memory(layers, x[:, t : t + 1], memory) for t in range(x.shape[1]))
        outs = [y for y in steps if y is not None]
    if not outs:
        raise ValueError(f"{x.shape[1]} input frames are too few to produce an output frame")
    return torch.cat(outs, 1)


class TAEHV(nn.Module):
    """Tiny AutoEncoder for Hunyuan Video / Wan. Defaults are the real `taew2_1.pth` sizes.

    Args:
        decoder_n_f: decoder widths of the four stages.
        encoder_width: width of every encoder layer.
        latent_channels: channels of the latent (16 for Wan 2.1).
        image_channels: channels of the video (3, RGB).
        decoder_time_upscale: per TGrow whether it doubles the frame count; two entries mean the
            original Wan/Hunyuan layout where the first TGrow (after stage 0) keeps the frame rate.
        decoder_space_upscale: per stage whether the nearest-neighbour upsample doubles H and W.
        encoder_time_downscale: per TPool whether it halves the frame count.
    """

    def __init__(
        self,
        decoder_n_f: Sequence[int] = (256, 128, 64, 64),
        encoder_width: int = 64,
        latent_channels: int = 16,
        image_channels: int = 3,
        decoder_time_upscale: Sequence[bool] = (True, True),
        decoder_space_upscale: Sequence[bool] = (True, True, True),
        encoder_time_downscale: Sequence[bool] = (True, True, False),
    ):
        super().__init__()
        if len(decoder_time_upscale) == 2:
            decoder_time_upscale = (False, *decoder_time_upscale)
        for name, value, size in (
            ("decoder_n_f", decoder_n_f, 4),
            ("decoder_time_upscale", decoder_time_upscale, 3),
            ("decoder_space_upscale", decoder_space_upscale, 3),
            ("encoder_time_downscale", encoder_time_downscale, 3),
        ):
            if len(value) != size:
                raise ValueError(f"TAEHV {name} must have {size} entries, got {list(value)}")
        self.latent_channels = int(latent_channels)
        self.image_channels = int(image_channels)
        n_f, w = [int(c) for c in decoder_n_f], int(encoder_width)
        t_down = [2 if d else 1 for d in encoder_time_downscale]
        t_up = [2 if u else 1 for u in decoder_time_upscale]
        s_up = [2 if u else 1 for u in decoder_space_upscale]

        enc: list[nn.Module] = [_conv3x3(self.image_channels, w), nn.ReLU()]
        for stride in t_down:
            enc += [TPool(w, stride), _conv3x3(w, w, stride=2, bias=False)] + [MemBlock(w, w) for _ in range(3)]
        self.encoder = nn.Sequential(*enc, _conv3x3(w, self.latent_channels))

        dec: list[nn.Module] = [Clamp(), _conv3x3(self.latent_channels, n_f[0]), nn.ReLU()]
        for stage in range(3):
            c = n_f[stage]
            dec += [MemBlock(c, c) for _ in range(3)]
            dec += [nn.Upsample(scale_factor=s_up[stage]), TGrow(c, t_up[stage])]
            dec.append(_conv3x3(c, n_f[stage + 1], bias=False))
        self.decoder = nn.Sequential(*dec, nn.ReLU(), _conv3x3(n_f[3], self.image_channels))

        self.temporal_downscale = t_down[0] * t_down[1] * t_down[2]
        self.temporal_upscale = t_up[0] * t_up[1] * t_up[2]
        self.spatial_upscale = s_up[0] * s_up[1] * s_up[2]
        # The first latent stands for a single pixel frame (Wan's causal layout) but decodes to
        # `temporal_upscale` frames; the original callers drop the leading extra ones.
        self.frames_to_trim = self.temporal_upscale - 1

    def check_latent(self, latent: torch.Tensor) -> None:
        """Raise ValueError unless `latent` is `[N, T, latent_channels, h, w]`."""
        if latent.ndim != 5 or latent.shape[2] != self.latent_channels:
            raise ValueError(
                f"TAEHV expects a latent [N, T, {self.latent_channels}, h, w], got shape {tuple(latent.shape)}"
            )

    def decode_video(self, latent: torch.Tensor, parallel: bool = True) -> torch.Tensor:
        """`[N, T, C, h, w]` latent -> `[N, T*4, 3, 8h, 8w]` RGB, nominally [0, 1].

        Like the Self-Forcing copy of TAEHV, the output is neither clamped nor trimmed (the first
        `frames_to_trim` frames are warm-up frames). `parallel=False` decodes frame by frame (O(1) memory).
        """
        self.check_latent(latent)
        return apply_layers(self.decoder, latent, parallel)

    def encode_video(self, video: torch.Tensor, parallel: bool = True) -> torch.Tensor:
        """`[N, T, 3, H, W]` RGB in [0, 1] -> `[N, ceil(T/4), C, H/8, W/8]` latent.

        A frame count that is not a multiple of 4 is padded at the end with copies of the last frame, as
        upstream TAEHV does (the Self-Forcing copy had no padding; multiples of 4 are unchanged).
        """
        if video.ndim != 5 or video.shape[2] != self.image_channels:
            raise ValueError(
                f"TAEHV expects a video [N, T, {self.image_channels}, H, W], got shape {tuple(video.shape)}"
            )
        remainder = video.shape[1] % self.temporal_downscale
        if remainder:
            pad = video[:, -1:].expand(-1, self.temporal_downscale - remainder, -1, -1, -1)
            video = torch.cat([video, pad], 1)
        return apply_layers(self.encoder, video, parallel)

    def load_weights(self, state_dict: dict[str, torch.Tensor], source: str = "state dict") -> None:
        """Strict `load_state_dict` whose errors name `source` and the offending keys/shapes."""
        load_state_dict_strict(self, state_dict, source)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a TAEHV state dict from `.safetensors` or a `.pth`/`.pt` pickle (`weights_only=True`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"TAEHV checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a flat state dict of tensors (TAEHV .pth), got {type(state).__name__}")
    return state


def taehv_config_from_state_dict(state_dict: dict[str, torch.Tensor], source: str = "state dict") -> dict:
    """Constructor arguments of the TAEHV that `state_dict` belongs to, read from its weight shapes.

    Spatial upsampling has no weights, so `decoder_space_upscale` keeps its default.
    """

    def shape(key: str) -> torch.Size:
        if key not in state_dict:
            raise KeyError(f"{source}: TAEHV key {key!r} is missing (needed to infer the model widths)")
        return state_dict[key].shape

    n_f = [shape(f"decoder.{i}.weight")[0] for i in _DEC_CONVS]
    width = shape("encoder.0.weight")[0]
    # A TGrow's 1x1 conv emits stride x width channels; a TPool's takes stride x width.
    grows = [shape(f"decoder.{i}.conv.weight")[0] // n_f[k] for k, i in enumerate(_DEC_TGROWS)]
    pools = [shape(f"encoder.{i}.conv.weight")[1] // width for i in _ENC_TPOOLS]
    return {
        "decoder_n_f": n_f,
        "encoder_width": width,
        "latent_channels": shape(f"decoder.{_DEC_CONVS[0]}.weight")[1],
        "image_channels": shape(f"decoder.{_DEC_OUT}.weight")[0],
        "decoder_time_upscale": [stride == 2 for stride in grows],
        "encoder_time_downscale": [stride == 2 for stride in pools],
    }


def load_taehv(
    path: str | Path, device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> TAEHV:
    """Build a TAEHV sized from the checkpoint at `path` (e.g. `taew2_1.pth`) and load it strictly."""
    state_dict = read_state_dict(path)
    model = TAEHV(**taehv_config_from_state_dict(state_dict, source=str(path)))
    model.load_weights(state_dict, source=str(path))
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def _to_signed_pixels(video: torch.Tensor) -> torch.Tensor:
    """TAEHV output ([0, 1] nominal) -> float32 [-1, 1], as the demo does (`2x - 1`, clamped)."""
    return (video.float() * 2 - 1).clamp(-1, 1)


class TAEHVStreamDecoder:
    """Block-by-block decoding of a latent stream `[B, f, C, h, w]` -> pixels `[B, t, 3, H, W]` in [-1, 1].

    `context_frames=3` (default) reproduces the Self-Forcing demo: the first block is decoded alone and
    its first 3 frames are dropped; every later block is decoded with the previous 3 latent frames
    prepended and the first 12 (= 4 x 3) output frames are dropped. The decoder's memory reaches further
    back than 3 latent frames, so this only approximates a whole-clip decode. `context_frames=None`
    instead carries the decoder's memory across blocks, which matches the whole-clip decode exactly and
    re-decodes nothing. Either way the frame counts are those of the Wan VAE: `1 + 4(f-1)`, then `4f`.
    """

    def __init__(self, taehv: TAEHV, context_frames: int | None = 3):
        if context_frames is not None and context_frames < 0:
            raise ValueError(f"context_frames must be >= 0 or None, got {context_frames}")
        self.taehv = taehv
        self.context_frames = context_frames
        self.reset()

    def reset(self) -> None:
        """Start a new video."""
        self._context: torch.Tensor | None = None
        self._memory: list = [None] * len(self.taehv.decoder)
        self._batch: int | None = None

    @torch.no_grad()
    def decode_chunk(self, latent_chunk: torch.Tensor) -> torch.Tensor:
        """Decode the next latent frames `[B, f, C, h, w]` -> float32 pixels `[B, t, 3, 8h, 8w]` in [-1, 1]."""
        self.taehv.check_latent(latent_chunk)
        if latent_chunk.shape[1] == 0:
            raise ValueError("decode_chunk got a chunk with 0 latent frames")
        if self._batch is not None and latent_chunk.shape[0] != self._batch:
            raise ValueError(f"batch size changed from {self._batch} to {latent_chunk.shape[0]}; call reset()")
        param = next(self.taehv.parameters())
        latent = latent_chunk.to(device=param.device, dtype=param.dtype)
        drop = self.taehv.frames_to_trim if self._batch is None else 0
        if self.context_frames is None:
            video = run_with_memory(self.taehv.decoder, latent, self._memory)
        else:
            window = latent if self._context is None else torch.cat([self._context, latent], 1)
            if self._context is not None:
                drop = self.taehv.temporal_upscale * self._context.shape[1]
            video = self.taehv.decode_video(window)
            self._context = window[:, -self.context_frames :] if self.context_frames else None
        self._batch = latent.shape[0]
        return _to_signed_pixels(video[:, drop:])


class TAEHVCodec(nn.Module):
    """TAEHV behind the Wan VAE's interface: `[B, F, C, h, w]` latents <-> `[B, T, 3, H, W]` pixels in [-1, 1].

    Frame counts follow the Wan VAE (`T = 1 + 4(F-1)`) by dropping TAEHV's warm-up frames; no latent
    normalisation is applied because TAEHV for Wan consumes the DiT's (normalised) latents directly.
    """

    def __init__(self, taehv: TAEHV):
        super().__init__()
        self.taehv = taehv

    @classmethod
    def from_checkpoint(
        cls, path: str | Path, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> "TAEHVCodec":
        """Codec around `load_taehv(path)` (`.pth` or `.safetensors`)."""
        return cls(load_taehv(path, device=device, dtype=dtype))

    @property
    def latent_channels(self) -> int:
        return self.taehv.latent_channels

    @property
    def spatial_factor(self) -> int:
        return self.taehv.spatial_upscale

    @property
    def temporal_factor(self) -> int:
        return self.taehv.temporal_upscale

    def _param(self) -> torch.Tensor:
        return next(self.taehv.parameters())

    def decode_to_pixel(self, latent: torch.Tensor) -> torch.Tensor:
        """`[B, F, C, h, w]` -> float32 `[B, 1 + 4(F-1), 3, 8h, 8w]` in [-1, 1]."""
        self.taehv.check_latent(latent)
        p = self._param()
        video = self.taehv.decode_video(latent.to(device=p.device, dtype=p.dtype))
        return _to_signed_pixels(video[:, self.taehv.frames_to_trim :])

    def encode_to_latent(self, pixel: torch.Tensor) -> torch.Tensor:
        """`[B, 3, T, H, W]` in [-1, 1] (the `LatentCodec` layout, as the Wan VAE) -> float32
        `[B, ceil(T/4), C, H/8, W/8]` (T = 1 + 4k gives k + 1)."""
        if pixel.ndim != 5 or pixel.shape[1] != self.taehv.image_channels:
            raise ValueError(
                f"encode_to_latent expects pixels [B, {self.taehv.image_channels}, T, H, W], "
                f"got shape {tuple(pixel.shape)}"
            )
        pixel = pixel.transpose(1, 2)
        factor = self.taehv.spatial_upscale
        if pixel.shape[-2] % factor or pixel.shape[-1] % factor:
            raise ValueError(f"pixel height/width {tuple(pixel.shape[-2:])} must be multiples of {factor}")
        p = self._param()
        video = (pixel.to(device=p.device, dtype=p.dtype) + 1) / 2
        return self.taehv.encode_video(video).float()

    def stream_decoder(self, context_frames: int | None = 3) -> TAEHVStreamDecoder:
        """A fresh block-by-block decoder (see `TAEHVStreamDecoder`; the default is the demo's scheme)."""
        return TAEHVStreamDecoder(self.taehv, context_frames=context_frames)
