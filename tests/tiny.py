"""Tiny configurations shared by the CPU tests (one place, so every test agrees on them)."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from model.config import WanConfig
from model.wan import WanDiT


def tiny_config(**overrides) -> WanConfig:
    base = dict(dim=32, ffn_dim=64, num_heads=2, num_layers=2, text_dim=16, freq_dim=16, text_len=8,
                in_dim=4, out_dim=4)
    base.update(overrides)
    return WanConfig(**base)


def tiny_model(seed: int = 0, **overrides) -> WanDiT:
    torch.manual_seed(seed)
    model = WanDiT(tiny_config(**overrides))
    with torch.no_grad():  # the original zero-initialises nothing we rely on; make every parameter non-trivial
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def tiny_inputs(model: WanDiT, batch: int = 2, frames: int = 6, height: int = 4, width: int = 6, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    x = torch.randn(batch, frames, cfg.in_dim, height, width, generator=g)
    context = torch.randn(batch, cfg.text_len - 2, cfg.text_dim, generator=g)
    return x, context


@dataclass
class ModeCall:
    """One recorded call of a `WanDiT` mode: the method's name, its arguments, whether gradients were on."""

    mode: str
    args: tuple
    kwargs: dict
    grad_enabled: bool


@contextlib.contextmanager
def recorded_calls(model, modes=("forward", "forward_teacher_forcing", "forward_cached", "write_cache",
                                 "features")):
    """Record every call of the model's `modes` methods (in order) as `ModeCall`s, while the block runs."""
    calls: list[ModeCall] = []

    def recorder(mode, method):
        def record(*args, **kwargs):
            calls.append(ModeCall(mode, args, kwargs, torch.is_grad_enabled()))
            return method(*args, **kwargs)
        return record

    for mode in modes:
        object.__setattr__(model, mode, recorder(mode, getattr(model, mode)))
    try:
        yield calls
    finally:
        for mode in modes:
            object.__delattr__(model, mode)


WORDS = ("a an the large small red green blue yellow white black circle square triangle moves left right up down "
         "diagonally and on background cat dog jumps").split()


def tiny_text_encoder(dim: int = 16, text_len: int = 16, seed: int = 0):
    """A frozen random UMT5 encoder with a word tokenizer built in code (no download)."""
    from transformers import UMT5Config, UMT5EncoderModel

    from model.text_encoder import TextEncoder, build_word_tokenizer
    tokenizer = build_word_tokenizer(WORDS)
    torch.manual_seed(seed)
    config = UMT5Config(vocab_size=len(tokenizer), d_model=dim, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                        relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", dropout_rate=0.0)
    return TextEncoder(tokenizer, UMT5EncoderModel(config), text_len=text_len)


def tiny_causal_settings(**overrides) -> dict:
    """The `causal` block of a tiny model folder (Config keys)."""
    settings = {"denoising_step_list": [1000, 750, 500], "warp_denoising_step": True, "num_frame_per_block": 2,
                "independent_first_frame": False, "context_noise": 0.0, "negative_prompt": "", "height": 32,
                "width": 48, "fps": 8, "decoder": "pixel",
                "model_kwargs": {"timestep_shift": 5.0, "local_attn_size": -1, "sink_size": 0, "rope": "absolute"},
                "image_or_video_shape": [1, 6, 12, 16, 24]}
    settings.update(overrides)
    return settings


def save_tiny_model_folder(folder, seed: int = 0, **causal_overrides):
    """A complete exported model folder with random tiny weights and the pixel-shuffle codec (12 latent channels)."""
    from model.pixel_codec import PixelShuffleCodec
    from pipeline.loading.model_folder import save_model_folder
    codec = PixelShuffleCodec(spatial_factor=2)
    model = tiny_model(seed, in_dim=codec.latent_channels, out_dim=codec.latent_channels, text_len=16)
    text = tiny_text_encoder(dim=model.config.text_dim, text_len=16, seed=seed)
    return save_model_folder(folder, transformer=model, wan_config=model.config,
                             causal=tiny_causal_settings(**causal_overrides), text_encoder=text.encoder,
                             tokenizer=text.tokenizer, codec=codec)


class TinyText:
    """Stand-in for the text conditioner of `trainer.base.Models`: each prompt maps to a fixed random embedding
    `[L, text_dim]` (seeded by the prompt's characters), the negative prompt to another."""

    def __init__(self, text_dim: int = 16, length: int = 6, seed: int = 0):
        self.text_dim, self.length, self.seed = text_dim, length, seed

    def _embed(self, prompt: str) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + sum((i + 1) * ord(c) for i, c in enumerate(prompt)))
        return torch.randn(self.length, self.text_dim, generator=g)

    def __call__(self, prompts: list[str]) -> torch.Tensor:
        return torch.stack([self._embed(p) for p in prompts])

    def negative(self, batch_size: int) -> torch.Tensor:
        return self._embed("<negative>").expand(batch_size, -1, -1).clone()


def tiny_train_config(**overrides):
    """A training `Config` for tiny models: latents [B, 6, 4, 4, 6], 2-frame blocks, 4 warped steps."""
    from utils.config import unchecked_config
    base = dict(image_or_video_shape=[1, 6, 4, 4, 6], num_training_frames=6, num_frame_per_block=2,
                denoising_step_list=[1000, 750, 500, 250], warp_denoising_step=True, seed=0,
                gradient_checkpointing=False, model_kwargs={"timestep_shift": 5.0})
    base.update(overrides)
    return unchecked_config(base)


def tiny_models(cfg=None, *, seed: int = 0, codec=None, teacher: bool = True, critic: bool = True, **model_overrides):
    """A `Models` bundle of tiny DiTs: causal generator and frozen teacher and critic (shifts from cfg, else 5
    and 8; one timestep per sample for the score networks, as the original's wrappers), `TinyText`."""
    from pipeline.denoiser import Denoiser
    from pipeline.schedule import FlowMatchSchedule
    from trainer.base import Models, frozen
    shift = cfg.rollout.generator_shift if cfg is not None else 5.0
    score_schedule = FlowMatchSchedule(cfg.model.score_network_shift if cfg is not None else 8.0)
    generator = Denoiser(tiny_model(seed, **model_overrides), FlowMatchSchedule(shift))
    text = TinyText(tiny_config(**model_overrides).text_dim)
    models = Models(generator=generator, text=text, codec=codec)
    if teacher:
        models.teacher = Denoiser(frozen(tiny_model(seed + 1, **model_overrides)), score_schedule,
                                  uniform_timestep=True)
    if critic:
        models.critic = Denoiser(tiny_model(seed + 2, **model_overrides), score_schedule,
                                 uniform_timestep=True)
    return models


def assert_window_gradients(out, generator: torch.nn.Module, masked_frames: int) -> None:
    """A rollout longer than its loss window: the window's first `masked_frames` frames are masked out of the loss,
    its re-encoded first frame has no path back to the generator, and the frames after it have one."""
    assert out.gradient_mask is not None
    assert not out.gradient_mask[:, :masked_frames].any() and out.gradient_mask[:, masked_frames:].all()
    params = list(generator.parameters())
    first = torch.autograd.grad(out.latents[:, 0].sum(), params, allow_unused=True, retain_graph=True)
    assert all(g is None or not g.any() for g in first)
    later = torch.autograd.grad(out.latents[:, 1:].sum(), params, allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in later)


# The tiny DMD recipe that train.py runs end to end in tests (original flat keys, as the recipes in configs/ write).
TINY_RECIPE = dict(trainer="score_distillation", distribution_loss="dmd", image_or_video_shape=[1, 6, 4, 4, 6],
                   num_training_frames=6, num_frame_per_block=2, warp_denoising_step=True,
                   gradient_checkpointing=False, mixed_precision=False, dfake_gen_update_ratio=2)


def tiny_recipe_yaml(**overrides) -> str:
    """`TINY_RECIPE` with `overrides`, as the text of a config file."""
    import yaml
    return yaml.safe_dump({**TINY_RECIPE, **overrides}, sort_keys=False)

