"""The one prompt-embedding cache, shared by training (`trainer.builders.PromptEncoder`) and inference
(`pipeline.inference.CausalInferencePipeline`)."""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable

import torch


class PromptEmbeddingCache:
    """Prompt -> embedding row, for a frozen encoder (each prompt is encoded on its own padded row, so a kept row is
    the one a new encoding would give). `capacity`: rows kept, least recently used dropped first; None keeps all
    (inference: a session's prompts), 0 keeps none (every call encodes). Training and inference share this one cache."""

    def __init__(self, capacity: int | None = None):
        if capacity is not None and capacity < 0:
            raise ValueError(f"prompt cache capacity must be >= 0 or None, got {capacity}")
        self.capacity = capacity
        self._rows: OrderedDict[str, torch.Tensor] = OrderedDict()

    def __call__(self, prompts: Iterable[str], encode: Callable[[list[str]], torch.Tensor]) -> torch.Tensor:
        """`[B, L, D]` for `prompts`; `encode(list_of_prompts)` is called once, for the distinct prompts not kept."""
        prompts = list(prompts)
        if self.capacity == 0:
            return encode(prompts)
        missing = [p for p in dict.fromkeys(prompts) if p not in self._rows]
        if missing:
            for prompt, row in zip(missing, encode(missing)):
                self._rows[prompt] = row
        for prompt in prompts:
            self._rows.move_to_end(prompt)
        out = torch.stack([self._rows[p] for p in prompts])
        while self.capacity is not None and len(self._rows) > self.capacity:
            self._rows.popitem(last=False)
        return out

    def __len__(self) -> int:
        return len(self._rows)

    def prompts(self) -> list[str]:
        """Kept prompts, least recently used first."""
        return list(self._rows)

    def clear(self) -> None:
        self._rows.clear()
