"""Architecture hyper-parameters of the Wan2.1 DiT."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Keys of an original Wan `config.json` (diffusers ModelMixin format) that describe the class, not the shape.
_BOOKKEEPING_KEYS = {"_class_name", "_diffusers_version", "_name_or_path", "window_size"}


PREDICTIONS = ("flow", "x0")
# Wan's timesteps are 1000 * sigma; an x0-predicting head is turned into flow with sigma >= this floor, so the
# division stays tame at the last steps (the network then learns whatever the floor asks of it there).
X0_PREDICTION_MIN_SIGMA = 0.05


@dataclass
class WanConfig:
    """Shape of a Wan2.1 DiT. Defaults are Wan2.1-T2V-1.3B; `WAN_14B` below holds the 14B values."""

    model_type: str = "t2v"
    patch_size: tuple[int, int, int] = (1, 2, 2)
    text_len: int = 512
    in_dim: int = 16
    dim: int = 1536
    ffn_dim: int = 8960
    freq_dim: int = 256
    text_dim: int = 4096
    out_dim: int = 16
    num_heads: int = 12
    num_layers: int = 30
    qk_norm: bool = True
    cross_attn_norm: bool = True
    eps: float = 1e-6
    # RoPE table length in latent frames (the original precomputes 1024 positions per axis).
    rope_max_positions: int = 1024
    # What the head's output means: "flow" (Wan: noise - x0) or "x0" (the clean latent; forward() still returns the
    # flow, (x_t - x0) / sigma, so schedules, losses and samplers are unchanged). x0 suits models whose tokens carry
    # as many values as the model is wide (the shapes world's 192-value tokens in a 192-wide DiT): a flow output
    # must carry the full-dimensional noise through the network, a clean latent lies on a low-dimensional manifold
    # (Li & He 2025, "Back to Basics: Let Denoising Generative Models Denoise").
    prediction: str = "flow"
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.patch_size = tuple(int(p) for p in self.patch_size)
        if self.model_type != "t2v":
            raise ValueError(f"model_type {self.model_type!r} is not supported (only 't2v')")
        if self.dim % self.num_heads:
            raise ValueError(f"dim {self.dim} is not divisible by num_heads {self.num_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for RoPE")
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {list(PREDICTIONS)}, got {self.prediction!r}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> "WanConfig":
        """Build from an original/diffusers-style Wan `config.json` dict; unknown keys are an error."""
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kwargs, extra, unknown = {}, {}, []
        for key, value in d.items():
            if key in known:
                kwargs[key] = value
            elif key in _BOOKKEEPING_KEYS or key.startswith("_"):
                extra[key] = value
            else:
                unknown.append(key)
        if unknown:
            raise KeyError(f"{source}: unknown Wan config key(s) {sorted(unknown)}; expected a subset of "
                           f"{sorted(known)}")
        window = extra.get("window_size", (-1, -1))
        # The original's flash-attention local window: every released model attends fully, and so does WanDiT.
        if not isinstance(window, (list, tuple)) or list(window) != [-1, -1]:
            raise ValueError(f"{source}: window_size={window!r}; expected [-1, -1] (full attention, the only "
                             f"value the DiT implements)")
        return cls(**kwargs, extra=extra)

    @classmethod
    def from_json(cls, path: str | Path) -> "WanConfig":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"Wan config file {path} does not exist")
        data = json.loads(path.read_text())
        # Our exported folders nest the causal settings next to the architecture; keep only the architecture here.
        data = {k: v for k, v in data.items() if k != "causal"}
        return cls.from_dict(data, source=str(path))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("extra")
        d["patch_size"] = list(self.patch_size)
        return d


WAN_1_3B = WanConfig()
WAN_14B = WanConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40)
