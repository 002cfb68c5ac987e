"""`configs/default_config.yaml`, written from the schema: every key with its default, its meaning as a comment.

    python -m utils.config --write-defaults     # after changing utils/config/schema.py
tests/utils/test_config.py fails while the file and the schema disagree.
"""
from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import textwrap
from pathlib import Path
from typing import Any

from utils.config.schema import Config

WIDTH = 120
HEADER = """\
# Every configuration key, with its default and meaning. GENERATED from utils/config/schema.py by
# `python -m utils.config --write-defaults`: edit the schema, not this file.
# Recipes (the other files here) override a few keys; `key=value` on the command line overrides anything
# (`rollout.num_frame_per_block=2`). Unknown keys are errors. The original's flat keys (`num_frame_per_block`,
# `model_kwargs.timestep_shift`, ...) load too: utils/config/original_keys.py maps them onto these sections.
"""


def _scalar(value: Any) -> str:
    if isinstance(value, float):
        text = repr(value)
        return text if "." in text or "inf" in text or "nan" in text else text.replace("e", ".0e", 1)
    if isinstance(value, list):
        return "[" + ", ".join(_scalar(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_scalar(v)}" for k, v in value.items()) + "}"
    return json.dumps(value, ensure_ascii=False)  # null, true/false, numbers, quoted strings


def _comment(text: str, indent: str) -> list[str]:
    return textwrap.wrap(text, WIDTH - len(indent) - 2, initial_indent=f"{indent}# ", subsequent_indent=f"{indent}# ")


def _section_lines(instance: Any, indent: str) -> list[str]:
    lines: list[str] = []
    for f in dataclasses.fields(instance):
        value = getattr(instance, f.name)
        if dataclasses.is_dataclass(value):
            lines += ["", *_comment(f"--- {f.name}: {f.metadata['help']}", indent), f"{indent}{f.name}:"]
            lines += _section_lines(value, indent + "  ")
        else:
            lines += _comment(f.metadata["help"], indent) + [f"{indent}{f.name}: {_scalar(value)}"]
    return lines


def default_config_text() -> str:
    return HEADER + "\n" + "\n".join(_section_lines(Config(), "")) + "\n"


def write_default_config(path: Path) -> None:
    """Atomically (a temp file renamed into place)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write(default_config_text())
    os.replace(tmp, path)
