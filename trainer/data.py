"""Training data: datasets, and a resumable batch iterator sharded over ranks.

The plug-in protocol (ODE-pair shards and the shapes world implement `Dataset`; the loop only sees `BatchIterator`):

* `Dataset`: `len(ds)` items, `ds[i]` a dict of a fixed set of keys whose values are `str`, `int`/`float` or tensors
  of one shape (e.g. `{"prompts": str, "idx": int}` or `{"prompts": str, "ode_latent": [K, F, C, H, W]}`).
  Items are addressed by index only, so any dataset is deterministic and resumable for free.
* `BatchIterator`: `next(it)` -> a batch (`collate` of this rank's items: strings as lists, numbers as 1-D tensors,
  tensors stacked along a new batch dim `[B, ...]`), plus `state_dict()` / `load_state_dict()` of plain ints.

`ShardedBatches` walks a fresh permutation of the dataset every epoch (seeded by the run seed and the epoch: the
original never reshuffled) as one stream of global batches of `batch_size * world_size` items; rank r
takes the r-th slice of each. A global batch may straddle an epoch boundary, so no item is dropped and datasets
smaller than a global batch still work. The position (epoch, index in the epoch's permutation) is all a resume needs.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Optional, Protocol

import torch
from torch import Tensor

from utils.errors import InputError
from utils.prompts import attach_extended, read_prompt_file

Batch = dict[str, Any]


class Dataset(Protocol):
    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> dict[str, Any]: ...


class BatchIterator(Protocol):
    def __iter__(self) -> Iterator[Batch]: ...

    def __next__(self) -> Batch: ...

    def state_dict(self) -> dict[str, int]: ...

    def load_state_dict(self, state: dict[str, int]) -> None: ...


class PromptDataset:
    """One prompt per non-blank line of `data_path`; items `{"prompts": str, "idx": int[, "extended_prompts": str]}`.

    `extended_prompt_path` must have one non-blank line per prompt (the original's TextDataset rule).
    `switch_seed` (prompt switches of long rollouts): items also carry `"switch_prompts"`, the prompt a rollout may
    switch to; the prompts are paired along one random cycle drawn from the seed, so none switches to itself and
    the pairing is fixed for a run (resumes need no state).
    """

    def __init__(self, data_path: str | Path, extended_prompt_path: str | Path | None = None,
                 switch_seed: Optional[int] = None):
        prompts = read_prompt_file(data_path)
        if extended_prompt_path:
            prompts = attach_extended(prompts, extended_prompt_path)
        self.prompts = prompts
        self.path = Path(data_path)
        self.switch_partner: Optional[list[int]] = None
        if switch_seed is not None:
            if len(prompts) < 2:
                raise InputError(f"{data_path}: prompt switches (prompt_switch_prob > 0) need at least two prompts")
            cycle = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(int(switch_seed))).tolist()
            self.switch_partner = [0] * len(prompts)
            for a, b in zip(cycle, cycle[1:] + cycle[:1]):
                self.switch_partner[a] = b

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, index: int) -> dict[str, Any]:
        p = self.prompts[index]
        item: dict[str, Any] = {"prompts": p.text, "idx": p.index}
        if p.extended is not None:
            item["extended_prompts"] = p.extended
        if self.switch_partner is not None:
            item["switch_prompts"] = self.prompts[self.switch_partner[index]].text
        return item


def collate(items: list[dict[str, Any]]) -> Batch:
    """Items -> batch: strings as lists, numbers as 1-D tensors `[B]`, tensors stacked `[B, ...]`."""
    if not items:
        raise ValueError("cannot collate an empty list of items")
    keys = list(items[0])
    batch: Batch = {}
    for key in keys:
        values = [item[key] for item in items]
        first = values[0]
        if isinstance(first, Tensor):
            batch[key] = torch.stack(values)
        elif isinstance(first, bool) or not isinstance(first, (int, float)):
            batch[key] = values
        else:
            batch[key] = torch.tensor(values)
    return batch


class ShardedBatches:
    """Endless per-rank batches over `dataset`; see the module docstring for the order and the resume state."""

    def __init__(self, dataset: Dataset, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 shuffle: bool = True):
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"bad sharding: batch_size={batch_size}, rank={rank}, world_size={world_size}")
        if len(dataset) == 0:
            raise InputError("the training dataset is empty")
        self.dataset = dataset
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = int(seed)
        self.shuffle = shuffle
        self.epoch = 0
        self.index = 0  # items of this epoch's permutation consumed by all ranks together
        self._perm: Optional[Tensor] = None
        self._perm_epoch = -1

    def _permutation(self, epoch: int) -> Tensor:
        if self._perm_epoch != epoch:
            n = len(self.dataset)
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
                self._perm = torch.randperm(n, generator=g)
            else:
                self._perm = torch.arange(n)
            self._perm_epoch = epoch
        assert self._perm is not None
        return self._perm

    def _take(self, count: int) -> list[int]:
        """The next `count` dataset indices of the global stream, advancing the position."""
        out: list[int] = []
        n = len(self.dataset)
        while len(out) < count:
            perm = self._permutation(self.epoch)
            step = min(count - len(out), n - self.index)
            out.extend(perm[self.index:self.index + step].tolist())
            self.index += step
            if self.index == n:
                self.epoch, self.index = self.epoch + 1, 0
        return out

    def __iter__(self) -> "ShardedBatches":
        return self

    def __next__(self) -> Batch:
        indices = self._take(self.batch_size * self.world_size)
        mine = indices[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
        return collate([self.dataset[i] for i in mine])

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed, "num_items": len(self.dataset)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if int(state.get("num_items", len(self.dataset))) != len(self.dataset):
            raise InputError(f"data position was saved for a dataset of {state['num_items']} items, "
                             f"this one has {len(self.dataset)}; the resumed order would differ")
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self.seed = int(state.get("seed", self.seed))


def build_data(cfg: Any, rank: int = 0, world_size: int = 1, seed: int = 0) -> ShardedBatches:
    """The batch iterator a recipe trains on. Score distillation is data-free apart from prompts (`data_path`).

    `trainer: ode` reads the ODE pairs of `ode_data_path` (trainer/ode_pairs.py), checked against the configured steps.
    The data-trained recipes (GAN, diffusion / teacher / diffusion forcing, CausVid, i2v distillation) read clean
    latents from the same shards (the clean end of each trajectory, as the original read its latent LMDB shards).
    """
    if cfg.model.world != "wan" and cfg.trainer != "ode":  # the shapes world renders its own (shapes/components.py)
        raise ValueError(f"build_data reads the data of world 'wan' (or ODE pairs), not of {cfg.model.world!r}")
    # i2v distillation takes the first latent frame of each clip from the data (the original read its LMDB shards).
    needs_latents = cfg.trainer in ("gan", "diffusion") or cfg.trainer == "score_distillation" and (
        cfg.distillation.distribution_loss == "causvid" or cfg.data.i2v)
    if needs_latents and cfg.rollout.prompt_switch_prob > 0:
        raise InputError("rollout.prompt_switch_prob > 0: the ODE-pair / latent shards carry no switch prompts; "
                         "prompt switches train on prompt files (data.data_path) or the shapes world")
    if needs_latents:
        from trainer.ode_pairs import ODEPairDataset
        if not cfg.data.ode_data_path:
            raise InputError(f"trainer {cfg.trainer!r} trains on data: set data.ode_data_path to a folder of ODE "
                             "pairs / latents written by scripts/generate_ode_pairs.py")
        return ShardedBatches(ODEPairDataset(cfg.data.ode_data_path), cfg.optimiser.batch_size, rank, world_size, seed)
    if cfg.trainer == "score_distillation":
        if not cfg.data.data_path:
            raise InputError("config key data.data_path is not set; expected a text file with one training prompt "
                             "per line")
        dataset = PromptDataset(cfg.data.data_path, cfg.data.extended_prompt_path,
                                switch_seed=seed if cfg.rollout.prompt_switch_prob > 0 else None)
        return ShardedBatches(dataset, cfg.optimiser.batch_size, rank, world_size, seed)
    if cfg.trainer == "ode":
        from trainer.ode_pairs import ODEPairDataset, config_trajectory_timesteps
        if not cfg.data.ode_data_path:
            raise InputError("config key data.ode_data_path is not set; expected a folder of ODE pairs written by "
                             "scripts/generate_ode_pairs.py")
        ode_pairs = ODEPairDataset(cfg.data.ode_data_path)  # FileNotFoundError naming the folder / index.json
        # Entry k of a stored trajectory is fed at step k: a config whose steps differ would train on wrong levels.
        ode_pairs.check_timesteps(config_trajectory_timesteps(cfg))
        return ShardedBatches(ode_pairs, cfg.optimiser.batch_size, rank, world_size, seed)
    raise InputError(f"trainer {cfg.trainer!r}: no built-in dataset; pass one to train.main(data=...)")
