"""The floors of the code, read from its imports (docs/design.md): every `import` statement of every module,
at module level or inside a function, may only point at its own floor or the ones below it, and no chain of imports
comes back to where it started.

    utils/      ground floor: config, errors, distributed, IO, video, logging, prompts   imports nothing below
    model/      networks, caches, codecs, key tables                                  imports nothing of the project
    pipeline/   schedule, denoiser, rollout, inference, teacher; loading/ (folders, checkpoints, Hub)   model, utils
    trainer/    algorithms, loop, training data and checkpoints, model builders       model, pipeline, utils
    shapes/     the miniature world and its networks                                  the core (all four above)
    webdemo/    the streaming demo's server, jobs and page                            model, pipeline, utils
    entry points (inference.py, train.py, demo.py, scripts/, benchmarks/)              anything
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

CORE = ("utils", "model", "pipeline", "trainer")
ALLOWED = {
    "utils": {"utils"},
    "model": {"model"},
    "pipeline": {"pipeline", "model", "utils"},
    "trainer": {"trainer", "pipeline", "model", "utils"},
    "shapes": {"shapes", *CORE},
    "webdemo": {"webdemo", "pipeline", "model", "utils"},
}
ENTRY_SCRIPTS = ("inference", "train", "demo")
ENTRY_FOLDERS = ("scripts", "benchmarks")
PROJECT = (*ALLOWED, *ENTRY_SCRIPTS, *ENTRY_FOLDERS)


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules(root: Path) -> dict[str, Path]:
    """Every module of the packages and the entry points: dotted name -> file."""
    files = [root / f"{name}.py" for name in ENTRY_SCRIPTS]
    for folder in (*ALLOWED, *ENTRY_FOLDERS):
        files += sorted((root / folder).rglob("*.py"))
    return {module_name(p, root): p for p in files if p.is_file() and "__pycache__" not in p.parts}


def imported_modules(path: Path, name: str, modules: dict[str, Path]) -> list[tuple[int, str, str]]:
    """(line, statement, imported project module) for every import of the project in the file."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in PROJECT:
                    found.append((node.lineno, f"import {alias.name}", alias.name))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolved against the importing module's package
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            if base.split(".")[0] not in PROJECT:
                continue
            statement = f"from {'.' * node.level}{node.module or ''} import {', '.join(a.name for a in node.names)}"
            for alias in node.names:  # `from utils import outputs` imports the module utils.outputs
                target = f"{base}.{alias.name}"
                found.append((node.lineno, statement, target if target in modules else base))
    return found


def floor(module: str) -> str:
    return module.split(".")[0]


def import_graph(root: Path) -> tuple[dict[str, Path], dict[str, dict[str, tuple[int, str]]]]:
    """Modules and, for each, the project modules it imports with the line and statement of the first import."""
    modules = project_modules(root)
    graph: dict[str, dict[str, tuple[int, str]]] = {}
    for name, path in modules.items():
        edges = graph.setdefault(name, {})
        for line, statement, target in imported_modules(path, name, modules):
            if target != name:
                edges.setdefault(target, (line, statement))
    return modules, graph


def floor_violations(root: Path) -> list[str]:
    modules, graph = import_graph(root)
    problems = []
    for name, edges in sorted(graph.items()):
        allowed = ALLOWED.get(floor(name))
        if allowed is None:  # an entry point: may import anything
            continue
        for target, (line, statement) in sorted(edges.items(), key=lambda edge: edge[1][0]):
            if floor(target) not in allowed:
                where = modules[name].relative_to(root)
                problems.append(f"{where}:{line}: '{statement}' -- {floor(name)}/ may import only "
                                f"{sorted(allowed)}, not {floor(target)}")
    return problems


def import_cycles(root: Path) -> list[str]:
    """Each cycle of the module graph once, as 'a -> b -> a' with the file and line of every step."""
    modules, graph = import_graph(root)
    cycles, seen = [], set()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph.get(node, {})):
            if target not in graph:
                continue
            if state.get(target) == 1:
                loop = path[path.index(target):] + [target]
                key = frozenset(loop)
                if key not in seen:
                    seen.add(key)
                    steps = [f"{modules[a].relative_to(root)}:{graph[a][b][0]} '{graph[a][b][1]}'"
                             for a, b in zip(loop, loop[1:])]
                    cycles.append(" -> ".join(loop) + " (" + "; ".join(steps) + ")")
            elif target not in state:
                visit(target)
        path.pop()
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name)
    return cycles


def test_every_import_points_at_its_own_floor_or_below():
    problems = floor_violations(REPO_ROOT)
    assert not problems, "imports that point up a floor:\n" + "\n".join(problems)


def test_no_import_cycles():
    cycles = import_cycles(REPO_ROOT)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_checks_see_every_package_and_name_the_offending_file_and_import(tmp_path):
    """The rules bite: a model file importing the pipeline, and two utils modules importing each other, are named."""
    modules = project_modules(REPO_ROOT)
    assert {floor(m) for m in modules} >= {*ALLOWED, *ENTRY_SCRIPTS, *ENTRY_FOLDERS}
    for folder in ALLOWED:
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "__init__.py").write_text("")
    (tmp_path / "model" / "net.py").write_text("import torch\n\n\ndef f():\n    from pipeline.rollout import x\n")
    (tmp_path / "pipeline" / "rollout.py").write_text("from model import net\nx = 1\n")
    (tmp_path / "utils" / "a.py").write_text("from . import b\n")
    (tmp_path / "utils" / "b.py").write_text("from utils.a import thing\n")
    (tmp_path / "shapes" / "world.py").write_text("from trainer.base import Models\n")
    (tmp_path / "trainer" / "base.py").write_text("import shapes.world as world\n")
    assert floor_violations(tmp_path) == [
        "model/net.py:5: 'from pipeline.rollout import x' -- model/ may import only ['model'], not pipeline",
        "trainer/base.py:1: 'import shapes.world' -- trainer/ may import only "
        "['model', 'pipeline', 'trainer', 'utils'], not shapes"]
    cycles = import_cycles(tmp_path)
    assert len(cycles) == 3, cycles
    assert any(c.startswith("utils.a -> utils.b -> utils.a (utils/a.py:1 'from . import b'; "
                            "utils/b.py:1 'from utils.a import thing')") for c in cycles), cycles
    assert any("model.net -> pipeline.rollout -> model.net" in c for c in cycles), cycles


@pytest.mark.parametrize("folder", list(ALLOWED))
def test_every_floor_is_a_package(folder):
    assert (REPO_ROOT / folder / "__init__.py").is_file(), f"{folder}/ needs an __init__.py"
