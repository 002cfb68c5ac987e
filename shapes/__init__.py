"""The shapes world: a miniature procedural video world with ground truth (see docs/shapes_world.md).

`world` (attributes, held-out split, sampler, renderer), `prompts` (short/extended prompts, vocabulary), `dataset`
(on-the-fly training batches), `reading` + `segment` (attributes read back out of frames), `evaluator` (scores).
"""
from shapes.dataset import ShapesWorldDataset
from shapes.evaluator import ATTRIBUTES, FRAME_METRICS, evaluate
from shapes.prompts import extended_prompt, prompt_words, short_prompt, vocabulary
from shapes.reading import ObjectReading, SceneReading, read_scenes, to_frames
from shapes.world import (
    COLOURS, DIRECTIONS, HELDOUT_COLOUR_BACKGROUND, HELDOUT_SHAPE_COLOUR, HELDOUT_SHAPE_DIRECTION, PALETTE,
    SHAPES, SIZES, SPEEDS, SPLITS, SceneSpec, ShapeSpec, heldout_reasons, is_heldout, render, sample_scenes,
    trajectories,
)

__all__ = [
    "ATTRIBUTES", "COLOURS", "DIRECTIONS", "FRAME_METRICS", "HELDOUT_COLOUR_BACKGROUND", "HELDOUT_SHAPE_COLOUR",
    "HELDOUT_SHAPE_DIRECTION", "PALETTE", "SHAPES", "SIZES", "SPEEDS", "SPLITS", "ObjectReading", "SceneReading",
    "SceneSpec", "ShapeSpec", "ShapesWorldDataset", "evaluate", "extended_prompt", "heldout_reasons", "is_heldout",
    "prompt_words", "read_scenes", "render", "sample_scenes", "short_prompt", "to_frames", "trajectories",
    "vocabulary",
]
