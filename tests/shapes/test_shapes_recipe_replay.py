"""assets/shapes_world/recipe.json: what made the bundled model, as scripts/shapes_world.py --recipe replays it
(at smoke size on CPU), with what no record holds said plainly."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from scripts import shapes_world
from utils.config import load_config
from utils.config.original_keys import FLAT_KEYS

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "assets" / "shapes_world" / "recipe.json"


def _card_settings() -> dict[str, str]:
    """The `| key | value |` rows of the bundled model card's training table."""
    rows = {}
    for line in (REPO / "assets" / "shapes_world" / "README.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 2 and cells[0].startswith("`") and cells[0].endswith("`"):
            rows[cells[0].strip("`")] = cells[1].strip("`")
    return rows


def test_recipe_matches_the_records_and_says_what_is_missing():
    recipe = shapes_world.load_recipe(RECIPE)
    assert recipe["exact"] is False and len(recipe["not_recoverable"]) >= 2
    steps = {s["name"]: s for s in recipe["steps"]}
    record = json.loads((REPO / "benchmarks" / "results" / "shapes_recipe_h100.json").read_text())["training"]
    for stage in ("ode_init", "dmd"):
        assert steps[stage]["recorded"]["steps"] == record[stage]["steps"]
        assert steps[stage]["recorded"]["time_limit_s"] == record[stage]["time_limit_s"]
        assert f"max_steps={record[stage]['steps']}" in steps[stage]["overrides"]
    # the DMD step's config is the one the model card lists (the card's max_steps/time limit: the time-boxed run's)
    cfg = load_config(shapes_world.CONFIGS / "self_forcing_dmd.yaml", list(steps["dmd"]["overrides"]))
    card = _card_settings()
    assert len(card) > 10
    for key, value in card.items():
        if key in ("max_steps", "time_limit_s"):
            continue
        place = cfg
        for name in FLAT_KEYS[key].split("."):  # the card lists the original's flat keys
            place = getattr(place, name)
        assert json.loads(value) == (list(place) if key == "denoising_step_list" else place), key
    assert float(card["time_limit_s"]) == steps["dmd"]["recorded"]["time_limit_s"]


def test_bad_recipes_are_errors_naming_the_key(tmp_path):
    good = json.loads(RECIPE.read_text())
    cases = {"format": {**good, "format": "x"},
             "stage": {**good, "steps": [{"name": "a", "stage": "nope"}]},
             "continues": {**good, "steps": [{"name": "a", "stage": "dmd", "continues": "b"}]},
             "world": {**good, "world": {"gravity": 1}}}
    for key, bad in cases.items():
        path = tmp_path / f"{key}.json"
        path.write_text(json.dumps(bad))
        with pytest.raises(Exception, match=key):
            shapes_world.load_recipe(path)
    assert shapes_world.main(["--recipe", str(tmp_path / "format.json"), "--out", str(tmp_path / "o")]) == 2


@pytest.mark.slow
def test_bundled_recipe_replays_at_smoke_size(tmp_path, capsys):
    import shapes.world
    margin = shapes.world.START_MARGIN
    out = tmp_path / "replay"
    assert shapes_world.main(["--recipe", str(RECIPE), "--out", str(out), "--size", "smoke"]) == 0
    assert shapes.world.START_MARGIN == margin  # the recipe's world setting holds for the replay only
    progress = json.loads((out / shapes_world.RECIPE_PROGRESS).read_text())
    names = [s["name"] for s in json.loads(RECIPE.read_text())["steps"]]
    assert [d["name"] for d in progress["done"]] == names
    # every training step ran its steps (smoke: 3) and the teacher phases continued one another
    trained = [d for d in progress["done"] if d["record"] is not None]
    assert [d["stage"] for d in trained] == ["teacher", "teacher", "teacher", "ode_init", "dmd"]
    assert all(d["record"]["complete"] and d["record"]["step"] == 3 for d in trained)
    fractions = [load_config(out / folder / "config.yaml").pretraining.frame_causal_fraction
                 for folder in ("teacher@teacher_plain", "teacher@teacher_causal_0.6", "teacher")]
    assert fractions == [0.0, 0.6, 0.85]
    last = load_config(out / "teacher" / "config.yaml")
    assert last.model.generator_ckpt == str(out / "teacher_init" / "generator_ema.safetensors")
    opt = last.optimiser
    assert opt.ema_weight == 0.995 and opt.lr_warmup_steps == 100 and last.compute.compile is False
    assert (out / "export" / "model_index.json").is_file()
    capsys.readouterr()
    assert shapes_world.main(["--recipe", str(RECIPE), "--out", str(out), "--size", "smoke"]) == 0
    assert capsys.readouterr().out.count("done, skipped") == len(names)
