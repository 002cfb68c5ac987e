"""Training data from the shapes world, rendered on the fly (nothing on disk).

`ShapesWorldDataset` serves two ways:
* `batch(batch_size, generator)`: a whole batch sampled and rendered at once (fast, batched, on any device);
* the `trainer.data.Dataset` protocol (`len(ds)`, `ds[i]`): item `i` is a deterministic function of (seed, i), so
  `trainer.data.ShardedBatches` shards, shuffles and resumes it like any other dataset.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch

from shapes.prompts import extended_prompt, short_prompt
from shapes.world import SPLITS, SceneSpec, render, sample_scenes


class ShapesWorldDataset:
    """Random scenes of one split as (prompt, video) pairs.

    Batch/item keys: "prompts" (short prompt), "extended_prompts" (a paraphrase), "video" (`[B, 3, T, H, W]` in
    [-1, 1]; an item's is `[3, T, H, W]`), "scenes" (the `SceneSpec`s, ground truth for the evaluator) and, for
    items only, "idx". `short_fraction`: the chance that a scene's prompts leave out size and/or speed
    (`sample_scenes`); the video shows the values the sampler drew for them.
    """

    def __init__(self, num_frames: int, height: int = 64, width: int = 64, split: str = "train", seed: int = 0,
                 num_shapes: int | Sequence[int] = (1, 2), length: int = 1_000_000, antialias: bool = True,
                 device: Optional[torch.device | str] = None, short_fraction: float = 0.0):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
        if num_frames < 1 or height < 1 or width < 1 or length < 1:
            raise ValueError(f"num_frames, height, width, length must be >= 1, got "
                             f"{num_frames}, {height}, {width}, {length}")
        self.num_frames, self.height, self.width = num_frames, height, width
        self.split, self.seed, self.num_shapes = split, int(seed), num_shapes
        self.length, self.antialias, self.device = length, antialias, device
        self.short_fraction = float(short_fraction)
        # rejects a bad num_shapes or short_fraction now
        sample_scenes(1, torch.Generator().manual_seed(0), split, num_shapes, self.short_fraction)

    def render(self, scenes: Sequence[SceneSpec]) -> torch.Tensor:
        """`[B, 3, T, H, W]` in [-1, 1] at this dataset's size."""
        return render(scenes, self.num_frames, self.height, self.width, antialias=self.antialias,
                      device=self.device)

    def batch(self, batch_size: int, generator: torch.Generator) -> dict[str, Any]:
        """A fresh batch, deterministic given the generator's state (which it advances)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        scenes = sample_scenes(batch_size, generator, self.split, self.num_shapes, self.short_fraction)
        seeds = torch.randint(0, 2**31 - 1, (batch_size,), generator=generator).tolist()
        return {"prompts": [short_prompt(s) for s in scenes],
                "extended_prompts": [extended_prompt(s, k) for s, k in zip(scenes, seeds)],
                "video": self.render(scenes), "scenes": scenes}

    def __len__(self) -> int:
        return self.length

    def item_seed(self, index: int) -> int:
        # Distinct datasets (seeds) get unrelated streams; 2**61 - 1 is prime, so the map is injective per seed.
        return (self.seed * 0x9E3779B97F4A7C15 + index) % (2**61 - 1)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for a ShapesWorldDataset of length {self.length}")
        seed = self.item_seed(int(index))
        scene = sample_scenes(1, torch.Generator().manual_seed(seed), self.split, self.num_shapes,
                              self.short_fraction)[0]
        return {"prompts": short_prompt(scene), "extended_prompts": extended_prompt(scene, seed),
                "video": self.render([scene])[0], "scenes": scene, "idx": int(index)}
