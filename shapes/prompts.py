"""Prompts of the shapes world, generated from the scene attributes, and the closed vocabulary they use.

Short prompts use one canonical wording ("a large red circle moves quickly left on a blue background"; two shapes
joined by "and"; a shape's `omitted` attributes left out: "a red circle moves left ..."); extended prompts
paraphrase the same attributes with templates and synonyms chosen deterministically from a seed. Every word is listed by `vocabulary()`, which feeds
`model.text_encoder.build_word_tokenizer` (lower case, split on whitespace and punctuation: `\\w+|[^\\w\\s]+`).
"""
from __future__ import annotations

import random
import re
from typing import Iterable

from shapes.world import COLOURS, DIRECTIONS, SHAPES, SIZES, SPEEDS, SceneSpec

DIRECTION_WORDS: dict[str, str] = {
    "left": "left", "right": "right", "up": "up", "down": "down",
    "up_left": "to the upper left", "up_right": "to the upper right",
    "down_left": "to the lower left", "down_right": "to the lower right",
}
SPEED_WORDS: dict[str, str] = {"slow": "slowly", "fast": "quickly"}

_SIZE_SYNONYMS = {"small": ("small", "little", "tiny"), "large": ("large", "big")}
_SHAPE_SYNONYMS = {"circle": ("circle", "disc", "round disc"), "square": ("square", "box"),
                   "triangle": ("triangle",)}
_SPEED_PHRASES = {"slow": ("slowly", "gently", "at a slow pace", "at a leisurely speed"),
                  "fast": ("quickly", "rapidly", "at a fast pace", "at high speed")}
_DIRECTION_PHRASES = {
    "left": ("to the left", "leftwards", "towards the left edge"),
    "right": ("to the right", "rightwards", "towards the right edge"),
    "up": ("upwards", "up", "towards the top edge"),
    "down": ("downwards", "down", "towards the bottom edge"),
    "up_left": ("up and to the left", "diagonally towards the upper left corner", "towards the top left"),
    "up_right": ("up and to the right", "diagonally towards the upper right corner", "towards the top right"),
    "down_left": ("down and to the left", "diagonally towards the lower left corner", "towards the bottom left"),
    "down_right": ("down and to the right", "diagonally towards the lower right corner", "towards the bottom right"),
}
_SHAPE_CLAUSES = (
    "a {size} {colour} {shape} moves {speed} {direction}",
    "a {colour} {shape} of {size} size travels {direction} {speed}",
    "there is a {size} {colour} {shape} gliding {speed} {direction}",
    "a {size} {shape} coloured {colour} drifts {direction} {speed}",
)
# "of {size} size" cannot lose its word: a clause without a size uses the others.
_SHAPE_CLAUSES_WITHOUT_SIZE = tuple(c for c in _SHAPE_CLAUSES if "of {size} size" not in c)
_JOINS = ("{a}, and {b}", "{a}, while {b}", "{a}; meanwhile {b}")
_BACKGROUNDS = ("on a plain {bg} background", "over a flat {bg} backdrop", "against a solid {bg} background")
_SCENES = {
    1: ("{shapes} {bg}. it bounces off the edges of the frame.",
        "a simple animation: {shapes} {bg}, reflecting off the walls whenever it reaches them.",
        "{shapes} {bg}. the camera is still and the shape keeps its colour and size."),
    2: ("{shapes}, both {bg}. they bounce off the edges of the frame.",
        "a simple animation {bg}: {shapes}. each shape reflects off the walls whenever it reaches them.",
        "{shapes} {bg}. the camera is still and the shapes keep their colours and sizes."),
}
_TOKEN = re.compile(r"\w+|[^\w\s]+")


def prompt_words(text: str) -> list[str]:
    """The tokens `build_word_tokenizer` makes of `text`: lower-cased words and runs of punctuation."""
    return _TOKEN.findall(text.lower())


def _words(*parts: str) -> str:
    return " ".join(p for p in parts if p)


def short_prompt(scene: SceneSpec) -> str:
    """"a large red circle moves quickly left on a blue background" (two shapes joined by "and"); a shape's
    `omitted` attributes are left out: "a red circle moves left on a blue background"."""
    clauses = [_words("a", s.size if s.states("size") else "", s.colour, s.shape, "moves",
                      SPEED_WORDS[s.speed] if s.states("speed") else "", DIRECTION_WORDS[s.direction])
               for s in scene.shapes]
    return " and ".join(clauses) + f" on a {scene.background} background"


def _capitalise(text: str) -> str:
    return re.sub(r"(^|[.:]\s+)([a-z])", lambda m: m.group(1) + m.group(2).upper(), text)


def extended_prompt(scene: SceneSpec, seed: int) -> str:
    """A longer paraphrase of the same attributes; the wording is a deterministic function of `seed`."""
    rng = random.Random(int(seed))
    clauses = []
    for s in scene.shapes:
        # the same draws whatever is omitted; a left-out attribute's words are dropped afterwards
        template = rng.choice(_SHAPE_CLAUSES if s.states("size") else _SHAPE_CLAUSES_WITHOUT_SIZE)
        words = dict(size=rng.choice(_SIZE_SYNONYMS[s.size]), colour=s.colour,
                     shape=rng.choice(_SHAPE_SYNONYMS[s.shape]), speed=rng.choice(_SPEED_PHRASES[s.speed]),
                     direction=rng.choice(_DIRECTION_PHRASES[s.direction]))
        for name in s.omitted:
            words[name] = ""
        clauses.append(" ".join(template.format(**words).split()))
    shapes = clauses[0] if len(clauses) == 1 else rng.choice(_JOINS).format(a=clauses[0], b=clauses[1])
    bg = rng.choice(_BACKGROUNDS).format(bg=scene.background)
    return _capitalise(rng.choice(_SCENES[len(clauses)]).format(shapes=shapes, bg=bg))


def _template_words(texts: Iterable[str]) -> set[str]:
    return {w for t in texts for w in prompt_words(re.sub(r"\{\w+\}", " ", t))}


def vocabulary() -> list[str]:
    """Every token any short or extended prompt can contain (punctuation tokens included), sorted."""
    words = _template_words(_SHAPE_CLAUSES + _JOINS + _BACKGROUNDS + _SCENES[1] + _SCENES[2])
    words |= _template_words(["a moves on background and"])
    fillers = list(COLOURS) + list(SHAPES) + list(SIZES) + list(DIRECTION_WORDS.values()) + list(SPEED_WORDS.values())
    for table in (_SIZE_SYNONYMS, _SHAPE_SYNONYMS, _SPEED_PHRASES, _DIRECTION_PHRASES):
        fillers += [phrase for phrases in table.values() for phrase in phrases]
    words |= _template_words(fillers)
    missing = set(DIRECTIONS) - set(DIRECTION_WORDS) | set(SPEEDS) - set(SPEED_WORDS)
    if missing:  # pragma: no cover - guards edits of the attribute tables in world.py
        raise KeyError(f"no prompt wording for attributes {sorted(missing)}")
    return sorted(words)
