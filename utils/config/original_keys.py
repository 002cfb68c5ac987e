"""The one adapter from the original's flat config keys to our sections.

The original (and the recipes in configs/, which keep its spelling) writes every key at the top level, with the
generator's settings under `model_kwargs`. `FLAT_KEYS` maps each of those keys to its place in `Config`; a YAML layer,
a stored run config or a `key=value` override may use either spelling, even both in one file. Keys of the original
that mean nothing here are listed with the reason in `IGNORED_ORIGINAL_KEYS`; keys whose only supported value is the
original's default are checked by `FIXED_ORIGINAL_KEYS` (any other value would change what the original did).
"""
from __future__ import annotations

import json
from typing import Any

from utils.errors import ConfigError

_SECTIONS = {
    "model": ("world", "model_root", "real_name", "fake_name", "generator_ckpt", "generator_ckpt_ema",
              "real_score_ckpt", "fake_score_ckpt", "dit_config", "text_encoder_path", "codec_spatial_factor",
              "num_train_timestep", "lora_rank", "lora_alpha"),
    "rollout": ("denoising_step_list", "warp_denoising_step", "num_frame_per_block", "independent_first_frame",
                "context_noise", "num_training_frames", "same_step_across_blocks", "last_step_only", "kv_cache_grad",
                "image_or_video_shape", "rollout_frames", "rollout_window", "prompt_switch_prob", "rollout_cache"),
    "distillation": ("distribution_loss", "dfake_gen_update_ratio", "guidance_scale", "real_guidance_scale",
                     "fake_guidance_scale", "ts_schedule", "ts_schedule_max", "min_score_timestep"),
    "distillation.gan": ("num_class", "concat_time_embeddings", "relativistic_discriminator", "critic_timestep_shift",
                         "r1_weight", "r2_weight", "r1_sigma", "r2_sigma", "discriminator_warmup_steps",
                         "discriminator_lr_multiplier", "loss_scale"),
    "pretraining": ("causal", "teacher_forcing", "noise_augmentation_max_timestep", "text_dropout",
                    "frame_causal_fraction"),
    "optimiser": ("lr", "lr_critic", "beta1", "beta2", "beta1_critic", "beta2_critic", "weight_decay",
                  "max_grad_norm_generator", "max_grad_norm_critic", "lr_warmup_steps", "batch_size",
                  "total_batch_size", "max_steps", "time_limit_s", "ema_weight", "ema_start_step",
                  "max_nonfinite_steps"),
    "compute": ("mixed_precision", "gradient_checkpointing", "checkpoint_keeps_attention", "sharding_strategy",
                "cpu_offload", "text_encoder_cpu_offload", "prompt_cache_size", "compile", "gc_interval"),
    "data": ("data_path", "extended_prompt_path", "ode_data_path", "negative_prompt", "i2v",
             "shapes_short_prompt_fraction"),
    "checkpointing": ("no_save",),
    "logging": ("logdir", "config_name", "log_every", "sample_every", "sample_prompts", "no_visualize",
                "disable_wandb", "wandb_host", "wandb_key", "wandb_entity", "wandb_project", "wandb_save_dir"),
    "inference": ("height", "width", "fps", "decoder", "taehv_path", "cuda_graphs", "attention_backend"),
}
# Flat original key -> dotted place in Config: the keys kept under their name, then the renamed ones.
FLAT_KEYS: dict[str, str] = {key: f"{section}.{key}" for section, keys in _SECTIONS.items() for key in keys} | {
    "trainer": "trainer",
    "seed": "seed",
    "model_kwargs.model_name": "model.generator_name",
    "model_kwargs.timestep_shift": "rollout.generator_shift",
    "model_kwargs.local_attn_size": "rollout.local_attn_size",
    "model_kwargs.sink_size": "rollout.sink_size",
    "model_kwargs.rope": "rollout.rope",
    "timestep_shift": "distillation.score_timestep_shift",
    "sid_alpha": "distillation.sid.alpha",
    "gan_g_weight": "distillation.gan.generator_weight",
    "gan_d_weight": "distillation.gan.discriminator_weight",
    "log_iters": "checkpointing.interval",
    "keep_checkpoints": "checkpointing.keep",
}
# Original keys accepted and dropped, each for a reason: none of them changes what training or inference computes.
IGNORED_ORIGINAL_KEYS: dict[str, str] = {
    **dict.fromkeys(("generator_fsdp_wrap_strategy", "real_score_fsdp_wrap_strategy", "fake_score_fsdp_wrap_strategy",
                     "text_encoder_fsdp_wrap_strategy"),
                    "FSDP wrap granularity (memory and speed only): every transformer block is a unit here"),
    **dict.fromkeys(("ckpt_step", "prompt_name", "prompt_path", "eval_first_n", "num_samples", "num_frames"),
                    "leftovers in the original's default_config.yaml that its code never reads (its inference took "
                    "prompts, samples and length as flags, as inference.py does)"),
}
# Original keys whose value must be the one given: another would ask for behaviour this code does not have.
FIXED_ORIGINAL_KEYS: dict[str, tuple[Any, str]] = {
    "backward_simulation": (True, "the rollout always trains on the generator's own samples (Self Forcing); the "
                                  "original also required true"),
    "denoising_loss_type": ("flow", "the critic is trained by flow matching, the only loss the original's scheduler "
                                    "supports"),
    "load_raw_video": (False, "training reads clips already encoded to latents (data.ode_data_path: ODE-pair "
                              "shards, whose clean end is the clip); there is no raw-video reader"),
}
SECTION_NAMES = ("model", "rollout", "distillation", "pretraining", "optimiser", "compute", "data", "checkpointing",
                 "logging", "inference")
SUBSECTION_NAMES = ("distillation.sid", "distillation.gan")


def _dotted(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A mapping of flat original keys as {dotted key: value} (only `model_kwargs` nests in the original)."""
    out = {}
    for key, value in values.items():
        if key == "model_kwargs" and not prefix and isinstance(value, dict):
            out.update(_dotted(value, "model_kwargs."))
        else:
            out[prefix + str(key)] = value
    return out


def _section_leaves(values: dict[str, Any], prefix: str) -> dict[str, Any]:
    """A sectioned mapping as {dotted key: value}, descending into sub-sections only (dit_config stays a dict)."""
    out = {}
    for key, value in values.items():
        dotted = f"{prefix}.{key}"
        if dotted in SUBSECTION_NAMES and isinstance(value, dict):
            out.update(_section_leaves(value, dotted))
        else:
            out[dotted] = value
    return out


def _put(target: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for name in parents:
        target = target.setdefault(name, {})
    target[leaf] = value


def to_sections(values: dict[str, Any], source: str) -> dict[str, Any]:
    """A config mapping in either spelling -> the sectioned one. Keys that are neither stay as they are, so that
    loading reports them as unknown (naming `source`); a fixed key with another value is a ConfigError."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        if key in SECTION_NAMES:
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: {key} is a section: expected a mapping of its keys, got {value!r}")
            for dotted, leaf in _section_leaves(value, key).items():
                _put(out, dotted, leaf)
            continue
        for flat, flat_value in _dotted({key: value}).items():
            if flat in IGNORED_ORIGINAL_KEYS:
                continue
            if flat in FIXED_ORIGINAL_KEYS:
                required, why = FIXED_ORIGINAL_KEYS[flat]
                if flat_value != required:
                    raise ConfigError(f"{source}: {flat} = {json.dumps(flat_value)} is not supported, only "
                                      f"{json.dumps(required)}: {why}")
                continue
            if flat.startswith("model_kwargs.") and flat not in FLAT_KEYS:
                known = [k.split(".", 1)[1] for k in FLAT_KEYS if k.startswith("model_kwargs.")]
                raise ConfigError(f"{source}: unknown config key {flat!r} (the original's model_kwargs holds "
                                  f"{', '.join(known)})")
            _put(out, FLAT_KEYS.get(flat, flat), flat_value)
    return out


def flat_values(cfg: Any, keys: tuple[str, ...]) -> dict[str, Any]:
    """The given flat original keys read from a sectioned `cfg` (nested under `model_kwargs` as the original did);
    for formats that store them flat (a model folder's rollout settings)."""
    out: dict[str, Any] = {}
    for key in keys:
        value = cfg
        for name in FLAT_KEYS[key].split("."):
            value = getattr(value, name)
        _put(out, key, list(value) if isinstance(value, (list, tuple)) else value)
    return out
