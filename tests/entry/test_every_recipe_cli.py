"""Every Wan training recipe in `configs/` trains two steps through train.py on the inputs docs/training.md documents
for it: a Wan model root on disk (DiT, text encoder, VAE), the recipe's own generator checkpoint, and its data in the
real on-disk format: a prompt file (`data.data_path`) for data-free distillation, ODE-pair shards
(`data.ode_data_path`, made by scripts/generate_ode_pairs.py) for the recipes that train on data.

Only sizes (model folders, frames, blocks, batch), step counts (steps, critic updates per generator update), learning
rates and the seed are overridden; the algorithm, the data source and the compute settings stay the recipe's. The
recipes are found by listing the folder, so a new one is covered without touching this file."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import train
from scripts import generate_ode_pairs
from tests.entry.test_data_recipes_cli import TINY
from tests.entry.test_train_cli import write_model_root
from tests.tiny import tiny_config, tiny_model
from trainer.causvid import CausVid
from trainer.data import PromptDataset, ShardedBatches
from trainer.diffusion import Diffusion
from trainer.dmd import DMD
from trainer.gan import GAN
from trainer.ode import ODERegression
from trainer.ode_pairs import ODEPairDataset
from trainer.sid import SiD
from utils.config import REPO_ROOT

CONFIGS = REPO_ROOT / "configs"
# Files of configs/ that are not training recipes, and why.
NOT_RECIPES = {
    "default_config.yaml": "every key's default and documentation, the layer under each recipe",
    "inference_long.yaml": "an inference.py preset (--config), not read by train.py",
    "inference_official.yaml": "an inference.py preset (--config), not read by train.py",
    "inference_taehv.yaml": "an inference.py preset (--config), not read by train.py",
}
RECIPES = sorted(p.name for p in CONFIGS.glob("*.yaml") if p.name not in NOT_RECIPES)

# docs/training.md: which algorithm each (trainer, distribution_loss) runs and which data it reads.
DOCUMENTED = {
    ("score_distillation", "dmd"): (DMD, PromptDataset),
    ("score_distillation", "sid"): (SiD, PromptDataset),
    ("score_distillation", "causvid"): (CausVid, ODEPairDataset),
    ("gan", "dmd"): (GAN, ODEPairDataset),
    ("ode", "dmd"): (ODERegression, ODEPairDataset),
    ("diffusion", "dmd"): (Diffusion, ODEPairDataset),
}

FRAMES, HEIGHT, WIDTH = 6, 4, 6  # the loss window: three 2-frame blocks of 4x6 latents
PROMPTS = "a red circle moves left\na blue square jumps\na green triangle moves up\na white cat on black\n"
# The shared tiny overrides, except that each recipe keeps its own initial generator checkpoint (written tiny below)
# and its compute settings (sharding, precision, recomputation), which a one-process CPU run takes as written.
RECIPE_OWN = ("generator_ckpt", "sharding_strategy", "mixed_precision", "gradient_checkpointing")
SIZES = [*(o for o in TINY if o.split("=")[0] not in RECIPE_OWN),
         f"image_or_video_shape=[1,{FRAMES},{tiny_config().in_dim},{HEIGHT},{WIDTH}]", f"num_training_frames={FRAMES}"]


def test_the_recipe_list_is_complete():
    """The exclusions name existing files, and no training recipe hides among them."""
    on_disk = {p.name for p in CONFIGS.glob("*.yaml")}
    assert set(NOT_RECIPES) <= on_disk
    assert {"self_forcing_dmd.yaml", "causvid.yaml", "ode_init.yaml", "self_forcing_dmd_long.yaml"} <= set(RECIPES)
    for name in NOT_RECIPES:
        text = (CONFIGS / name).read_text()
        assert name == "default_config.yaml" or ("trainer:" not in text and "base_config:" not in text), name


def tiny_sizes(recipe: Path) -> list[str]:
    """`SIZES`, plus a long rollout scaled to the tiny window (twice the window, a window-long rolling cache with
    one sink block) when the recipe trains on long rollouts."""
    cfg = train.load_run_config(train.parse_args(["--config_path", str(recipe), *SIZES]))
    if cfg.rollout.rollout_frames == 0:
        return SIZES
    block = cfg.rollout.num_frame_per_block
    return [*SIZES, f"rollout_frames={2 * FRAMES}", f"model_kwargs.local_attn_size={FRAMES}",
            f"model_kwargs.sink_size={block}"]


def write_generator_checkpoint(path: Path, ema: bool) -> dict[str, torch.Tensor]:
    """A generator checkpoint as the released ones are stored (`torch.save` of `{"generator": {"model." + key},
    "generator_ema": ...}`, two different sets); returns the set a recipe starts from (`ema`: the EMA one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    weights = {role: tiny_model(seed=seed).state_dict() for role, seed in (("generator", 7), ("generator_ema", 8))}
    torch.save({role: {f"model.{k}": v for k, v in sd.items()} for role, sd in weights.items()}, path)
    return weights["generator_ema" if ema else "generator"]


@pytest.fixture(scope="module")
def shared_inputs(tmp_path_factory) -> dict[str, Path]:
    """The inputs every recipe may read, written once: the model root, a prompt file, and ODE-pair shards made by
    scripts/generate_ode_pairs.py from that prompt file with the tiny teacher (its defaults: bfloat16 storage, the
    shift-8 warped [1000, 750, 500, 250, 0] trajectory that configs/ode_init.yaml regresses on)."""
    folder = tmp_path_factory.mktemp("recipe_inputs")
    root = folder / "wan_models"
    write_model_root(root, vae=True)
    prompts = folder / "prompts.txt"
    prompts.write_text(PROMPTS)
    pairs = folder / "ode_pairs"
    status = generate_ode_pairs.main(["--model-root", str(root), "--teacher-name", "TinyWan", "--prompts", str(prompts),
                                      "--output", str(pairs), "--num-frames", str(FRAMES), "--height",
                                      str(HEIGHT * 8), "--width", str(WIDTH * 8), "--device", "cpu"])
    assert status == 0
    return {"model_root": root, "data_path": prompts, "ode_data_path": pairs}


def recipe_inputs(recipe: Path, inputs: dict[str, Path], tmp_path: Path, sizes: list[str]):
    """The overrides that point the recipe at its inputs: only the keys the recipe itself sets (never a different
    kind of input), plus the generator weights it starts from when it names a checkpoint (else None)."""
    cfg = train.load_run_config(train.parse_args(["--config_path", str(recipe), *sizes]))
    overrides, initial = [f"model_root={inputs['model_root']}"], None
    if cfg.model.generator_ckpt:
        ckpt = tmp_path / "checkpoints" / Path(cfg.model.generator_ckpt).name
        initial = write_generator_checkpoint(ckpt, ema=cfg.model.generator_ckpt_ema)
        overrides.append(f"generator_ckpt={ckpt}")
    overrides += [f"{key}={inputs[key]}" for key in ("data_path", "ode_data_path") if getattr(cfg.data, key)]
    return overrides, initial


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_trains_two_steps_on_its_documented_data(tmp_path, monkeypatch, shared_inputs, name):
    recipe = CONFIGS / name
    sizes = tiny_sizes(recipe)
    inputs, initial = recipe_inputs(recipe, shared_inputs, tmp_path, sizes)
    argv = ["--config_path", str(recipe), "--logdir", str(tmp_path / "run"), "--disable-wandb", "--no_save", *sizes,
            *inputs]
    cfg = train.load_run_config(train.parse_args(argv))
    kind = (cfg.trainer, cfg.distillation.distribution_loss)
    assert kind in DOCUMENTED, f"{name} trains {kind}, which docs/training.md (and DOCUMENTED here) does not list"
    algorithm, dataset = DOCUMENTED[kind]

    batches = []  # (dataset class, batch keys) of every batch the loop drew
    original_next = ShardedBatches.__next__

    def recording_next(self):
        batch = original_next(self)
        batches.append((type(self.dataset), set(batch)))
        return batch
    monkeypatch.setattr(ShardedBatches, "__next__", recording_next)
    trainer = train.main(argv)

    assert trainer.step == 2
    assert type(trainer.algorithm) is algorithm
    assert batches and {kind for kind, _ in batches} == {dataset}
    # Prompt files carry the prompt a long rollout may switch to; ODE pairs carry the trajectories.
    expected_keys = {"prompts", "idx"} | ({"ode_latent"} if dataset is ODEPairDataset else set())
    expected_keys |= {"switch_prompts"} if cfg.rollout.prompt_switch_prob > 0 else set()
    assert all(keys == expected_keys for _, keys in batches), batches
    models = trainer.algorithm.models
    # The VAE is loaded for a rollout longer than its loss window (the window's first frame is re-encoded).
    long_rollout = cfg.rollout.rollout_frames > cfg.rollout.image_or_video_shape[1]
    assert (models.codec is not None) == (long_rollout or cfg.logging.sample_every > 0)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2]
    roles = ["generator"] + (["critic"] if models.critic is not None else [])
    losses = [row[f"{role}_loss"] for row in rows for role in roles if f"{role}_loss" in row]
    assert {f"{role}_loss" for row in rows for role in roles if f"{role}_loss" in row} == {f"{r}_loss" for r in roles}
    assert all(isinstance(loss, float) and torch.isfinite(torch.tensor(loss)) for loss in losses), losses
    # Every trained network moved a little from where the recipe starts it: the generator from the recipe's checkpoint
    # when it names one (far from the model root's weights), else from the root's, as the critic.
    root_weights = tiny_model().state_dict()
    starts = [(models.generator.model, initial or root_weights)]
    starts += [(models.critic.model, root_weights)] if models.critic is not None else []
    for net, start in starts:
        trained = net.state_dict()
        change = max(float((trained[k].float() - start[k]).abs().max()) for k in start)
        assert 0 < change < 0.01, change
    if initial is not None:
        assert max(float((initial[k] - root_weights[k]).abs().max()) for k in initial) > 0.05
