"""Prompts for inference: prompt files, extended prompts, output names, sharding over ranks, and
interactive prompt-switching schedules.

Every prompt carries a stable `index` (its position among the non-blank lines of the prompt file, or
among the non-blank inline prompts). The index names the outputs (`output_name`), survives sharding
across ranks, and lets a resumed batch skip finished prompts, whatever rank processes them.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import unicodedata
from pathlib import Path
from typing import Any, Sequence, TypeVar

from utils.errors import InputError, MissingFileError

T = TypeVar("T")

PathLike = str | os.PathLike

# Each world's example prompts: the videos sampled during training (`sample_prompts` unset) and the model card's
# command.
DEFAULT_PROMPTS = {"shapes": ["a large red circle moves slowly left on a blue background",
                              "a small yellow square moves quickly up on a black background"],
                   "wan": ["A red fox trots through fresh snow in a quiet pine forest, morning light."]}


@dataclasses.dataclass(frozen=True)
class Prompt:
    """One prompt: `index` among non-blank entries (0-based), `text` stripped, `line` the 1-based line
    in the source file (None for inline prompts), `extended` the matching extended prompt if any."""

    index: int
    text: str
    line: int | None = None
    extended: str | None = None
    image: str | None = None  # i2v: this prompt's first frame (the original's image-text pair folders)
    crop: tuple[int, int, int, int] | None = None  # (left, top, right, bottom) to cut from the image first

    @property
    def model_text(self) -> str:
        """The text the model is conditioned on: the extended prompt when given (as in the original),
        while outputs stay named after the short `text`."""
        return self.extended if self.extended is not None else self.text


# ----------------------------------------------------------------------------------------------- prompt files

def _read_lines(path: PathLike, what: str) -> list[str]:
    """Decode `path` as UTF-8 line by line (so a bad byte is reported with its 1-based line number)."""
    path = Path(path)
    if not path.exists():
        raise MissingFileError(f"{what} {path} does not exist")
    if path.is_dir():
        raise InputError(f"{what} {path} is a directory; expected a UTF-8 text file")
    raw_lines = path.read_bytes().split(b"\n")
    lines = []
    for number, raw in enumerate(raw_lines, start=1):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            byte = raw[error.start]
            raise InputError(
                f"{what} {path}: line {number}: invalid UTF-8 byte 0x{byte:02x} at column {error.start + 1}; "
                "expected a UTF-8 encoded text file") from None
        if number == 1:
            text = text.removeprefix("\ufeff")  # editors on Windows prepend a byte-order mark
        lines.append(text)
    return lines


def read_prompt_file(path: PathLike) -> list[Prompt]:
    """Read one prompt per line (UTF-8, stripped, blank lines skipped). Raises FileNotFoundError for a
    missing file and ValueError for a file without prompts or with invalid UTF-8 (naming the line)."""
    prompts = []
    for number, line in enumerate(_read_lines(path, "prompt file"), start=1):
        text = line.strip()
        if text:
            prompts.append(Prompt(index=len(prompts), text=text, line=number))
    if not prompts:
        raise InputError(f"prompt file {path} contains no prompts; expected one prompt per line")
    return prompts


def _looks_like_file(arg: str) -> bool:
    return os.path.isfile(arg) or arg.lower().endswith(".txt")


def read_prompts(prompt_arg: PathLike | Sequence[str]) -> list[Prompt]:
    """Resolve a `--prompt` argument: a path to a prompt file (a string naming an existing file, any
    string ending in `.txt`, or a `PathLike`), a single inline prompt, or a list of inline prompts
    (blank entries skipped, indices count the non-blank ones)."""
    if isinstance(prompt_arg, os.PathLike):
        return read_prompt_file(prompt_arg)
    if isinstance(prompt_arg, str):
        if _looks_like_file(prompt_arg):
            if not os.path.exists(prompt_arg):
                raise MissingFileError(
                    f"prompt file {prompt_arg} does not exist (a --prompt ending in .txt is read as a file)")
            return read_prompt_file(prompt_arg)
        prompt_arg = [prompt_arg]
    prompts = []
    for item in prompt_arg:
        if not isinstance(item, str):
            raise InputError(f"inline prompts must be strings, got {type(item).__name__}: {item!r}")
        if item.strip():
            prompts.append(Prompt(index=len(prompts), text=item.strip()))
    if not prompts:
        raise InputError(f"no prompt given: every inline prompt is empty ({list(prompt_arg)!r})")
    return prompts


def attach_extended(prompts: Sequence[Prompt], extended_path: PathLike) -> list[Prompt]:
    """Pair each prompt with the extended prompt at the same position among the non-blank lines of
    `extended_path`; the counts must match."""
    extended = read_prompt_file(extended_path)
    if len(extended) != len(prompts):
        raise InputError(
            f"extended prompt file {extended_path} has {len(extended)} non-blank lines but there are "
            f"{len(prompts)} prompts; expected exactly one extended prompt per prompt")
    return [dataclasses.replace(p, extended=e.text) for p, e in zip(prompts, extended)]


# ----------------------------------------------------------------------------------------------- output names

_WINDOWS_RESERVED = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(10)), *(f"lpt{i}" for i in range(10))}


def slugify(text: str, max_len: int = 60) -> str:
    """A lowercase file-name-safe rendering of `text`: only ASCII letters, digits, '-' and '_'; accents
    transliterated (é → e), other non-ASCII dropped; at most `max_len` characters, cut at a word
    boundary when one is close; never empty ("prompt"), never a path, never a hidden or reserved name.

    The original used `prompt[:100]` as the file name, which breaks on '/'."""
    if max_len < 1:
        raise InputError(f"slugify max_len must be >= 1, got {max_len}")
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii").lower()
    slug = re.sub(r"[^a-z0-9_]+", "-", ascii_text).strip("-_")
    slug = re.sub(r"[-_]{2,}", "-", slug)
    if len(slug) > max_len:
        cut = slug[:max_len]
        boundary = cut.rfind("-")
        # Prefer ending on a whole word, unless that would throw away more than half the budget.
        if slug[max_len] != "-" and boundary >= max_len // 2:
            cut = cut[:boundary]
        slug = cut.strip("-_")
    if not slug:
        slug = "prompt"[:max_len]
    if slug in _WINDOWS_RESERVED:
        slug = f"{slug}_"[:max_len] if max_len > len(slug) else "p"
    return slug


def output_name(index: int, prompt: str, sample: int = 0, num_samples: int = 1, seed: int | None = None,
                max_slug_len: int = 60) -> str:
    """File stem for one output, without extension: `f"{index:04d}-{slugify(prompt)}"`, then `-s{sample}`
    when `num_samples > 1`, then `-seed{seed}` when `seed` is given.

    `index` (the prompt's stable `Prompt.index`) makes names unique even when two prompts share a slug;
    pass the short prompt, not the extended one. Example: `output_name(7, "A cat / dog", 1, 2)` →
    `"0007-a-cat-dog-s1"`."""
    if index < 0:
        raise InputError(f"output index must be >= 0, got {index}")
    if num_samples < 1 or not 0 <= sample < num_samples:
        raise InputError(f"sample must be in [0, num_samples={num_samples}), got {sample}")
    name = f"{index:04d}-{slugify(prompt, max_slug_len)}"
    if num_samples > 1:
        name += f"-s{sample}"
    if seed is not None:
        name += f"-seed{seed}"
    return name


# ----------------------------------------------------------------------------------------------- sharding

def shard(items: Sequence[T], rank: int, world_size: int) -> list[T]:
    """Round-robin share of `items` for `rank`: `items[rank::world_size]`. Shares never overlap and
    their union is all of `items` (the original's `DistributedSampler(drop_last=True)` dropped the tail).
    Ranks may get different counts, even zero, so callers must not run collectives per item."""
    if world_size < 1:
        raise InputError(f"world_size must be >= 1, got {world_size}")
    if not 0 <= rank < world_size:
        raise InputError(f"rank must be in [0, {world_size}), got {rank}")
    return list(items[rank::world_size])


# ----------------------------------------------------------------------------------------------- schedules

Schedule = list[tuple[int, str]]

_SCHEDULE_LINE = re.compile(r"^\s*([0-9]+)\s*:(.*)$")


def parse_prompt_schedule(text_or_path: PathLike | list | dict) -> Schedule:
    """Parse an interactive prompt-switching schedule into `[(block_index, prompt), ...]`.

    Accepted forms (a string naming an existing file, or ending in `.txt`/`.json`, is read as a file):

    * lines `block: prompt` (`0: a cat walks` / `4: the cat jumps`); blank lines and `#` comments skipped;
    * JSON `[{"block": 0, "prompt": "..."}, ...]` (or `[[0, "..."], ...]`), or `{"0": "...", "4": "..."}`
      (keys sorted numerically), as text, as a file, or as an already-parsed list/dict.

    The schedule must start at block 0, with strictly increasing blocks and non-empty prompts; errors name
    the line or entry. Prompt `i` is active from its block up to the next entry's block.
    """
    source = "prompt schedule"
    if isinstance(text_or_path, (list, dict)):
        return _schedule_from_json(text_or_path, source)
    if isinstance(text_or_path, os.PathLike) or os.path.isfile(text_or_path) \
            or text_or_path.lower().endswith((".txt", ".json")):
        source = f"prompt schedule file {text_or_path}"
        lines = _read_lines(text_or_path, "prompt schedule file")
        text = "\n".join(lines)
    else:
        text = text_or_path
    stripped = text.strip()
    if not stripped:
        raise InputError(f"{source} is empty; expected lines 'block: prompt' or JSON")
    if stripped[0] in "[{":
        try:
            obj = json.loads(text, object_pairs_hook=_reject_duplicate_keys(source))  # keeps line numbers
        except json.JSONDecodeError as error:
            raise InputError(f"{source}: invalid JSON at line {error.lineno}, column {error.colno}: "
                             f"{error.msg}") from None
        return _schedule_from_json(obj, source)
    return _schedule_from_lines(text.split("\n"), source)


def _reject_duplicate_keys(source: str):
    def hook(pairs: list[tuple[str, Any]]) -> dict:
        seen: dict[str, Any] = {}
        for key, value in pairs:
            if key in seen:
                raise InputError(f"{source}: key {key!r} appears twice")
            seen[key] = value
        return seen
    return hook


def _schedule_from_lines(lines: list[str], source: str) -> Schedule:
    entries = []
    for number, line in enumerate(lines, start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        match = _SCHEDULE_LINE.match(line)
        if match is None:
            raise InputError(f"{source}: line {number}: expected '<block index>: <prompt>' with a non-negative "
                             f"integer block index, got {line.strip()!r}")
        entries.append((int(match.group(1)), match.group(2), f"line {number}"))
    return _validate_schedule(entries, source)


def _schedule_from_json(obj: Any, source: str) -> Schedule:
    entries = []
    if isinstance(obj, dict):
        for key, prompt in obj.items():
            if not re.fullmatch(r"[0-9]+", str(key).strip()):
                raise InputError(f"{source}: key {key!r}: expected a non-negative integer block index")
            entries.append((int(key), prompt, f"key {key!r}"))
        numbers = [block for block, _, _ in entries]
        if len(set(numbers)) != len(numbers):
            raise InputError(f"{source}: two keys name the same block ({sorted(numbers)})")
        entries.sort(key=lambda entry: entry[0])
    elif isinstance(obj, list):
        for position, item in enumerate(obj):
            where = f"entry {position}"
            if isinstance(item, dict):
                unknown = set(item) - {"block", "prompt"}
                if unknown or "block" not in item or "prompt" not in item:
                    raise InputError(f"{source}: {where}: expected keys 'block' and 'prompt', got {sorted(item)}")
                block, prompt = item["block"], item["prompt"]
            elif isinstance(item, (list, tuple)) and len(item) == 2:
                block, prompt = item
            else:
                raise InputError(f"{source}: {where}: expected {{'block': int, 'prompt': str}}, got {item!r}")
            if isinstance(block, bool) or not isinstance(block, int) or block < 0:
                raise InputError(f"{source}: {where}: 'block' must be a non-negative integer, got {block!r}")
            entries.append((block, prompt, where))
    else:
        raise InputError(f"{source}: expected a JSON list or object, got {type(obj).__name__}")
    return _validate_schedule(entries, source)


def _validate_schedule(entries: list[tuple[int, Any, str]], source: str) -> Schedule:
    if not entries:
        raise InputError(f"{source} has no entries; expected at least '0: <prompt>'")
    schedule: Schedule = []
    for block, prompt, where in entries:
        if not isinstance(prompt, str) or not prompt.strip():
            raise InputError(f"{source}: {where}: block {block} needs a non-empty prompt string, got {prompt!r}")
        if not schedule and block != 0:
            raise InputError(f"{source}: {where}: the schedule must start at block 0, got block {block}")
        if schedule and block <= schedule[-1][0]:
            raise InputError(f"{source}: {where}: block {block} must be greater than the previous block "
                             f"{schedule[-1][0]} (strictly increasing)")
        schedule.append((block, prompt.strip()))
    return schedule


def prompt_at_block(schedule: Schedule, block: int) -> str:
    """The prompt active at `block`: the last schedule entry whose block index is <= `block`."""
    if block < 0:
        raise InputError(f"block index must be >= 0, got {block}")
    active = schedule[0][1]
    for start, prompt in schedule:
        if start > block:
            break
        active = prompt
    return active


def read_image_pair_dir(data_dir: str | Path) -> list[Prompt]:
    """The original's i2v inference data (`TextImagePairDataset`): exactly one `target_crop_info_<ratio>.json` in
    `data_dir`, a list of items with `file_name`, `caption` and optionally `target_crop.target_bbox`
    (left, top, right, bottom pixels of the source image), and the images in `<data_dir>/<ratio>/`. Each item
    becomes a prompt carrying its image (and crop box); errors name the file and the item."""
    import json

    data_dir = Path(data_dir)
    infos = sorted(data_dir.glob("target_crop_info_*.json"))
    if len(infos) != 1:
        raise InputError(f"{data_dir}: an i2v data folder needs exactly one target_crop_info_<ratio>.json, "
                         f"found {len(infos)}")
    info = infos[0]
    ratio = info.stem[len("target_crop_info_"):]
    try:
        items = json.loads(info.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(f"{info}: not valid UTF-8 JSON: {err}") from None
    if not isinstance(items, list) or not items:
        raise InputError(f"{info}: expected a non-empty JSON list of items")
    prompts = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or not isinstance(item.get("file_name"), str) \
                or not isinstance(item.get("caption"), str) or not item["caption"].strip():
            raise InputError(f"{info}: item {i} needs a string file_name and a non-empty caption")
        image = data_dir / ratio / item["file_name"]
        if not image.is_file():
            raise MissingFileError(f"{info}: item {i}: image {image} does not exist")
        box = (item.get("target_crop") or {}).get("target_bbox")
        if box is not None:
            if not (isinstance(box, (list, tuple)) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)
                    and box[0] < box[2] and box[1] < box[3]):
                raise InputError(f"{info}: item {i}: target_crop.target_bbox must be [left, top, right, bottom], "
                                 f"got {box!r}")
            box = tuple(int(round(v)) for v in box)
        prompts.append(Prompt(i, item["caption"].strip(), image=str(image), crop=box))
    return prompts
