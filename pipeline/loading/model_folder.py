"""The self-contained model folder: what the Hub export writes, what `inference.py --model DIR` reads, and the form
of the bundled shapes-world model.

    model_index.json                   components and their classes
    transformer/config.json            WanConfig + "causal": the rollout settings (Config keys)
    transformer/diffusion_pytorch_model.safetensors   original Wan key names
    text_encoder/, tokenizer/          transformers UMT5EncoderModel + tokenizer (save_pretrained layout)
    vae/                               diffusers AutoencoderKLWan folder         } one of the two
    codec/config.json                  a parameter-free codec (the shapes world) }
    README.md                          model card (written by the export)
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from model.config import WanConfig
from model.pixel_codec import PixelShuffleCodec
from model.wan import WanDiT
from pipeline.loading.checkpoint import (load_state_dict_strict, load_wan_safetensors, read_transformer_config,
                                         save_wan_safetensors_sharded)
from utils.errors import InputError, MissingFileError, reading

MODEL_INDEX = "model_index.json"
PIPELINE_CLASS = "SelfForcingPipeline"  # the index's _class_name: what marks a folder as one of ours
# Config keys that describe how a generator rolls out; stored with the transformer so a folder runs as trained. The
# folder keeps the original's flat spelling (what exported folders and their readers use); loading maps it onto the
# config's sections (utils/config/original_keys.py).
CAUSAL_KEYS = ("denoising_step_list", "warp_denoising_step", "num_frame_per_block", "independent_first_frame",
               "context_noise", "negative_prompt", "height", "width", "fps", "decoder", "image_or_video_shape",
               "model_kwargs.timestep_shift", "model_kwargs.local_attn_size", "model_kwargs.sink_size",
               "model_kwargs.rope")


def is_model_folder(path: str | Path) -> bool:
    return (Path(path) / MODEL_INDEX).is_file()


def causal_settings(cfg: Any) -> dict[str, Any]:
    """The rollout-relevant part of a Config, as stored in transformer/config.json["causal"]."""
    from utils.config.original_keys import flat_values
    return flat_values(cfg, CAUSAL_KEYS)


def save_model_folder(folder: str | Path, *, transformer: WanDiT | dict[str, torch.Tensor], wan_config: WanConfig,
                      causal: dict[str, Any], text_encoder: Any = None, tokenizer: Any = None, vae: Any = None,
                      codec: PixelShuffleCodec | None = None, extra_files: dict[str, str] | None = None,
                      transformer_format: str = "original", max_shard_bytes: int = 5 * 2**30,
                      index_extra: dict[str, Any] | None = None) -> Path:
    """Write the folder atomically (a temp folder renamed into place). `text_encoder`: a transformers model with
    `save_pretrained`; `vae`: a diffusers model with `save_pretrained`; `codec`: a parameter-free codec.
    `transformer_format`: "original" (Wan key names, our config) or "diffusers" (`WanTransformer3DModel` keys and
    config, loadable by its `from_pretrained`); weights above `max_shard_bytes` are sharded with an index."""
    if transformer_format not in ("original", "diffusers"):
        raise ValueError(f"transformer_format must be 'original' or 'diffusers', got {transformer_format!r}")
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        index: dict[str, Any] = {"_class_name": PIPELINE_CLASS, **(index_extra or {})}
        (tmp / "transformer").mkdir()
        state = transformer.state_dict() if isinstance(transformer, torch.nn.Module) else transformer
        state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
        if transformer_format == "diffusers":
            from diffusers import __version__ as diffusers_version

            from model.dit_keys import diffusers_config_json, wan_to_diffusers
            state = wan_to_diffusers(state)
            config = {"_class_name": "WanTransformer3DModel", "_diffusers_version": diffusers_version,
                      **diffusers_config_json(wan_config), "causal": causal}
            index["transformer"] = ["diffusers", "WanTransformer3DModel"]
        else:
            config = wan_config.to_dict() | {"causal": causal}
            index["transformer"] = ["self_forcing", "WanDiT"]
        save_wan_safetensors_sharded(state, tmp / "transformer", max_shard_bytes=max_shard_bytes)
        (tmp / "transformer" / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
        if text_encoder is not None:
            text_encoder.save_pretrained(tmp / "text_encoder")
            index["text_encoder"] = ["transformers", type(text_encoder).__name__]
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp / "tokenizer")
            index["tokenizer"] = ["transformers", type(tokenizer).__name__]
        if vae is not None:
            vae.save_pretrained(tmp / "vae")
            index["vae"] = ["diffusers", type(vae).__name__]
        if codec is not None:
            (tmp / "codec").mkdir()
            (tmp / "codec" / "config.json").write_text(json.dumps(codec.config(), indent=2))
            index["codec"] = ["self_forcing", type(codec).__name__]
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        (tmp / MODEL_INDEX).write_text(json.dumps(index, indent=2))
        os.chmod(tmp, 0o755)
        if folder.exists():
            backup = folder.with_name(f".{folder.name}.old")
            shutil.rmtree(backup, ignore_errors=True)
            folder.rename(backup)
            tmp.rename(folder)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def read_model_index(folder: str | Path) -> dict[str, Any]:
    folder = Path(folder)
    path = folder / MODEL_INDEX
    if not path.is_file():
        raise MissingFileError(f"{folder} is not a model folder: {MODEL_INDEX} is missing")
    with reading(str(path)):
        return json.loads(path.read_text())


def load_transformer(folder: str | Path, device: str | torch.device = "cpu",
                     dtype: torch.dtype = torch.float32) -> tuple[WanDiT, dict[str, Any]]:
    """The generator and its stored causal settings."""
    tdir = Path(folder) / "transformer"
    wan_config, causal = read_transformer_config(tdir / "config.json")
    with torch.device("meta"):
        model = WanDiT(wan_config)
    state = load_wan_safetensors(tdir)
    with reading(f"transformer weights {tdir}"):
        load_state_dict_strict(model, state, str(tdir), assign=True)
    return model.to(device=device, dtype=dtype).eval(), causal


def has_codec(folder: str | Path) -> bool:
    return (Path(folder) / "codec" / "config.json").is_file() or (Path(folder) / "vae").is_dir()


def load_codec(folder: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    folder = Path(folder)
    if (folder / "codec" / "config.json").is_file():
        with reading(f"codec settings {folder / 'codec' / 'config.json'}"):
            cfg = json.loads((folder / "codec" / "config.json").read_text())
        kind = cfg.pop("type", None) if isinstance(cfg, dict) else None
        if kind != "pixel_shuffle":
            raise InputError(f"{folder / 'codec' / 'config.json'}: unknown codec type {kind!r}")
        try:
            return PixelShuffleCodec(**cfg)
        except TypeError as err:  # unknown or missing keys
            raise InputError(f"{folder / 'codec' / 'config.json'}: {err}") from None
    if (folder / "vae").is_dir():
        from pipeline.loading.wan_components import load_wan_vae
        return load_wan_vae(folder, device=device, dtype=dtype)
    raise MissingFileError(f"{folder} has neither codec/ nor vae/")


def load_text_encoder(folder: str | Path, text_len: int, device: str | torch.device = "cpu",
                      dtype: torch.dtype = torch.float32):
    """`text_encoder/` + `tokenizer/` of the folder; `text_len` is the generator's (rows it pads context to)."""
    if not (Path(folder) / "text_encoder").is_dir():
        raise MissingFileError(f"model folder {folder} has no text_encoder/ (export with --include-base, or give "
                               "--model-root)")
    from pipeline.loading.wan_components import load_wan_text_encoder
    return load_wan_text_encoder(folder, text_len=text_len, device=device, dtype=dtype)

