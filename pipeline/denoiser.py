"""The denoiser: a DiT plus a schedule, turning flow predictions into x0 predictions (and back)."""
from __future__ import annotations

from torch import Tensor, nn

from model.attention import BlockCausal
from model.kv_cache import KVCache
from pipeline.schedule import FlowMatchSchedule


class Denoiser:
    """`(flow, x0) = denoiser(x_t, t, context)` for latents `[B, F, C, H, W]` and timesteps `[B, F]`.

    The network never sees the schedule (it predicts flow = noise - x0); this object owns the conversion, per
    (sample, frame), with this network's own schedule (the original gives each network its own shift table).
    `uniform_timestep` (bidirectional teacher/critic): the network gets one timestep per sample, `t[:, 0]`.
    One method per mode of the network (`model.wan.WanDiT`): a whole clip, teacher forcing, a KV-cached chunk, a
    cache write, features for the GAN heads.
    """

    def __init__(self, model: nn.Module, schedule: FlowMatchSchedule, uniform_timestep: bool = False):
        self.model = model
        self.schedule = schedule
        self.uniform_timestep = uniform_timestep

    def __call__(self, x_t: Tensor, t: Tensor, context: Tensor, *,
                 block_causal: BlockCausal | None = None) -> tuple[Tensor, Tensor]:
        """A whole clip, bidirectional or block-causal."""
        flow = self.model(x_t, self.network_timesteps(x_t, t), context, block_causal=block_causal)
        return flow, self.schedule.x0_from_flow(flow, x_t, t)

    def teacher_forcing(self, x_t: Tensor, t: Tensor, context: Tensor, clean_x: Tensor, block_causal: BlockCausal,
                        aug_t: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """A whole clip whose blocks attend to the clean frames `clean_x` (at timestep `aug_t`, default 0)."""
        flow = self.model.forward_teacher_forcing(x_t, self.network_timesteps(x_t, t), context, clean_x,
                                                  block_causal, aug_t)
        return flow, self.schedule.x0_from_flow(flow, x_t, t)

    def cached(self, x_t: Tensor, t: Tensor, context: Tensor, kv_cache: KVCache,
               start_frame: int) -> tuple[Tensor, Tensor]:
        """The chunk of frames from `start_frame`, attending to (and written into) `kv_cache`."""
        flow = self.model.forward_cached(x_t, self.network_timesteps(x_t, t), context, kv_cache, start_frame)
        return flow, self.schedule.x0_from_flow(flow, x_t, t)

    def cache_pass(self, x_t: Tensor, t: Tensor, context: Tensor, kv_cache: KVCache, start_frame: int) -> None:
        """A call that only writes K/V into the KV cache (the clean-context pass, priming, re-caching): the model
        may skip everything after the last layer's keys and values."""
        self.model.write_cache(x_t, self.network_timesteps(x_t, t), context, kv_cache, start_frame)

    def features(self, x_t: Tensor, t: Tensor, context: Tensor, layers: tuple[int, ...]
                 ) -> tuple[Tensor, list[Tensor], Tensor]:
        """`(flow, hidden states of the blocks in layers, time embedding)` of a bidirectional call (GAN heads)."""
        return self.model.features(x_t, self.network_timesteps(x_t, t), context, layers)

    def network_timesteps(self, x_t: Tensor, t: Tensor) -> Tensor:
        """The `[B, F]` timesteps as the network takes them: `[B]` for a `uniform_timestep` network."""
        if t.dim() != 2 or tuple(t.shape) != tuple(x_t.shape[:2]):
            raise ValueError(f"timesteps must be [B, F] = {list(x_t.shape[:2])}, got {list(t.shape)}")
        return t[:, 0] if self.uniform_timestep else t

    def flow_from_x0(self, x0: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        return self.schedule.flow_from_x0(x0, x_t, t)
