"""The shapes world (shapes/): renderer, sampler and held-out split, prompts and vocabulary, dataset, and the
evaluator on ground-truth and corrupted videos."""
from __future__ import annotations

import dataclasses
from collections import deque

import pytest
import torch
import torch.nn.functional as F

from shapes import (COLOURS, DIRECTIONS, HELDOUT_COLOUR_BACKGROUND, HELDOUT_SHAPE_COLOUR,
                    HELDOUT_SHAPE_DIRECTION, PALETTE, SHAPES, SIZES, SPEEDS, SceneSpec, ShapeSpec,
                    ShapesWorldDataset, evaluate, extended_prompt, heldout_reasons, is_heldout, prompt_words,
                    read_scenes, render, sample_scenes, short_prompt, trajectories, vocabulary)
from shapes.prompts import DIRECTION_WORDS, SPEED_WORDS
from shapes.segment import connected_components
from trainer.data import collate


def scenes(n: int, seed: int = 0, split: str = "all", num_shapes=(1, 2)) -> list[SceneSpec]:
    return sample_scenes(n, torch.Generator().manual_seed(seed), split, num_shapes)


@pytest.fixture(scope="module")
def eval_set():
    """24 scenes (one and two shapes), their ground-truth videos `[B, T, 3, H, W]` in [-1, 1] and their report."""
    sc = scenes(24, seed=11)
    video = render(sc, 12).transpose(1, 2)
    return sc, video, evaluate(video, sc, per_video=True)


# ------------------------------------------------------------------------------------------------ renderer

def test_render_layout_range_and_determinism():
    sc = scenes(6, seed=1)
    video = render(sc, 5, 32, 48)
    assert video.shape == (6, 3, 5, 32, 48) and video.dtype == torch.float32
    assert video.min() >= -1 and video.max() <= 1
    assert torch.equal(video, render(sc, 5, 32, 48))
    assert sc == scenes(6, seed=1) and sc != scenes(6, seed=2)
    one_by_one = torch.cat([render([s], 5, 32, 48) for s in sc])
    assert torch.equal(video, one_by_one)
    # frames are a function of the frame index: a window of a longer video equals a render starting there
    assert torch.equal(render(sc, 9, 32, 48)[:, :, 4:], render(sc, 5, 32, 48, start_frame=4))


def test_render_colours_come_from_the_palette():
    sc = scenes(4, seed=3, num_shapes=1)
    video = (render(sc, 3, antialias=False) + 1) / 2
    for scene, v in zip(sc, video):
        colours = {tuple(round(c, 4) for c in px) for px in v.permute(1, 2, 3, 0).reshape(-1, 3).tolist()}
        want = {tuple(round(c, 4) for c in PALETTE[name]) for name in (scene.background, scene.shapes[0].colour)}
        assert colours == want


def test_shapes_stay_inside_the_frame_and_are_never_clipped():
    sc = scenes(12, seed=4, num_shapes=1)
    t, h, w = 150, 40, 56
    pos = trajectories(sc, t, h, w)[:, 0]                                     # [B, T, 2]
    half = torch.tensor([SIZES[s.shapes[0].size] * min(h, w) / 2 for s in sc])[:, None]
    assert (pos[..., 0] - half >= -1e-4).all() and (pos[..., 0] + half <= w + 1e-4).all()
    assert (pos[..., 1] - half >= -1e-4).all() and (pos[..., 1] + half <= h + 1e-4).all()
    # the shape's total coverage is the same in every frame, bounces included: nothing leaves the frame
    video = (render(sc, t, h, w) + 1) / 2
    bg = torch.tensor([PALETTE[s.background] for s in sc])[:, :, None, None, None]
    fg = torch.tensor([PALETTE[s.shapes[0].colour] for s in sc])[:, :, None, None, None]
    coverage = (((video - bg) * (fg - bg)).sum(1) / ((fg - bg) ** 2).sum(1)).sum((-2, -1))  # [B, T] area in px
    assert torch.allclose(coverage, coverage[:, :1].expand_as(coverage), rtol=0.03)  # a 1-px clip costs >= 5%


def test_bouncing_reflects_position_and_velocity():
    spec = ShapeSpec("square", "red", "small", "down_right", "fast", start=(0.75, 0.5))
    pos = trajectories([SceneSpec("blue", (spec,))], 40, 64, 64)[0, 0]        # [T, 2]
    vel = pos[1:] - pos[:-1]
    hi = 64 - SIZES["small"] * 64 / 2
    step = SPEEDS["fast"] * 64 / 2 ** 0.5
    assert torch.allclose(vel[:3], torch.tensor([step, step]).expand(3, 2), atol=1e-4)
    assert pos[:, 0].max() <= hi + 1e-4
    flips = (torch.sign(vel[1:, 0]) != torch.sign(vel[:-1, 0])).nonzero().flatten()
    assert len(flips) >= 1 and (vel[:, 1] > 0).sum() > 0
    first = int(flips[0]) + 1
    assert (vel[first + 1:first + 4, 0] < 0).all()                            # after the wall x moves back
    # reflection law: position past the wall = 2 * wall - unbounded position
    unbounded = pos[0, 0] + step * (first + 1)
    assert torch.isclose(pos[first + 1, 0], 2 * hi - unbounded, atol=1e-3)
    assert torch.allclose(vel[first + 1:first + 4].abs(), torch.tensor([step, step]).expand(3, 2), atol=1e-4)


def test_first_frames_move_in_the_prompted_direction():
    sc = scenes(200, seed=5)
    vel = trajectories(sc, 5)                                                  # straight for the first frames
    vel = vel[:, :, 1:] - vel[:, :, :-1]
    for scene, v in zip(sc, vel):
        for s, shape in enumerate(scene.shapes):
            want = torch.tensor(DIRECTIONS[shape.direction], dtype=torch.float32)
            assert torch.equal(torch.sign(v[s].round(decimals=4)), want.expand(4, 2)), scene


# ------------------------------------------------------------------------------------------ sampler, splits

def test_heldout_combinations_never_in_train_always_in_heldout():
    train, held = scenes(300, seed=6, split="train"), scenes(300, seed=6, split="heldout")
    assert not any(is_heldout(s) for s in train)
    assert all(is_heldout(s) and heldout_reasons(s) for s in held)
    for s in train:
        for shape in s.shapes:
            assert (shape.shape, shape.colour) not in HELDOUT_SHAPE_COLOUR
            assert (shape.colour, s.background) not in HELDOUT_COLOUR_BACKGROUND
            assert (shape.shape, shape.direction) not in HELDOUT_SHAPE_DIRECTION
    kinds = {r.split("=")[0] for s in held for r in heldout_reasons(s)}
    assert kinds == {"shape_colour", "colour_background", "shape_direction"}
    mixed = scenes(300, seed=6, split="all")
    assert 0 < sum(map(is_heldout, mixed)) < 300
    assert {len(s.shapes) for s in mixed} == {1, 2}
    assert {len(s.shapes) for s in scenes(20, seed=6, num_shapes=2)} == {2}


def test_sampled_scenes_cover_every_attribute_and_respect_constraints():
    sc = scenes(400, seed=7)
    shapes = [s for scene in sc for s in scene.shapes]
    assert {s.shape for s in shapes} == set(SHAPES) and {s.colour for s in shapes} == set(COLOURS)
    assert {s.direction for s in shapes} == set(DIRECTIONS) and {s.size for s in shapes} == set(SIZES)
    assert {s.speed for s in shapes} == set(SPEEDS) and {s.background for s in sc} == set(COLOURS)
    for scene in sc:
        colours = [s.colour for s in scene.shapes]
        assert scene.background not in colours and len(set(colours)) == len(colours)


def test_bad_specs_and_arguments_raise():
    with pytest.raises(ValueError, match="colour"):
        ShapeSpec("circle", "purple", "small", "left", "slow")
    with pytest.raises(ValueError, match="direction"):
        ShapeSpec("circle", "red", "small", "sideways", "slow")
    with pytest.raises(ValueError, match="start"):
        ShapeSpec("circle", "red", "small", "left", "slow", start=(0.5, 1.5))
    red = ShapeSpec("circle", "red", "small", "left", "slow")
    with pytest.raises(ValueError, match="background"):
        SceneSpec("red", (red,))
    with pytest.raises(ValueError, match="distinct"):
        SceneSpec("blue", (red, dataclasses.replace(red, shape="square")))
    with pytest.raises(ValueError, match="split"):
        sample_scenes(2, torch.Generator(), split="test")
    with pytest.raises(ValueError, match="num_shapes"):
        sample_scenes(2, torch.Generator(), num_shapes=3)
    with pytest.raises(ValueError, match="scenes"):
        render([], 4)
    assert SceneSpec("blue", [red]).shapes == (red,)


# ------------------------------------------------------------------------------------------------- prompts

def test_prompts_name_the_attributes():
    scene = SceneSpec("blue", (ShapeSpec("circle", "red", "large", "left", "fast"),
                               ShapeSpec("triangle", "white", "small", "up_right", "slow")))
    assert short_prompt(scene) == ("a large red circle moves quickly left and a small white triangle moves slowly "
                                   "to the upper right on a blue background")
    for s in scenes(100, seed=8):
        short, words = short_prompt(s), prompt_words(extended_prompt(s, 3))
        assert short.endswith(f" on a {s.background} background")
        for shape in s.shapes:
            clause = f"a {shape.size} {shape.colour} {shape.shape} moves {SPEED_WORDS[shape.speed]} "
            assert clause + DIRECTION_WORDS[shape.direction] in short
            assert shape.colour in words
        assert s.background in words
        assert extended_prompt(s, 3) == extended_prompt(s, 3)
        assert len({extended_prompt(s, k) for k in range(12)}) > 1


def test_vocabulary_covers_every_prompt_with_the_word_tokenizer():
    from model.text_encoder import build_word_tokenizer

    words = vocabulary()
    assert words == sorted(set(words)) and all(w == w.lower() for w in words)
    tokenizer = build_word_tokenizer(words)
    for i, s in enumerate(scenes(300, seed=9)):
        for text in (short_prompt(s), extended_prompt(s, i)):
            ids = tokenizer(text)["input_ids"]
            assert tokenizer.unk_token_id not in ids, text
            assert tokenizer.convert_ids_to_tokens(ids)[:-1] == prompt_words(text)


# ------------------------------------------------------------------------------------------------- dataset

def test_dataset_batches_and_items():
    ds = ShapesWorldDataset(num_frames=6, height=32, width=32, split="heldout", seed=1)
    batch = ds.batch(5, torch.Generator().manual_seed(0))
    assert set(batch) == {"prompts", "extended_prompts", "video", "scenes"}
    assert batch["video"].shape == (5, 3, 6, 32, 32)
    assert batch["prompts"] == [short_prompt(s) for s in batch["scenes"]]
    assert all(is_heldout(s) for s in batch["scenes"])
    again = ds.batch(5, torch.Generator().manual_seed(0))
    assert again["prompts"] == batch["prompts"] and torch.equal(again["video"], batch["video"])
    assert again["extended_prompts"] == batch["extended_prompts"]
    items = [ds[i] for i in (0, 7, 7)]
    assert items[1]["prompts"] == items[2]["prompts"] and torch.equal(items[1]["video"], items[2]["video"])
    assert items[0]["video"].shape == (3, 6, 32, 32) and items[1]["idx"] == 7
    other = ShapesWorldDataset(num_frames=6, height=32, width=32, split="heldout", seed=2)
    assert other[7]["scenes"] != items[1]["scenes"]
    collated = collate(items)
    assert collated["video"].shape == (3, 3, 6, 32, 32) and collated["idx"].tolist() == [0, 7, 7]
    with pytest.raises(IndexError):
        ds[len(ds)]
    with pytest.raises(ValueError, match="split"):
        ShapesWorldDataset(4, split="valid")


# ----------------------------------------------------------------------------------------------- evaluator

def _bfs_components(labels: torch.Tensor) -> int:
    h, w = labels.shape
    seen, count = torch.zeros(h, w, dtype=torch.bool), 0
    for y in range(h):
        for x in range(w):
            if labels[y, x] < 0 or seen[y, x]:
                continue
            count += 1
            queue = deque([(y, x)])
            seen[y, x] = True
            while queue:
                cy, cx = queue.popleft()
                for dy in (-1, 0, 1):
                    for dx in (-1, 0, 1):
                        ny, nx = cy + dy, cx + dx
                        if 0 <= ny < h and 0 <= nx < w and not seen[ny, nx] and labels[ny, nx] == labels[cy, cx]:
                            seen[ny, nx] = True
                            queue.append((ny, nx))
    return count


def test_connected_components_match_a_flood_fill():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(-1, 3, (4, 12, 13), generator=g)
    labels[0] = -1
    labels[0, 1:10, 2] = labels[0, 9, 2:11] = labels[0, 1:10, 10] = 1      # a U: one component, non-convex
    labels[0, 0, 0] = labels[0, 1, 1] = 2                                  # diagonal neighbours connect
    ids = connected_components(labels)
    roots = ids == torch.arange(12 * 13).reshape(12, 13)
    assert int(roots[0].sum()) == 2
    for frame, r in zip(labels, roots):
        assert int(r.sum()) == _bfs_components(frame)
    assert ((ids >= 0) == (labels >= 0)).all()


def test_evaluator_reads_ground_truth(eval_set):
    sc, video, report = eval_set
    assert report["attribute_accuracy"] >= 0.97 and report["motion_correct"] >= 0.95
    for name in ("background", "colour", "shape", "size", "direction", "speed"):
        assert report[f"{name}_accuracy"] >= 0.95, name
    assert report["velocity_match"] >= 0.95 and report["jitter"] < 0.1 and report["frame_quality"] >= 0.97
    assert report["overall"] >= 0.97 and report["count_accuracy"] >= 0.95
    assert len(report["per_frame"]["frame_quality"]) == 12 and len(report["per_frame"]["velocity_match"]) == 11
    assert len(report["per_video"]) == len(sc) and any(len(v["shapes"]) == 2 for v in report["per_video"])
    # the same videos in [0, 1], in the renderer's layout, or one at a time give the same report
    same = evaluate((video.transpose(1, 2) + 1) / 2, sc, value_range=(0, 1), layout="BCTHW")
    assert same["overall"] == pytest.approx(report["overall"], abs=1e-6)
    single = evaluate(video[3], sc[3])
    assert single["overall"] == pytest.approx(report["per_video"][3]["overall"], abs=1e-6)


def test_read_scenes_recovers_the_attributes():
    scene = SceneSpec("black", (ShapeSpec("square", "yellow", "large", "down_left", "slow", (0.6, 0.2)),
                                ShapeSpec("triangle", "cyan", "small", "right", "fast", (0.1, 0.9))))
    reading = read_scenes(render([scene], 10, 64, 80), layout="BCTHW")[0]
    assert reading.background == "black" and len(reading.objects) == 2
    by_colour = {o.colour: o for o in reading.objects}
    for spec in scene.shapes:
        got = by_colour[spec.colour]
        assert (got.shape, got.size, got.direction, got.speed) == (spec.shape, spec.size, spec.direction, spec.speed)
        assert got.presence == 1.0 and got.centroids.shape == (10, 2)


def _blur(video: torch.Tensor, sigma: float) -> torch.Tensor:
    r = int(3 * sigma)
    k = torch.exp(-torch.arange(-r, r + 1.0) ** 2 / (2 * sigma ** 2))
    k = (k / k.sum()).view(1, 1, 1, -1)
    x = video.flatten(0, 2)[:, None]
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="replicate"), k)
    x = F.conv2d(F.pad(x, (0, 0, r, r), mode="replicate"), k.transpose(-1, -2))
    return x.view_as(video)


def _recolour(scene: SceneSpec) -> SceneSpec:
    used = {scene.background} | {s.colour for s in scene.shapes}
    first = dataclasses.replace(scene.shapes[0], colour=next(c for c in COLOURS if c not in used))
    return dataclasses.replace(scene, shapes=(first,) + scene.shapes[1:])


CORRUPTIONS = {
    # name: (make the corrupted video, the metric that must drop, its ceiling)
    "noise": (lambda v, sc, g: (v + 0.3 * torch.randn(v.shape, generator=g)).clamp(-1, 1), "clean_fraction", 0.6),
    "wrong_colour": (lambda v, sc, g: render([_recolour(s) for s in sc], v.shape[1]).transpose(1, 2),
                     "colour_accuracy", 0.6),
    "frozen": (lambda v, sc, g: v[:, :1].expand_as(v), "motion_correct", 0.1),
    "shuffled": (lambda v, sc, g: v[:, torch.randperm(v.shape[1], generator=g)], "velocity_match", 0.5),
    "blob": (lambda v, sc, g: _blur(v, 3.0), "sharpness", 0.5),
}


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_evaluator_drops_on_corrupted_videos(eval_set, name):
    sc, video, clean = eval_set
    make, metric, ceiling = CORRUPTIONS[name]
    bad = evaluate(make(video, sc, torch.Generator().manual_seed(0)), sc)
    assert bad[metric] <= ceiling, (metric, bad[metric])
    assert bad["overall"] <= clean["overall"] - 0.05, (clean["overall"], bad["overall"])
    if name == "blob":
        assert bad["shape_accuracy"] <= 0.8
    if name == "shuffled":
        assert bad["jitter"] > 1.0 and bad["unexplained_reversals"] > 1


def test_per_frame_quality_shows_drift():
    sc = scenes(4, seed=12)
    video = render(sc, 10).transpose(1, 2)
    video[:, 5:] = (video[:, 5:] + 0.4 * torch.randn(video[:, 5:].shape, generator=torch.Generator())).clamp(-1, 1)
    curve = evaluate(video, sc)["per_frame"]["clean_fraction"]
    assert min(curve[:5]) > 0.99 and max(curve[5:]) < 0.6


def test_evaluator_bad_inputs_raise(eval_set):
    sc, video, _ = eval_set
    with pytest.raises(ValueError, match="one SceneSpec per video"):
        evaluate(video[:2], sc[:3])
    with pytest.raises(ValueError, match="3 channels"):
        evaluate(video[:2, :, :2], sc[:2])
    with pytest.raises(ValueError, match="layout"):
        evaluate(video[:2], sc[:2], layout="BHWC")
    with pytest.raises(ValueError, match="value_range"):
        evaluate(video[:2], sc[:2], value_range=(1, 0))


def test_sampler_centres_follow_the_renderer_trajectories():
    """The sampler's overlap check computes centres in Python floats (speed); they must be the renderer's."""
    from shapes.world import REFERENCE_SIDE, SEPARATE_FRAMES, _centre, _draw_scene
    g = torch.Generator().manual_seed(4)
    for _ in range(200):
        scene = _draw_scene(g, (1, 2))
        pos = trajectories([scene], SEPARATE_FRAMES, REFERENCE_SIDE, REFERENCE_SIDE)[0]  # [S, T, 2]
        for s, spec in enumerate(scene.shapes):
            for frame in range(SEPARATE_FRAMES):
                assert _centre(spec, frame, REFERENCE_SIDE) == pytest.approx(pos[s, frame].tolist(), abs=1e-3)
