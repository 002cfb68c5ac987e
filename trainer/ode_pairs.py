"""ODE pairs on disk: teacher ODE trajectories for ODE-regression initialisation (docs/method.md), in safetensors.

The original wrote one `.pt` pickle per prompt and then converted them to an LMDB whose shape entry came from the
last processed file (wrong when that file was all duplicates). This format replaces both:

    folder/
      index.json    {"format": "self-forcing-ode-pairs", "version": 1,
                     "num_pairs": N,                      sum of the shard counts
                     "latent_shape": [K, F, C, H, W],     of one pair (K trajectory entries)
                     "timesteps": [t_0, ..., t_{K-1}],    noise level (0..T scale) of each entry; the last is 0
                     "dtype": "bfloat16",                 storage dtype of the shards
                     "teacher": "...", "sampler": {...},  provenance (free-form)
                     "shards": [{"file": "shard-r000-00000.safetensors", "count": n}, ...]}
      shard-r{rank:03d}-{i:05d}.safetensors
                    tensor "ode_latent" [n, K, F, C, H, W]; string metadata (JSON, UTF-8):
                    "format" (as above), "prompts" (list of n str), "indices" (list of n int: each prompt's index
                    in the prompt file), "timesteps" (list of K float)

Entry K-1 of every trajectory is the clean sample (what ODE regression regresses to); the other entries are the
noisy states the generator is fed. Each rank of a generation job writes its own shards (`OdePairWriter`, each shard
written atomically); rank 0 then writes `index.json` by scanning the shards that exist (`finalize_index`), so the
index is right for any number of ranks. `ODEPairDataset` reads pairs lazily, one at a time.
"""
from __future__ import annotations

import bisect
import json
import math
import os
import re
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from pipeline.loading.checkpoint import save_safetensors_atomic
from utils.errors import InputError, InputKeyError, MissingFileError

FORMAT = "self-forcing-ode-pairs"
VERSION = 1
INDEX = "index.json"
LATENT_KEY = "ode_latent"
SHARD_PATTERN = re.compile(r"^shard-r(\d{3,})-(\d{5,})\.safetensors$")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
_SAFETENSORS_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}
# Timesteps live on the 0..1000 scale; stored and configured steps agree far better than half a grid step, while
# a wrong shift or a missing warp moves them by tens.
TIMESTEP_ATOL = 0.5


def shard_name(rank: int, number: int) -> str:
    return f"shard-r{rank:03d}-{number:05d}.safetensors"


def dtype_name(dtype: torch.dtype) -> str:
    for name, value in DTYPES.items():
        if value == dtype:
            return name
    raise ValueError(f"ODE pairs are stored as one of {list(DTYPES)}, got {dtype}")


def _check_timesteps(timesteps: Sequence[float], k: int | None, source: str) -> list[float]:
    try:
        values = [float(t) for t in timesteps]
    except (TypeError, ValueError):
        raise InputError(f"{source}: timesteps must be a list of numbers, got {timesteps!r}") from None
    if not values or values[-1] != 0.0 or any(not math.isfinite(t) for t in values):
        raise InputError(f"{source}: timesteps must be finite and end with 0 (the clean sample), got {values}")
    if k is not None and len(values) != k:
        raise InputError(f"{source}: {len(values)} timesteps for trajectories of {k} entries")
    return values


class OdePairWriter:
    """Appends (prompts, trajectories) of one rank and writes a shard of `shard_size` pairs whenever one is full.

    timesteps: the K noise levels of the trajectory entries (last 0), stored in every shard.
    dtype: storage dtype (bfloat16 halves the size of the original's float32 pickles).
    Call `close()` (or use `with`) to write the last, partial shard.
    """

    def __init__(self, folder: str | Path, rank: int = 0, shard_size: int = 64, *,
                 timesteps: Sequence[float] | None = None, dtype: torch.dtype = torch.bfloat16):
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        if rank < 0:
            raise ValueError(f"rank must be >= 0, got {rank}")
        self.folder = Path(folder)
        self.rank = rank
        self.shard_size = shard_size
        self.dtype = DTYPES[dtype_name(dtype)]
        self.timesteps = None if timesteps is None else _check_timesteps(timesteps, None, "OdePairWriter")
        self.written: list[Path] = []
        self._prompts: list[str] = []
        self._indices: list[int] = []
        self._latents: list[Tensor] = []
        self._next_index = 0
        self._entry_shape: tuple[int, ...] | None = None
        self.folder.mkdir(parents=True, exist_ok=True)

    def __enter__(self) -> "OdePairWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()

    def add(self, prompts: Sequence[str], trajectories: Tensor, indices: Sequence[int] | None = None) -> None:
        """prompts: n strings; trajectories: `[n, K, F, C, H, W]`; indices: each prompt's index in its prompt file
        (default: a running count over this writer)."""
        if isinstance(prompts, str):
            raise TypeError("prompts must be a list of strings, not one string")
        n = len(prompts)
        if trajectories.dim() != 6 or trajectories.shape[0] != n:
            raise ValueError(f"trajectories must be [{n}, K, F, C, H, W] for {n} prompts, "
                             f"got {list(trajectories.shape)}")
        entry = tuple(trajectories.shape[1:])
        if self._entry_shape is not None and entry != self._entry_shape:
            raise ValueError(f"trajectory shape {list(entry)} differs from the earlier {list(self._entry_shape)}")
        if self.timesteps is not None and entry[0] != len(self.timesteps):
            raise ValueError(f"trajectories have {entry[0]} entries but timesteps has {len(self.timesteps)}")
        if indices is None:
            indices = range(self._next_index, self._next_index + n)
        if len(indices) != n:
            raise ValueError(f"{len(indices)} indices for {n} prompts")
        self._entry_shape = entry
        self._next_index += n
        self._prompts.extend(str(p) for p in prompts)
        self._indices.extend(int(i) for i in indices)
        self._latents.extend(trajectories.detach().to("cpu", self.dtype).unbind(0))
        while len(self._prompts) >= self.shard_size:
            self._flush(self.shard_size)

    def _flush(self, count: int) -> None:
        path = self.folder / shard_name(self.rank, len(self.written))
        metadata = {"format": FORMAT, "prompts": json.dumps(self._prompts[:count], ensure_ascii=False),
                    "indices": json.dumps(self._indices[:count])}
        if self.timesteps is not None:
            metadata["timesteps"] = json.dumps(self.timesteps)
        save_safetensors_atomic({LATENT_KEY: torch.stack(self._latents[:count])}, path, metadata=metadata)
        del self._prompts[:count], self._indices[:count], self._latents[:count]
        self.written.append(path)

    def close(self) -> list[Path]:
        """Write what is left; returns every shard this writer wrote."""
        if self._prompts:
            self._flush(len(self._prompts))
        return self.written


def shard_files(folder: str | Path) -> list[Path]:
    """The shard files in `folder`, ordered by (rank, number)."""
    found = []
    for path in Path(folder).iterdir():
        m = SHARD_PATTERN.match(path.name)
        if m:
            found.append(((int(m.group(1)), int(m.group(2))), path))
    return [p for _, p in sorted(found)]


def _read_shard_header(path: Path) -> dict[str, Any]:
    """{"count", "entry_shape", "dtype", "prompts", "indices", "timesteps"} of a shard, without loading its tensor."""
    try:
        f = safe_open(str(path), framework="pt")
    except (OSError, SafetensorError) as err:  # truncated or foreign files
        raise InputError(f"{path} is not a readable safetensors file: {err}") from None
    meta = f.metadata() or {}
    if meta.get("format") != FORMAT:
        raise InputError(f"{path}: metadata 'format' is {meta.get('format')!r}, expected {FORMAT!r}")
    if LATENT_KEY not in f.keys():
        raise InputKeyError(f"{path} has no tensor {LATENT_KEY!r} (found {list(f.keys())})")
    sl = f.get_slice(LATENT_KEY)
    shape = list(sl.get_shape())
    if len(shape) != 6:
        raise InputError(f"{path}: {LATENT_KEY} must be [n, K, F, C, H, W], got {shape}")
    try:
        prompts = json.loads(meta["prompts"])
    except (KeyError, json.JSONDecodeError):
        raise InputKeyError(f"{path}: metadata 'prompts' (a JSON list of strings) is missing or malformed") from None
    if not isinstance(prompts, list) or len(prompts) != shape[0]:
        raise InputError(f"{path}: {len(prompts)} prompts in the metadata for {shape[0]} trajectories")
    timesteps = json.loads(meta["timesteps"]) if "timesteps" in meta else None
    return {"count": shape[0], "entry_shape": shape[1:], "dtype": _SAFETENSORS_DTYPES.get(sl.get_dtype()),
            "prompts": prompts, "indices": json.loads(meta.get("indices", "null")), "timesteps": timesteps}


def _write_json_atomic(data: dict[str, Any], path: Path) -> None:
    tmp = path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def finalize_index(folder: str | Path, *, timesteps: Sequence[float] | None = None, teacher: str = "",
                   sampler: dict[str, Any] | None = None) -> dict[str, Any]:
    """Scan every shard in `folder` (all ranks' shards must be written: call after a barrier, on one rank) and
    write `index.json`. Counts, shapes and dtype come from each shard's own header; shards must agree on the pair
    shape, dtype and timesteps. `timesteps` is required when the shards do not carry them. Returns the index."""
    folder = Path(folder)
    files = shard_files(folder)
    if not files:
        raise MissingFileError(f"{folder} holds no ODE-pair shards (shard-r*-*.safetensors); nothing to index")
    expected = None if timesteps is None else _check_timesteps(timesteps, None, "finalize_index")
    shards, entry_shape, dtype = [], None, None
    for path in files:
        head = _read_shard_header(path)
        if entry_shape is None:
            entry_shape, dtype = head["entry_shape"], head["dtype"]
        if head["entry_shape"] != entry_shape or head["dtype"] != dtype:
            raise InputError(f"{path}: pairs of shape {head['entry_shape']} ({head['dtype']}) differ from "
                             f"{files[0].name}'s {entry_shape} ({dtype})")
        if head["timesteps"] is not None:
            stored = _check_timesteps(head["timesteps"], entry_shape[0], str(path))
            if expected is None:
                expected = stored
            elif not torch.allclose(torch.tensor(stored), torch.tensor(expected), atol=1e-3, rtol=0):
                raise InputError(f"{path}: timesteps {stored} differ from {expected}")
        shards.append({"file": path.name, "count": head["count"]})
    if expected is None:
        raise InputError(f"the shards in {folder} carry no timesteps; pass timesteps=[...] (K values, last 0)")
    index = {"format": FORMAT, "version": VERSION, "num_pairs": sum(s["count"] for s in shards),
             "latent_shape": entry_shape, "timesteps": _check_timesteps(expected, entry_shape[0], str(folder)),
             "dtype": dtype, "teacher": teacher, "sampler": sampler or {}, "shards": shards}
    _write_json_atomic(index, folder / INDEX)
    return index


def clear_output(folder: str | Path, overwrite: bool, delete: bool) -> None:
    """Refuse to write into a folder that already holds ODE pairs unless `overwrite`; with `delete` (one rank
    only), remove the old index, shards and leftover temporary files so a smaller rerun leaves no stale shard."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    old = [p for p in folder.iterdir() if p.name == INDEX or SHARD_PATTERN.match(p.name)]
    if old and not overwrite:
        raise InputError(f"{folder} already holds ODE pairs ({len(old)} files, e.g. {min(old).name}); "
                         "choose another output folder or pass --overwrite")
    if delete:
        temps = [p for p in folder.iterdir() if p.name.startswith((".shard-r", f".{INDEX}.")) and p.suffix == ".tmp"]
        for path in old + temps:
            path.unlink(missing_ok=True)


def _require(index: dict[str, Any], key: str, kind: type | tuple[type, ...], path: Path) -> Any:
    if key not in index:
        raise InputKeyError(f"{path}: key {key!r} is missing")
    if not isinstance(index[key], kind):
        raise InputError(f"{path}: key {key!r} must be {kind}, got {index[key]!r}")
    return index[key]


class ODEPairDataset:
    """The pairs of a folder written by `OdePairWriter` + `finalize_index`, read lazily.

    `ds[i]` -> `{"prompts": str, "ode_latent": float32 [K, F, C, H, W], "idx": i}`, opening only shard i's file
    (memory-mapped; one pair is read). `timesteps`: the K noise levels of the entries (last 0).
    `verify`: check every listed shard's header (count, shape, dtype) up front.
    """

    def __init__(self, folder: str | Path, verify: bool = True):
        self.folder = Path(folder)
        path = self.folder / INDEX
        if not self.folder.is_dir():
            raise MissingFileError(f"ODE-pair folder {self.folder} does not exist "
                                    "(write one with scripts/generate_ode_pairs.py)")
        if not path.is_file():
            raise MissingFileError(f"{path} does not exist; is {self.folder} an ODE-pair folder written by "
                                    "scripts/generate_ode_pairs.py (rank 0 writes it when all ranks are done)?")
        try:
            index = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise InputError(f"{path} is not valid JSON: {err}") from None
        if not isinstance(index, dict) or index.get("format") != FORMAT:
            found = index.get("format") if isinstance(index, dict) else type(index).__name__
            raise InputError(f"{path}: key 'format' is {found!r}, expected {FORMAT!r}")
        version = _require(index, "version", int, path)
        if version > VERSION:
            raise InputError(f"{path}: format version {version} is newer than this code reads ({VERSION})")
        shape = _require(index, "latent_shape", list, path)
        if len(shape) != 5 or not all(isinstance(s, int) and s > 0 for s in shape):
            raise InputError(f"{path}: key 'latent_shape' must be [K, F, C, H, W] positive ints, got {shape}")
        self.latent_shape = tuple(shape)
        self.timesteps = _check_timesteps(_require(index, "timesteps", list, path), shape[0], f"{path}: key "
                                          "'timesteps'")
        self.dtype = _require(index, "dtype", str, path)
        if self.dtype not in DTYPES:
            raise InputError(f"{path}: key 'dtype' must be one of {list(DTYPES)}, got {self.dtype!r}")
        self.index = index
        self.files: list[Path] = []
        self.offsets = [0]
        for n, shard in enumerate(_require(index, "shards", list, path)):
            if not isinstance(shard, dict) or not isinstance(shard.get("file"), str) \
                    or not isinstance(shard.get("count"), int) or shard["count"] < 0:
                raise InputError(f"{path}: shards[{n}] must be {{'file': str, 'count': int}}, got {shard!r}")
            file = self.folder / shard["file"]
            if not file.is_file():
                raise MissingFileError(f"{path}: shards[{n}] lists {shard['file']}, which does not exist in "
                                        f"{self.folder}")
            if verify:
                self._verify_shard(file, shard["count"])
            self.files.append(file)
            self.offsets.append(self.offsets[-1] + shard["count"])
        num_pairs = _require(index, "num_pairs", int, path)
        if num_pairs != self.offsets[-1]:
            raise InputError(f"{path}: key 'num_pairs' is {num_pairs} but the shards hold {self.offsets[-1]}")

    def _verify_shard(self, file: Path, count: int) -> None:
        head = _read_shard_header(file)
        if head["count"] != count or tuple(head["entry_shape"]) != self.latent_shape or head["dtype"] != self.dtype:
            raise InputError(f"{file}: holds {head['count']} pairs of {head['entry_shape']} ({head['dtype']}); "
                             f"{INDEX} says {count} of {list(self.latent_shape)} ({self.dtype})")

    def __len__(self) -> int:
        return self.offsets[-1]

    def locate(self, index: int) -> tuple[Path, int]:
        """(shard file, row in it) of pair `index`."""
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"pair {index} out of range for {n} pairs in {self.folder}")
        index %= n
        shard = bisect.bisect_right(self.offsets, index) - 1  # the last shard starting at or before: skips empty ones
        return self.files[shard], index - self.offsets[shard]

    def __getitem__(self, index: int) -> dict[str, Any]:
        file, row = self.locate(int(index))
        f = safe_open(str(file), framework="pt")
        prompts = json.loads(f.metadata()["prompts"])
        latent = f.get_slice(LATENT_KEY)[row].to(torch.float32)
        return {"prompts": prompts[row], "ode_latent": latent, "idx": int(index) % len(self)}

    def check_timesteps(self, steps: Sequence[float], source: str = "denoising_step_list",
                        atol: float = TIMESTEP_ATOL) -> None:
        """Raise unless the generator's (warped) step list `steps` names the stored entries one to one."""
        steps = [float(s) for s in steps]
        if len(steps) != len(self.timesteps) or any(abs(a - b) > atol for a, b in zip(steps, self.timesteps)):
            raise InputError(f"{source} (as the generator runs it: {[round(s, 2) for s in steps]}) does not match "
                             f"the timesteps of the ODE pairs in {self.folder / INDEX} "
                             f"({[round(t, 2) for t in self.timesteps]}); ODE regression feeds entry k at step k. "
                             "Check rollout.denoising_step_list (it must end with 0), rollout.warp_denoising_step and "
                             "rollout.generator_shift against the generation's --shift/--record")


def config_trajectory_timesteps(cfg: Any) -> list[float]:
    """The timesteps ODE regression assigns to the trajectory entries: `denoising_step_list`, warped onto the
    generator's shifted grid when `warp_denoising_step`, final 0 kept."""
    from pipeline.schedule import FlowMatchSchedule
    schedule = FlowMatchSchedule(cfg.rollout.generator_shift, cfg.model.num_train_timestep)
    return schedule.denoising_steps(cfg.rollout.denoising_step_list, cfg.rollout.warp_denoising_step)
