"""The README stays a front door: its results table is the summarize script's output, its set-up commands are the
ones CI runs, and it stays short."""
from __future__ import annotations

import importlib.util
import re

from tests.conftest import REPO_ROOT

README = REPO_ROOT / "README.md"
TABLE = re.compile(r"<!-- results: python benchmarks/summarize.py -->\n(.*?)\n<!-- /results -->", re.S)
TEST_COMMAND = "pip install torch==2.13.0 && pip install -e '.[test]' && python -m pytest -q -m \"not gpu\""
RUN_COMMAND = "pip install torch==2.13.0 && pip install -e . && python inference.py"


def _summarize():
    spec = importlib.util.spec_from_file_location("summarize", REPO_ROOT / "benchmarks" / "summarize.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_results_table_is_the_summarize_output():
    found = TABLE.search(README.read_text())
    assert found, "README.md lost its results markers"
    table = _summarize().readme_table()
    assert found.group(1) == table, "README table differs: paste `python benchmarks/summarize.py` between the markers"
    rows = table.splitlines()
    assert rows[0].startswith("| measured |") and len(rows) > 10
    for row in rows[2:]:  # every row names the result file it was computed from, and that file exists
        name = re.search(r"`([\w.]+\.json)` \|$", row)
        assert name and (REPO_ROOT / "benchmarks" / "results" / name.group(1)).is_file(), row


def test_readme_is_short_and_its_prose_lines_fit():
    text = README.read_text()
    assert len(text.encode()) <= 15 * 1024
    in_code, long_lines = False, []
    for number, line in enumerate(text.splitlines(), 1):
        if line.startswith("```"):
            in_code = not in_code
        elif not line.startswith("|") and len(line) > 120:
            long_lines.append(number)
    assert not long_lines, f"README lines over 120 characters: {long_lines}"


def test_readme_set_up_commands_are_the_ones_ci_runs():
    text = README.read_text()
    assert text.index(RUN_COMMAND) < text.index(TEST_COMMAND) < text.index("## Inference")
    ci = (REPO_ROOT / ".ci" / "run").read_text()
    assert "python -m pip install -q torch==2.13.0" in ci and "python -m pip install -q -e '.[test]'" in ci
    assert '\npython -m pytest -q -m "not gpu"\n' in ci
    assert "apt-get install -y -qq chromium" in ci  # the browser test runs in CI, it is not skipped there
