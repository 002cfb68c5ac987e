"""Readers and writers for Wan DiT checkpoints.

Every reader returns a plain state dict with the ORIGINAL Wan parameter names and no prefix
(`blocks.0.self_attn.q.weight`, `head.head.weight`, ...), whatever the file layout:

* original Wan folders: `config.json` + `diffusion_pytorch_model.safetensors`, or shards
  `diffusion_pytorch_model-0000x-of-0000y.safetensors` + `diffusion_pytorch_model.safetensors.index.json`;
* diffusers `transformer/` folders (`WanTransformer3DModel`; keys converted by `model.dit_keys`);
* Self-Forcing training checkpoints (`.pt` pickles of `{"generator", "generator_ema", "critic"}` whose
  keys carry the diffusion wrapper's `model.` prefix, sometimes with FSDP wrapper infixes).
"""
from __future__ import annotations

import json
import os
import pickle
import re
import uuid
import zipfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from model.config import WanConfig
from model.dit_keys import to_wan_keys, wan_config_from_diffusers
from model.weights import StateDictMismatchError, _head, load_state_dict_strict  # noqa: F401 (re-exported)
from utils.errors import InputError, InputKeyError, MissingFileError

StateDict = dict[str, torch.Tensor]

SINGLE_FILE = "diffusion_pytorch_model.safetensors"
INDEX_FILE = "diffusion_pytorch_model.safetensors.index.json"
TRAINING_GENERATOR, TRAINING_GENERATOR_EMA = "generator.safetensors", "generator_ema.safetensors"
# Activation checkpointing, FSDP1 and torch.compile insert these module names into parameter names; the
# reference EMA shadow keeps them (docs/original.md, "EMA"), the released checkpoints do not.
_WRAPPER_FRAGMENTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


# ----------------------------------------------------------------------------------------------- safetensors

def _read_safetensors(path: Path) -> StateDict:
    if not path.is_file():
        raise MissingFileError(f"safetensors file {path} does not exist")
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        raise InputError(f"{path}: not a readable safetensors file (corrupt or truncated?): {err}") from err


def _load_index(index_path: Path) -> StateDict:
    try:
        index = json.loads(index_path.read_text())
        weight_map = index["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise InputError(f"{index_path}: not a safetensors index (expected a JSON object with 'weight_map')") from err
    if not isinstance(weight_map, dict) or not weight_map:
        raise InputError(f"{index_path}: 'weight_map' must be a non-empty mapping key -> shard file")
    shards = sorted(set(weight_map.values()))
    missing = [s for s in shards if not (index_path.parent / s).is_file()]
    if missing:
        raise MissingFileError(f"{index_path}: {len(missing)} of {len(shards)} shard(s) listed in the index "
                                f"are missing from {index_path.parent}: {missing}")
    sd: StateDict = {}
    for shard in shards:
        shard_path = index_path.parent / shard
        part = _read_safetensors(shard_path)
        expected = {k for k, v in weight_map.items() if v == shard}
        absent, unlisted = sorted(expected - part.keys()), sorted(part.keys() - expected)
        if absent or unlisted:
            raise InputError(f"{shard_path} does not match {index_path.name}: keys listed but absent "
                             f"{absent[:10]} ({len(absent)}), keys present but not listed {unlisted[:10]} "
                             f"({len(unlisted)})")
        sd.update(part)
    return sd


def _resolve_folder(folder: Path) -> Path:
    """The index or single safetensors file holding a folder's weights."""
    for name in (INDEX_FILE, SINGLE_FILE):
        if (folder / name).is_file():
            return folder / name
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    files = sorted(folder.glob("*.safetensors"))
    if len(indexes) == 1:
        return indexes[0]
    if not indexes and len(files) == 1:
        return files[0]
    raise MissingFileError(f"{folder}: expected {SINGLE_FILE} or {INDEX_FILE}; found index files "
                            f"{[p.name for p in indexes]} and safetensors files {[p.name for p in files]}")


def load_wan_safetensors(path: str | Path) -> StateDict:
    """Load DiT weights from a `.safetensors` file, a `*.safetensors.index.json` of shards, or a folder.

    Every shard the index lists must exist and hold exactly the keys the index assigns to it.
    diffusers-named keys are converted, so the result always has the original Wan names.
    """
    path = Path(path)
    if path.is_dir():
        path = _resolve_folder(path)
    if path.name.endswith(".index.json"):
        if not path.is_file():
            raise MissingFileError(f"safetensors index {path} does not exist")
        return to_wan_keys(_load_index(path))
    return to_wan_keys(_read_safetensors(path))


def _read_config_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise InputError(f"{path}: invalid JSON: {err}") from err
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a JSON object")
    return data


def _is_diffusers_config(data: dict) -> bool:
    return data.get("_class_name") == "WanTransformer3DModel" or "num_attention_heads" in data


def read_transformer_config(config_path: str | Path) -> tuple[WanConfig, dict]:
    """(architecture, stored causal settings) of a DiT `config.json`: ours (WanConfig keys) or diffusers'
    (`WanTransformer3DModel`), either possibly with the `causal` block and `text_len` our export adds."""
    config_path = Path(config_path)
    if not config_path.is_file():
        raise MissingFileError(f"{config_path} is missing")
    data = _read_config_json(config_path)
    causal = data.pop("causal", {})
    if _is_diffusers_config(data):
        return wan_config_from_diffusers(data, source=str(config_path)), causal
    return WanConfig.from_json(config_path), causal


def load_diffusers_transformer(folder: str | Path) -> tuple[WanConfig, StateDict]:
    """Load a diffusers `transformer/` folder (config.json + safetensors, sharded or not).

    Returns (WanConfig, state dict with original Wan keys).
    """
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise MissingFileError(f"{folder}: no config.json (expected a diffusers WanTransformer3DModel folder)")
    data = _read_config_json(config_path)
    if not _is_diffusers_config(data):
        raise InputError(f"{config_path}: not a diffusers WanTransformer3DModel config "
                         f"(_class_name={data.get('_class_name')!r}, no 'num_attention_heads')")
    return read_transformer_config(config_path)[0], load_wan_safetensors(folder)


# --------------------------------------------------------------------------------------- Self-Forcing .pt

def _torch_load(path: Path) -> object:
    if not path.is_file():
        raise MissingFileError(f"checkpoint {path} does not exist")
    # mmap keeps multi-GB checkpoints (generator + critic + EMA) out of RAM; only zip-format files allow it.
    mmap = zipfile.is_zipfile(path)
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as err:  # torch raises KeyError/RuntimeError/EOFError/UnpicklingError for bad files
        if isinstance(err, pickle.UnpicklingError) and "Weights only load failed" in str(err):
            raise InputError(
                f"{path}: refused to unpickle: the file holds objects other than tensors and plain containers "
                f"(torch.load weights_only=True failed). Untrusted pickles are never executed; re-save the "
                f"state dict with plain tensors or as safetensors. Detail: {str(err)[:300]}") from err
        raise InputError(f"{path}: not a readable torch checkpoint (corrupt or truncated?): "
                         f"{type(err).__name__}: {str(err)[:300]}") from err


def clean_key(key: str) -> str:
    """Drop wrapper infixes anywhere in `key`, then the diffusion wrapper's leading `model.`."""
    for fragment in _WRAPPER_FRAGMENTS:
        key = key.replace(fragment, "")
    return key[len("model."):] if key.startswith("model.") else key


def _is_tensor_dict(obj: object) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def load_self_forcing_pt(path: str | Path, use_ema: bool = False, key: str | None = None) -> StateDict:
    """Load the generator from a Self-Forcing checkpoint (`torch.load(weights_only=True)`).

    Picks `generator_ema` if `use_ema` else `generator` (falling back to `model`, then to the file itself
    when it is a raw state dict, as the reference trainers do); `key` overrides the choice (e.g. "critic").
    Keys come back without `model.` and without FSDP/compile/checkpoint wrapper infixes.
    """
    path = Path(path)
    if key is not None and use_ema:  # the entry named by `key` would silently replace the EMA one
        raise ValueError(f"{path}: give use_ema or key={key!r}, not both")
    obj = _torch_load(path)
    if not isinstance(obj, dict):
        raise InputError(f"{path}: expected a dict of state dicts, got {type(obj).__name__}")
    if use_ema:
        key = "generator_ema"
    if key is not None:
        candidates = [key]
    else:
        candidates = ["generator", "model"]
    chosen = next((c for c in candidates if c in obj), None)
    if chosen is not None:
        sd = obj[chosen]
    elif key is None and _is_tensor_dict(obj):
        sd, chosen = obj, "<raw state dict>"
    else:
        raise InputKeyError(f"{path}: no {' / '.join(repr(c) for c in candidates)} entry; top-level keys present: "
                       f"{sorted(map(str, obj))[:20]}")
    if not _is_tensor_dict(sd):
        raise InputError(f"{path}: entry {chosen!r} is not a non-empty dict of tensors")
    out: StateDict = {}
    for name, tensor in sd.items():
        new = clean_key(name)
        if new in out:
            raise InputError(f"{path}: entry {chosen!r}: keys collide on {new!r} after stripping wrapper prefixes")
        out[new] = tensor
    return to_wan_keys(out)


# ----------------------------------------------------------------------------------------------- dispatch

def _config_next_to(folder: Path) -> WanConfig | None:
    config_path = folder / "config.json"
    if not config_path.is_file():
        return None
    return read_transformer_config(config_path)[0]


def load_dit_state_dict(path: str | Path, use_ema: bool = False) -> tuple[StateDict, WanConfig | None]:
    """Load DiT weights from any supported layout; returns (original-key state dict, WanConfig or None).

    * folder: a diffusers pipeline root (uses `transformer/`), a diffusers or original Wan folder
      (config.json + safetensors), a folder holding a single `model.pt`, or a training checkpoint folder
      (`generator.safetensors`; `use_ema` picks `generator_ema.safetensors`);
    * `.safetensors` / `.safetensors.index.json`: config taken from a `config.json` beside it, if any;
    * `.pt` / `.pth` / `.bin` / `.ckpt`: Self-Forcing checkpoint (`use_ema` picks `generator_ema`); no config.
    """
    path = Path(path)
    if not path.exists():
        raise MissingFileError(f"DiT checkpoint {path} does not exist")
    if path.is_dir():
        if (path / "model_index.json").is_file() and (path / "transformer").is_dir():
            path = path / "transformer"
        if not list(path.glob("*.safetensors")) and (path / "model.pt").is_file():
            return load_self_forcing_pt(path / "model.pt", use_ema=use_ema), None
        if (path / TRAINING_GENERATOR).is_file():  # trainer/train_state.py's layout: both sets side by side
            weights = path / (TRAINING_GENERATOR_EMA if use_ema else TRAINING_GENERATOR)
            if not weights.is_file():
                raise MissingFileError(f"{weights} does not exist: the checkpoint was saved before EMA started "
                                       "(optimiser.ema_start_step); drop the EMA choice (--use_ema, "
                                       f"model.generator_ckpt_ema) to load its {TRAINING_GENERATOR}")
            return load_wan_safetensors(weights), _config_next_to(path)
        _one_set_of_weights(path, use_ema)
        return load_wan_safetensors(path), _config_next_to(path)
    name = path.name.lower()
    if name.endswith(".safetensors") or name.endswith(".index.json"):
        _one_set_of_weights(path, use_ema)
        return load_wan_safetensors(path), _config_next_to(path.parent)
    if name.endswith(PICKLE_SUFFIXES):
        return load_self_forcing_pt(path, use_ema=use_ema), None
    raise InputError(f"{path}: unrecognised checkpoint type; expected a folder, .safetensors, "
                     f".safetensors.index.json or one of {list(PICKLE_SUFFIXES)}")


def _one_set_of_weights(path: Path, use_ema: bool) -> None:
    """A safetensors checkpoint holds one set of weights: asking it for the EMA ones is an error, not a no-op."""
    if use_ema:
        raise InputError(f"{path} holds one set of weights: the EMA choice (--use_ema, model.generator_ckpt_ema) picks "
                         "the generator_ema entry of a Self-Forcing .pt checkpoint; point at the EMA weights "
                         "themselves instead (e.g. a training run's generator_ema.safetensors)")


# ------------------------------------------------------------------------------------------ strict loading

# ------------------------------------------------------------------------------------------------ writing

def _prepare_for_safetensors(sd: StateDict) -> StateDict:
    out: StateDict = {}
    seen: set[tuple[int, int]] = set()
    for key, tensor in sd.items():
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"cannot save {key!r}: expected a tensor, got {type(tensor).__name__}")
        t = tensor.detach().to("cpu").contiguous()
        storage = t.untyped_storage()
        ident = (storage.data_ptr(), storage.nbytes())
        # safetensors refuses tensors that share memory (tied weights) or view a larger buffer; copy those.
        if ident in seen or storage.nbytes() != t.numel() * t.element_size():
            t = t.clone()
        seen.add((t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()))
        out[key] = t
    return out


def save_safetensors_atomic(sd: StateDict, path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Write `sd` to `path` via a temporary file in the same directory and `os.replace`.

    A crash mid-write never leaves a truncated file under the final name. Tensors are moved to CPU and
    made contiguous; tensors sharing storage are copied. Metadata values must be strings.
    """
    path = Path(path)
    if metadata is not None:
        bad = [k for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)]
        if bad:
            raise ValueError(f"safetensors metadata for {path} must map str -> str; offending keys {bad}")
    tensors = _prepare_for_safetensors(sd)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    tmp.touch(exist_ok=False)
    mode = tmp.stat().st_mode  # the umask's mode; safetensors itself writes 0600, too strict for shared weights
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        os.chmod(tmp, mode)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_wan_safetensors_sharded(sd: StateDict, folder: str | Path, max_shard_bytes: int = 5 * 2**30) -> list[Path]:
    """Write `sd` as `diffusion_pytorch_model[-0000i-of-0000n].safetensors` (+ index when sharded).

    Shards are filled in key order up to `max_shard_bytes`; returns the files written.
    """
    folder = Path(folder)
    shards: list[StateDict] = [{}]
    size = 0
    for key, tensor in sd.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
    if len(shards) == 1:
        save_safetensors_atomic(sd, folder / SINGLE_FILE, metadata={"format": "pt"})
        return [folder / SINGLE_FILE]
    written, weight_map = [], {}
    for i, shard in enumerate(shards):
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_safetensors_atomic(shard, folder / name, metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
        written.append(folder / name)
    total = sum(t.numel() * t.element_size() for t in sd.values())
    index = json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    tmp = folder / f".{INDEX_FILE}.tmp"
    tmp.write_text(index)
    os.replace(tmp, folder / INDEX_FILE)
    return written + [folder / INDEX_FILE]


# ---------------------------------------------------------------------------------------- config from shapes

def infer_wan_config(sd: StateDict, num_heads: int | None = None, text_len: int = 512,
                     eps: float = 1e-6, source: str = "state dict") -> WanConfig:
    """Derive a WanConfig from the shapes of an original-key state dict.

    Shapes fix dim, ffn_dim, num_layers, in/out_dim, text_dim, freq_dim, patch_size, qk_norm and
    cross_attn_norm. They cannot fix the head count: `num_heads` defaults to dim / 128 (every Wan2.1 model
    uses head_dim 128) and must be passed when dim is not a multiple of 128. `text_len` and `eps` are
    not stored in the weights either (512 and 1e-6 for every Wan2.1 model).
    """
    def shape(key: str) -> tuple[int, ...]:
        if key not in sd:
            raise InputKeyError(f"{source}: cannot infer the Wan config, key {key!r} is missing")
        return tuple(sd[key].shape)

    if "img_emb.proj.0.weight" in sd:
        raise InputError(f"{source}: image-to-video weights (img_emb.*) are not supported; only t2v")
    dim, in_dim, *patch = shape("patch_embedding.weight")
    layers = sorted({int(m.group(1)) for k in sd if (m := re.match(r"^blocks\.(\d+)\.", k))})
    if layers != list(range(len(layers))) or not layers:
        raise InputError(f"{source}: block indices must be 0..N-1 with N >= 1, found {layers[:10]}")
    head_out = shape("head.head.weight")[0]
    patch_volume = patch[0] * patch[1] * patch[2]
    if head_out % patch_volume:
        raise InputError(f"{source}: head.head.weight has {head_out} outputs, not a multiple of patch volume "
                         f"{patch_volume}")
    if num_heads is None:
        if dim % 128:
            raise InputError(f"{source}: dim {dim} is not a multiple of 128, pass num_heads explicitly")
        num_heads = dim // 128
    return WanConfig(
        patch_size=tuple(patch),
        text_len=text_len,
        in_dim=in_dim,
        dim=dim,
        ffn_dim=shape("blocks.0.ffn.0.weight")[0],
        freq_dim=shape("time_embedding.0.weight")[1],
        text_dim=shape("text_embedding.0.weight")[1],
        out_dim=head_out // patch_volume,
        num_heads=num_heads,
        num_layers=len(layers),
        qk_norm="blocks.0.self_attn.norm_q.weight" in sd,
        cross_attn_norm="blocks.0.norm3.weight" in sd,
        eps=eps,
    )
