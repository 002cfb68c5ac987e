"""Prompt handling (utils/prompts.py): prompt files, inline prompts, extended prompts, output names,
sharding across ranks, and prompt-switching schedules."""
from __future__ import annotations

import json
import re

import pytest

from utils.prompts import (Prompt, attach_extended, output_name, parse_prompt_schedule, prompt_at_block,
                           read_prompt_file, read_prompts, shard, slugify)


def write(path, data: str | bytes):
    path.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
    return path


# ----------------------------------------------------------------------------------------------- prompt files

def test_prompt_file_skips_blank_lines_and_keeps_line_numbers(tmp_path):
    path = write(tmp_path / "p.txt", "\ufeff  a cat walks \r\n\n   \nune fête à Paris\n\t\nlast line without newline")
    prompts = read_prompt_file(path)
    assert [p.text for p in prompts] == ["a cat walks", "une fête à Paris", "last line without newline"]
    assert [p.index for p in prompts] == [0, 1, 2]
    assert [p.line for p in prompts] == [1, 4, 6]
    assert prompts[1].model_text == "une fête à Paris" and prompts[1].extended is None


def test_prompt_file_errors_name_file_and_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        read_prompt_file(tmp_path / "missing.txt")
    empty = write(tmp_path / "empty.txt", "\n  \n\t\n")
    with pytest.raises(ValueError, match="empty.txt.*no prompts"):
        read_prompt_file(empty)
    bad = write(tmp_path / "bad.txt", b"good line\n\nalso good\nbroken \xff byte\n")
    with pytest.raises(ValueError, match=r"bad\.txt: line 4: invalid UTF-8 byte 0xff at column 8"):
        read_prompt_file(bad)
    with pytest.raises(ValueError, match="directory"):
        read_prompt_file(tmp_path)


def test_read_prompts_inline_vs_path(tmp_path, monkeypatch):
    path = write(tmp_path / "prompts.txt", "one\n\ntwo\n")
    assert [p.text for p in read_prompts(str(path))] == ["one", "two"]
    assert [p.text for p in read_prompts(path)] == ["one", "two"]  # PathLike
    inline = read_prompts("  a red circle moves left  ")
    assert inline == [Prompt(index=0, text="a red circle moves left", line=None)]
    assert [(p.index, p.text) for p in read_prompts(["a", "  ", "b"])] == [(0, "a"), (1, "b")]
    # An existing file without the .txt suffix is read as a file ...
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "list", "x\ny\n")
    assert [p.text for p in read_prompts("list")] == ["x", "y"]
    # ... and a missing .txt path is an error, not a prompt about a file name.
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        read_prompts("nope.txt")
    with pytest.raises(ValueError, match="no prompt"):
        read_prompts("   ")
    with pytest.raises(ValueError, match="no prompt"):
        read_prompts([])


def test_attach_extended(tmp_path):
    prompts = read_prompts(str(write(tmp_path / "p.txt", "cat\n\ndog\n")))
    extended = write(tmp_path / "e.txt", "a fluffy cat in the sun\ndog running on a beach\n\n")
    both = attach_extended(prompts, extended)
    assert [(p.text, p.extended, p.model_text) for p in both] == [
        ("cat", "a fluffy cat in the sun", "a fluffy cat in the sun"),
        ("dog", "dog running on a beach", "dog running on a beach")]
    assert [p.index for p in both] == [0, 1] and [p.line for p in both] == [1, 3]
    short = write(tmp_path / "short.txt", "only one\n")
    with pytest.raises(ValueError, match=r"short\.txt has 1 non-blank lines but there are 2 prompts"):
        attach_extended(prompts, short)


# ----------------------------------------------------------------------------------------------- names

SAFE = re.compile(r"^[a-z0-9][a-z0-9_-]*$")


@pytest.mark.parametrize("text", [
    "../../etc/passwd", "/abs/path", "..", ".", ".hidden", "a/b\\c", "con", "NUL", "", "   ", "!!!",
    "日本語のプロンプト", "emoji 🐱 cat", "Café crème brûlée", "tab\tnew\nline", "a" * 500, "x-" * 100,
    "__init__", "--flag", "null\x00byte"])
def test_slugify_is_always_a_safe_bounded_name(text):
    slug = slugify(text)
    assert SAFE.match(slug), slug
    assert 1 <= len(slug) <= 60
    assert slug not in {"con", "nul", "prn", "aux"}
    assert "/" not in slug and ".." not in slug and not slug.startswith(".")


def test_slugify_values():
    assert slugify("A Red Circle, moving LEFT!") == "a-red-circle-moving-left"
    assert slugify("Café crème brûlée") == "cafe-creme-brulee"
    assert slugify("日本語") == "prompt"
    assert slugify("../../etc/passwd") == "etc-passwd"
    assert slugify("snake_case_words") == "snake_case_words"
    long = slugify("word " * 40, max_len=22)
    assert long == "word-word-word-word"  # cut at a word boundary, not mid-word
    assert len(slugify("x" * 100, max_len=7)) == 7
    with pytest.raises(ValueError):
        slugify("cat", max_len=0)


def test_output_name():
    assert output_name(7, "A cat / dog") == "0007-a-cat-dog"
    assert output_name(7, "A cat / dog", sample=1, num_samples=2) == "0007-a-cat-dog-s1"
    assert output_name(12345, "cat", seed=3) == "12345-cat-seed3"
    # Same slug, different prompts: the index keeps names apart.
    assert output_name(0, "Cat!") != output_name(1, "cat?")
    with pytest.raises(ValueError, match="sample"):
        output_name(0, "cat", sample=2, num_samples=2)
    with pytest.raises(ValueError, match="index"):
        output_name(-1, "cat")


# ----------------------------------------------------------------------------------------------- sharding

@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("count", [0, 1, 2, 3, 7, 10])
def test_shard_covers_everything_without_overlap(world_size, count):
    items = [f"prompt-{i}" for i in range(count)]
    shards = [shard(items, rank, world_size) for rank in range(world_size)]
    flat = [item for part in shards for item in part]
    assert sorted(flat) == sorted(items)  # nothing dropped, nothing duplicated
    assert len(flat) == len(set(flat))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1  # balanced
    for rank, part in enumerate(shards):
        assert part == items[rank::world_size]  # deterministic order within a rank


def test_shard_fewer_prompts_than_ranks_and_bad_args():
    prompts = read_prompts(["only", "two"])
    parts = [shard(prompts, rank, 4) for rank in range(4)]
    assert [[p.index for p in part] for part in parts] == [[0], [1], [], []]
    with pytest.raises(ValueError, match="rank"):
        shard(prompts, 4, 4)
    with pytest.raises(ValueError, match="world_size"):
        shard(prompts, 0, 0)


# ----------------------------------------------------------------------------------------------- schedules

EXPECTED = [(0, "a cat walks"), (4, "the cat jumps"), (9, "the cat: sleeps")]


def test_schedule_line_format_inline_and_file(tmp_path):
    text = "# comment\n0: a cat walks\n\n 4 :the cat jumps  \n9: the cat: sleeps\n"
    assert parse_prompt_schedule(text) == EXPECTED
    path = write(tmp_path / "schedule.txt", text)
    assert parse_prompt_schedule(str(path)) == EXPECTED
    assert parse_prompt_schedule(path) == EXPECTED


def test_schedule_json_formats(tmp_path):
    as_list = [{"block": 0, "prompt": "a cat walks"}, {"block": 4, "prompt": "the cat jumps"},
               {"block": 9, "prompt": "the cat: sleeps"}]
    as_dict = {"9": "the cat: sleeps", "0": "a cat walks", "4": "the cat jumps"}  # sorted numerically
    assert parse_prompt_schedule(as_list) == EXPECTED
    assert parse_prompt_schedule(as_dict) == EXPECTED
    assert parse_prompt_schedule(json.dumps(as_list)) == EXPECTED
    assert parse_prompt_schedule([[0, "a cat walks"], [4, "the cat jumps"], [9, "the cat: sleeps"]]) == EXPECTED
    path = write(tmp_path / "schedule.json", json.dumps(as_dict))
    assert parse_prompt_schedule(str(path)) == EXPECTED


@pytest.mark.parametrize("schedule, message", [
    ("0: a\n4: b\n3: c\n", r"line 3: block 3 must be greater than the previous block 4"),
    ("0: a\n0: b\n", r"line 2: block 0 must be greater"),
    ("2: a\n4: b\n", r"line 1: the schedule must start at block 0"),
    ("0: a\nfour: b\n", r"line 2: expected '<block index>: <prompt>'"),
    ("0: a\n-1: b\n", r"line 2: expected"),
    ("0: a\n5:   \n", r"line 2: block 5 needs a non-empty prompt"),
    ("# only comments\n\n", r"no entries"),
    ("", r"empty"),
    ('[{"block": 0, "prompt": "a"}, {"block": 2}]', r"entry 1: expected keys 'block' and 'prompt'"),
    ('[{"block": 0, "prompt": "a", "seed": 1}]', r"entry 0: expected keys"),
    ('[{"block": 0, "prompt": "a"}, {"block": "2", "prompt": "b"}]', r"entry 1: 'block' must be a non-negative"),
    ('[{"block": 0, "prompt": "a"}, {"block": true, "prompt": "b"}]', r"entry 1: 'block' must be"),
    ('[{"block": 1, "prompt": "a"}]', r"entry 0: the schedule must start at block 0"),
    ('[{"block": 0, "prompt": ""}]', r"entry 0: block 0 needs a non-empty prompt"),
    ('[{"block": 0, "prompt": 5}]', r"entry 0: block 0 needs a non-empty prompt string"),
    ('[0, "a"]', r"entry 0: expected"),
    ('{"0": "a", "x": "b"}', r"key 'x': expected a non-negative integer"),
    ('{"0": "a", "0": "b"}', r"key '0' appears twice"),
    ('{"0": "a", "00": "b"}', r"two keys name the same block"),
    ('{"3": "a"}', r"key '3': the schedule must start at block 0"),
    ('\n\n[{"block": 0, "prompt": "a"},]', r"invalid JSON at line 3"),
    ('"just a string"', r"expected '<block index>: <prompt>'"),
])
def test_schedule_errors_name_the_line_or_entry(schedule, message):
    with pytest.raises(ValueError, match=message):
        parse_prompt_schedule(schedule)


def test_schedule_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.json"):
        parse_prompt_schedule(str(tmp_path / "missing.json"))
    bad = write(tmp_path / "bad.txt", b"0: ok\n4: caf\xe9\n")
    with pytest.raises(ValueError, match=r"bad\.txt: line 2: invalid UTF-8"):
        parse_prompt_schedule(str(bad))
    out_of_order = write(tmp_path / "order.txt", "0: a\n\n2: b\n1: c\n")
    with pytest.raises(ValueError, match=r"order\.txt: line 4"):
        parse_prompt_schedule(out_of_order)


def test_prompt_at_block():
    assert [prompt_at_block(EXPECTED, b) for b in (0, 3, 4, 8, 9, 100)] == [
        "a cat walks", "a cat walks", "the cat jumps", "the cat jumps", "the cat: sleeps", "the cat: sleeps"]
    with pytest.raises(ValueError):
        prompt_at_block(EXPECTED, -1)
