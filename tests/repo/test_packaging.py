"""`pip install .` puts everything under one package, `self_forcing`, and claims no generic top-level import names
(model, pipeline, trainer, utils, shapes, webdemo, inference, train, demo) in the user's environment
(docs/packaging.md)."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT

FOLDERS = ("model", "pipeline", "trainer", "utils", "shapes", "webdemo")
OWN = (*FOLDERS, "inference", "train", "demo")
PLAIN_IMPORT = re.compile(rf"^\s*(from|import) ({'|'.join(OWN)})\b", re.M)


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The package built from a copy of the checkout (pip builds in its source folder) into a --target folder."""
    tmp = tmp_path_factory.mktemp("packaging")
    source = tmp / "source"
    source.mkdir()
    for name in ("setup.py", "requirements.txt", "inference.py", "train.py", "demo.py"):
        shutil.copy(REPO_ROOT / name, source / name)
    for name in (*FOLDERS, "configs", "assets"):
        shutil.copytree(REPO_ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    target = tmp / "site"
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                           "--no-compile", "--target", str(target), str(source)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return target


def test_install_claims_one_top_level_name(installed):
    top = sorted(p.name for p in installed.iterdir() if p.name != "__pycache__")
    assert [n for n in top if not n.endswith(".dist-info")] == ["self_forcing"], top
    info = next(installed.glob("self_forcing-*.dist-info"))
    record = (info / "RECORD").read_text()
    assert not re.search(rf"^({'|'.join(OWN)})(/|\.py,)", record, re.M)
    package = installed / "self_forcing"
    assert {*FOLDERS, "configs", "assets"} <= {p.name for p in package.iterdir()}
    assert (package / "configs" / "default_config.yaml").is_file()
    assert (package / "assets" / "shapes_world" / "model_index.json").is_file()
    assert (package / "webdemo" / "demo.html").is_file()
    assert (package / "pipeline" / "loading" / "model_folder.py").is_file()
    assert not (package / "setup.py").exists() and not (package / "tests").exists()


def test_installed_modules_import_each_other_under_self_forcing(installed):
    sources = list((installed / "self_forcing").rglob("*.py"))
    assert len(sources) > 50
    plain = [f"{p.relative_to(installed)}: {m[0].strip()}"
             for p in sources for m in PLAIN_IMPORT.finditer(p.read_text())]
    assert not plain, plain[:10]
    # The rewriting kept the imports working: the entry points load, find the bundled model and the default config,
    # and no module was loaded under a plain name.
    probe = ("import sys\n"
             "import self_forcing.inference as inference, self_forcing.train, self_forcing.demo\n"
             "from self_forcing.utils.config import DEFAULT_CONFIG\n"
             "assert inference.DEFAULT_MODEL.is_dir() and DEFAULT_CONFIG.is_file()\n"
             f"print(sorted(m for m in sys.modules if m.split('.')[0] in {OWN!r}))\n")
    env = {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, "PYTHONPATH": str(installed)}
    done = subprocess.run([sys.executable, "-c", probe], cwd=installed.parent, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"
