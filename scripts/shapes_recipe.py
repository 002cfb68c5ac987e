"""Replay a recorded shapes-world recipe: the stages that made a model, with their settings, step counts and seeds.

    python scripts/shapes_world.py --recipe assets/shapes_world/recipe.json --out runs/replay
    python scripts/shapes_world.py --recipe assets/shapes_world/recipe.json --out runs/tiny --size smoke

A recipe (`format` "shapes-recipe/1") lists `steps`, each one stage of scripts/shapes_world.py with its own
`overrides` (config `key=value`, after every other), `num_prompts` for `ode_pairs`, and `continues`: the earlier
step whose teacher this one trains further (its EMA weights become `<out>/teacher_init`, the earlier step's folder is
kept as `<out>/teacher@<name>`). `world` sets the world's constants for the replay (`start_margin`: where shapes
start, `shapes.world.START_MARGIN`). `recorded` (what the original run logged) and `not_recoverable` (what no
record holds, stated plainly) are for readers; the replay does not read them. Progress is kept in
`<out>/recipe_progress.json`: a rerun skips the steps already done, and a stage killed mid-way continues from its
last checkpoint. `--size smoke` replays the same steps at smoke size: the smoke settings' max_steps,
compile=false and ODE-pair count win over a step's own.
"""
from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from utils.errors import InputError, MissingFileError, reading

FORMAT = "shapes-recipe/1"
PROGRESS = "recipe_progress.json"
SMOKE_KEEPS = ("max_steps", "compile")  # at smoke size these stay the smoke settings'
WORLD_KEYS = {"start_margin": "START_MARGIN"}


def load_recipe(path: str | Path) -> dict[str, Any]:
    """The recipe at `path`, checked: every step names a known stage; `continues` names an earlier teacher step."""
    from scripts.shapes_world import ALL_STAGES, OPTIONAL_STAGES
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"--recipe {path} does not exist")
    with reading(str(path)):
        recipe = json.loads(path.read_text())
    if recipe.get("format") != FORMAT:
        raise InputError(f"{path}: key 'format' must be {FORMAT!r}, got {recipe.get('format')!r}")
    unknown_world = sorted(set(recipe.get("world", {})) - set(WORLD_KEYS))
    if unknown_world:
        raise InputError(f"{path}: key 'world' has unknown setting(s) {unknown_world}; expected {list(WORLD_KEYS)}")
    seen: dict[str, str] = {}
    for i, step in enumerate(recipe.get("steps") or []):
        where = f"{path}: steps[{i}]"
        if step.get("stage") not in ALL_STAGES + OPTIONAL_STAGES:
            raise InputError(f"{where}: key 'stage' must be one of {ALL_STAGES + OPTIONAL_STAGES}, "
                             f"got {step.get('stage')!r}")
        if not step.get("name") or step["name"] in seen:
            raise InputError(f"{where}: key 'name' must be a non-empty name used once, got {step.get('name')!r}")
        if "continues" in step and (step["stage"] != "teacher" or seen.get(step["continues"]) != "teacher"):
            raise InputError(f"{where}: key 'continues' must name an earlier teacher step (only a teacher is "
                             f"continued), got {step['continues']!r}")
        if not all(isinstance(o, str) and "=" in o for o in step.get("overrides", [])):
            raise InputError(f"{where}: key 'overrides' must be a list of 'key=value' strings")
        seen[step["name"]] = step["stage"]
    if not seen:
        raise InputError(f"{path}: key 'steps' must list at least one step")
    return recipe


@contextmanager
def world_settings(settings: dict[str, Any]) -> Iterator[None]:
    """The world's module constants set for the replay, restored afterwards."""
    import shapes.world as world
    saved = {WORLD_KEYS[k]: getattr(world, WORLD_KEYS[k]) for k in settings}
    try:
        for key, value in settings.items():
            setattr(world, WORLD_KEYS[key], value)
        yield
    finally:
        for name, value in saved.items():
            setattr(world, name, value)


def step_overrides(step: dict[str, Any], size: str) -> tuple[str, ...]:
    overrides = step.get("overrides", [])
    if size == "smoke":
        overrides = [o for o in overrides if o.split("=", 1)[0].strip() not in SMOKE_KEEPS]
    return tuple(overrides)


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def replay(recipe_path: str | Path, out: str | Path, size: str = "full") -> dict[str, Any]:
    """Run every step of the recipe not yet done in `out` -> the progress record (steps done, their stage records)."""
    from scripts.shapes_world import read_stage_record, run_stage
    recipe, out = load_recipe(recipe_path), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    progress_path = out / PROGRESS
    progress = json.loads(progress_path.read_text()) if progress_path.is_file() else {
        "recipe": str(recipe_path), "size": size, "done": []}
    if progress["size"] != size:
        raise InputError(f"{out} holds a {progress['size']} replay; this one is {size} (use another --out)")
    with world_settings(recipe.get("world", {})):
        for step in recipe["steps"]:
            if step["name"] in [d["name"] for d in progress["done"]]:
                print(f"[recipe] {step['name']}: done, skipped", flush=True)
                continue
            stage = step["stage"]
            if "continues" in step:
                # the earlier step's teacher is kept under its name and becomes the new one's starting point (a
                # rerun after a kill finds it kept, and the new stage's checkpoints to continue from)
                kept = out / f"{stage}@{step['continues']}"
                if not kept.exists():
                    shutil.move(str(out / stage), str(kept))
                (out / "teacher_init").mkdir(exist_ok=True)
                shutil.copy2(kept / "generator_ema.safetensors", out / "teacher_init" / "generator_ema.safetensors")
            ode_prompts = step.get("num_prompts") if size != "smoke" else None  # smoke: the smoke prompt count
            run_stage(stage, out, size, step_overrides(step, size), ode_prompts)
            progress["done"].append({"name": step["name"], "stage": stage, "record": read_stage_record(out, stage)})
            _write_json(progress_path, progress)
    return progress
