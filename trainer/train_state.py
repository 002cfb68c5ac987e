"""Training checkpoints on disk: layout, atomic writes, discovery for `--resume`, pruning.

One folder per checkpoint, `<logdir>/checkpoint_model_{step:06d}/`, holding

    generator.safetensors            generator weights, original Wan keys (no `model.` prefix; LoRA merged), fp32
    generator_ema.safetensors        EMA of the generator, same keys (once EMA has started)
    critic.safetensors               critic (fake score / discriminator trunk), original Wan keys (if trained)
    discriminator_heads.safetensors  GAN heads (if any)
    lora_adapter.safetensors         LoRA runs: the adapter tensors (peft names); lora_adapter_ema.safetensors: their EMA
    config.json                      the generator's WanConfig, so `pipeline.loading.checkpoint.
                                     load_dit_state_dict(".../generator_ema.safetensors")` returns weights and
                                     architecture
    config.yaml                      the run's configuration (wandb_key redacted)
    training_state.pt                step, optimizer states (full, keyed by parameter name), RNG states of every
                                     rank, the shared generator, data position, EMA counters, non-finite counter;
                                     tensors and plain containers only (read with torch.load(weights_only=True))

The folder is written under a temporary name in the logdir and renamed into place, so a crash mid-save leaves the
previous checkpoints untouched and never a half-written folder under a checkpoint name.
"""
from __future__ import annotations

import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from safetensors.torch import load_file

from pipeline.loading.checkpoint import clean_key, save_safetensors_atomic
from utils.errors import InputError, InputKeyError, MissingFileError
from utils.lora import adapter_state_dict, lora_scaling, merge_lora_state_dict

CHECKPOINT_PREFIX = "checkpoint_model_"
TRAINING_STATE = "training_state.pt"
FORMAT_VERSION = 1
_TMP_PREFIX = ".tmp-"
_NAME = re.compile(rf"^{CHECKPOINT_PREFIX}(\d+)$")


def checkpoint_dir(logdir: str | Path, step: int) -> Path:
    return Path(logdir) / f"{CHECKPOINT_PREFIX}{step:06d}"


def list_checkpoints(logdir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints in `logdir` as (step, folder), oldest first (temporary folders are ignored)."""
    root = Path(logdir)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        m = _NAME.match(child.name)
        if m and child.is_dir() and (child / TRAINING_STATE).is_file():
            found.append((int(m.group(1)), child))
    return sorted(found)


def latest_checkpoint(logdir: str | Path) -> Optional[Path]:
    found = list_checkpoints(logdir)
    return found[-1][1] if found else None


def resolve_resume(resume: Optional[str], logdir: str | Path) -> Optional[Path]:
    """`--resume` argument -> checkpoint folder. "latest" (the flag alone) -> newest in logdir, or None (start fresh,
    so a job script with --resume works on its first launch). A path must exist and hold a training state."""
    if resume is None:
        return None
    if resume == "latest":
        return latest_checkpoint(logdir)
    path = Path(resume)
    if path.is_file() and path.name == TRAINING_STATE:
        path = path.parent
    if not path.is_dir():
        raise MissingFileError(f"--resume {resume}: no such checkpoint folder")
    if not (path / TRAINING_STATE).is_file():
        nested = latest_checkpoint(path)
        if nested is None:
            raise MissingFileError(f"--resume {resume}: {path} holds no {TRAINING_STATE} and no "
                                    f"{CHECKPOINT_PREFIX}* folder")
        path = nested
    return path


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some filesystems refuse opening directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _save_torch(obj: Any, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def write_checkpoint(logdir: str | Path, step: int, *, tensors: dict[str, dict[str, torch.Tensor]],
                     training_state: dict[str, Any], texts: dict[str, str]) -> Path:
    """Write `checkpoint_model_{step:06d}/` atomically. `tensors`: file stem -> state dict (safetensors);
    `texts`: file name -> content. Replaces an existing folder of the same step. Rank 0 only."""
    logdir = Path(logdir)
    logdir.mkdir(parents=True, exist_ok=True)
    final = checkpoint_dir(logdir, step)
    tmp = logdir / f"{_TMP_PREFIX}{final.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        for stem, sd in tensors.items():
            save_safetensors_atomic(sd, tmp / f"{stem}.safetensors", metadata={"format": "pt", "step": str(step)})
        for name, text in texts.items():
            (tmp / name).write_text(text, encoding="utf-8")
        # Written last: list_checkpoints only counts folders holding it.
        _save_torch({"format_version": FORMAT_VERSION, **training_state}, tmp / TRAINING_STATE)
        _fsync_dir(tmp)
        if final.exists():
            old = logdir / f"{_TMP_PREFIX}old-{final.name}-{uuid.uuid4().hex[:8]}"
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
        _fsync_dir(logdir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def remove_stale_temporaries(logdir: str | Path) -> None:
    """Delete leftovers of saves that were killed mid-way (rank 0, before the first save of a run)."""
    root = Path(logdir)
    if root.is_dir():
        for child in root.iterdir():
            if child.name.startswith(_TMP_PREFIX + CHECKPOINT_PREFIX) or child.name.startswith(_TMP_PREFIX + "old-"):
                shutil.rmtree(child, ignore_errors=True)


def prune_checkpoints(logdir: str | Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` checkpoints (keep <= 0 keeps everything); returns what was removed."""
    if keep <= 0:
        return []
    removed = []
    for _, path in list_checkpoints(logdir)[:-keep]:
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def load_training_state(folder: str | Path) -> dict[str, Any]:
    """`training_state.pt` of a checkpoint folder, read with weights_only=True (memory-mapped)."""
    path = Path(folder) / TRAINING_STATE
    if not path.is_file():
        raise MissingFileError(f"checkpoint {folder} has no {TRAINING_STATE}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:
        raise InputError(f"{path}: not a readable training state (corrupt, or written by another program): "
                         f"{type(err).__name__}: {str(err)[:300]}") from err
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        raise InputError(f"{path}: expected a training state of format_version {FORMAT_VERSION}, got "
                         f"{state.get('format_version') if isinstance(state, dict) else type(state).__name__}")
    return state


def read_weights(folder: str | Path, stem: str, required: bool = True) -> Optional[dict[str, torch.Tensor]]:
    """`<folder>/<stem>.safetensors` as a state dict (None when absent and not required)."""
    path = Path(folder) / f"{stem}.safetensors"
    if not path.is_file():
        if required:
            raise MissingFileError(f"checkpoint {folder} has no {path.name}")
        return None
    try:
        return load_file(str(path), device="cpu")
    except Exception as err:
        raise InputError(f"{path}: not a readable safetensors file (corrupt or truncated?): {err}") from err


def remap_to_module(sd: dict[str, torch.Tensor], module_keys: list[str], clean: Callable[[str], str],
                    source: str) -> dict[str, torch.Tensor]:
    """Rename clean checkpoint keys to a module's own state-dict keys (which may carry wrapper infixes)."""
    by_clean = {clean(k): k for k in module_keys}
    out, unknown = {}, []
    for key, value in sd.items():
        target = by_clean.get(key, key if key in module_keys else None)
        if target is None:
            unknown.append(key)
        else:
            out[target] = value
    if unknown:
        raise InputKeyError(f"{source}: {len(unknown)} key(s) do not belong to the model, e.g. {sorted(unknown)[:5]}")
    return out


# ------------------------------------------------------------------------------- what a training run stores

class CheckpointIO:
    """Gathers the weights of a `Models` bundle into checkpoint files and restores them (collectives when sharded).

    Roles: "generator" is `models.generator.model`; "critic" is `models.critic.model`, grouped with
    `models.discriminator_heads` when present (one optimizer covers both).
    """

    def __init__(self, models: Any, lora_rank: int = 0, lora_alpha: float = 0.0):
        from torch import nn

        self.models = models
        self.lora_scaling = lora_scaling(lora_rank, lora_alpha) if lora_rank > 0 else None
        self._modules: dict[str, nn.Module] = {"generator": models.generator.model}
        if models.critic is not None:
            critic = models.critic.model
            heads = models.discriminator_heads
            self._modules["critic"] = critic if heads is None else nn.ModuleDict({"critic": critic, "heads": heads})

    def module(self, role: str):
        if role not in self._modules:
            raise KeyError(f"no {role!r} network in the models bundle")
        return self._modules[role]

    def _generator_files(self, sd: dict[str, torch.Tensor], stem: str) -> dict[str, dict[str, torch.Tensor]]:
        out = {stem: {clean_key(k): v for k, v in merge_lora_state_dict(sd, self.lora_scaling or 1.0).items()}}
        if self.lora_scaling is not None:
            out[f"lora_adapter{stem[len('generator'):]}"] = adapter_state_dict(sd)
        return out

    def gather(self, ema: Any = None) -> dict[str, dict[str, torch.Tensor]]:
        """File stem -> clean state dict; complete on rank 0, empty on the others. Every rank must call it."""
        from utils.distributed import full_model_state_dict

        gen = full_model_state_dict(self._modules["generator"])
        files = self._generator_files(gen, "generator")
        if ema is not None and ema.started:
            shadow = ema.full_state_dict()
            files.update(self._generator_files({**gen, **shadow}, "generator_ema"))
            if self.lora_scaling is not None:
                files["lora_adapter_ema"] = adapter_state_dict(shadow)
        if self.models.critic is not None:
            files["critic"] = {clean_key(k): v for k, v in full_model_state_dict(self.models.critic.model).items()}
            if self.models.discriminator_heads is not None:
                files["discriminator_heads"] = full_model_state_dict(self.models.discriminator_heads)
        return {stem: sd for stem, sd in files.items() if sd}

    def texts(self, cfg: Any) -> dict[str, str]:
        import dataclasses
        import json

        from omegaconf import OmegaConf

        from utils.logging import redact

        out = {"config.yaml": OmegaConf.to_yaml(OmegaConf.create(redact(dataclasses.asdict(cfg))))}
        wan_config = getattr(self._modules["generator"], "config", None)
        if hasattr(wan_config, "to_dict"):
            out["config.json"] = json.dumps(wan_config.to_dict(), indent=2)
        return out

    def _load(self, module: Any, folder: Path, stem: str, is_main: bool, strict: bool = True) -> None:
        from utils.distributed import load_full_model_state_dict

        sd: dict[str, torch.Tensor] = {}
        if is_main:
            sd = read_weights(folder, stem) or {}
            sd = remap_to_module(sd, list(module.state_dict().keys()), clean_key, str(folder / f"{stem}.safetensors"))
        load_full_model_state_dict(module, sd, strict=strict)

    def restore(self, folder: str | Path, ema: Any, ema_params: dict[str, Any], is_main: bool = True) -> None:
        """Load generator (or its LoRA adapters), critic, heads and the EMA shadow from a checkpoint folder."""
        folder = Path(folder)
        gen = self._modules["generator"]
        lora = self.lora_scaling is not None
        self._load(gen, folder, "lora_adapter" if lora else "generator", is_main, strict=not lora)
        if self.models.critic is not None and (folder / "critic.safetensors").is_file():
            self._load(self.models.critic.model, folder, "critic", is_main)
            if self.models.discriminator_heads is not None:
                self._load(self.models.discriminator_heads, folder, "discriminator_heads", is_main)
        ema_stem = "lora_adapter_ema" if lora else "generator_ema"
        if ema is None or not (folder / f"{ema_stem}.safetensors").is_file():
            return
        if is_main:
            sd = read_weights(folder, ema_stem)
            sd = remap_to_module(sd, list(gen.state_dict().keys()), clean_key, str(folder / f"{ema_stem}.safetensors"))
            sd = {name: sd[name] for name in ema_params if name in sd}
        else:  # only rank 0's values are used when the shadow is re-sharded
            sd = {name: torch.empty(tuple(p.shape)) for name, p in ema_params.items()}
        ema.load_full_state_dict(sd, ema_params, source=str(folder / f"{ema_stem}.safetensors"))
