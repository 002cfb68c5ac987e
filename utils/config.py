"""The configuration schema: one typed dataclass, loaded from YAML + `key=value` overrides and validated.

Key names are the original ones (so `configs/self_forcing_dmd.yaml` of the original loads unchanged); our additions
are documented in `configs/default_config.yaml`. An unknown or misspelt key, a wrong type, or a bad value is an
error naming the key and the file.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf  # noqa: F401  (MISSING is re-exported for recipes)
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from utils.errors import ConfigError  # noqa: F401  (re-exported: callers import it from here)
from utils.video import MAX_FPS

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO_ROOT / "configs" / "default_config.yaml"


@dataclass
class ModelKwargs:
    """Generator settings (the original's `model_kwargs`)."""

    model_name: str = "Wan2.1-T2V-1.3B"
    timestep_shift: float = 5.0
    local_attn_size: int = -1  # rolling KV window in latent frames; -1 keeps every frame
    sink_size: int = 0  # latent frames pinned at the start of a rolling cache
    rope: str = "absolute"  # "relative": positions relative to the cache window (unbounded rollouts)


@dataclass
class Config:
    # --- what to run --------------------------------------------------------------------------------------------
    trainer: str = "score_distillation"  # score_distillation | gan | ode | diffusion
    distribution_loss: str = "dmd"  # dmd | sid | causvid (score_distillation only)
    causal: bool = True  # diffusion trainer: false trains a bidirectional teacher
    teacher_forcing: bool = False  # diffusion trainer with causal: clean context (true) or diffusion forcing (false)

    # --- models and files -----------------------------------------------------------------------------------------
    world: str = "wan"  # wan: real Wan2.1 components | shapes: the miniature shapes world (models built by code)
    dit_config: Optional[dict[str, Any]] = None  # WanConfig fields of networks built from scratch (shapes world)
    text_encoder_path: Optional[str] = None  # folder with text_encoder/ + tokenizer/ (overrides the Wan T5)
    real_score_ckpt: Optional[str] = None  # teacher weights (else <model_root>/<real_name>)
    fake_score_ckpt: Optional[str] = None  # critic initial weights (else <model_root>/<fake_name>, or the teacher's)
    codec_spatial_factor: int = 2  # shapes world: pixel-unshuffle factor of the latent codec
    # shapes world: fraction of training prompts in a short form that leaves out size and/or speed (the scene still
    # has them, drawn at random; shapes/world.py OMISSIONS); also the ODE pairs' prompts
    shapes_short_prompt_fraction: float = 0.0
    model_root: str = "wan_models"  # folder holding <real_name>/, <fake_name>/ and model_kwargs.model_name/
    generator_ckpt: Optional[str] = None
    real_name: str = "Wan2.1-T2V-1.3B"
    fake_name: str = "Wan2.1-T2V-1.3B"
    model_kwargs: ModelKwargs = field(default_factory=ModelKwargs)
    text_encoder_cpu_offload: bool = False
    prompt_cache_size: int = 0
    decoder: str = "wan"  # wan | taehv: pixel decoder for visualisation and inference
    taehv_path: Optional[str] = None
    compile: bool = False  # torch.compile the DiT: inference compiles the generator's layer pieces, training each block
    cuda_graphs: bool = False  # inference on CUDA: replay one CUDA graph per KV-cache plan (block position)
    attention_backend: str = "auto"  # inference: model/attention.py ATTENTION_BACKENDS (benchmarks/speed.py times them)

    # --- the causal generator and its rollout ---------------------------------------------------------------------
    denoising_step_list: list[int] = field(default_factory=lambda: [1000, 750, 500, 250])
    warp_denoising_step: bool = False
    num_frame_per_block: int = 3
    independent_first_frame: bool = False
    context_noise: float = 0.0
    num_training_frames: int = 21
    same_step_across_blocks: bool = True
    last_step_only: bool = False
    kv_cache_grad: str = "paper"  # paper: cache written without gradient | original: gradients leak (docs/original.md)
    image_or_video_shape: list[int] = field(default_factory=lambda: [1, 21, 16, 60, 104])

    # --- long self-rollouts (DMD, SiD, GAN; docs/training.md, "Long self-rollouts") ----------------------------
    rollout_frames: int = 0  # latent frames of each training rollout, up to many horizons; 0: the standard recipe
    rollout_window: str = "latest"  # latest | uniform: where the loss window (image_or_video_shape[1]) sits
    prompt_switch_prob: float = 0.0  # chance that a rollout switches to batch['switch_prompts'] (KV re-cache)
    rollout_cache: str = "training"  # training: the original's (every frame held) | inference: as inference builds it

    # --- distribution matching ------------------------------------------------------------------------------------
    guidance_scale: float = 3.0
    real_guidance_scale: Optional[float] = None
    fake_guidance_scale: Optional[float] = None
    timestep_shift: float = 5.0
    num_train_timestep: int = 1000
    ts_schedule: bool = False
    ts_schedule_max: bool = False
    min_score_timestep: int = 0
    denoising_loss_type: str = "flow"
    sid_alpha: float = 1.0
    negative_prompt: str = ""

    # --- GAN ------------------------------------------------------------------------------------------------------
    num_class: int = 1
    concat_time_embeddings: bool = False
    relativistic_discriminator: bool = False
    critic_timestep_shift: Optional[float] = None
    gan_g_weight: float = 1e-2
    gan_d_weight: float = 1e-2
    r1_weight: float = 0.0
    r2_weight: float = 0.0
    r1_sigma: float = 0.01
    r2_sigma: float = 0.01
    discriminator_warmup_steps: int = 0
    discriminator_lr_multiplier: float = 1.0
    loss_scale: float = 1.0

    # --- diffusion / ODE pre-training -----------------------------------------------------------------------------
    noise_augmentation_max_timestep: int = 0
    text_dropout: float = 0.0
    frame_causal_fraction: float = 0.0
    ode_data_path: Optional[str] = None

    # --- optimisation ---------------------------------------------------------------------------------------------
    lr: float = 2e-6
    lr_critic: Optional[float] = None
    beta1: float = 0.0
    beta2: float = 0.999
    beta1_critic: float = 0.0
    beta2_critic: float = 0.999
    weight_decay: float = 0.01
    max_grad_norm_generator: float = 10.0
    max_grad_norm_critic: float = 10.0
    lr_warmup_steps: int = 0
    batch_size: int = 1
    total_batch_size: Optional[int] = None
    dfake_gen_update_ratio: int = 5
    max_steps: int = 600
    time_limit_s: float = 0.0
    ema_weight: float = 0.0
    ema_start_step: int = 0
    gradient_checkpointing: bool = True
    mixed_precision: bool = True
    sharding_strategy: str = "full"
    cpu_offload: bool = False
    lora_rank: int = 0
    lora_alpha: float = 0.0
    max_nonfinite_steps: int = 5

    # --- data, logging, checkpoints -------------------------------------------------------------------------------
    data_path: Optional[str] = None
    extended_prompt_path: Optional[str] = None
    load_raw_video: bool = False  # kept for the original's configs; true is an error (no raw-video reader)
    seed: int = 0
    log_iters: int = 50
    keep_checkpoints: int = 3  # newest checkpoints kept in the logdir (0: all)
    log_every: int = 1
    sample_every: int = 0
    sample_prompts: list[str] = field(default_factory=list)
    gc_interval: int = 100
    i2v: bool = False  # image-to-video distillation: the data's first latent frame conditions the rollout
    wandb_host: Optional[str] = None
    wandb_key: Optional[str] = None
    wandb_entity: Optional[str] = None
    wandb_project: Optional[str] = None

    # --- inference ------------------------------------------------------------------------------------------------
    height: int = 480
    width: int = 832
    num_frames: int = 81
    fps: int = 16

    # --- accepted for compatibility with the original configs, unused -------------------------------------------
    generator_fsdp_wrap_strategy: str = "size"
    real_score_fsdp_wrap_strategy: str = "size"
    fake_score_fsdp_wrap_strategy: str = "size"
    text_encoder_fsdp_wrap_strategy: str = "size"
    ckpt_step: Optional[int] = None
    prompt_name: Optional[str] = None
    prompt_path: Optional[str] = None
    eval_first_n: int = -1
    num_samples: int = 1
    backward_simulation: bool = True

    # --- set by the entry points --------------------------------------------------------------------------------
    config_name: str = ""
    logdir: str = ""
    no_save: bool = False
    no_visualize: bool = False
    disable_wandb: bool = False
    wandb_save_dir: str = ""


# The names of model/attention.py's ATTENTION_BACKENDS, written out because the ground floor imports no network
# code (tests/model/test_attention_backends.py holds the two lists together).
ATTENTION_BACKEND_NAMES = ("auto", "flash_attn", "sdpa", "sdpa_cudnn", "sdpa_flash", "sdpa_efficient", "sdpa_math",
                           "sdpa_cudnn_halves", "flash_attn_halves")

_CHOICES = {
    "trainer": ("score_distillation", "gan", "ode", "diffusion"),
    "world": ("wan", "shapes"),
    "distribution_loss": ("dmd", "sid", "causvid"),
    "kv_cache_grad": ("paper", "original"),
    "decoder": ("wan", "taehv", "pixel"),
    "denoising_loss_type": ("flow",),
    "sharding_strategy": ("full", "hybrid_full", "hybrid_zero2", "no_shard"),
    "model_kwargs.rope": ("absolute", "relative"),
    "attention_backend": ATTENTION_BACKEND_NAMES,
    "rollout_window": ("latest", "uniform"),
    "rollout_cache": ("training", "inference"),
}


def _validate(cfg: Config, where: Callable[[str], str]) -> None:
    """Raise ConfigError for a bad value; `where(key)` names the file or override that set the key."""
    for key, allowed in _CHOICES.items():
        value = OmegaConf.select(OmegaConf.structured(cfg), key) if "." in key else getattr(cfg, key)
        if value not in allowed:
            raise ConfigError(f"{where(key)}: {key} = {value!r} is not one of {list(allowed)}")
    if cfg.max_steps < 0:  # 0 is meaningful: the initial weights written as checkpoint 0
        raise ConfigError(f"{where('max_steps')}: max_steps must be >= 0, got {cfg.max_steps}")
    for key in ("num_frame_per_block", "dfake_gen_update_ratio", "fps", "height", "width", "batch_size",
                "num_training_frames", "log_iters"):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"{where(key)}: {key} must be >= 1, got {getattr(cfg, key)}")
    if cfg.fps > MAX_FPS:
        raise ConfigError(f"{where('fps')}: fps must be at most {MAX_FPS}, got {cfg.fps}")
    if not cfg.denoising_step_list:
        raise ConfigError(f"{where('denoising_step_list')}: denoising_step_list is empty")
    if cfg.height % 16 or cfg.width % 16:
        blamed = where("height" if cfg.height % 16 else "width")
        raise ConfigError(f"{blamed}: height/width {cfg.height}x{cfg.width} must be multiples of 16 "
                          "(8x VAE downsampling, then 2x2 patches)")
    if not 0.0 <= cfg.text_dropout < 1.0:
        raise ConfigError(f"{where('text_dropout')}: text_dropout must be in [0, 1), got {cfg.text_dropout}")
    if cfg.load_raw_video:
        raise ConfigError(f"{where('load_raw_video')}: load_raw_video = true is not supported: training reads clips "
                          "already encoded to latents (ode_data_path: ODE-pair shards, whose clean end is the clip); "
                          "set it to false")
    rollout_recipe = cfg.trainer == "gan" or (cfg.trainer == "score_distillation"
                                              and cfg.distribution_loss != "causvid")
    if cfg.i2v and rollout_recipe and not cfg.independent_first_frame:
        raise ConfigError(f"{where('i2v')}: i2v = true needs independent_first_frame = true: the rollout starts from "
                          "the data's first latent frame as a block of its own, then generates whole blocks")
    _validate_long_rollout(cfg, where, rollout_recipe)
    if not 0.0 <= cfg.shapes_short_prompt_fraction <= 1.0 or (cfg.shapes_short_prompt_fraction and
                                                                 cfg.world != "shapes"):
        raise ConfigError(f"{where('shapes_short_prompt_fraction')}: shapes_short_prompt_fraction must be in [0, 1] "
                          f"and needs world: shapes, got {cfg.shapes_short_prompt_fraction} with world "
                          f"{cfg.world!r}")
    if not 0.0 <= cfg.frame_causal_fraction < 1.0:
        raise ConfigError(f"{where('frame_causal_fraction')}: frame_causal_fraction must be in [0, 1) (a model trained "
                          f"only causally is a causal one: causal: true), got {cfg.frame_causal_fraction}")


def _validate_long_rollout(cfg: Config, where: Callable[[str], str], rollout_recipe: bool) -> None:
    """The long self-rollout keys: each one either takes effect or is an error (never accepted and ignored)."""
    horizon, nfpb = cfg.image_or_video_shape[1], cfg.num_frame_per_block
    first = int(cfg.independent_first_frame)
    if not 0.0 <= cfg.prompt_switch_prob <= 1.0:
        raise ConfigError(f"{where('prompt_switch_prob')}: prompt_switch_prob must be in [0, 1], "
                          f"got {cfg.prompt_switch_prob}")
    if cfg.rollout_cache != "training" and not rollout_recipe:
        raise ConfigError(f"{where('rollout_cache')}: rollout_cache sets the cache of self-forcing rollouts (DMD, "
                          f"SiD, GAN), which trainer {cfg.trainer!r} / {cfg.distribution_loss!r} does not run")
    if cfg.rollout_frames == 0:
        for key, default in (("rollout_window", "latest"), ("prompt_switch_prob", 0.0)):
            if getattr(cfg, key) != default:
                raise ConfigError(f"{where(key)}: {key} = {getattr(cfg, key)!r} needs a long rollout: set "
                                  f"rollout_frames (latent frames, at least image_or_video_shape[1] = {horizon})")
    else:
        if not rollout_recipe:
            raise ConfigError(f"{where('rollout_frames')}: rollout_frames trains on self-rollouts (trainer "
                              f"score_distillation with dmd / sid, or gan), not trainer {cfg.trainer!r} / "
                              f"distribution_loss {cfg.distribution_loss!r}")
        if cfg.rollout_frames < horizon or (cfg.rollout_frames - first) % nfpb:
            raise ConfigError(f"{where('rollout_frames')}: rollout_frames = {cfg.rollout_frames} must be at least "
                              f"the loss window image_or_video_shape[1] = {horizon} and split into blocks of "
                              f"num_frame_per_block = {nfpb}" + (" after the independent first frame" if first else ""))
        if cfg.rollout_frames == horizon:
            # One window position and no block boundary before it: these keys could not change anything.
            for key, default in (("rollout_window", "latest"), ("prompt_switch_prob", 0.0)):
                if getattr(cfg, key) != default:
                    raise ConfigError(f"{where(key)}: {key} = {getattr(cfg, key)!r} needs rollout_frames beyond the "
                                      f"loss window image_or_video_shape[1] = {horizon}")
        if cfg.num_training_frames != horizon:
            raise ConfigError(f"{where('num_training_frames')}: num_training_frames = {cfg.num_training_frames} "
                              "(random rollout lengths) cannot be combined with rollout_frames; set it to "
                              f"image_or_video_shape[1] = {horizon}")
    if cfg.rollout_frames > horizon:
        # Memory must not grow with the rollout: only a cache that evicts (as inference's does) stays bounded.
        window = cfg.model_kwargs.local_attn_size
        if cfg.rollout_cache != "inference":
            raise ConfigError(f"{where('rollout_cache')}: rollout_frames = {cfg.rollout_frames} beyond the loss "
                              "window needs rollout_cache = inference (a rolling cache of bounded size)")
        if window == -1 or window < nfpb:
            raise ConfigError(f"{where('model_kwargs.local_attn_size')}: rollout_frames = {cfg.rollout_frames} "
                              "needs a rolling window: set model_kwargs.local_attn_size to at least "
                              f"num_frame_per_block = {nfpb} latent frames (the window used at inference)")
        if not 0 <= cfg.model_kwargs.sink_size <= window - nfpb:
            raise ConfigError(f"{where('model_kwargs.sink_size')}: sink_size = {cfg.model_kwargs.sink_size} must "
                              f"leave room for a block in the window of {window} frames")


def _keys(values: Any, prefix: str = "") -> list[str]:
    """Dotted keys of a nested mapping (a YAML layer, an override)."""
    if isinstance(values, DictConfig):
        values = OmegaConf.to_container(values)
    if not isinstance(values, dict):
        return []
    keys = []
    for key, value in values.items():
        keys.append(f"{prefix}{key}")
        if isinstance(value, dict):
            keys += _keys(value, f"{prefix}{key}.")
    return keys


def _merge(base: DictConfig, other: Any, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, other)
    except ConfigKeyError as err:
        raise ConfigError(f"{source}: unknown config key {err.full_key!r} "
                          f"(misspelt? see configs/default_config.yaml)") from None
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "?"
        raise ConfigError(f"{source}: bad value for {key!r}: {err.msg if hasattr(err, 'msg') else err}") from None


def _load_yaml(source: Path, seen: tuple[Path, ...] = ()) -> DictConfig:
    """A YAML file; `base_config: other.yaml` (relative to the file) is loaded first and overridden by the rest."""
    if not source.is_file():
        raise ConfigError(f"config file {source} does not exist")
    try:
        loaded = OmegaConf.load(source)
    except Exception as err:  # YAML syntax errors
        raise ConfigError(f"{source}: cannot parse YAML: {err}") from None
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"{source}: expected a mapping of config keys (key: value lines), got a YAML "
                          f"{'list' if isinstance(loaded, ListConfig) else type(loaded).__name__}")
    base = loaded.pop("base_config", None)
    if base is None:
        return loaded
    base_path = (source.parent / str(base)).resolve()
    if base_path in seen:
        raise ConfigError(f"{source}: base_config {base} includes itself")
    return OmegaConf.merge(_load_yaml(base_path, seen + (source.resolve(),)), loaded)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                default_path: str | Path | None = DEFAULT_CONFIG,
                layers: list[tuple[str, dict[str, Any]]] | None = None,
                extra_paths: list[str | Path] | None = None) -> Config:
    """Schema defaults <- `default_config.yaml` <- `layers` (named dicts, e.g. a model folder's stored settings)
    <- `extra_paths` (e.g. a preset) <- `path` <- `key=value` overrides; returns a validated `Config`."""
    cfg = OmegaConf.structured(Config)
    origin: dict[str, str] = {}  # key -> the layer that set it last, so an error blames the right file or override

    def merge(values: Any, source: str) -> None:
        nonlocal cfg
        cfg = _merge(cfg, values, source)
        origin.update(dict.fromkeys(_keys(values), source))

    if default_path is not None:
        merge(_load_yaml(Path(default_path)), str(default_path))
    for name, values in layers or []:
        merge(values, name)
    for source in [*(extra_paths or []), path]:
        if source is None:
            continue
        merge(_load_yaml(Path(source)), str(source))
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        merge(OmegaConf.from_dotlist([item]), f"override {item!r}")
    result: Config = OmegaConf.to_object(cfg)
    if path is not None and not result.config_name:
        result.config_name = Path(path).stem

    def where(key: str) -> str:
        return origin.get(key, "the built-in defaults")

    _validate(result, where)
    return result


def config_to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def config_from_dict(d: dict[str, Any], source: str = "stored config") -> Config:
    """Rebuild a Config from `config_to_dict` output (e.g. stored inside a checkpoint)."""
    cfg = _merge(OmegaConf.structured(Config), d, source)
    return OmegaConf.to_object(cfg)
