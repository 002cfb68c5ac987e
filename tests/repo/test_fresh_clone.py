"""A fresh clone of the committed repository passes its golden tests with nothing beside it: the fixtures ship in
tests/golden/, and no test reads a folder outside the clone."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT


def _git(*args: str, cwd=REPO_ROOT) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


@pytest.mark.slow
def test_golden_tests_pass_in_a_fresh_clone_with_nothing_beside_it(tmp_path):
    if shutil.which("git") is None or not (REPO_ROOT / ".git").exists():
        pytest.skip("needs git and a git checkout of the repository (this copy is not one)")
    head = _git("rev-parse", "HEAD")
    alone = tmp_path / "empty"  # the clone's parent holds nothing else: no fixture folder beside it
    alone.mkdir()
    clone = alone / "self-forcing"
    _git("clone", "--quiet", "--no-checkout", str(REPO_ROOT), str(clone), cwd=tmp_path)
    _git("checkout", "--quiet", "--detach", head, cwd=clone)
    assert sorted(p.name for p in alone.iterdir()) == ["self-forcing"]
    fixtures = clone / "tests" / "golden"
    assert fixtures.is_dir() and any(fixtures.iterdir()), "tests/golden/ is not committed"

    env = {k: v for k, v in os.environ.items() if k not in ("SF_GOLDEN_DIR", "PYTHONPATH")}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "golden and not gpu"],
                          cwd=clone, env=env, capture_output=True, text=True, timeout=1200)
    summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert " passed" in summary and "skipped" not in summary and "failed" not in summary, summary
