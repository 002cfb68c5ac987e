"""3-axis rotary position embedding of Wan2.1 and the sinusoidal timestep embedding.

No complex numbers: the original rotates in complex128; here the angles are built in float64 (as the original's
table) and kept as float32 cos/sin, and a rotation is one multiply-add on feature pairs in float32.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor


def rope_axis_split(head_dim: int) -> tuple[int, int, int]:
    """Real dimensions given to the (frame, height, width) axes: `d - 4*(d//6)`, `2*(d//6)`, `2*(d//6)`."""
    spatial = 2 * (head_dim // 6)
    return head_dim - 2 * spatial, spatial, spatial


def _inv_freq(axis_dim: int, device: torch.device | str = "cpu") -> Tensor:
    """`[axis_dim/2]` float64 `10000^(-2j/axis_dim)`."""
    return 1.0 / (10000.0 ** (torch.arange(0, axis_dim, 2, dtype=torch.float64, device=device) / axis_dim))


def _axis_angles(max_positions: int, axis_dim: int) -> Tensor:
    """`[max_positions, axis_dim/2]` float64 angles pos * 10000^(-2j/axis_dim)."""
    # Explicitly on CPU: models are often built under a `torch.device("meta")` context, the tables never are.
    return torch.outer(torch.arange(max_positions, dtype=torch.float64, device="cpu"), _inv_freq(axis_dim))


class Rotation:
    """The RoPE angles of L tokens: `cos`, `sin` `[L, head_dim/2]` float32, and the same as pair tables
    `[L, 1, head_dim/2, 2]` (`(cos, cos)`, `(-sin, sin)`) so a rotation is `x * cos2 + swap(x) * sin2`."""

    def __init__(self, cos: Tensor, sin: Tensor):
        self.cos, self.sin = cos, sin
        self.cos2 = torch.stack((cos, cos), dim=-1).unsqueeze(1)
        self.sin2 = torch.stack((-sin, sin), dim=-1).unsqueeze(1)

    @property
    def num_tokens(self) -> int:
        return self.cos.shape[0]

    def tensors(self) -> tuple[Tensor, ...]:
        return self.cos, self.sin, self.cos2, self.sin2


class RotaryTables:
    """Per-axis cos/sin tables, built in float64 (as the original) and kept in float32 per device.

    Not a module buffer on purpose: `model.to(torch.bfloat16)` must not round the tables.
    """

    def __init__(self, head_dim: int, max_positions: int = 1024, cached_rotations: int = 64):
        self.head_dim = head_dim
        self.max_positions = max_positions
        self.axis_dims = rope_axis_split(head_dim)
        self.angles = [_axis_angles(max_positions, d) for d in self.axis_dims]  # float64, CPU
        self._per_device: dict[torch.device, list[tuple[Tensor, Tensor]]] = {}
        self._inv_freq_frame: dict[torch.device, Tensor] = {}
        self._rotations: OrderedDict[tuple, Rotation] = OrderedDict()
        self._max_cached = cached_rotations

    def _tables(self, device: torch.device) -> list[tuple[Tensor, Tensor]]:
        tables = self._per_device.get(device)
        if tables is None:
            tables = [(a.cos().float().to(device), a.sin().float().to(device)) for a in self.angles]
            self._per_device[device] = tables
        return tables

    def frame_inv_freq(self, device: torch.device) -> Tensor:
        """`[frame_dim/2]` float64 frequencies of the temporal axis on `device`."""
        inv = self._inv_freq_frame.get(device)
        if inv is None:
            inv = self._inv_freq_frame[device] = _inv_freq(self.axis_dims[0]).to(device)
        return inv

    def _frame_cos_sin(self, first: int, count: int, device: torch.device, beyond_table: bool) -> tuple[Tensor, Tensor]:
        if first + count <= self.max_positions:
            cf, sf = self._tables(device)[0]
            return cf[first:first + count], sf[first:first + count]
        if not beyond_table:
            raise ValueError(
                f"RoPE frame position {first + count - 1} exceeds the table of {self.max_positions} "
                "positions; use a rolling KV cache with rope='relative' for longer rollouts")
        # Past the table (relative-RoPE caches run forever): the same float64 angles, computed on the device so
        # no host-to-device copy (a host sync) enters the generation loop.
        positions = torch.arange(first, first + count, dtype=torch.float64, device=device)
        angles = torch.outer(positions, self.frame_inv_freq(device))
        return angles.cos().float(), angles.sin().float()

    def _grid(self, frame: tuple[Tensor, Tensor], height: int, width: int, device: torch.device
              ) -> tuple[Tensor, Tensor]:
        (cf, sf), (ch, sh), (cw, sw) = frame, *self._tables(device)[1:]
        num_frames = cf.shape[0]

        def grid(cos_f: Tensor, cos_h: Tensor, cos_w: Tensor) -> Tensor:
            return torch.cat([
                cos_f[:, None, None, :].expand(num_frames, height, width, -1),
                cos_h[None, :height, None, :].expand(num_frames, height, width, -1),
                cos_w[None, None, :width, :].expand(num_frames, height, width, -1),
            ], dim=-1).reshape(num_frames * height * width, -1)

        return grid(cf, ch, cw), grid(sf, sh, sw)

    def rotation(self, first_frame: int, num_frames: int, height: int, width: int, device: torch.device, *,
                 beyond_table: bool = False) -> Rotation:
        """The `Rotation` of frames `[first_frame, first_frame + num_frames)` of a `height x width` token grid.

        Positions are Python ints (no host sync) and recent results are cached, so the few-step chain of a block
        builds its tables once. beyond_table: allow frame positions past `max_positions` (relative-RoPE caches,
        whose attention scores only see position differences bounded by the cache length).
        """
        key = (first_frame, num_frames, height, width, device)
        rot = self._rotations.get(key)
        if rot is not None:
            self._rotations.move_to_end(key)
            return rot
        frame = self._frame_cos_sin(first_frame, num_frames, device, beyond_table)
        rot = Rotation(*self._grid(frame, height, width, device))
        self._rotations[key] = rot
        if len(self._rotations) > self._max_cached:
            self._rotations.popitem(last=False)
        return rot


def apply_rope(x: Tensor, cos: Tensor | Rotation, sin: Tensor | None = None, *, fused: bool = True) -> Tensor:
    """Rotate adjacent feature pairs of `x` `[B, L, heads, head_dim]` by `cos`/`sin` `[L', head_dim/2]` (or a
    `Rotation`). Only the first L' tokens are rotated (the original passes padding tokens through).

    Computed in float32. fused: one multiply-add on the pair tables (4 kernels in eager mode, one when compiled);
    False keeps the split/stack formula this code started from (the benchmark's eager baseline).
    """
    rot = cos if isinstance(cos, Rotation) else None
    n = rot.num_tokens if rot is not None else cos.shape[0]
    head = x[:, :n]
    if fused:
        if rot is None:
            rot = Rotation(cos, sin)
        pairs = head.unflatten(-1, (-1, 2))  # bf16 * float32 tables promotes inside the kernels: no .float() copy
        rotated = torch.addcmul(pairs * rot.cos2, pairs.flip(-1), rot.sin2).flatten(-2).to(x.dtype)
    else:
        c, s = (rot.cos, rot.sin) if rot is not None else (cos, sin)
        head = head.float()
        even, odd = head[..., 0::2], head[..., 1::2]
        c, s = c[None, :, None, :], s[None, :, None, :]
        rotated = torch.stack((even * c - odd * s, even * s + odd * c), dim=-1).flatten(-2).to(x.dtype)
    if n == x.shape[1]:
        return rotated
    return torch.cat([rotated, x[:, n:]], dim=1)


def rotate_frames(x: Tensor, frame_dim: int, angle_cos: Tensor, angle_sin: Tensor) -> Tensor:
    """Rotate only the temporal RoPE pairs (the first `frame_dim` features of each head) of `x` `[..., head_dim]`
    by extra angles `[frame_dim/2]` (cos, sin); spatial features are untouched. In float32, result in x's dtype."""
    t = x[..., :frame_dim].unflatten(-1, (-1, 2))
    cos2 = torch.stack((angle_cos, angle_cos), dim=-1)
    sin2 = torch.stack((-angle_sin, angle_sin), dim=-1)
    rotated = torch.addcmul(t * cos2, t.flip(-1), sin2).flatten(-2).to(x.dtype)
    return torch.cat([rotated, x[..., frame_dim:]], dim=-1)


def sinusoidal_embedding(freq_dim: int, t: Tensor) -> Tensor:
    """`[N, freq_dim]` float64 `[cos(t*w) | sin(t*w)]`, `w_j = 10000^(-j/(freq_dim/2))`, for timesteps `t` `[N]`."""
    half = freq_dim // 2
    inv_freq = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    angles = torch.outer(t.to(torch.float64), inv_freq)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)
