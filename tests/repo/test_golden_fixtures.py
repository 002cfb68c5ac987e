"""The fixture set under test is complete and unaltered: every file `index.json` lists is there with its digest."""
import hashlib
import json

import pytest

from tests.conftest import golden_dir


@pytest.mark.golden
def test_every_indexed_fixture_is_present_with_its_sha256():
    root = golden_dir()
    index_path = root / "index.json"
    if not index_path.is_file():
        pytest.fail(f"{index_path} is missing: a fixture set lists its files there")
    entries = json.loads(index_path.read_text())["files"]
    assert entries, f"{index_path} lists no files"
    for entry in entries:
        path = root / entry["file"]
        assert path.is_file(), f"{path} is listed in index.json but missing"
        data = path.read_bytes()
        assert len(data) == entry["bytes"], f"{path}: {len(data)} bytes, index.json says {entry['bytes']}"
        assert hashlib.sha256(data).hexdigest() == entry["sha256"], f"{path}: SHA-256 differs from index.json"
