"""Every repository path that README.md and docs/*.md cite exists, so a reader who follows one finds the file.

Cited are backquoted words, words in code blocks and link targets that start with one of the repository's
top-level folders or name one of its root files; bare names of code (`rollout.py` in a folder's listing) must be the
name of some file in the repository. Placeholders (`<logdir>/...`, `stats_*.json`) are not checked. Paths of the
original implementation that the docs compare with (its `trainer/distillation.py`, ...) are listed here, and the
list is kept honest: each is cited and none exists in this repository.
"""
from __future__ import annotations

import re
import subprocess

from tests.conftest import REPO_ROOT

DOCS = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
# Bare names of code (outputs and users' own files, `stats.json`, `prompts.txt`, are not the repository's).
CODE_SUFFIXES = (".py", ".sh", ".html")
# The original repository's files (github.com/guandeh17/Self-Forcing), cited where the docs compare with it.
ORIGINAL_PATHS = {
    "model/base.py", "model/causvid.py", "model/diffusion.py", "model/dmd.py", "model/gan.py",
    "model/ode_regression.py", "model/sid.py", "pipeline/bidirectional_diffusion_inference.py",
    "pipeline/bidirectional_inference.py", "pipeline/causal_inference.py", "pipeline/self_forcing_training.py",
    "trainer/distillation.py", "utils/dataset.py", "utils/lmdb.py", "utils/scheduler.py", "utils/wan_wrapper.py",
    "scripts/create_lmdb_iterative.py",
}
BACKQUOTED = re.compile(r"`([^`\n]+)`")
LINK = re.compile(r"\]\(([^)#\s]+)")
CODE_BLOCK = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
INDENTED_CODE = re.compile(r"^(?: {4}|\t)(.*)$", re.M)
PATH_WORD = re.compile(r"[\w.-]+(?:/[\w.*<>-]*)*")


def _tracked_files() -> list[str]:
    listing = subprocess.run(["git", "ls-files"], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    return listing.stdout.splitlines()


def _cited_words(text: str) -> set[str]:
    words = set()
    for span in BACKQUOTED.findall(text) + CODE_BLOCK.findall(text) + INDENTED_CODE.findall(text):
        words.update(PATH_WORD.findall(span))
    return {word.rstrip(".,;:") for word in words}


def _cited_paths(doc) -> tuple[set[str], set[str]]:
    """(repository paths, bare file names) that `doc` cites, relative to the repository root."""
    text = doc.read_text()
    tracked = _tracked_files()
    top_level = {path.split("/")[0] for path in tracked}
    paths, names = set(), set()
    for target in LINK.findall(text):
        if not target.startswith(("http:", "https:", "mailto:")):
            paths.add((doc.parent / target).resolve().relative_to(REPO_ROOT).as_posix())
    for word in _cited_words(text):
        if any(mark in word for mark in "<>*$") or word.startswith("."):
            continue
        if "/" in word and word.split("/")[0] in top_level:
            paths.add(word.rstrip("/"))
        elif "/" not in word and word in top_level:
            paths.add(word)
        elif "/" not in word and word.endswith(CODE_SUFFIXES) and not word.startswith("-"):
            names.add(word)
    return paths, names


def test_every_repository_path_the_docs_cite_exists():
    tracked = _tracked_files()
    basenames = {path.rsplit("/", 1)[-1] for path in tracked}
    missing, cited_original = [], set()
    for doc in DOCS:
        paths, names = _cited_paths(doc)
        for path in sorted(paths):
            if path in ORIGINAL_PATHS:
                cited_original.add(path)
            elif not (REPO_ROOT / path).exists():
                missing.append(f"{doc.relative_to(REPO_ROOT)}: {path}")
        for name in sorted(names):
            if name not in basenames and not any(path.endswith("/" + name) for path in ORIGINAL_PATHS):
                missing.append(f"{doc.relative_to(REPO_ROOT)}: {name} (no file of that name)")
    assert not missing, "cited but not in the repository:\n" + "\n".join(missing)
    assert cited_original == ORIGINAL_PATHS, f"no longer cited: {sorted(ORIGINAL_PATHS - cited_original)}"
    assert not [path for path in ORIGINAL_PATHS if (REPO_ROOT / path).exists()]
