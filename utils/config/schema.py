"""The configuration schema: typed sections, one dataclass each, every field with its meaning (`metadata["help"]`).

`configs/default_config.yaml` is generated from these classes (`python -m utils.config --write-defaults`), so a
default and its explanation live here only. Choices are `Literal` types: loading rejects any other value.
Which shift is which (four of them, one per use):
  rollout.generator_shift                the generator's schedule (step warping, its sigma lookups)
  model.score_network_shift              the teacher's and critic's schedule (their x0 <-> flow conversion)
  distillation.score_timestep_shift      the timesteps drawn for the DMD / SiD / critic losses
  distillation.gan.critic_timestep_shift the timesteps drawn for the GAN discriminator (null: the one above)
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, get_args

Trainer = Literal["score_distillation", "gan", "ode", "diffusion"]
World = Literal["wan", "shapes"]
DistributionLoss = Literal["dmd", "sid", "causvid"]
KVCacheGrad = Literal["paper", "original"]
Rope = Literal["absolute", "relative"]
RolloutWindow = Literal["latest", "uniform"]
RolloutCache = Literal["training", "inference"]
Decoder = Literal["wan", "taehv", "pixel"]
ShardingStrategy = Literal["full", "hybrid_full", "hybrid_zero2", "no_shard"]
# model/attention.py's ATTENTION_BACKENDS, written out because the ground floor imports no network code
# (tests/model/test_attention_backends.py holds the two lists together).
AttentionBackend = Literal["auto", "flash_attn", "sdpa", "sdpa_cudnn", "sdpa_flash", "sdpa_efficient", "sdpa_math",
                           "sdpa_cudnn_halves", "flash_attn_halves"]
ATTENTION_BACKEND_NAMES = get_args(AttentionBackend)


def setting(default: Any, help: str) -> Any:
    """A field with its default and meaning (lists and dicts are copied per instance)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


def section(cls: type, help: str) -> Any:
    return field(default_factory=cls, metadata={"help": help})


@dataclass
class ModelSection:
    world: World = setting("wan", "wan: real Wan2.1 components from model_root | shapes: the miniature shapes "
                           "world (networks built by code from dit_config)")
    model_root: str = setting("wan_models", "folder holding the Wan model folders named below (the text encoder and "
                              "VAE come from generator_name's)")
    generator_name: str = setting("Wan2.1-T2V-1.3B", "generator architecture / initial weights folder under "
                                  "model_root")
    real_name: str = setting("Wan2.1-T2V-1.3B", "teacher (real score) model folder under model_root")
    fake_name: str = setting("Wan2.1-T2V-1.3B", "critic (fake score) model folder under model_root")
    generator_ckpt: Optional[str] = setting(None, "initial generator weights (e.g. checkpoints/ode_init.pt); null: "
                                            "generator_name's")
    generator_ckpt_ema: bool = setting(False, "start from generator_ckpt's EMA weights (the generator_ema entry of a "
                                       "Self-Forcing .pt, what inference loads with --use_ema)")
    real_score_ckpt: Optional[str] = setting(None, "teacher weights file (else <model_root>/<real_name>)")
    fake_score_ckpt: Optional[str] = setting(None, "critic initial weights (else <model_root>/<fake_name>, or the "
                                             "teacher's)")
    dit_config: Optional[dict[str, Any]] = setting(None, "WanConfig fields of networks trained from scratch (shapes "
                                                   "world), e.g. {dim: 256, ..., prediction: x0}")
    text_encoder_path: Optional[str] = setting(None, "folder with text_encoder/ + tokenizer/ (overrides the Wan T5; "
                                               "the shapes world's)")
    codec_spatial_factor: int = setting(2, "shapes world: pixel-unshuffle factor of the latent codec")
    num_train_timestep: int = setting(1000, "timestep range of every network's schedule")
    score_network_shift: float = setting(8.0, "the teacher's and critic's schedule shift (their x0 <-> flow "
                                         "conversion); 8 as the original's WanDiffusionWrapper default, which the "
                                         "released checkpoints were trained with")
    lora_rank: int = setting(0, ">0 trains LoRA adapters on the generator (merged on export)")
    lora_alpha: float = setting(0.0, "LoRA alpha (0: equal to the rank)")


@dataclass
class RolloutSection:
    denoising_step_list: list[int] = setting([1000, 750, 500, 250], "few-step timesteps before warping")
    warp_denoising_step: bool = setting(False, "map the steps onto the generator's shifted grid ([1000, 937.5, "
                                        "833.3, 625] at shift 5)")
    generator_shift: float = setting(5.0, "the generator's schedule shift (warped steps, its sigma lookups)")
    num_frame_per_block: int = setting(3, "latent frames generated together per autoregressive block")
    independent_first_frame: bool = setting(False, "frame 0 is a block of its own (image-to-video layout)")
    context_noise: float = setting(0.0, "timestep of the pass that writes each finished block into the KV cache")
    num_training_frames: int = setting(21, "latent frames per training rollout (losses use the last 21)")
    same_step_across_blocks: bool = setting(True, "one random exit step shared by all blocks of a rollout")
    last_step_only: bool = setting(False, "always exit at the last denoising step")
    kv_cache_grad: KVCacheGrad = setting("paper", "paper: the KV cache carries no gradient (the paper's Algorithm 1) "
                                         "| original: as the original code, a block's gradient also flows through "
                                         "cached keys/values into earlier blocks' exit-step forwards")
    image_or_video_shape: list[int] = setting([1, 21, 16, 60, 104], "[B, F, C, H, W] latent shape of training "
                                              "rollouts")
    local_attn_size: int = setting(-1, "rolling KV window in latent frames; -1 keeps every frame (at most 21 at "
                                   "480x832)")
    sink_size: int = setting(0, "latent frames pinned at the start of a rolling cache (attention sink)")
    rope: Rope = setting("absolute", "absolute (original) | relative: positions inside the cache window, unbounded "
                         "length")
    # Long self-rollouts (DMD, SiD, GAN; docs/training.md, "Long self-rollouts").
    rollout_frames: int = setting(0, "latent frames of each training rollout, up to many times the loss window "
                                  "(image_or_video_shape[1]); 0: the standard recipe")
    rollout_window: RolloutWindow = setting("latest", "where the loss window sits in a long rollout: latest (its "
                                            "end) | uniform (ending at a random block boundary)")
    prompt_switch_prob: float = setting(0.0, "chance that a long rollout switches to batch['switch_prompts'] at a "
                                        "block boundary before the window (KV re-cache)")
    rollout_cache: RolloutCache = setting("training", "training: the original's cache (every frame held) | "
                                          "inference: the rolling cache inference builds (local_attn_size, "
                                          "sink_size, rope)")


@dataclass
class SiDSection:
    alpha: float = setting(1.0, "SiD's alpha")


@dataclass
class GANSection:
    num_class: int = setting(1, "discriminator outputs")
    concat_time_embeddings: bool = setting(False, "append the time embedding as a 4th discriminator token")
    relativistic_discriminator: bool = setting(False, "relativistic losses (fake logits against real ones)")
    critic_timestep_shift: Optional[float] = setting(None, "shift of the discriminator's timestep sampling (null: "
                                                     "distillation.score_timestep_shift)")
    generator_weight: float = setting(0.01, "weight of the generator's adversarial loss")
    discriminator_weight: float = setting(0.01, "weight of the discriminator's loss")
    r1_weight: float = setting(0.0, "approximate R1 (finite differences on noisy real latents)")
    r2_weight: float = setting(0.0, "approximate R2 (on noisy generated latents)")
    r1_sigma: float = setting(0.01, "R1's perturbation scale")
    r2_sigma: float = setting(0.01, "R2's perturbation scale")
    discriminator_warmup_steps: int = setting(0, "steps training only the discriminator heads")
    discriminator_lr_multiplier: float = setting(1.0, "learning-rate multiplier of the discriminator heads")
    loss_scale: float = setting(1.0, "factor on the discriminator's total loss")


@dataclass
class DistillationSection:
    distribution_loss: DistributionLoss = setting("dmd", "trainer score_distillation: dmd | sid | causvid")
    dfake_gen_update_ratio: int = setting(5, "critic updates per generator update (score distillation, GAN)")
    guidance_scale: float = setting(3.0, "teacher CFG: real = cond + g * (cond - uncond)")
    real_guidance_scale: Optional[float] = setting(None, "if set, overrides guidance_scale for the teacher ...")
    fake_guidance_scale: Optional[float] = setting(None, "... and enables CFG for the critic's prediction")
    score_timestep_shift: float = setting(5.0, "shift of the timesteps drawn for the DMD / SiD / critic losses")
    ts_schedule: bool = setting(False, "restrict score timesteps below the rollout's exit step")
    ts_schedule_max: bool = setting(False, "... and above the exit step's upper end")
    min_score_timestep: int = setting(0, "lowest integer score timestep drawn")
    sid: SiDSection = section(SiDSection, "SiD (distribution_loss: sid)")
    gan: GANSection = section(GANSection, "GAN (trainer: gan): discriminator heads on the critic trunk")


@dataclass
class PretrainingSection:
    causal: bool = setting(True, "trainer diffusion: false pre-trains a bidirectional teacher")
    teacher_forcing: bool = setting(False, "trainer diffusion, causal: clean context (teacher forcing) or noisy "
                                    "(diffusion forcing)")
    noise_augmentation_max_timestep: int = setting(0, "teacher forcing: clean context noised up to this timestep")
    text_dropout: float = setting(0.0, "diffusion training: this fraction of prompts is replaced by the negative "
                                  "prompt, so the model learns the unconditional branch that CFG subtracts")
    frame_causal_fraction: float = setting(0.0, "bidirectional diffusion training: this fraction of steps attends "
                                           "frame-causally, which teaches the model an arrow of time "
                                           "(trainer/diffusion.py says why)")


@dataclass
class OptimiserSection:
    lr: float = setting(2.0e-6, "generator AdamW learning rate")
    lr_critic: Optional[float] = setting(None, "critic learning rate (null: lr)")
    beta1: float = setting(0.0, "generator AdamW beta1")
    beta2: float = setting(0.999, "generator AdamW beta2")
    beta1_critic: float = setting(0.0, "critic AdamW beta1")
    beta2_critic: float = setting(0.999, "critic AdamW beta2")
    weight_decay: float = setting(0.01, "AdamW weight decay (generator and critic)")
    max_grad_norm_generator: float = setting(10.0, "generator gradient clipping norm")
    max_grad_norm_critic: float = setting(10.0, "critic gradient clipping norm")
    lr_warmup_steps: int = setting(0, "linear learning-rate warm-up")
    batch_size: int = setting(1, "per GPU")
    total_batch_size: Optional[int] = setting(None, "gradient accumulation up to this global batch (null: "
                                              "batch_size x GPUs)")
    max_steps: int = setting(600, "training steps (critic updates for score distillation); 0: save initial weights")
    time_limit_s: float = setting(0.0, "stop (and checkpoint) after this many seconds of training; 0: no limit")
    ema_weight: float = setting(0.0, "generator EMA decay (0 disables EMA)")
    ema_start_step: int = setting(0, "step at which EMA starts from the current weights")
    max_nonfinite_steps: int = setting(5, "abort after this many consecutive NaN/inf losses (each is skipped)")


@dataclass
class ComputeSection:
    mixed_precision: bool = setting(True, "bf16 parameters/compute, fp32 reductions and master weights")
    gradient_checkpointing: bool = setting(True, "recompute transformer blocks in backward")
    checkpoint_keeps_attention: bool = setting(True, "... except the generator's and critic's self-attention "
                                               "kernels, whose outputs are kept (same gradients; ~0.1 GB per layer "
                                               "of a 480x832 clip)")
    sharding_strategy: ShardingStrategy = setting("full", "FSDP: full | hybrid_full | hybrid_zero2 | no_shard (one "
                                                  "process: no FSDP, fp32)")
    cpu_offload: bool = setting(False, "FSDP parameter offload to CPU")
    text_encoder_cpu_offload: bool = setting(False, "keep UMT5 on the CPU: saves ~11 GB of GPU memory, but in "
                                             "training every batch's prompts are encoded on the host (~5 s a step "
                                             "for UMT5-XXL on 16 cores)")
    prompt_cache_size: int = setting(0, "training: keep this many prompt embeddings instead of re-encoding (Wan: "
                                     "4 MB each)")
    compile: bool = setting(False, "torch.compile the DiT (inference: the generator's layer pieces, on by default on "
                            "CUDA, pipeline/levers.py; training: every block; warm-up once)")
    gc_interval: int = setting(100, "training steps between gc.collect() calls (0: never)")


@dataclass
class DataSection:
    data_path: Optional[str] = setting(None, "training prompts (one per line)")
    extended_prompt_path: Optional[str] = setting(None, "optional longer prompts, line by line with data_path")
    ode_data_path: Optional[str] = setting(None, "ODE-pair shards (scripts/generate_ode_pairs.py): trainer ode's "
                                           "pairs, and the clean latents of GAN, CausVid and diffusion training")
    negative_prompt: str = setting("", "unconditional branch of CFG (the Wan negative prompt in the recipes)")
    i2v: bool = setting(False, "image-to-video distillation: the first clean latent frame of the data starts each "
                        "rollout (needs rollout.independent_first_frame) / enters CausVid and ODE regression clean")
    shapes_short_prompt_fraction: float = setting(0.0, "shapes world: fraction of training prompts (and ODE-pair "
                                                  "prompts) in a short form that leaves out size and/or speed; the "
                                                  "scene still has them, drawn at random (shapes/world.py OMISSIONS)")


@dataclass
class CheckpointingSection:
    interval: int = setting(50, "checkpoint every this many steps")
    keep: int = setting(3, "newest checkpoint folders kept in the logdir (0: keep all)")
    no_save: bool = setting(False, "write no checkpoints (train.py --no_save)")


@dataclass
class LoggingSection:
    logdir: str = setting("", "the run's folder (train.py --logdir; empty: logs/<config name>)")
    config_name: str = setting("", "the run's name (empty: the config file's stem)")
    log_every: int = setting(1, "scalar logging interval (steps)")
    sample_every: int = setting(0, "sample videos every N steps into <logdir>/samples/ (0: never)")
    sample_prompts: list[str] = setting([], "prompts of those samples (empty: a built-in prompt or two)")
    no_visualize: bool = setting(False, "draw no samples and load no decoder for them (train.py --no_visualize)")
    disable_wandb: bool = setting(False, "log to files only (train.py --disable-wandb)")
    wandb_host: Optional[str] = setting(None, "wandb server (set: log online)")
    wandb_key: Optional[str] = setting(None, "wandb API key (set: log online; redacted in stored configs)")
    wandb_entity: Optional[str] = setting(None, "wandb entity")
    wandb_project: Optional[str] = setting(None, "wandb project")
    wandb_save_dir: str = setting("", "wandb's local folder (empty: the logdir)")


@dataclass
class InferenceSection:
    height: int = setting(480, "pixels, multiple of 16 (the shapes world also renders its training clips at it)")
    width: int = setting(832, "pixels, multiple of 16")
    fps: int = setting(16, "frames per second of written videos")
    decoder: Decoder = setting("wan", "wan | taehv | pixel (the shapes-world codec): latent-to-pixel decoder")
    taehv_path: Optional[str] = setting(None, "TAEHV weights (taew2_1.pth) when decoder is taehv")
    cuda_graphs: bool = setting(False, "on CUDA: one CUDA graph per KV-cache plan, replayed (CUDA default: on)")
    attention_backend: AttentionBackend = setting("auto", "auto (on CUDA the fastest, timed at start-up; else "
                                                  "flash-attn if installed, else SDPA's choice) | a fixed one "
                                                  "(benchmarks/speed.py times them; *_halves: keys in two halves, "
                                                  "faster at batch 1)")


@dataclass
class Config:
    trainer: Trainer = setting("score_distillation", "score_distillation | gan | ode | diffusion")
    seed: int = setting(0, "0: a random seed drawn on rank 0 and broadcast")
    model: ModelSection = section(ModelSection, "networks and the files they come from")
    rollout: RolloutSection = section(RolloutSection, "the causal generator's block-wise rollout (training and "
                                      "inference)")
    distillation: DistillationSection = section(DistillationSection, "distribution matching against the teacher "
                                                "(DMD, SiD, CausVid) and the GAN loss")
    pretraining: PretrainingSection = section(PretrainingSection, "diffusion pre-training (teacher, teacher "
                                              "forcing, diffusion forcing)")
    optimiser: OptimiserSection = section(OptimiserSection, "AdamW, batch, steps, EMA")
    compute: ComputeSection = section(ComputeSection, "precision, sharding, memory and compilation")
    data: DataSection = section(DataSection, "prompts and latent data")
    checkpointing: CheckpointingSection = section(CheckpointingSection, "checkpoints in the logdir")
    logging: LoggingSection = section(LoggingSection, "the run folder, scalars, samples, wandb")
    inference: InferenceSection = section(InferenceSection, "video size, decoder and inference speed levers")
