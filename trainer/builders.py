"""Build the `Models` bundle of a training recipe from a config: real Wan components from disk.

    <model_root>/<model.generator_name>/      generator architecture (+ weights unless generator_ckpt is given),
                                              text encoder (models_t5_umt5-xxl-enc-bf16.pth + google/umt5-xxl/)
                                              and VAE (Wan2.1_VAE.pth)
    <model_root>/<model.real_name>/           teacher (real score), frozen
    <model_root>/<model.fake_name>/           critic (fake score)
    model.generator_ckpt                      generator weights (Self-Forcing .pt, safetensors, our checkpoints)

Which networks a recipe needs follows the trainer (teacher and critic for score distillation, critic for GAN,
the generator alone for ODE regression and diffusion). LoRA adapters are injected here, before sharding.
Tests and the shapes world pass their own bundle to `train.main(models=...)` instead.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor

from model.prompt_cache import PromptEmbeddingCache
from pipeline.denoiser import Denoiser
from pipeline.schedule import FlowMatchSchedule
from trainer.base import Models, frozen
from utils.errors import MissingFileError
from utils.lora import apply_lora

class PromptEncoder:
    """The `TextConditioner` of a run: prompts -> `[B, text_len, text_dim]` on `device`; the negative prompt is
    encoded once and cached per batch size (the original cached it regardless of batch size).

    `cache_size` > 0 keeps that many prompt embeddings (least recently used dropped first): the encoder is frozen and
    each prompt is encoded on its own padded row, so a cached embedding is the one a new encoding would give. Data-free
    distillation over a prompt file and the shapes world see the same prompts again and again; re-encoding them every
    step (as the original does) is pure overhead. Each entry costs `text_len x text_dim` values on `device`."""

    def __init__(self, encoder: Any, negative_prompt: str, device: torch.device | str | None = None,
                 cache_size: int = 0):
        self.encoder = encoder
        self.negative_prompt = negative_prompt
        self.device = device
        self.cache_size = int(cache_size)
        self._negative: dict[int, Tensor] = {}
        self._cache = PromptEmbeddingCache(self.cache_size)

    def place(self, device: torch.device | str, keep_on_cpu: bool = False) -> "PromptEncoder":
        """Embeddings are returned on `device`; the encoder runs there too unless `keep_on_cpu`."""
        if not keep_on_cpu:
            self.encoder.to(device)
        self.device = device
        self._negative.clear()
        self._cache.clear()
        return self

    def __call__(self, prompts: list[str]) -> Tensor:
        return self._cache(prompts, lambda missing: self.encoder.encode(missing, output_device=self.device))

    def negative(self, batch_size: int) -> Tensor:
        if batch_size not in self._negative:
            one = self.encoder.encode([self.negative_prompt], output_device=self.device)
            self._negative[batch_size] = one.expand(batch_size, *one.shape[1:]).contiguous()
        return self._negative[batch_size]


def needed_networks(cfg: Any) -> tuple[bool, bool]:
    """(teacher, critic) for the configured trainer."""
    if cfg.trainer == "score_distillation":
        return True, True
    if cfg.trainer == "gan":
        return False, True
    return False, False


def _generator_is_bidirectional(cfg: Any) -> bool:
    return cfg.trainer == "diffusion" and not cfg.pretraining.causal


def codec_needed(cfg: Any) -> bool:
    """Whether a recipe needs its video codec: samples are drawn, or the rollout is longer than the loss window (the
    window's first frame is the last pixel frame before it, re-encoded)."""
    longest = max(cfg.rollout.num_training_frames, cfg.rollout.rollout_frames)
    samples = not cfg.logging.no_visualize and cfg.logging.sample_every > 0
    return samples or longest > cfg.rollout.image_or_video_shape[1]


def build_models(cfg: Any, *, load_text: bool = True, load_codec: Optional[bool] = None) -> Models:
    """The recipe's networks on the CPU (`utils.distributed.parallelize_models` moves and shards them).

    Teacher weights are held in bf16 when `mixed_precision` (frozen: no fp32 master copy needed); trained networks
    in fp32 (master weights). `load_codec` default: `codec_needed(cfg)`.
    `world: shapes` builds the miniature world's networks by code instead (shapes/components.py, chosen by
    train.py: the core never imports the world built on top of it).
    """
    if cfg.model.world != "wan":
        raise ValueError(f"build_models builds the networks of world 'wan', not {cfg.model.world!r}")
    from pipeline.loading.wan_components import load_wan_dit, load_wan_text_encoder, load_wan_vae, model_dir

    root = Path(cfg.model.model_root)
    if not root.is_dir():
        names = dict.fromkeys((cfg.model.generator_name, cfg.model.real_name, cfg.model.fake_name))  # each once
        raise MissingFileError(f"model_root {root} does not exist (config key model.model_root; expected a folder with "
                                + ", ".join(f"{name}/" for name in names) + ")")
    gen_dir = model_dir(root, cfg.model.generator_name)
    ckpt = cfg.model.generator_ckpt
    if ckpt and not Path(ckpt).exists():
        raise MissingFileError(f"model.generator_ckpt {ckpt} does not exist")
    generator_net = load_wan_dit(gen_dir, checkpoint=ckpt or None, use_ema=cfg.model.generator_ckpt_ema)
    if cfg.model.lora_rank > 0:
        apply_lora(generator_net, cfg.model.lora_rank, cfg.model.lora_alpha)
    generator = Denoiser(generator_net, FlowMatchSchedule(cfg.rollout.generator_shift, cfg.model.num_train_timestep),
                         uniform_timestep=_generator_is_bidirectional(cfg))
    want_teacher, want_critic = needed_networks(cfg)
    teacher = critic = None
    score_schedule = FlowMatchSchedule(cfg.model.score_network_shift, cfg.model.num_train_timestep)
    if want_teacher:
        dtype = torch.bfloat16 if cfg.compute.mixed_precision else torch.float32
        net = frozen(load_wan_dit(model_dir(root, cfg.model.real_name), dtype=dtype))
        teacher = Denoiser(net, score_schedule, uniform_timestep=True)
    if want_critic:
        net = load_wan_dit(model_dir(root, cfg.model.fake_name)).requires_grad_(True)
        critic = Denoiser(net, score_schedule, uniform_timestep=True)
    text: Any = None
    if load_text:
        encoder = load_wan_text_encoder(gen_dir, text_len=generator_net.config.text_len)
        text = PromptEncoder(encoder, cfg.data.negative_prompt, cache_size=cfg.compute.prompt_cache_size)
    if load_codec is None:
        load_codec = codec_needed(cfg)
    codec = frozen(load_wan_vae(gen_dir)) if load_codec else None
    return Models(generator=generator, text=text, teacher=teacher, critic=critic, codec=codec)


def prepare_injected_models(models: Models, cfg: Any) -> Models:
    """Apply the config's LoRA to a bundle built elsewhere (tests, the shapes world), as `build_models` does."""
    net = models.generator.model
    if cfg.model.lora_rank > 0 and not any(".lora_" in n for n, _ in net.named_parameters()):
        apply_lora(net, cfg.model.lora_rank, cfg.model.lora_alpha)
    return models
