"""The sectioned config: both spellings of every key, the one adapter, choices from the Literal types, errors that
name file and key, stored flat configs, and the generated defaults file."""
from __future__ import annotations

import dataclasses
import typing

import pytest
import yaml

from utils.config import (DEFAULT_CONFIG, Config, ConfigError, config_from_dict, config_to_dict, load_config,
                          unchecked_config)
from utils.config.defaults_file import default_config_text
from utils.config.original_keys import (FIXED_ORIGINAL_KEYS, FLAT_KEYS, IGNORED_ORIGINAL_KEYS, flat_values,
                                        to_sections)

# The original's configs/self_forcing_dmd.yaml merged over its default_config.yaml, every key as the original spells
# it (values as the original ships them; wandb placeholders set).
ORIGINAL_DMD = """
independent_first_frame: false
weight_decay: 0.01
same_step_across_blocks: true
discriminator_lr_multiplier: 1.0
last_step_only: false
i2v: false
num_training_frames: 21
gc_interval: 100
context_noise: 0
causal: true
ckpt_step: 0
prompt_name: MovieGenVideoBench
prompt_path: prompts/MovieGenVideoBench.txt
eval_first_n: 64
num_samples: 1
height: 480
width: 832
num_frames: 81
generator_ckpt: checkpoints/ode_init.pt
generator_fsdp_wrap_strategy: size
real_score_fsdp_wrap_strategy: size
fake_score_fsdp_wrap_strategy: size
real_name: Wan2.1-T2V-14B
text_encoder_fsdp_wrap_strategy: size
denoising_step_list: [1000, 750, 500, 250]
warp_denoising_step: true
ts_schedule: false
num_train_timestep: 1000
timestep_shift: 5.0
guidance_scale: 3.0
denoising_loss_type: flow
mixed_precision: true
seed: 0
wandb_host: WANDB_HOST
wandb_key: WANDB_KEY
wandb_entity: WANDB_ENTITY
wandb_project: WANDB_PROJECT
sharding_strategy: hybrid_full
lr: 2.0e-06
lr_critic: 4.0e-07
beta1: 0.0
beta2: 0.999
beta1_critic: 0.0
beta2_critic: 0.999
data_path: prompts/vidprom_filtered_extended.txt
batch_size: 1
ema_weight: 0.99
ema_start_step: 200
total_batch_size: 64
log_iters: 50
negative_prompt: ugly
dfake_gen_update_ratio: 5
image_or_video_shape: [1, 21, 16, 60, 104]
distribution_loss: dmd
trainer: score_distillation
gradient_checkpointing: true
num_frame_per_block: 3
load_raw_video: false
model_kwargs:
  timestep_shift: 5.0
"""


def _get(cfg, dotted):
    for name in dotted.split("."):
        cfg = getattr(cfg, name)
    return cfg


def _leaf_fields(cls=Config, prefix=""):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _leaf_fields(hints[f.name], f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", f, hints[f.name]


def test_the_original_dmd_config_loads_onto_the_sections(tmp_path):
    (tmp_path / "original.yaml").write_text(ORIGINAL_DMD)
    cfg = load_config(tmp_path / "original.yaml")
    assert cfg.rollout.generator_shift == 5.0 and cfg.distillation.score_timestep_shift == 5.0
    assert cfg.model.real_name == "Wan2.1-T2V-14B" and cfg.model.generator_ckpt == "checkpoints/ode_init.pt"
    assert cfg.checkpointing.interval == 50 and cfg.optimiser.total_batch_size == 64
    assert cfg.optimiser.lr_critic == pytest.approx(4e-7) and cfg.compute.sharding_strategy == "hybrid_full"
    assert cfg.rollout.warp_denoising_step and cfg.logging.wandb_key == "WANDB_KEY"
    assert cfg.logging.config_name == "original"


def test_every_flat_key_lands_on_its_field_and_every_field_has_one_flat_key():
    targets = list(FLAT_KEYS.values())
    fields = {name for name, _, _ in _leaf_fields()}
    assert len(targets) == len(set(targets)), "two flat keys map onto one field"
    # Fields new here have no original spelling; every other field is reachable from the original's key.
    assert fields - set(targets) == {"model.score_network_shift"}
    assert set(targets) <= fields


@pytest.mark.parametrize("flat, sectioned, value, recipe", [
    ("num_frame_per_block=2", "rollout.num_frame_per_block=2", 2, []),
    ("model_kwargs.timestep_shift=8.0", "rollout.generator_shift=8.0", 8.0, []),
    ("timestep_shift=3.0", "distillation.score_timestep_shift=3.0", 3.0, []),
    ("gan_g_weight=0.5", "distillation.gan.generator_weight=0.5", 0.5, ["trainer=gan"]),
    ("sid_alpha=0.25", "distillation.sid.alpha=0.25", 0.25, ["distribution_loss=sid"]),
    ("log_iters=7", "checkpointing.interval=7", 7, []),
    ("model_kwargs.model_name=Tiny", "model.generator_name=Tiny", "Tiny", []),
])
def test_overrides_work_in_both_spellings(flat, sectioned, value, recipe):
    dotted = sectioned.split("=")[0]
    assert _get(load_config(None, [*recipe, flat]), dotted) == value
    assert _get(load_config(None, [*recipe, sectioned]), dotted) == value


def test_a_file_may_mix_spellings_and_later_layers_win(tmp_path):
    (tmp_path / "base.yaml").write_text("model_kwargs: {timestep_shift: 8.0}\nrollout: {num_frame_per_block: 2}\n")
    (tmp_path / "child.yaml").write_text("base_config: base.yaml\nrollout: {generator_shift: 6.0}\n"
                                         "num_frame_per_block: 4\ntrainer: gan\n"
                                         "distillation: {gan: {r1_weight: 2.0}}\n")
    cfg = load_config(tmp_path / "child.yaml", ["distillation.gan.r2_weight=3.0"])
    assert cfg.rollout.generator_shift == 6.0 and cfg.rollout.num_frame_per_block == 4
    assert (cfg.distillation.gan.r1_weight, cfg.distillation.gan.r2_weight) == (2.0, 3.0)


def test_unknown_keys_name_the_file_and_the_key(tmp_path):
    (tmp_path / "typo.yaml").write_text("rollout:\n  num_frames_per_block: 2\n")
    with pytest.raises(ConfigError, match=r"typo.yaml: unknown config key 'rollout.num_frames_per_block'"):
        load_config(tmp_path / "typo.yaml")
    (tmp_path / "flat_typo.yaml").write_text("num_frames_per_block: 2\n")
    with pytest.raises(ConfigError, match=r"flat_typo.yaml: unknown config key 'num_frames_per_block'"):
        load_config(tmp_path / "flat_typo.yaml")
    with pytest.raises(ConfigError, match=r"override 'optimiser.learning_rate=1': unknown config key"):
        load_config(None, ["optimiser.learning_rate=1"])


def test_choices_come_from_the_literal_types_and_errors_name_the_source(tmp_path):
    with pytest.raises(ConfigError, match=r"override 'kv_cache_grad=leaky': rollout.kv_cache_grad = 'leaky' is not "
                                          r"one of \['paper', 'original'\]"):
        load_config(None, ["kv_cache_grad=leaky"])
    (tmp_path / "bad.yaml").write_text("trainer: distill\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: trainer = 'distill' is not one of"):
        load_config(tmp_path / "bad.yaml")
    with pytest.raises(ConfigError, match=r"bad value for 'optimiser.lr'"):
        load_config(None, ["optimiser.lr=fast"])


def test_validation_blames_the_layer_that_set_the_key(tmp_path):
    (tmp_path / "small.yaml").write_text("inference: {height: 40}\n")
    with pytest.raises(ConfigError, match=r"small.yaml: height/width 40x832 must be multiples of 16"):
        load_config(tmp_path / "small.yaml")
    with pytest.raises(ConfigError, match=r"override 'num_frame_per_block=0': rollout.num_frame_per_block must be "
                                          r">= 1"):
        load_config(None, ["num_frame_per_block=0"])
    with pytest.raises(ConfigError, match=r"override 'generator_ckpt_ema=true': model.generator_ckpt_ema = true picks "
                                          r"the EMA weights of model.generator_ckpt, which is not set"):
        load_config(None, ["generator_ckpt_ema=true"])


def test_a_sink_without_a_rolling_window_is_an_error_naming_both_layers(tmp_path):
    """Sink frames are what a rolling cache keeps when it evicts; with local_attn_size -1 nothing is ever evicted,
    in training or at inference, so the value could not act."""
    with pytest.raises(ConfigError) as err:
        load_config(None, ["model_kwargs.sink_size=2"])
    assert str(err.value) == ("override 'model_kwargs.sink_size=2': rollout.sink_size = 2 pins frames that a rolling "
                              f"KV cache would evict; rollout.local_attn_size = -1 ({DEFAULT_CONFIG}) keeps every "
                              "frame, so none is evicted: set rollout.local_attn_size, or rollout.sink_size to 0")
    long = DEFAULT_CONFIG.parent / "inference_long.yaml"
    with pytest.raises(ConfigError) as err:  # the long preset's sink, its window turned off
        load_config(None, ["rollout.local_attn_size=-1"], extra_paths=[long])
    assert str(err.value).startswith(f"{long}: rollout.sink_size = 5 pins frames")
    assert "rollout.local_attn_size = -1 (override 'rollout.local_attn_size=-1')" in str(err.value)
    with pytest.raises(ConfigError, match=r"rollout.sink_size must be >= 0, got -1"):
        load_config(None, ["rollout.local_attn_size=4", "rollout.sink_size=-1"])
    # With a window the sink acts (at inference, in the sample videos, and with rollout_cache inference in training)
    # and is stored with the model, whichever cache training uses.
    cfg = load_config(None, ["rollout.local_attn_size=4", "rollout.sink_size=2", "rollout.rope=relative"])
    assert (cfg.rollout.rollout_cache, cfg.rollout.sink_size, cfg.rollout.rope) == ("training", 2, "relative")


def test_meaningless_original_keys_are_listed_with_a_reason_and_dropped():
    assert all(reason for reason in IGNORED_ORIGINAL_KEYS.values())
    values = {key: 1 for key in IGNORED_ORIGINAL_KEYS} | {"lr": 1.0}
    assert to_sections(values, "x") == {"optimiser": {"lr": 1.0}}
    assert not set(IGNORED_ORIGINAL_KEYS) & set(FLAT_KEYS)


@pytest.mark.parametrize("key", sorted(FIXED_ORIGINAL_KEYS))
def test_original_keys_asking_for_other_behaviour_are_errors(key):
    required, _ = FIXED_ORIGINAL_KEYS[key]
    other = {True: "false", False: "true"}.get(required, "other")
    with pytest.raises(ConfigError, match=rf"override '{key}={other}': {key} = .* is not supported, only"):
        load_config(None, [f"{key}={other}"])
    assert load_config(None, [f"{key}={str(required).lower()}"]) == load_config(None)


def test_stored_configs_round_trip_in_either_spelling(tmp_path):
    cfg = load_config(None, ["num_frame_per_block=2", "timestep_shift=7.0", "wandb_key=SECRET"])
    assert config_from_dict(config_to_dict(cfg)) == cfg
    stored_flat = yaml.safe_load(ORIGINAL_DMD)  # a run folder's config.yaml written before the sections
    restored = config_from_dict(stored_flat)
    assert restored.rollout.num_frame_per_block == 3 and restored.checkpointing.interval == 50
    with pytest.raises(ConfigError, match="stored config: unknown config key 'not_a_key'"):
        config_from_dict({"not_a_key": 1})


def test_flat_values_write_the_original_spelling_back():
    cfg = load_config(None, ["rollout.generator_shift=6.0", "rollout.local_attn_size=8", "rollout.sink_size=2",
                             "inference.height=64"])
    keys = ("height", "num_frame_per_block", "model_kwargs.timestep_shift", "model_kwargs.sink_size")
    stored = flat_values(cfg, keys + ("model_kwargs.local_attn_size",))
    assert stored == {"height": 64, "num_frame_per_block": 3,
                      "model_kwargs": {"timestep_shift": 6.0, "sink_size": 2, "local_attn_size": 8}}
    assert load_config(None, layers=[("folder", stored)]).rollout.generator_shift == 6.0


def test_unchecked_configs_accept_what_loading_would_reject():
    cfg = unchecked_config({"kv_cache_grad": "leaky", "model_kwargs": {"timestep_shift": 8.0}, "lr": 3.0})
    assert cfg.rollout.kv_cache_grad == "leaky" and cfg.rollout.generator_shift == 8.0 and cfg.optimiser.lr == 3.0
    with pytest.raises(ConfigError, match="unknown config keys"):
        unchecked_config({"rollout": {"frames": 1}})


def test_every_field_is_typed_and_explained():
    for name, f, hint in _leaf_fields():
        assert f.metadata.get("help"), f"{name} has no help text"
        assert hint is not typing.Any, name
    choices = {name: typing.get_args(hint) for name, _, hint in _leaf_fields() if typing.get_origin(hint) is
               typing.Literal}
    assert choices["rollout.kv_cache_grad"] == ("paper", "original") and "trainer" in choices


def test_the_defaults_file_is_generated_from_the_schema():
    """Fails when configs/default_config.yaml and utils/config/schema.py drift: run
    `python -m utils.config --write-defaults`."""
    assert DEFAULT_CONFIG.read_text(encoding="utf-8") == default_config_text()
    loaded = yaml.safe_load(DEFAULT_CONFIG.read_text(encoding="utf-8"))
    assert loaded == config_to_dict(Config())  # every default, at its sectioned place
    assert "# the teacher's and critic's schedule shift" in DEFAULT_CONFIG.read_text(encoding="utf-8")


def test_misplaced_values_name_the_key():
    with pytest.raises(ConfigError, match=r"'model_kwargs.window=3': unknown config key 'model_kwargs.window'"):
        load_config(None, ["model_kwargs.window=3"])
    with pytest.raises(ConfigError, match=r"override 'rollout=5': rollout is a section: expected a mapping"):
        load_config(None, ["rollout=5"])


def test_every_shipped_recipe_loads():
    recipes = sorted((DEFAULT_CONFIG.parent).glob("*.yaml")) + sorted((DEFAULT_CONFIG.parent / "shapes").glob("*.yaml"))
    assert len(recipes) > 15
    loaded = {path.relative_to(DEFAULT_CONFIG.parent).as_posix(): load_config(path) for path in recipes}
    assert loaded["ode_init.yaml"].rollout.generator_shift == 8.0
    assert loaded["self_forcing_sid.yaml"].distillation.distribution_loss == "sid"
    # The shapes world's teacher and critic are its own networks, trained on the generator's grid.
    shapes = loaded["shapes/self_forcing_dmd.yaml"]
    assert shapes.model.score_network_shift == shapes.rollout.generator_shift == 5.0
    assert loaded["self_forcing_dmd.yaml"].model.score_network_shift == 8.0


@pytest.mark.parametrize("override, recipe, reader", [
    ("sid_alpha=0.5", [], "SiD (trainer score_distillation, distribution_loss sid)"),
    ("distillation.gan.r1_weight=1.0", [], "the GAN recipe (trainer gan)"),
    ("gan_g_weight=1.0", ["trainer=diffusion"], "the GAN recipe (trainer gan)"),
    ("fake_guidance_scale=2.0", [], "distillation.real_guidance_scale"),
    ("causal=false", [], "diffusion pre-training (trainer diffusion)"),
    ("teacher_forcing=true", ["trainer=ode"], "CausVid (distribution_loss causvid)"),
    ("noise_augmentation_max_timestep=100", ["trainer=diffusion"], "teacher forcing (trainer diffusion, "
                                                                   "pretraining.teacher_forcing true)"),
    ("text_dropout=0.1", [], "diffusion pre-training (trainer diffusion)"),
    ("frame_causal_fraction=0.5", ["trainer=gan"], "diffusion pre-training (trainer diffusion)"),
    ("lora_alpha=4", [], "LoRA (model.lora_rank > 0)"),
    ("codec_spatial_factor=4", [], "the shapes world (model.world shapes)"),
    ("logging.sample_prompts=[a cat]", [], "the sample videos (logging.sample_every > 0)"),
    *[("kv_cache_grad=original", recipe, "self-forcing rollouts (trainer score_distillation with dmd / sid, or gan)")
      for recipe in (["distribution_loss=causvid"], ["trainer=ode"], ["trainer=diffusion"])],
])
def test_a_key_set_where_no_recipe_part_reads_it_is_an_error_naming_it(override, recipe, reader):
    with pytest.raises(ConfigError) as err:
        load_config(None, [*recipe, override])
    message = str(err.value)
    assert message.startswith(f"override {override!r}: ") and " is read only by " in message and reader in message
    assert "does not use: remove it or set it to its default" in message


@pytest.mark.parametrize("overrides", [
    ["distribution_loss=sid", "sid_alpha=0.5"], ["trainer=gan", "distillation.gan.r1_weight=1.0"],
    ["real_guidance_scale=3.0", "fake_guidance_scale=2.0"], ["trainer=diffusion", "causal=false", "text_dropout=0.1"],
    ["distribution_loss=causvid", "teacher_forcing=true"],
    ["trainer=diffusion", "teacher_forcing=true", "noise_augmentation_max_timestep=100"],
    ["lora_rank=2", "lora_alpha=4"], ["world=shapes", "codec_spatial_factor=4"],
    ["logging.sample_every=10", "logging.sample_prompts=[a cat]"],
    ["kv_cache_grad=original"], ["distribution_loss=sid", "kv_cache_grad=original"],
    ["trainer=gan", "kv_cache_grad=original"],
    # the original's default_config.yaml sets causal: true for every recipe, and sid_alpha 1.0 rides along in its
    # self_forcing_sid.yaml whatever the loss: defaults are never errors
    ["causal=true", "sid_alpha=1.0", "trainer=ode"],
])
def test_the_same_keys_load_where_their_recipe_reads_them(overrides):
    load_config(None, overrides)
