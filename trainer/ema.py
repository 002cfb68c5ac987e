"""Exponential moving average of the generator's trainable parameters.

Differences from the original `EMA_FSDP` (its `utils/distributed.py`), on purpose:
* the shadow lives where the parameters live, shard by shard (no full CPU copy on every rank; gathered only to
  save a checkpoint);
* keys are the module's own parameter names; FSDP2 wraps in place, so they carry no `_fsdp_wrapped_module.` infix
  and `generator_ema.safetensors` loads into a plain `WanDiT` (the original's EMA keys did not: docs/original.md);
* resume restores the shadow instead of re-initialising it from the current weights.

The update after each generator step is the original's: `shadow = d * shadow + (1 - d) * param`, in float32.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import Tensor, nn

from utils.distributed import full_tensor, local_tensor
from utils.errors import InputError, InputKeyError


def trainable_named_parameters(module: nn.Module, params: Iterable[nn.Parameter] | None = None
                               ) -> dict[str, nn.Parameter]:
    """`{name: parameter}` of `module` restricted to `params` (default: those with requires_grad)."""
    wanted = {id(p) for p in params} if params is not None else None
    return {name: p for name, p in module.named_parameters()
            if (p.requires_grad if wanted is None else id(p) in wanted)}


class EMA:
    """fp32 shadow of `named_params` starting at loop step `start_step`; `decay` = the config's ema_weight."""

    def __init__(self, decay: float, start_step: int = 0):
        if not 0.0 < decay < 1.0:
            raise InputError(f"ema_weight must be in (0, 1) to enable EMA, got {decay}")
        self.decay = float(decay)
        self.start_step = int(start_step)
        self.shadow: dict[str, Tensor] = {}
        self.num_updates = 0

    @property
    def started(self) -> bool:
        return bool(self.shadow)

    @torch.no_grad()
    def start(self, named_params: dict[str, nn.Parameter]) -> None:
        """Initialise the shadow from the current weights (the original does this at ema_start_step)."""
        self.shadow = {name: p.detach().to(torch.float32, copy=True) for name, p in named_params.items()}
        self.num_updates = 0

    @torch.no_grad()
    def update(self, named_params: dict[str, nn.Parameter]) -> None:
        if not self.started:
            raise RuntimeError("EMA.update before EMA.start")
        shadows = [local_tensor(self.shadow[name]) for name in named_params]
        params = [local_tensor(p.detach()).to(torch.float32) for p in named_params.values()]
        # shadow <- d * shadow + (1 - d) * param, as one multi-tensor op (lerp towards the parameter by 1 - d).
        torch._foreach_lerp_(shadows, params, 1.0 - self.decay)
        self.num_updates += 1

    def full_state_dict(self) -> dict[str, Tensor]:
        """Unsharded shadow on CPU (a collective over ranks for sharded parameters; every rank must call it)."""
        return {name: full_tensor(t).detach().to("cpu", copy=True) for name, t in self.shadow.items()}

    @torch.no_grad()
    def load_full_state_dict(self, sd: dict[str, Tensor], named_params: dict[str, nn.Parameter],
                             source: str = "EMA state") -> None:
        """Restore a full shadow into shards shaped like `named_params` (every rank passes the full tensors)."""
        missing = sorted(set(named_params) - set(sd))
        if missing:
            raise InputKeyError(f"{source}: EMA shadow lacks {len(missing)} parameter(s), e.g. {missing[:5]}")
        self.start(named_params)
        for name, p in named_params.items():
            value = sd[name].to(torch.float32)
            if tuple(value.shape) != tuple(p.shape):
                raise InputError(f"{source}: EMA entry {name!r} has shape {tuple(value.shape)}, "
                                 f"the parameter {tuple(p.shape)}")
            self.shadow[name] = _like(p, value)

    def state(self) -> dict[str, int | float | bool]:
        return {"decay": self.decay, "start_step": self.start_step, "num_updates": self.num_updates,
                "started": self.started}


def _like(p: Tensor, full: Tensor) -> Tensor:
    """`full` laid out as `p` (same DTensor mesh/placements when sharded), float32, on p's device."""
    try:
        from torch.distributed.tensor import DTensor, distribute_tensor
    except ImportError:  # pragma: no cover
        return full.to(p.device)
    if isinstance(p, DTensor):
        return distribute_tensor(full.to(p.device_mesh.device_type), p.device_mesh, p.placements)
    return full.to(p.device)
