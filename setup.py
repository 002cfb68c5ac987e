"""Installs the checkout's code as ONE package, `self_forcing` (docs/packaging.md).

In the checkout the folders model/, pipeline/, trainer/, utils/, shapes/, webdemo/ and the scripts inference.py,
train.py, demo.py import each other by those plain names (`python inference.py` from the checkout). An installed
copy must not claim such generic top-level names in a user's environment, so `pip install .` lays the same tree out under `self_forcing/`
(with configs/ and assets/ beside the code, where the code looks for them) and rewrites the plain imports of the
installed copies to `self_forcing.<name>`. An editable install (`pip install -e .`) copies nothing: it maps
`self_forcing` onto the checkout, whose scripts keep their plain imports (run them from the checkout).
"""
import re
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

PACKAGE = "self_forcing"
FOLDERS = ("model", "pipeline", "trainer", "utils", "shapes", "webdemo")   # packages: self_forcing.<folder>
SCRIPTS = ("inference", "train", "demo")              # root modules, installed as self_forcing.<script>
OWN_NAMES = "|".join(FOLDERS + SCRIPTS)
FROM_IMPORT = re.compile(rf"^(\s*)from ({OWN_NAMES})(\.[\w.]+)? import ", re.M)
PLAIN_IMPORT = re.compile(rf"^(\s*)import ({OWN_NAMES})((?:\.\w+)*)(\s+as\s+\w+)?\s*$", re.M)


def namespaced(source: str, path: str) -> str:
    """The module's text with its imports of the project's own top-level names moved under `self_forcing`."""
    source = FROM_IMPORT.sub(lambda m: f"{m[1]}from {PACKAGE}.{m[2]}{m[3] or ''} import ", source)

    def plain(m: re.Match) -> str:
        indent, name, dotted, alias = m[1], m[2], m[3], m[4] or ""
        if not dotted:                     # `import inference` -> the same name bound to the installed module
            return f"{indent}from {PACKAGE} import {name}{alias}"
        if alias:
            return f"{indent}import {PACKAGE}.{name}{dotted}{alias}"
        raise ValueError(f"{path}: 'import {name}{dotted}' binds the top-level name {name!r}; write "
                         f"'from {name}{dotted[:dotted.rfind('.')]} import {dotted[dotted.rfind('.') + 1:]}' or add "
                         "'as <alias>' so the installed copy can be moved under self_forcing")

    source = PLAIN_IMPORT.sub(plain, source)
    leftover = re.search(rf"^\s*import ({OWN_NAMES})\b.*,", source, re.M)
    if leftover:
        raise ValueError(f"{path}: '{leftover[0].strip()}': import the project's modules one per line")
    return source


class NamespacedBuildPy(build_py):
    """build_py that rewrites each copied module's imports (see `namespaced`); editable installs skip build_py."""

    def build_module(self, module, module_file, package):
        outfile, copied = super().build_module(module, module_file, package)
        if copied:
            path = Path(outfile)
            path.write_text(namespaced(path.read_text(encoding="utf-8"), module_file), encoding="utf-8")
        return outfile, copied


requirements = [line.strip() for line in Path(__file__).with_name("requirements.txt").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
folders = find_packages(include=[pattern for folder in FOLDERS for pattern in (folder, f"{folder}.*")])

setup(
    name="self-forcing",
    version="0.1.0",
    description="Self Forcing: autoregressive video diffusion on Wan2.1, trained on its own rollouts",
    # self_forcing is the checkout's root: its modules are the root's scripts (setup.py itself is left out), its
    # packages the folders, its data the configs, the bundled model and the demo page.
    packages=[PACKAGE] + [f"{PACKAGE}.{name}" for name in folders],
    package_dir={PACKAGE: "."},
    package_data={PACKAGE: ["configs/*.yaml", "configs/**/*.yaml", "assets/**/*"], f"{PACKAGE}.webdemo": ["*.html"]},
    cmdclass={"build_py": NamespacedBuildPy},
    python_requires=">=3.10",
    install_requires=requirements,
    extras_require={
        "flash": ["flash-attn>=2.6"],
        # flash-attn 4 (CuTe DSL; on Hopper its forward is FA3's kernel): the fastest attention measured on an H100.
        "flash4": ["flash-attn-4>=4.0.0b36"],
        # playwright drives the system chromium; setuptools builds the package in tests/repo/test_packaging.py
        "test": ["pytest>=8", "playwright>=1.40", "setuptools>=70.1"],
    },
)
