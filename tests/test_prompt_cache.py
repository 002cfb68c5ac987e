"""The training prompt-embedding cache (`utils.builders.PromptEncoder(cache_size=...)`)."""
from __future__ import annotations

import torch

from tests.tiny import tiny_text_encoder
from utils.builders import PromptEncoder


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
    assert list(cached._cache) == ["a red fish", "a cat", "a bird"]
    cached(["a dog"])
    assert encoder.encoded[-1] == "a dog"


def test_cache_off_by_default_encodes_every_call():
    encoder = CountingEncoder(tiny_text_encoder(dim=16, text_len=8))
    text = PromptEncoder(encoder, "")
    text(["a cat"])
    text(["a cat"])
    assert encoder.encoded == ["a cat", "a cat"] and not text._cache
