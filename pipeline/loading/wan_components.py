"""Load the real Wan2.1 components from the original folder layout (`wan_models/Wan2.1-T2V-1.3B/` etc.):

    <model_root>/<name>/config.json, diffusion_pytorch_model*.safetensors   DiT
    <model_root>/<name>/models_t5_umt5-xxl-enc-bf16.pth + google/umt5-xxl/  text encoder + tokenizer
    <model_root>/<name>/Wan2.1_VAE.pth                                       VAE

A diffusers-layout folder (`transformer/`, `text_encoder/`, `tokenizer/`, `vae/`) is accepted as well.
Weights load on the meta device first so nothing is initialised twice.
"""
from __future__ import annotations

from pathlib import Path

import torch

from model.config import WanConfig
from model.wan import WanDiT
from pipeline.loading.checkpoint import load_dit_state_dict, load_state_dict_strict, read_transformer_config
from utils.errors import MissingFileError, reading

T5_CHECKPOINT = "models_t5_umt5-xxl-enc-bf16.pth"
T5_TOKENIZER = Path("google") / "umt5-xxl"
VAE_CHECKPOINT = "Wan2.1_VAE.pth"


def model_dir(model_root: str | Path, name: str) -> Path:
    path = Path(model_root) / name
    if not path.is_dir():
        raise MissingFileError(f"model folder {path} does not exist (set model_root / the model name in the config)")
    return path


def wan_config_of(folder: Path) -> WanConfig:
    """Architecture from an original `config.json`, or a diffusers `transformer/config.json`."""
    if (folder / "config.json").is_file():
        return WanConfig.from_json(folder / "config.json")
    if (folder / "transformer" / "config.json").is_file():
        return read_transformer_config(folder / "transformer" / "config.json")[0]
    raise MissingFileError(f"{folder} has no config.json (nor transformer/config.json)")


def load_wan_dit(folder: str | Path, *, checkpoint: str | Path | None = None, use_ema: bool = False,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> WanDiT:
    """The DiT of `folder`, with weights from `checkpoint` (a Self-Forcing .pt, safetensors, ...) if given."""
    folder = Path(folder)
    config = wan_config_of(folder)
    state, stored_config = load_dit_state_dict(checkpoint or folder, use_ema=use_ema)
    if stored_config is not None and stored_config.to_dict() != config.to_dict():
        config = stored_config
    with torch.device("meta"):
        model = WanDiT(config)
    with reading(f"DiT weights {checkpoint or folder}"):
        load_state_dict_strict(model, state, str(checkpoint or folder), assign=True)
    return model.to(device=device, dtype=dtype).eval()


def load_wan_text_encoder(folder: str | Path, *, text_len: int = 512, device: str | torch.device = "cpu",
                          dtype: torch.dtype = torch.float32):
    """The text encoder and tokenizer of `folder`: `text_encoder/` + `tokenizer/`, or the original T5 files."""
    from model.text_encoder import TextEncoder
    folder = Path(folder)
    if (folder / "text_encoder").is_dir():
        if not (folder / "tokenizer").is_dir():
            raise MissingFileError(f"{folder / 'tokenizer'} does not exist: a folder with text_encoder/ also needs "
                                   "its tokenizer/")
        with reading(f"text encoder {folder / 'text_encoder'} or tokenizer {folder / 'tokenizer'}"):
            return TextEncoder.from_diffusers_folder(folder, dtype=dtype, device=device, text_len=text_len)
    if not (folder / T5_CHECKPOINT).is_file():
        raise MissingFileError(f"{folder} has no text encoder: expected text_encoder/ + tokenizer/, or "
                               f"{T5_CHECKPOINT} + {T5_TOKENIZER}/")
    if not (folder / T5_TOKENIZER).is_dir():
        raise MissingFileError(f"tokenizer folder {folder / T5_TOKENIZER} does not exist (needed beside "
                               f"{folder / T5_CHECKPOINT})")
    with reading(f"text encoder {folder / T5_CHECKPOINT} or tokenizer {folder / T5_TOKENIZER}"):
        return TextEncoder.from_wan_checkpoint(folder / T5_CHECKPOINT, folder / T5_TOKENIZER, dtype=dtype,
                                               device=device, text_len=text_len)


def load_wan_vae(folder: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    from model.vae import WanVAE
    folder = Path(folder)
    if (folder / "vae").is_dir():
        with reading(f"VAE {folder / 'vae'}"):
            return WanVAE.from_diffusers_folder(folder / "vae", dtype=dtype).to(device)
    with reading(f"VAE {folder / VAE_CHECKPOINT}"):
        return WanVAE.from_wan_checkpoint(folder / VAE_CHECKPOINT, dtype=dtype).to(device)
