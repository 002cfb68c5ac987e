"""A parameter-free latent codec: pixel (un)shuffle. The shapes world uses it in place of the Wan VAE.

It follows the `model.vae.LatentCodec` interface: `[B, 3, T, H, W]` pixels in [-1, 1] <-> `[B, T, 3*s*s, H/s, W/s]`
latents, one latent frame per pixel frame (temporal_factor 1). The scale maps pixel values to roughly unit variance,
which is what the flow-matching schedule expects of latents: shapes-world videos have a pixel std of about 0.8, so the
default 1.25 gives latents of std ~1 (2.0, used before, gave 1.6: noise then hid less of the data at every timestep).
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class PixelShuffleStream:
    def __init__(self, codec: "PixelShuffleCodec"):
        self.codec = codec

    def decode_chunk(self, latent_chunk: Tensor) -> Tensor:
        return self.codec.decode_to_pixel(latent_chunk)

    def reset(self) -> None:  # stateless: every latent frame decodes on its own
        pass


class PixelShuffleCodec(nn.Module):
    temporal_factor = 1

    def __init__(self, spatial_factor: int = 4, scale: float = 1.25, pixel_channels: int = 3):
        super().__init__()
        self.spatial_factor = spatial_factor
        self.scale = scale
        self.pixel_channels = pixel_channels
        self.latent_channels = pixel_channels * spatial_factor**2

    def config(self) -> dict:
        return {"type": "pixel_shuffle", "spatial_factor": self.spatial_factor, "scale": self.scale,
                "pixel_channels": self.pixel_channels}

    def encode_to_latent(self, video: Tensor) -> Tensor:
        """`[B, 3, T, H, W]` in [-1, 1] -> `[B, T, 3*s*s, H/s, W/s]`."""
        s = self.spatial_factor
        if video.dim() != 5 or video.shape[1] != self.pixel_channels or video.shape[3] % s or video.shape[4] % s:
            raise ValueError(f"expected pixels [B, {self.pixel_channels}, T, H, W] with H, W multiples of {s}, "
                             f"got {list(video.shape)}")
        frames = video.transpose(1, 2)  # [B, T, 3, H, W]
        return F.pixel_unshuffle(frames.flatten(0, 1), s).unflatten(0, frames.shape[:2]).float() * self.scale

    def decode_to_pixel(self, latent: Tensor) -> Tensor:
        """`[B, F, 3*s*s, h, w]` -> `[B, F, 3, s*h, s*w]` clamped to [-1, 1]."""
        if latent.dim() != 5 or latent.shape[2] != self.latent_channels:
            raise ValueError(f"expected latents [B, F, {self.latent_channels}, h, w], got {list(latent.shape)}")
        pixels = F.pixel_shuffle(latent.float().flatten(0, 1) / self.scale, self.spatial_factor)
        return pixels.unflatten(0, latent.shape[:2]).clamp(-1, 1)

    def stream_decoder(self) -> PixelShuffleStream:
        return PixelShuffleStream(self)
