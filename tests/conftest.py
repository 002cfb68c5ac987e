"""Shared test fixtures: the golden fixture directory and loaders for its cases."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO_ROOT = Path(__file__).resolve().parents[1]


SHIPPED_GOLDEN_DIR = REPO_ROOT / "tests" / "golden"


def golden_dir() -> Path:
    """`$SF_GOLDEN_DIR` (another fixture set of the same format), else the set shipped in `tests/golden/`."""
    env = os.environ.get("SF_GOLDEN_DIR")
    return Path(env).expanduser() if env else SHIPPED_GOLDEN_DIR


class GoldenCase:
    """One fixture case: its JSON description and its tensors (io and, if present, weights)."""

    def __init__(self, name: str):
        root = golden_dir()
        if not root.is_dir():
            origin = "$SF_GOLDEN_DIR" if os.environ.get("SF_GOLDEN_DIR") else "the shipped fixtures"
            pytest.fail(f"golden fixture directory {root} ({origin}) does not exist: point SF_GOLDEN_DIR at a "
                        f"folder of fixtures in the format of tests/golden/, or unset it")
        self.root = root
        self.name = name
        json_path = root / f"{name}.json"
        io_path = root / f"{name}.io.safetensors"
        if not json_path.exists() and not io_path.exists():
            pytest.fail(f"golden case {name!r} is missing from {root}: expected {json_path.name} and/or {io_path.name}")
        self.meta = json.loads(json_path.read_text()) if json_path.exists() else {}
        self.io = load_file(str(io_path)) if io_path.exists() else {}

    def weights(self, file_name: str | None = None) -> dict[str, torch.Tensor]:
        file_name = file_name or self.meta.get("weights_file") or f"{self.name}.weights.safetensors"
        return load_file(str(self.root / file_name))

    def json(self, file_name: str) -> dict:
        return json.loads((self.root / file_name).read_text())


@pytest.fixture
def golden():
    """Factory: `golden("wan_dit_bidirectional")` -> GoldenCase."""
    return GoldenCase


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
