"""The whole Self Forcing recipe in the shapes world, stage by stage, with the same train.py and trainers.

    python scripts/shapes_world.py --out runs/shapes                     # full size (GPU, ~20 minutes)
    python scripts/shapes_world.py --out runs/smoke --size smoke         # a few steps of everything (CPU, CI)
    python scripts/shapes_world.py --out runs/shapes --stages dmd,export # some stages (earlier ones must exist)
    python scripts/shapes_world.py --out runs/shapes --stages dmd_long   # an optional stage, after dmd
    python scripts/shapes_world.py --recipe assets/shapes_world/recipe.json --out runs/replay  # a recorded recipe

Stages, in order (configs/shapes/*.yaml):
  base         frozen text encoder + tokenizer over the world's vocabulary, and the codec, as a model folder
  teacher      bidirectional teacher, flow matching on rendered videos (from <out>/teacher_init if present)
  ode_pairs    teacher ODE trajectories (48 Euler steps, shift 5, CFG) recorded at the student's 4 timesteps
  ode_init     causal student regressed onto the ODE pairs
  dmd sid gan  Self Forcing with DMD / SiD / GAN from the ODE init
  causvid teacher_forcing diffusion_forcing   the baselines
  export       the Self Forcing DMD student (EMA) as a model folder (what `inference.py` loads)
Optional stage (only when named in --stages):
  dmd_long     the DMD student tuned on long self-rollouts with prompt switches (docs/training.md)
Each training stage leaves `<out>/<stage>/generator.safetensors` (+ `generator_ema.safetensors`, `config.json`)
next to its logs, and `stage.json`: the step it reached, its max_steps and whether it got there (a stage may be
time-boxed with `time_limit_s`, e.g. SHAPES_OVERRIDES="time_limit_s=200"). A stage with outputs is skipped on a
rerun, `--force` redoes it; `--resume` continues a stage that a time limit cut short from its last checkpoint (same
data order, seeds and random state: the trainer's exact resume) up to its max_steps. A stage killed before it wrote
its outputs continues from its last checkpoint on any rerun.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils.errors import InputError, MissingFileError, reading  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs" / "shapes"
TRAIN_STAGES = {"teacher": "teacher", "ode_init": "ode_init", "dmd": "self_forcing_dmd",
                "sid": "self_forcing_sid", "gan": "self_forcing_gan", "causvid": "causvid",
                "teacher_forcing": "teacher_forcing", "diffusion_forcing": "diffusion_forcing",
                "dmd_long": "self_forcing_dmd_long"}
ALL_STAGES = ["base", "teacher", "ode_pairs", "ode_init", "dmd", "sid", "gan", "causvid", "teacher_forcing",
              "diffusion_forcing", "export"]
OPTIONAL_STAGES = ["dmd_long"]  # run only when named: they continue a finished stage
# A few steps of everything at toy sizes: checks the plumbing, not the quality.
SMOKE = ["max_steps=3", "batch_size=2", "log_every=1", "lr_warmup_steps=0", "ema_start_step=1",
         "dfake_gen_update_ratio=2",
         "dit_config={dim: 32, ffn_dim: 64, num_heads: 2, num_layers: 2, text_dim: 32, text_len: 32, freq_dim: 32, "
         "prediction: x0}",
         "image_or_video_shape=[1,6,12,16,16]", "num_training_frames=6", "mixed_precision=false", "compile=false"]
SMOKE_GAN = ["discriminator_warmup_steps=1"]  # the GAN stage's own: other recipes refuse GAN keys
SMOKE_ODE_PAIRS = {"num_prompts": 4, "num_steps": 8, "record": [0, 2, 4, 6, 8]}
FULL_ODE_PAIRS = {"num_prompts": 2048, "num_steps": 48, "record": [0, 12, 24, 36, 48]}


def stage_overrides(stage: str, out: Path, size: str, extra: tuple[str, ...] = ()) -> list[str]:
    """Paths into the run folder, the smoke settings, `key=value` items of $SHAPES_OVERRIDES (e.g. a shorter
    max_steps for a time-boxed run), then `extra` (a recipe step's own)."""
    paths = [f"text_encoder_path={out / 'base'}", f"ode_data_path={out / 'ode_pairs'}"]
    env = os.environ.get("SHAPES_OVERRIDES", "").split()
    smoke = SMOKE + (SMOKE_GAN if stage == "gan" else []) if size == "smoke" else []
    return paths + smoke + env + list(extra)


def weights_overrides(stage: str, out: Path) -> list[str]:
    """Point the stage's config at the previous stages' outputs under `out`. The teacher continues from
    `out/teacher_init/generator_ema.safetensors` when there is one (a teacher trained by an earlier run, copied
    there to train it further)."""
    teacher = out / "teacher" / "generator_ema.safetensors"
    teacher_init = out / "teacher_init" / "generator_ema.safetensors"
    if stage == "teacher":
        return [f"generator_ckpt={teacher_init}"] if teacher_init.is_file() else []
    ode_init = out / "ode_init" / "generator.safetensors"
    if stage == "ode_init" or stage in ("teacher_forcing", "diffusion_forcing"):
        return [f"generator_ckpt={teacher}"]
    if stage in ("dmd", "sid", "gan", "causvid"):
        return [f"generator_ckpt={ode_init}", f"real_score_ckpt={teacher}"]
    if stage == "dmd_long":
        return [f"generator_ckpt={out / 'dmd' / 'generator_ema.safetensors'}", f"real_score_ckpt={teacher}"]
    return []


def load_stage_config(stage: str, out: Path, size: str, extra: tuple[str, ...] = ()):
    from utils.config import load_config
    overrides = stage_overrides(stage, out, size, extra) + weights_overrides(stage, out)
    return load_config(CONFIGS / f"{TRAIN_STAGES.get(stage, 'base')}.yaml", overrides)


BASE_ASSET = REPO / "assets" / "shapes_base"  # the full recipe's text encoder, shipped so every machine agrees


def run_base(out: Path, size: str, extra: tuple[str, ...] = ()) -> None:
    from shapes.components import shapes_codec, write_text_encoder
    cfg = load_stage_config("teacher", out, size, extra)
    base = out / "base"
    dit = cfg.model.dit_config
    shipped = json.loads((BASE_ASSET / "text_encoder" / "config.json").read_text())["d_model"]
    if shipped == dit["text_dim"]:
        # Random initialisation may differ between torch/transformers versions; the shipped copy cannot.
        shutil.copytree(BASE_ASSET, base, dirs_exist_ok=True)
    else:
        write_text_encoder(base, dim=dit["text_dim"], text_len=dit["text_len"], seed=0)
    codec = shapes_codec(cfg)  # always the config's (the shipped folder's codec is only the default config's)
    (base / "codec").mkdir(exist_ok=True)
    (base / "codec" / "config.json").write_text(json.dumps(codec.config(), indent=2))
    (base / "model_index.json").write_text(json.dumps({
        "_class_name": "SelfForcingPipeline", "text_encoder": ["transformers", "UMT5EncoderModel"],
        "tokenizer": ["transformers", "PreTrainedTokenizerFast"], "codec": ["self_forcing", "PixelShuffleCodec"]},
        indent=2))


STAGE_RECORD = "stage.json"


def read_stage_record(out: Path, stage: str) -> dict | None:
    """What `run_train` recorded of a training stage (None: no record, e.g. a stage that is not trained)."""
    path = out / stage / STAGE_RECORD
    return json.loads(path.read_text()) if path.is_file() else None


def _write_stage_record(out: Path, stage: str, final: Path) -> dict:
    from trainer.train_state import list_checkpoints
    from utils.config import load_config
    cfg = load_config(final / "config.yaml")
    step = list_checkpoints(out / stage / "logs")[-1][0]
    opt = cfg.optimiser
    record = {"stage": stage, "step": step, "max_steps": opt.max_steps, "complete": step >= opt.max_steps,
              "time_limit_s": opt.time_limit_s, "seed": cfg.seed, "checkpoint": final.name}
    tmp = out / stage / f".{STAGE_RECORD}.tmp"
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, out / stage / STAGE_RECORD)
    return record


def run_train(stage: str, out: Path, size: str, extra: tuple[str, ...] = ()) -> None:
    import train
    from trainer.train_state import latest_checkpoint
    logdir = out / stage / "logs"
    argv = ["--config_path", str(CONFIGS / f"{TRAIN_STAGES[stage]}.yaml"), "--logdir", str(logdir),
            "--disable-wandb", *stage_overrides(stage, out, size, extra), *weights_overrides(stage, out)]
    if latest_checkpoint(logdir) is not None:
        argv.insert(0, "--resume")
    train.main(argv)
    if int(os.environ.get("RANK", 0)) != 0:  # under torchrun every rank trains; one writes the stage's files
        return
    final = latest_checkpoint(logdir)
    for name in ("generator.safetensors", "generator_ema.safetensors", "config.json", "config.yaml"):
        if (final / name).is_file():
            shutil.copy2(final / name, out / stage / name)
    if not (out / stage / "generator_ema.safetensors").is_file():
        shutil.copy2(out / stage / "generator.safetensors", out / stage / "generator_ema.safetensors")
    record = _write_stage_record(out, stage, final)
    if not record["complete"]:
        print(f"[shapes] {stage}: stopped by time_limit_s at step {record['step']} of {record['max_steps']}; "
              f"--resume --stages {stage} continues it", flush=True)


def run_ode_pairs(out: Path, size: str, extra: tuple[str, ...] = (), num_prompts: int | None = None) -> None:
    import torch

    from pipeline.denoiser import Denoiser
    from pipeline.schedule import FlowMatchSchedule
    from scripts.generate_ode_pairs import generate_ode_pairs
    from shapes import sample_scenes, short_prompt
    from shapes.components import load_shapes_text, shapes_dit
    cfg = load_stage_config("ode_init", out, size, extra)
    settings = dict(SMOKE_ODE_PAIRS if size == "smoke" else FULL_ODE_PAIRS)
    settings["num_prompts"] = int(os.environ.get("SHAPES_ODE_PROMPTS", num_prompts or settings["num_prompts"]))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    teacher = shapes_dit(cfg, str(out / "teacher" / "generator_ema.safetensors")).to(device, dtype).eval()
    text = load_shapes_text(cfg, teacher.config.text_len, device=device)
    scenes = sample_scenes(settings["num_prompts"], torch.Generator().manual_seed(2), split="train",
                           short_fraction=cfg.data.shapes_short_prompt_fraction)
    prompts = [short_prompt(s) for s in scenes]
    _, frames, channels, h, w = cfg.rollout.image_or_video_shape
    generate_ode_pairs(Denoiser(teacher, FlowMatchSchedule(cfg.rollout.generator_shift), uniform_timestep=True),
                       text, prompts, out / "ode_pairs", latent_shape=(frames, channels, h, w),
                       num_steps=settings["num_steps"], shift=cfg.rollout.generator_shift, guidance_scale=3.0,
                       record_steps=settings["record"], negative_prompt=cfg.data.negative_prompt,
                       batch_size=256 if device.type == "cuda" else 2, seed=3, teacher_name="shapes teacher",
                       overwrite=True, progress=False)


def run_export(out: Path, size: str) -> None:
    from scripts import export_hf
    target = out / "export"
    code = export_hf.main([str(out / "dmd" / "logs"), "--output", str(target), "--include-base", str(out / "base"),
                           "--base-model", "self-forcing/shapes-world-teacher"])
    if code:
        raise RuntimeError(f"export failed with status {code}")


def stage_done(out: Path, stage: str) -> bool:
    return (out / stage / ("model_index.json" if stage in ("base", "export") else
                           "index.json" if stage == "ode_pairs" else "generator.safetensors")).exists()


def run_stage(stage: str, out: Path, size: str, extra: tuple[str, ...] = (), ode_prompts: int | None = None) -> float:
    """Run one stage (`extra`: overrides after every other, `ode_prompts`: prompts of the ode_pairs stage) -> s."""
    tic = time.perf_counter()
    print(f"[shapes] {stage} ...", flush=True)
    if stage == "base":
        run_base(out, size, extra)
    elif stage == "ode_pairs":
        run_ode_pairs(out, size, extra, ode_prompts)
    elif stage == "export":
        run_export(out, size)
    else:
        run_train(stage, out, size, extra)
    seconds = time.perf_counter() - tic
    print(f"[shapes] {stage}: {seconds:.1f} s", flush=True)
    return seconds


# ---------------------------------------------------------------------------------------------------- recipes
# A recipe (`format` "shapes-recipe/1", e.g. assets/shapes_world/recipe.json) lists `steps`, each one stage with its
# own `overrides` (config `key=value`, after every other), `num_prompts` for `ode_pairs`, and `continues`: the
# earlier step whose teacher this one trains further (its EMA weights become `<out>/teacher_init`; the earlier
# step's folder is kept as `<out>/teacher@<name>`). `world` sets the world's constants for the replay
# (`start_margin`: `shapes.world.START_MARGIN`). `recorded` (what the original run logged) and `not_recoverable`
# (what no record holds, stated plainly) are for readers; the replay does not read them. Progress is kept in
# `<out>/recipe_progress.json`: a rerun skips the steps already done, and a stage killed mid-way continues from its
# last checkpoint. `--size smoke` replays the same steps at smoke size: the smoke settings' max_steps,
# compile=false and ODE-pair count win over a step's own.
RECIPE_FORMAT = "shapes-recipe/1"
RECIPE_PROGRESS = "recipe_progress.json"
SMOKE_KEEPS = ("max_steps", "compile")  # at smoke size these stay the smoke settings'
WORLD_KEYS = {"start_margin": "START_MARGIN"}


def load_recipe(path: str | Path) -> dict[str, Any]:
    """The recipe at `path`, checked: every step names a known stage; `continues` names an earlier teacher step."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"--recipe {path} does not exist")
    with reading(str(path)):
        recipe = json.loads(path.read_text())
    if recipe.get("format") != RECIPE_FORMAT:
        raise InputError(f"{path}: key 'format' must be {RECIPE_FORMAT!r}, got {recipe.get('format')!r}")
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
    recipe, out = load_recipe(recipe_path), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    progress_path = out / RECIPE_PROGRESS
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/shapes", help="run folder (default: %(default)s)")
    p.add_argument("--size", choices=["full", "smoke"], default="full", help="full recipe or a smoke run")
    p.add_argument("--stages", help="comma-separated stages (default: all)")
    p.add_argument("--force", action="store_true", help="redo stages that already finished")
    p.add_argument("--resume", action="store_true",
                   help="continue stages that a time limit stopped before max_steps, from their last checkpoint")
    p.add_argument("--recipe", metavar="JSON",
                   help="replay a recorded recipe (e.g. assets/shapes_world/recipe.json) instead of --stages")
    args = p.parse_args(argv)
    if args.force and args.resume:
        p.error("--force redoes stages from scratch, --resume continues them: give one")
    out = Path(args.out)
    if args.recipe:
        # A replay runs the recipe's own steps and skips those its progress file lists as done.
        given = [flag for flag, value in (("--stages", args.stages), ("--force", args.force),
                                          ("--resume", args.resume)) if value]
        if given:
            p.error(f"{', '.join(given)}: for the stages of a standard run; --recipe replays the recipe's own "
                    "steps (a rerun continues after its last finished step)")
        from utils.errors import UserError, one_line
        try:
            replay(args.recipe, out, args.size)
        except UserError as err:  # the project's own errors; a bug keeps its traceback
            print(f"error: {one_line(err)}", file=sys.stderr)
            return 2
        return 0
    stages = [s.strip() for s in (args.stages or ",".join(ALL_STAGES)).split(",") if s.strip()]
    unknown = sorted(set(stages) - set(ALL_STAGES) - set(OPTIONAL_STAGES))
    if unknown:
        p.error(f"unknown stage(s) {unknown}; choose from {ALL_STAGES + OPTIONAL_STAGES}")
    timings = {}
    for stage in [s for s in ALL_STAGES + OPTIONAL_STAGES if s in stages]:
        record = read_stage_record(out, stage)
        cut = record is not None and not record["complete"]
        if stage_done(out, stage) and not args.force and not (args.resume and cut):
            note = f" (stopped at step {record['step']} of {record['max_steps']}; --resume continues it)" if cut else ""
            print(f"[shapes] {stage}: done, skipped{note}", flush=True)
            continue
        if args.force and (out / stage).exists():
            shutil.rmtree(out / stage)
        timings[stage] = run_stage(stage, out, args.size)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"timings_{int(time.time())}.json").write_text(json.dumps(timings, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
