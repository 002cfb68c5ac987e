"""Key conversion between the original Wan2.1 DiT and diffusers' `WanTransformer3DModel`.

One table (`_TOP_LEVEL`, `_PER_BLOCK`) serves both directions. Every tensor keeps its shape: the block
`modulation [1, 6, D]` is diffusers' `blocks.N.scale_shift_table [1, 6, D]` and the head `modulation
[1, 2, D]` is the top-level `scale_shift_table [1, 2, D]`. The one naming trap is the LayerNorm numbering:
the original's affine cross-attention norm is `norm3` and its parameter-free FFN norm is `norm2`, while in
diffusers the affine cross-attention norm is `norm2` (its parameter-free `norm1`/`norm3` have no keys).
"""
from __future__ import annotations

import re
from typing import Any

import torch

from model.config import WanConfig

# (original Wan module/parameter path, diffusers path). A key matches an entry when it equals the path or
# starts with the path + "."; the remainder (".weight", ".bias") is carried over unchanged.
_TOP_LEVEL: list[tuple[str, str]] = [
    ("patch_embedding", "patch_embedding"),
    ("text_embedding.0", "condition_embedder.text_embedder.linear_1"),
    ("text_embedding.2", "condition_embedder.text_embedder.linear_2"),
    ("time_embedding.0", "condition_embedder.time_embedder.linear_1"),
    ("time_embedding.2", "condition_embedder.time_embedder.linear_2"),
    ("time_projection.1", "condition_embedder.time_proj"),
    ("head.head", "proj_out"),
    ("head.modulation", "scale_shift_table"),
    # Image-to-video extras: converted so the table is complete, although WanConfig only builds t2v models.
    ("img_emb.proj.0", "condition_embedder.image_embedder.norm1"),
    ("img_emb.proj.1", "condition_embedder.image_embedder.ff.net.0.proj"),
    ("img_emb.proj.3", "condition_embedder.image_embedder.ff.net.2"),
    ("img_emb.proj.4", "condition_embedder.image_embedder.norm2"),
    ("img_emb.emb_pos", "condition_embedder.image_embedder.pos_embed"),
]

_PER_BLOCK: list[tuple[str, str]] = [
    ("modulation", "scale_shift_table"),
    ("self_attn.q", "attn1.to_q"),
    ("self_attn.k", "attn1.to_k"),
    ("self_attn.v", "attn1.to_v"),
    ("self_attn.o", "attn1.to_out.0"),
    ("self_attn.norm_q", "attn1.norm_q"),
    ("self_attn.norm_k", "attn1.norm_k"),
    ("cross_attn.q", "attn2.to_q"),
    ("cross_attn.k", "attn2.to_k"),
    ("cross_attn.v", "attn2.to_v"),
    ("cross_attn.o", "attn2.to_out.0"),
    ("cross_attn.norm_q", "attn2.norm_q"),
    ("cross_attn.norm_k", "attn2.norm_k"),
    ("cross_attn.k_img", "attn2.add_k_proj"),
    ("cross_attn.v_img", "attn2.add_v_proj"),
    ("cross_attn.norm_k_img", "attn2.norm_added_k"),
    ("norm3", "norm2"),
    ("ffn.0", "ffn.net.0.proj"),
    ("ffn.2", "ffn.net.2"),
]

# diffusers lists this in `_keys_to_ignore_on_load_unexpected`: some converted checkpoints carry an unused
# image-branch query norm that no model (original or diffusers) reads.
_DIFFUSERS_IGNORED_SUFFIXES = ("attn2.norm_added_q.weight", "attn2.norm_added_q.bias")

# diffusers' `fuse_projections()` concatenates projections along the output dim; split them back.
_FUSED: dict[str, tuple[str, ...]] = {
    "attn1.to_qkv": ("attn1.to_q", "attn1.to_k", "attn1.to_v"),
    "attn2.to_kv": ("attn2.to_k", "attn2.to_v"),
    "attn2.to_added_kv": ("attn2.add_k_proj", "attn2.add_v_proj"),
}

_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.(.+)$")

_DIFFUSERS_CONFIG_KEYS = {
    "patch_size", "num_attention_heads", "attention_head_dim", "in_channels", "out_channels", "text_dim",
    "freq_dim", "ffn_dim", "num_layers", "cross_attn_norm", "qk_norm", "eps", "image_dim",
    "added_kv_proj_dim", "rope_max_seq_len", "pos_embed_seq_len",
}
_QK_NORM_ACROSS_HEADS = "rms_norm_across_heads"
# Settings diffusers' config has no key for, kept in the same config.json by our export and read back by our loader
# (diffusers' own `from_pretrained` would reject them, as it does our `causal` block).
_OUR_CONFIG_KEYS = ("text_len", "prediction")


class UnknownKeyError(KeyError):
    """Keys the conversion table does not know (prints its message plainly, unlike KeyError)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def _rename(name: str, table: list[tuple[str, str]], src: int) -> str | None:
    """Map `name` through the table column `src` (0 = Wan, 1 = diffusers) to the other column."""
    best = None
    for pair in table:
        prefix = pair[src]
        # Only the parameter itself may follow the module path, so adapter weights (LoRA) are not let through.
        if name in (prefix, prefix + ".weight", prefix + ".bias") and (best is None or len(prefix) > len(best[src])):
            best = pair
    if best is None:
        return None
    return best[1 - src] + name[len(best[src]):]


def _convert(sd: dict[str, torch.Tensor], src: int, what: str) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for key, value in sd.items():
        match = _BLOCK_RE.match(key)
        if match:
            inner = _rename(match.group(2), _PER_BLOCK, src)
            new = None if inner is None else f"blocks.{match.group(1)}.{inner}"
        else:
            new = _rename(key, _TOP_LEVEL, src)
        if new is None:
            unknown.append(key)
        elif new in out:
            raise ValueError(f"{what}: keys collide on {new!r} (second source key {key!r})")
        else:
            out[new] = value
    if unknown:
        raise UnknownKeyError(f"{what}: {len(unknown)} key(s) not in the Wan<->diffusers table: {sorted(unknown)[:20]}")
    return out


def _unfuse_diffusers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if key.endswith(_DIFFUSERS_IGNORED_SUFFIXES):
            continue
        match = _BLOCK_RE.match(key)
        fused = None
        if match:
            module, _, param = match.group(2).rpartition(".")
            fused = _FUSED.get(module)
        if fused is None:
            out[key] = value
            continue
        if value.shape[0] % len(fused):
            raise ValueError(f"fused projection {key!r} has {value.shape[0]} rows, not divisible by {len(fused)}")
        for part, chunk in zip(fused, value.chunk(len(fused), dim=0)):
            out[f"blocks.{match.group(1)}.{part}.{param}"] = chunk
    # A model saved after fuse_projections() holds both the fused and the separate projections (same
    # values); the separate ones win.
    out.update({k: v for k, v in sd.items() if k in out and not k.endswith(_DIFFUSERS_IGNORED_SUFFIXES)})
    return out


def diffusers_to_wan(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers `WanTransformer3DModel` state dict -> original Wan DiT keys (same tensors, same shapes).

    Fused projections (`to_qkv`, `to_kv`) are split; the unused `attn2.norm_added_q` is dropped.
    Raises KeyError naming every key the table does not know.
    """
    return _convert(_unfuse_diffusers(sd), src=1, what="diffusers -> Wan")


def wan_to_diffusers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Original Wan DiT state dict -> diffusers `WanTransformer3DModel` keys (same tensors, same shapes)."""
    return _convert(sd, src=0, what="Wan -> diffusers")


def is_diffusers_state_dict(sd: dict[str, Any]) -> bool:
    """True when the keys use diffusers' naming (checked on names the original layout never uses)."""
    for key in sd:
        match = _BLOCK_RE.match(key)
        inner = match.group(2) if match else ""
        if key.startswith(("condition_embedder.", "proj_out.")) or key == "scale_shift_table":
            return True
        if inner.startswith(("attn1.", "attn2.", "ffn.net.", "scale_shift_table")):
            return True
    return False


def to_wan_keys(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Return `sd` with original Wan keys, converting from diffusers naming when that is what it uses."""
    return diffusers_to_wan(sd) if is_diffusers_state_dict(sd) else sd


def diffusers_config_from_wan(cfg: WanConfig) -> dict[str, Any]:
    """WanConfig -> keyword arguments of `diffusers.WanTransformer3DModel` (also its config.json body).

    `text_len` has no diffusers counterpart: diffusers does not pad the context, callers must pass
    `text_len` rows themselves to match the original.
    """
    if not cfg.qk_norm:
        # diffusers' WanAttention always builds norm_q/norm_k whatever `qk_norm` says.
        raise ValueError("diffusers WanTransformer3DModel cannot express qk_norm=False")
    return {
        "patch_size": list(cfg.patch_size),
        "num_attention_heads": cfg.num_heads,
        "attention_head_dim": cfg.head_dim,
        "in_channels": cfg.in_dim,
        "out_channels": cfg.out_dim,
        "text_dim": cfg.text_dim,
        "freq_dim": cfg.freq_dim,
        "ffn_dim": cfg.ffn_dim,
        "num_layers": cfg.num_layers,
        "cross_attn_norm": cfg.cross_attn_norm,
        "qk_norm": _QK_NORM_ACROSS_HEADS,
        "eps": cfg.eps,
        "image_dim": None,
        "added_kv_proj_dim": None,
        "rope_max_seq_len": cfg.rope_max_positions,
        "pos_embed_seq_len": None,
    }


def diffusers_config_json(cfg: WanConfig) -> dict[str, Any]:
    """The body of an exported diffusers `transformer/config.json`: diffusers' keys plus the settings it has no key
    for (`text_len` always, `prediction` when the head is not the default flow head)."""
    ours = {"text_len": cfg.text_len} | ({"prediction": cfg.prediction} if cfg.prediction != "flow" else {})
    return diffusers_config_from_wan(cfg) | ours


def wan_config_from_diffusers(d: dict[str, Any], text_len: int = 512, source: str = "config") -> WanConfig:
    """diffusers `WanTransformer3DModel` config dict (possibly with our `text_len`/`prediction`) -> WanConfig.

    Keys starting with "_" (`_class_name`, `_diffusers_version`, ...) go to `WanConfig.extra`; any other
    unknown key is a KeyError. `text_len` (when `d` has none) is not stored by diffusers: 512 for every Wan2.1 model.
    """
    d = dict(d)
    ours = {k: d.pop(k) for k in _OUR_CONFIG_KEYS if k in d}
    text_len = int(ours.get("text_len", text_len))
    unknown = sorted(k for k in d if k not in _DIFFUSERS_CONFIG_KEYS and not k.startswith("_"))
    if unknown:
        raise KeyError(f"{source}: unknown diffusers WanTransformer3DModel config key(s) {unknown}; "
                       f"expected a subset of {sorted(_DIFFUSERS_CONFIG_KEYS)}")
    for key in ("image_dim", "added_kv_proj_dim", "pos_embed_seq_len"):
        if d.get(key) is not None:
            raise ValueError(f"{source}: {key}={d[key]!r} describes an image-to-video model; only t2v is supported")
    qk_norm = d.get("qk_norm", _QK_NORM_ACROSS_HEADS)
    if qk_norm not in (_QK_NORM_ACROSS_HEADS, None):
        raise ValueError(f"{source}: qk_norm={qk_norm!r}; expected {_QK_NORM_ACROSS_HEADS!r}")
    defaults = WanConfig()
    heads = int(d.get("num_attention_heads", 40))
    head_dim = int(d.get("attention_head_dim", 128))
    in_dim = int(d.get("in_channels", 16))
    return WanConfig(
        patch_size=tuple(d.get("patch_size", defaults.patch_size)),
        text_len=text_len,
        in_dim=in_dim,
        dim=heads * head_dim,
        ffn_dim=int(d.get("ffn_dim", 13824)),
        freq_dim=int(d.get("freq_dim", 256)),
        text_dim=int(d.get("text_dim", 4096)),
        out_dim=int(d.get("out_channels") or in_dim),
        num_heads=heads,
        num_layers=int(d.get("num_layers", 40)),
        # diffusers builds the RMS q/k norms even for qk_norm=None, so the weights always exist.
        qk_norm=True,
        cross_attn_norm=bool(d.get("cross_attn_norm", True)),
        eps=float(d.get("eps", 1e-6)),
        rope_max_positions=int(d.get("rope_max_seq_len", 1024)),
        prediction=ours.get("prediction", "flow"),
        extra={k: v for k, v in d.items() if k.startswith("_")},
    )
