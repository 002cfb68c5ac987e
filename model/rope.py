"""3-axis rotary position embedding of Wan2.1 and the sinusoidal timestep embedding."""
from __future__ import annotations

import torch
from torch import Tensor


def rope_axis_split(head_dim: int) -> tuple[int, int, int]:
    """Real dimensions given to the (frame, height, width) axes: `d - 4*(d//6)`, `2*(d//6)`, `2*(d//6)`."""
    spatial = 2 * (head_dim // 6)
    return head_dim - 2 * spatial, spatial, spatial


def _axis_angles(max_positions: int, axis_dim: int) -> Tensor:
    """`[max_positions, axis_dim/2]` float64 angles pos * 10000^(-2j/axis_dim)."""
    # Explicitly on CPU: models are often built under a `torch.device("meta")` context, the tables never are.
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, axis_dim, 2, dtype=torch.float64, device="cpu") / axis_dim))
    return torch.outer(torch.arange(max_positions, dtype=torch.float64, device="cpu"), inv_freq)


class RotaryTables:
    """Per-axis cos/sin tables, built in float64 (as the original) and kept in float32 per device.

    Not a module buffer on purpose: `model.to(torch.bfloat16)` must not round the tables.
    """

    def __init__(self, head_dim: int, max_positions: int = 1024):
        self.head_dim = head_dim
        self.max_positions = max_positions
        self.axis_dims = rope_axis_split(head_dim)
        self.angles = [_axis_angles(max_positions, d) for d in self.axis_dims]  # float64, CPU
        self._per_device: dict[torch.device, list[tuple[Tensor, Tensor]]] = {}

    def _tables(self, device: torch.device) -> list[tuple[Tensor, Tensor]]:
        tables = self._per_device.get(device)
        if tables is None:
            tables = [(a.cos().float().to(device), a.sin().float().to(device)) for a in self.angles]
            self._per_device[device] = tables
        return tables

    def cos_sin(self, frame_positions: Tensor, height: int, width: int) -> tuple[Tensor, Tensor]:
        """cos, sin `[len(frame_positions)*height*width, head_dim/2]` for a frame-major token grid.

        `frame_positions` `[F]` (long) are the temporal RoPE indices of the frames; rows and columns count from 0.
        """
        device = frame_positions.device
        if frame_positions.numel() and int(frame_positions.max()) >= self.max_positions:
            raise ValueError(
                f"RoPE frame position {int(frame_positions.max())} exceeds the table of {self.max_positions} "
                "positions; use a rolling KV cache with rope='relative' for longer rollouts")
        (cf, sf), (ch, sh), (cw, sw) = self._tables(device)
        num_frames = frame_positions.numel()
        rows = torch.arange(height, device=device)
        cols = torch.arange(width, device=device)

        def grid(cos_f: Tensor, cos_h: Tensor, cos_w: Tensor) -> Tensor:
            return torch.cat([
                cos_f[:, None, None, :].expand(num_frames, height, width, -1),
                cos_h[None, :, None, :].expand(num_frames, height, width, -1),
                cos_w[None, None, :, :].expand(num_frames, height, width, -1),
            ], dim=-1).reshape(num_frames * height * width, -1)

        cos = grid(cf[frame_positions], ch[rows], cw[cols])
        sin = grid(sf[frame_positions], sh[rows], sw[cols])
        return cos, sin


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate adjacent feature pairs of `x` `[B, L, heads, head_dim]` by the angles of `cos`/`sin` `[L', head_dim/2]`.

    Only the first L' tokens are rotated (the original passes padding tokens through). Computed in float32.
    """
    n = cos.shape[0]
    head = x[:, :n].float()
    even, odd = head[..., 0::2], head[..., 1::2]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    rotated = torch.stack((even * c - odd * s, even * s + odd * c), dim=-1).flatten(-2).to(x.dtype)
    if n == x.shape[1]:
        return rotated
    return torch.cat([rotated, x[:, n:]], dim=1)


def sinusoidal_embedding(freq_dim: int, t: Tensor) -> Tensor:
    """`[N, freq_dim]` float64 `[cos(t*w) | sin(t*w)]`, `w_j = 10000^(-j/(freq_dim/2))`, for timesteps `t` `[N]`."""
    half = freq_dim // 2
    inv_freq = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    angles = torch.outer(t.to(torch.float64), inv_freq)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)
