"""LoRA on the generator (peft), and merging adapters back into plain Wan weights for checkpoints.

Adapters are injected in place (`peft.inject_adapter_in_model`), so the generator stays a `WanDiT` with its forward
signature and the loop, FSDP and the rollout need no wrapper. Parameter names gain peft's infixes
(`blocks.0.self_attn.q.base_layer.weight`, `...q.lora_A.default.weight`); `merge_lora_state_dict` turns such a
state dict back into the original Wan keys, so generator checkpoints load into inference like full fine-tunes.
"""
from __future__ import annotations

import re

import torch
from torch import Tensor, nn

from utils.errors import InputError

# Attention projections of self- and cross-attention and both FFN linears of every block.
LORA_TARGETS = r".*blocks\.\d+\.(self_attn|cross_attn)\.(q|k|v|o)|.*blocks\.\d+\.ffn\.(0|2)"
_ADAPTER = "default"


def lora_scaling(rank: int, alpha: float) -> float:
    """peft's scaling alpha / r; alpha 0 means alpha = r (scaling 1)."""
    return (alpha or rank) / rank


def apply_lora(model: nn.Module, rank: int, alpha: float) -> nn.Module:
    """Inject LoRA adapters (rank `rank`) into the generator and freeze everything else. In place."""
    from peft import LoraConfig, inject_adapter_in_model

    if rank < 1:
        raise InputError(f"lora_rank must be >= 1 to apply LoRA, got {rank}")
    config = LoraConfig(r=rank, lora_alpha=alpha or rank, lora_dropout=0.0, target_modules=LORA_TARGETS,
                        bias="none")
    model = inject_adapter_in_model(config, model, adapter_name=_ADAPTER)
    for name, p in model.named_parameters():
        p.requires_grad_(".lora_" in name)
    return model


def is_lora_state_dict(sd: dict[str, Tensor]) -> bool:
    return any(".lora_A." in k for k in sd)


def adapter_state_dict(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Only the adapter tensors (what a LoRA run trains)."""
    return {k: v for k, v in sd.items() if ".lora_" in k}


def merge_lora_state_dict(sd: dict[str, Tensor], scaling: float) -> dict[str, Tensor]:
    """Original Wan keys with `W + scaling * B @ A` for every adapted linear (computed in float32).

    A state dict without adapters is returned unchanged.
    """
    if not is_lora_state_dict(sd):
        return dict(sd)
    out: dict[str, Tensor] = {}
    for key, value in sd.items():
        if ".lora_" in key:
            continue
        m = re.match(r"^(.*)\.base_layer\.(weight|bias)$", key)
        if m is None:
            out[key] = value
            continue
        prefix, kind = m.groups()
        if kind == "weight":
            a = sd[f"{prefix}.lora_A.{_ADAPTER}.weight"].to(torch.float32)
            b = sd[f"{prefix}.lora_B.{_ADAPTER}.weight"].to(torch.float32)
            value = (value.to(torch.float32) + scaling * (b @ a)).to(value.dtype)
        out[f"{prefix}.{kind}"] = value
    return out
