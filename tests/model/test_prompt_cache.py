"""The prompt-embedding cache (`model.prompt_cache`), also through `trainer.builders.PromptEncoder(cache_size=...)`."""
from __future__ import annotations

import torch

from tests.tiny import tiny_text_encoder
from trainer.builders import PromptEncoder


class CountingEncoder:
    def __init__(self, encoder):
        self.encoder, self.encoded = encoder, []

    def encode(self, prompts, output_device=None):
        self.encoded.extend(prompts)
        return self.encoder.encode(prompts, output_device=output_device)


def test_cached_embeddings_equal_fresh_ones_and_only_new_prompts_are_encoded():
    encoder = CountingEncoder(tiny_text_encoder(dim=16, text_len=8))
    plain = PromptEncoder(encoder.encoder, "")
    cached = PromptEncoder(encoder, "", cache_size=3)
    first = ["a cat", "a dog", "a cat"]
    torch.testing.assert_close(cached(first), plain(first), atol=1e-6, rtol=0)
    assert encoder.encoded == ["a cat", "a dog"]  # duplicates within a batch encoded once
    second = ["a dog", "a red fish", "a cat"]
    torch.testing.assert_close(cached(second), plain(second), atol=1e-6, rtol=0)
    assert encoder.encoded == ["a cat", "a dog", "a red fish"]
    # size 3 is full; a fourth prompt evicts the least recently used one ("a dog")
    cached(["a bird"])
    assert cached._cache.prompts() == ["a red fish", "a cat", "a bird"]
    cached(["a dog"])
    assert encoder.encoded[-1] == "a dog"


def test_cache_off_by_default_encodes_every_call():
    encoder = CountingEncoder(tiny_text_encoder(dim=16, text_len=8))
    text = PromptEncoder(encoder, "")
    text(["a cat"])
    text(["a cat"])
    assert encoder.encoded == ["a cat", "a cat"] and len(text._cache) == 0


def test_unbounded_cache_keeps_every_prompt_and_rejects_negative_capacity():
    import pytest

    from model.prompt_cache import PromptEmbeddingCache
    calls = []

    def encode(prompts):
        calls.append(list(prompts))
        return torch.stack([torch.full((2, 3), float(len(p))) for p in prompts])

    cache = PromptEmbeddingCache()
    out = cache(["ab", "abc", "ab"], encode)
    assert out.shape == (3, 2, 3) and out[:, 0, 0].tolist() == [2.0, 3.0, 2.0]
    cache([f"p{i}" for i in range(50)], encode)
    cache(["abc"], encode)
    assert len(cache) == 52 and calls[-1] == [f"p{i}" for i in range(50)]  # "abc" was kept: not encoded again
    cache.clear()
    assert len(cache) == 0
    with pytest.raises(ValueError, match="capacity"):
        PromptEmbeddingCache(-1)
