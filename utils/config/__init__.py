"""The configuration: typed sections (`utils/config/schema.py`), loaded from YAML + `key=value` overrides and
validated.

Files and overrides may use our sectioned keys (`rollout.num_frame_per_block`) or the original's flat ones
(`num_frame_per_block`, so `configs/self_forcing_dmd.yaml` of the original loads unchanged); the one adapter between
them is `utils/config/original_keys.py`. An unknown or misspelt key, a wrong type, or a bad value is an error naming
the key and the file. Every key, its default and meaning: `configs/default_config.yaml`, generated from the schema.
"""
from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any, Callable, Literal

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from utils.config.original_keys import to_sections
from utils.config.schema import (ATTENTION_BACKEND_NAMES, CheckpointingSection, ComputeSection,  # noqa: F401
                                 Config, DataSection, DistillationSection, GANSection, InferenceSection,
                                 LoggingSection, ModelSection, OptimiserSection, PretrainingSection, RolloutSection,
                                 SiDSection)
from utils.errors import ConfigError  # noqa: F401  (re-exported: callers import it from here)
from utils.video import MAX_FPS

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = REPO_ROOT / "configs" / "default_config.yaml"


def _validate(cfg: Config, where: Callable[[str], str]) -> None:
    """Raise ConfigError for a bad value (choices are checked on loading, by their Literal types); `where(key)`
    names the file or override that set the key."""
    r, opt, video = cfg.rollout, cfg.optimiser, cfg.inference
    if opt.max_steps < 0:  # 0 is meaningful: the initial weights written as checkpoint 0
        raise ConfigError(f"{where('optimiser.max_steps')}: optimiser.max_steps must be >= 0, got {opt.max_steps}")
    for key in ("rollout.num_frame_per_block", "distillation.dfake_gen_update_ratio", "inference.fps",
                "inference.height", "inference.width", "optimiser.batch_size", "rollout.num_training_frames",
                "checkpointing.interval"):
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value < 1:
            raise ConfigError(f"{where(key)}: {key} must be >= 1, got {value}")
    if video.fps > MAX_FPS:
        raise ConfigError(f"{where('inference.fps')}: inference.fps must be at most {MAX_FPS}, got {video.fps}")
    if not r.denoising_step_list:
        raise ConfigError(f"{where('rollout.denoising_step_list')}: rollout.denoising_step_list is empty")
    if video.height % 16 or video.width % 16:
        blamed = where("inference.height" if video.height % 16 else "inference.width")
        raise ConfigError(f"{blamed}: height/width {video.height}x{video.width} must be multiples of 16 "
                          "(8x VAE downsampling, then 2x2 patches)")
    pre = cfg.pretraining
    if not 0.0 <= pre.text_dropout < 1.0:
        raise ConfigError(f"{where('pretraining.text_dropout')}: pretraining.text_dropout must be in [0, 1), got "
                          f"{pre.text_dropout}")
    rollout_recipe = _runs_self_rollout(cfg)
    if cfg.data.i2v and rollout_recipe and not r.independent_first_frame:
        raise ConfigError(f"{where('data.i2v')}: data.i2v = true needs rollout.independent_first_frame = true: the "
                          "rollout starts from the data's first latent frame as a block of its own, then generates "
                          "whole blocks")
    _validate_long_rollout(cfg, where, rollout_recipe)
    if r.sink_size < 0:
        raise ConfigError(f"{where('rollout.sink_size')}: rollout.sink_size must be >= 0, got {r.sink_size}")
    if r.sink_size and r.local_attn_size == -1:  # in training and at inference alike: nothing is evicted
        raise ConfigError(f"{where('rollout.sink_size')}: rollout.sink_size = {r.sink_size} pins frames that a rolling "
                          f"KV cache would evict; rollout.local_attn_size = -1 ({where('rollout.local_attn_size')}) "
                          "keeps every frame, so none is evicted: set rollout.local_attn_size, or rollout.sink_size "
                          "to 0")
    _validate_recipe_keys(cfg, where)
    if cfg.model.generator_ckpt_ema and not cfg.model.generator_ckpt:
        raise ConfigError(f"{where('model.generator_ckpt_ema')}: model.generator_ckpt_ema = true picks the EMA weights "
                          "of model.generator_ckpt, which is not set")
    short = cfg.data.shapes_short_prompt_fraction
    if not 0.0 <= short <= 1.0 or (short and cfg.model.world != "shapes"):
        raise ConfigError(f"{where('data.shapes_short_prompt_fraction')}: data.shapes_short_prompt_fraction must be in "
                          f"[0, 1] and needs model.world: shapes, got {short} with world {cfg.model.world!r}")
    if not 0.0 <= pre.frame_causal_fraction < 1.0:
        raise ConfigError(f"{where('pretraining.frame_causal_fraction')}: pretraining.frame_causal_fraction must be "
                          "in [0, 1) (a model trained only causally is a causal one: pretraining.causal: true), got "
                          f"{pre.frame_causal_fraction}")


def _runs_self_rollout(cfg: Config) -> bool:
    """Whether the recipe trains on the generator's own KV-cached rollouts (DMD, SiD, GAN; CausVid, ODE regression
    and diffusion pre-training build the generator's input from data)."""
    return cfg.trainer == "gan" or (cfg.trainer == "score_distillation"
                                    and cfg.distillation.distribution_loss != "causvid")


def _validate_recipe_keys(cfg: Config, where: Callable[[str], str]) -> None:
    """Keys that only some recipes read: set away from their default where nothing reads them, they would be accepted
    and ignored, so that is an error naming the key and what reads it. (optimiser.ema_start_step is not among them:
    recipes that turn the EMA off with ema_weight 0 inherit it from their base config.)"""
    d, pre, model, log = cfg.distillation, cfg.pretraining, cfg.model, cfg.logging
    diffusion = cfg.trainer == "diffusion"
    score = cfg.trainer == "score_distillation"
    gan_defaults = GANSection()
    # (key, value, default, whether the config reads it, what reads it)
    checks = [
        ("distillation.sid.alpha", d.sid.alpha, SiDSection().alpha, score and d.distribution_loss == "sid",
         "SiD (trainer score_distillation, distribution_loss sid)"),
        *[(f"distillation.gan.{f.name}", getattr(d.gan, f.name), getattr(gan_defaults, f.name), cfg.trainer == "gan",
           "the GAN recipe (trainer gan)") for f in dataclasses.fields(GANSection)],
        ("distillation.fake_guidance_scale", d.fake_guidance_scale, None, d.real_guidance_scale is not None,
         "distillation.real_guidance_scale (set, the pair replaces guidance_scale)"),
        ("pretraining.causal", pre.causal, True, diffusion, "diffusion pre-training (trainer diffusion)"),
        ("pretraining.teacher_forcing", pre.teacher_forcing, False,
         diffusion or (score and d.distribution_loss == "causvid"),
         "diffusion pre-training (trainer diffusion) and CausVid (distribution_loss causvid)"),
        ("pretraining.noise_augmentation_max_timestep", pre.noise_augmentation_max_timestep, 0,
         diffusion and pre.teacher_forcing, "teacher forcing (trainer diffusion, pretraining.teacher_forcing true)"),
        ("pretraining.text_dropout", pre.text_dropout, 0.0, diffusion, "diffusion pre-training (trainer diffusion)"),
        ("pretraining.frame_causal_fraction", pre.frame_causal_fraction, 0.0, diffusion,
         "diffusion pre-training (trainer diffusion)"),
        ("rollout.kv_cache_grad", cfg.rollout.kv_cache_grad, RolloutSection().kv_cache_grad, _runs_self_rollout(cfg),
         "self-forcing rollouts (trainer score_distillation with dmd / sid, or gan)"),
        ("model.lora_alpha", model.lora_alpha, 0.0, model.lora_rank > 0, "LoRA (model.lora_rank > 0)"),
        ("model.codec_spatial_factor", model.codec_spatial_factor, 2, model.world == "shapes",
         "the shapes world (model.world shapes)"),
        ("logging.sample_prompts", log.sample_prompts, [], log.sample_every > 0,
         "the sample videos (logging.sample_every > 0)"),
    ]
    recipe = f"trainer {cfg.trainer!r}" + (f" / distribution_loss {d.distribution_loss!r}" if score else "")
    for key, value, default, read, reader in checks:
        if value != default and not read:
            raise ConfigError(f"{where(key)}: {key} = {value!r} is read only by {reader}, which this config ({recipe}) "
                              f"does not use: remove it or set it to its default {default!r}")


def _validate_long_rollout(cfg: Config, where: Callable[[str], str], rollout_recipe: bool) -> None:
    """The long self-rollout keys: each one either takes effect or is an error (never accepted and ignored)."""
    r = cfg.rollout
    horizon, nfpb = r.image_or_video_shape[1], r.num_frame_per_block
    first = int(r.independent_first_frame)
    recipe = f"trainer {cfg.trainer!r} / distribution_loss {cfg.distillation.distribution_loss!r}"
    if not 0.0 <= r.prompt_switch_prob <= 1.0:
        raise ConfigError(f"{where('rollout.prompt_switch_prob')}: rollout.prompt_switch_prob must be in [0, 1], "
                          f"got {r.prompt_switch_prob}")
    if r.rollout_cache != "training" and not rollout_recipe:
        raise ConfigError(f"{where('rollout.rollout_cache')}: rollout.rollout_cache sets the cache of self-forcing "
                          f"rollouts (DMD, SiD, GAN), which {recipe} does not run")
    if r.rollout_frames == 0:
        for key, default in (("rollout_window", "latest"), ("prompt_switch_prob", 0.0)):
            if getattr(r, key) != default:
                raise ConfigError(f"{where('rollout.' + key)}: rollout.{key} = {getattr(r, key)!r} needs a long "
                                  "rollout: set rollout.rollout_frames (latent frames, at least "
                                  f"rollout.image_or_video_shape[1] = {horizon})")
    else:
        if not rollout_recipe:
            raise ConfigError(f"{where('rollout.rollout_frames')}: rollout.rollout_frames trains on self-rollouts "
                              f"(trainer score_distillation with dmd / sid, or gan), not {recipe}")
        if r.rollout_frames < horizon or (r.rollout_frames - first) % nfpb:
            raise ConfigError(f"{where('rollout.rollout_frames')}: rollout.rollout_frames = {r.rollout_frames} must "
                              f"be at least the loss window rollout.image_or_video_shape[1] = {horizon} and split "
                              f"into blocks of rollout.num_frame_per_block = {nfpb}"
                              + (" after the independent first frame" if first else ""))
        if r.rollout_frames == horizon:
            # One window position and no block boundary before it: these keys could not change anything.
            for key, default in (("rollout_window", "latest"), ("prompt_switch_prob", 0.0)):
                if getattr(r, key) != default:
                    raise ConfigError(f"{where('rollout.' + key)}: rollout.{key} = {getattr(r, key)!r} needs "
                                      "rollout.rollout_frames beyond the loss window "
                                      f"rollout.image_or_video_shape[1] = {horizon}")
        if r.num_training_frames != horizon:
            raise ConfigError(f"{where('rollout.num_training_frames')}: rollout.num_training_frames = "
                              f"{r.num_training_frames} (random rollout lengths) cannot be combined with "
                              f"rollout.rollout_frames; set it to rollout.image_or_video_shape[1] = {horizon}")
    if r.rollout_frames > horizon:
        # Memory must not grow with the rollout: only a cache that evicts (as inference's does) stays bounded.
        if r.rollout_cache != "inference":
            raise ConfigError(f"{where('rollout.rollout_cache')}: rollout.rollout_frames = {r.rollout_frames} "
                              "beyond the loss window needs rollout.rollout_cache = inference (a rolling cache of "
                              "bounded size)")
        if r.local_attn_size == -1 or r.local_attn_size < nfpb:
            raise ConfigError(f"{where('rollout.local_attn_size')}: rollout.rollout_frames = {r.rollout_frames} "
                              "needs a rolling window: set rollout.local_attn_size to at least "
                              f"rollout.num_frame_per_block = {nfpb} latent frames (the window used at inference)")
        if not 0 <= r.sink_size <= r.local_attn_size - nfpb:
            raise ConfigError(f"{where('rollout.sink_size')}: rollout.sink_size = {r.sink_size} must leave room for "
                              f"a block in the window of {r.local_attn_size} frames")


def _keys(values: Any, prefix: str = "") -> list[str]:
    """Dotted keys of a nested mapping (a YAML layer, an override)."""
    if not isinstance(values, dict):
        return []
    keys = []
    for key, value in values.items():
        keys.append(f"{prefix}{key}")
        if isinstance(value, dict):
            keys += _keys(value, f"{prefix}{key}.")
    return keys


def _field_type(dotted: str) -> Any:
    """The annotated type of a dotted Config field (None when there is none)."""
    cls: Any = Config
    hint = None
    for name in dotted.split("."):
        if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
            return None
        hint = typing.get_type_hints(cls).get(name)
        cls = hint
    return hint


def _lookup(values: dict[str, Any], dotted: str) -> Any:
    for name in dotted.split("."):
        values = values.get(name) if isinstance(values, dict) else None
    return values


def _merge(base: DictConfig, other: dict[str, Any], source: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, other)
    except ConfigKeyError as err:
        raise ConfigError(f"{source}: unknown config key {err.full_key!r} "
                          f"(misspelt? see configs/default_config.yaml)") from None
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "?"
        hint = _field_type(key)
        if typing.get_origin(hint) is Literal:
            raise ConfigError(f"{source}: {key} = {_lookup(other, key)!r} is not one of "
                              f"{list(typing.get_args(hint))}") from None
        raise ConfigError(f"{source}: bad value for {key!r}: {err.msg if hasattr(err, 'msg') else err}") from None


def _load_yaml(source: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A YAML file, sectioned; `base_config: other.yaml` (relative to the file) is loaded first and overridden by
    the rest."""
    if not source.is_file():
        raise ConfigError(f"config file {source} does not exist")
    try:
        loaded = OmegaConf.load(source)
    except Exception as err:  # YAML syntax errors
        raise ConfigError(f"{source}: cannot parse YAML: {err}") from None
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"{source}: expected a mapping of config keys (key: value lines), got a YAML "
                          f"{'list' if isinstance(loaded, ListConfig) else type(loaded).__name__}")
    values = OmegaConf.to_container(loaded)
    base = values.pop("base_config", None)
    values = to_sections(values, str(source))
    if base is None:
        return values
    base_path = (source.parent / str(base)).resolve()
    if base_path in seen:
        raise ConfigError(f"{source}: base_config {base} includes itself")
    merged = OmegaConf.merge(_load_yaml(base_path, seen + (source.resolve(),)), values)
    return OmegaConf.to_container(merged)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                default_path: str | Path | None = DEFAULT_CONFIG,
                layers: list[tuple[str, dict[str, Any]]] | None = None,
                extra_paths: list[str | Path] | None = None) -> Config:
    """Schema defaults <- `default_config.yaml` <- `layers` (named dicts, e.g. a model folder's stored settings)
    <- `extra_paths` (e.g. a preset) <- `path` <- `key=value` overrides; returns a validated `Config`. Every layer
    may use the sectioned or the original's flat keys."""
    cfg = OmegaConf.structured(Config)
    origin: dict[str, str] = {}  # key -> the layer that set it last, so an error blames the right file or override

    def merge(values: dict[str, Any], source: str) -> None:
        nonlocal cfg
        cfg = _merge(cfg, values, source)
        origin.update(dict.fromkeys(_keys(values), source))

    if default_path is not None:
        merge(_load_yaml(Path(default_path)), str(default_path))
    for name, values in layers or []:
        merge(to_sections(dict(values), name), name)
    for source in [*(extra_paths or []), path]:
        if source is None:
            continue
        merge(_load_yaml(Path(source)), str(source))
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        source = f"override {item!r}"
        merge(to_sections(OmegaConf.to_container(OmegaConf.from_dotlist([item])), source), source)
    result: Config = OmegaConf.to_object(cfg)
    if path is not None and not result.logging.config_name:
        result.logging.config_name = Path(path).stem

    def where(key: str) -> str:
        return origin.get(key, "the built-in defaults")

    _validate(result, where)
    return result


def config_to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def config_from_dict(d: dict[str, Any], source: str = "stored config") -> Config:
    """Rebuild a Config from `config_to_dict` output or a stored flat config of the original's spelling (e.g. stored
    inside a checkpoint); checks types and choices, as loading does."""
    cfg = _merge(OmegaConf.structured(Config), to_sections(dict(d), source), source)
    return OmegaConf.to_object(cfg)


def unchecked_config(values: dict[str, Any]) -> Config:
    """A Config from values in either spelling, built without any check: for tests of the code that must itself
    reject a bad value it is handed."""
    def build(cls: type, given: dict[str, Any]) -> Any:
        kwargs = {}
        for f in dataclasses.fields(cls):
            if f.name in given:
                sub = typing.get_type_hints(cls)[f.name]
                is_section = isinstance(sub, type) and dataclasses.is_dataclass(sub)
                kwargs[f.name] = build(sub, given[f.name]) if is_section else given[f.name]
        unknown = set(given) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ConfigError(f"unknown config keys {sorted(unknown)} in {cls.__name__}")
        return cls(**kwargs)
    return build(Config, to_sections(values, "unchecked config"))
