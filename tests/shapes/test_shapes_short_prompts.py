"""Short prompts in the shapes world: prompts that leave out size and/or speed, the scenes behind them, training
prompts with a configured share of short forms, and an evaluator that scores only what a prompt states."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from shapes import (SceneSpec, ShapeSpec, ShapesWorldDataset, evaluate, extended_prompt, prompt_words, render,
                    sample_scenes, short_prompt, vocabulary)
from shapes.prompts import _SIZE_SYNONYMS, _SPEED_PHRASES
from shapes.world import OMISSIONS, SIZES, SPEEDS
from utils.config import load_config
from utils.errors import ConfigError

CIRCLE = ShapeSpec("circle", "red", "large", "left", "fast", (0.6, 0.5))
TRIANGLE = ShapeSpec("triangle", "white", "small", "up_right", "slow", (0.2, 0.8))


def _scenes(n, seed=0, short_fraction=0.0):
    return sample_scenes(n, torch.Generator().manual_seed(seed), "all", short_fraction=short_fraction)


def test_short_prompts_leave_out_what_the_shape_omits():
    both = SceneSpec("blue", (dataclasses.replace(CIRCLE, omitted=("size", "speed")),
                              dataclasses.replace(TRIANGLE, omitted=("speed",))))
    assert short_prompt(both) == ("a red circle moves left and a small white triangle moves to the upper right "
                                  "on a blue background")
    assert short_prompt(SceneSpec("blue", (dataclasses.replace(CIRCLE, omitted=("size",)),))) == (
        "a red circle moves quickly left on a blue background")
    size_words = {w for words in _SIZE_SYNONYMS.values() for w in words}
    speed_words = {"slowly", "gently", "slow", "leisurely", "quickly", "rapidly", "fast", "high"}
    assert speed_words <= {w for words in _SPEED_PHRASES.values() for p in words for w in prompt_words(p)}
    omitted = SceneSpec("blue", (dataclasses.replace(CIRCLE, omitted=("size", "speed")),))
    for seed in range(40):
        text = extended_prompt(omitted, seed)
        words = prompt_words(text)
        assert "red" in words and not (size_words | speed_words) & set(words) and " of  size" not in text, text
        assert "of size" not in " ".join(words), text
        assert set(words) <= set(vocabulary())
    with pytest.raises(ValueError, match="omitted"):
        dataclasses.replace(CIRCLE, omitted=("colour",))


def test_sampler_draws_the_same_scenes_and_samples_what_short_prompts_leave_out():
    full, short = _scenes(400, seed=5), _scenes(400, seed=5, short_fraction=0.3)
    assert [dataclasses.replace(s, shapes=tuple(dataclasses.replace(p, omitted=()) for p in s.shapes))
            for s in short] == full
    shortened = [s for s in short if s.shapes[0].omitted]
    assert 0.22 < len(shortened) / len(short) < 0.38
    assert all(all(p.omitted in OMISSIONS for p in s.shapes) for s in shortened)
    # what a prompt leaves out still varies over the world's values, as in full-prompt scenes
    no_size = [p.size for s in shortened for p in s.shapes if not p.states("size")]
    no_speed = [p.speed for s in shortened for p in s.shapes if not p.states("speed")]
    assert set(no_size) == set(SIZES) and set(no_speed) == set(SPEEDS)
    assert all(not p.omitted for s in _scenes(50, seed=5, short_fraction=0.0) for p in s.shapes)
    with pytest.raises(ValueError, match="short_fraction"):
        _scenes(1, short_fraction=1.5)


def test_training_prompts_take_the_configured_share_of_short_forms():
    from shapes.components import ShapesBatches
    overrides = ["world=shapes", "batch_size=64", "image_or_video_shape=[1,2,12,16,16]"]
    counts = {}
    for fraction in (0.0, 0.5, 1.0):
        cfg = load_config(overrides=overrides + [f"shapes_short_prompt_fraction={fraction}"])
        batch = ShapesBatches(cfg, seed=1).dataset.batch(64, torch.Generator().manual_seed(3))
        counts[fraction] = sum(p != short_prompt(dataclasses.replace(
            s, shapes=tuple(dataclasses.replace(x, omitted=()) for x in s.shapes)))
            for p, s in zip(batch["prompts"], batch["scenes"]))
        assert batch["prompts"] == [short_prompt(s) for s in batch["scenes"]]
    assert counts[0.0] == 0 and counts[1.0] == 64 and 16 < counts[0.5] < 48
    with pytest.raises(ConfigError, match="shapes_short_prompt_fraction"):
        load_config(overrides=["shapes_short_prompt_fraction=0.5"])  # the Wan world has no generated prompts
    with pytest.raises(ConfigError, match="shapes_short_prompt_fraction"):
        load_config(overrides=["world=shapes", "shapes_short_prompt_fraction=2"])
    data = ShapesWorldDataset(4, 32, 32, seed=0, short_fraction=1.0)
    assert data[3]["scenes"].shapes[0].omitted and data[3]["prompts"] == short_prompt(data[3]["scenes"])


def _score(drawn: ShapeSpec, prompted: ShapeSpec) -> dict:
    """A video of `drawn` scored against a scene (and so a prompt) of `prompted`."""
    video = render([SceneSpec("blue", (drawn,))], 12).transpose(1, 2)
    return evaluate(video, [SceneSpec("blue", (prompted,))], per_video=True)


def test_evaluator_scores_only_what_the_prompt_states():
    small = dataclasses.replace(CIRCLE, size="small")
    stated = _score(small, CIRCLE)                       # prompt says large, video shows small: wrong
    assert stated["size_accuracy"] == 0.0 and stated["attribute_accuracy"] == pytest.approx(5 / 6)
    unstated = _score(small, dataclasses.replace(CIRCLE, omitted=("size",)))  # prompt says no size: not scored
    assert unstated["num_stated"]["size"] == 0 and unstated["size_accuracy"] != unstated["size_accuracy"]  # NaN
    assert unstated["attribute_accuracy"] == 1.0 and unstated["per_video"][0]["shapes"][0]["size_ok"] is None
    slow = dataclasses.replace(CIRCLE, speed="slow")
    assert _score(slow, CIRCLE)["motion_correct"] == 0.0  # prompted quickly, moves slowly
    free = _score(slow, dataclasses.replace(CIRCLE, omitted=("speed",)))
    # any steady speed in the prompted direction is right when the prompt names none
    assert free["motion_correct"] == 1.0 and free["velocity_match"] >= 0.9 and free["attribute_accuracy"] == 1.0
    backwards = dataclasses.replace(slow, direction="right")
    assert _score(backwards, dataclasses.replace(CIRCLE, omitted=("speed",)))["motion_correct"] == 0.0
