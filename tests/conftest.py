"""Shared test fixtures: the golden fixture directory and loaders for its cases."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO_ROOT = Path(__file__).resolve().parents[1]


def golden_dir() -> Path:
    """`$SF_GOLDEN_DIR`, or `../shared/golden` next to the repository root."""
    env = os.environ.get("SF_GOLDEN_DIR")
    return Path(env) if env else (REPO_ROOT.parent / "shared" / "golden")


class GoldenCase:
    """One fixture case: its JSON description and its tensors (io and, if present, weights)."""

    def __init__(self, name: str):
        root = golden_dir()
        if not root.is_dir():
            pytest.fail(f"golden fixture directory {root} does not exist (set SF_GOLDEN_DIR)")
        self.root = root
        self.name = name
        json_path = root / f"{name}.json"
        self.meta = json.loads(json_path.read_text()) if json_path.exists() else {}
        io_path = root / f"{name}.io.safetensors"
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
