"""Loading a state dict into a module strictly, with errors that name the file and every mismatch.

Shared by every component (DiT, VAE, TAEHV) and by the checkpoint readers in `pipeline/loading/checkpoint.py`.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch

StateDict = Mapping[str, torch.Tensor]


class StateDictMismatchError(KeyError, ValueError):
    """A state dict does not fit a module; catchable as KeyError or ValueError."""

    def __str__(self) -> str:  # KeyError would print the repr of the message
        return str(self.args[0]) if self.args else ""


def _head(keys: list[str], n: int = 10) -> str:
    shown = ", ".join(keys[:n])
    return f"{len(keys)} [{shown}{', ...' if len(keys) > n else ''}]"


def load_state_dict_strict(module: torch.nn.Module, sd: StateDict, source: str, assign: bool = False) -> None:
    """Load `sd` into `module`, failing with a message naming `source` and every mismatch.

    Raises StateDictMismatchError (a KeyError and a ValueError) listing missing and unexpected keys
    (first 10 of each, with counts) and shape mismatches (key, expected, got). `assign` as in
    `nn.Module.load_state_dict` (needed when the module lives on the meta device).
    """
    expected = module.state_dict()
    missing = sorted(expected.keys() - sd.keys())
    unexpected = sorted(sd.keys() - expected.keys())
    shapes = [(k, tuple(expected[k].shape), tuple(sd[k].shape))
              for k in sorted(expected.keys() & sd.keys()) if expected[k].shape != sd[k].shape]
    if missing or unexpected or shapes:
        lines = [f"state dict from {source} does not fit {type(module).__name__}:"]
        if missing:
            lines.append(f"  missing keys: {_head(missing)}")
        if unexpected:
            lines.append(f"  unexpected keys: {_head(unexpected)}")
        if shapes:
            shown = "; ".join(f"{k}: expected {e}, got {g}" for k, e, g in shapes[:10])
            lines.append(f"  shape mismatches: {len(shapes)} [{shown}]")
        raise StateDictMismatchError("\n".join(lines))
    module.load_state_dict(sd, strict=False, assign=assign)
