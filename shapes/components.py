"""The shapes world's networks and data, built by code: the miniature world the whole recipe runs in.

Networks: Wan-architecture DiTs of `model.dit_config` size (latent channels from the pixel-unshuffle codec), a frozen
small UMT5 text encoder with a word tokenizer over the world's vocabulary (created once per recipe run by
`write_text_encoder` and then read from `model.text_encoder_path`, so every stage conditions on the same encoder), and
the parameter-free codec. Data: videos rendered on the fly and encoded to latents, or ODE pairs for `trainer: ode`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch

from model.config import WanConfig
from model.pixel_codec import PixelShuffleCodec
from model.wan import WanDiT
from pipeline.denoiser import Denoiser
from pipeline.loading.checkpoint import load_dit_state_dict, load_state_dict_strict
from pipeline.schedule import FlowMatchSchedule
from trainer.base import Models, frozen
from utils.errors import InputError, MissingFileError, reading


def shapes_codec(cfg: Any) -> PixelShuffleCodec:
    return PixelShuffleCodec(spatial_factor=cfg.model.codec_spatial_factor)


def shapes_wan_config(cfg: Any) -> WanConfig:
    if not cfg.model.dit_config:
        raise InputError("model.world: shapes needs model.dit_config (the DiT size, WanConfig fields) in the config")
    channels = shapes_codec(cfg).latent_channels
    return WanConfig(**{**dict(cfg.model.dit_config), "in_dim": channels, "out_dim": channels})


def write_text_encoder(folder: str | Path, *, dim: int, text_len: int, seed: int = 0) -> Path:
    """Create `folder/text_encoder` + `folder/tokenizer`: a frozen UMT5 over the world's vocabulary, random weights
    except for its attention pattern (`_local_context_attention`)."""
    from transformers import UMT5Config, UMT5EncoderModel

    from model.text_encoder import build_word_tokenizer
    from shapes import vocabulary
    folder = Path(folder)
    tokenizer = build_word_tokenizer(vocabulary())
    torch.manual_seed(seed)
    config = UMT5Config(vocab_size=len(tokenizer), d_model=dim, d_kv=32, d_ff=2 * dim, num_layers=2,
                        num_heads=max(2, dim // 32), relative_attention_num_buckets=16,
                        feed_forward_proj="gated-gelu", dropout_rate=0.0)
    encoder = UMT5EncoderModel(config).eval()
    _local_context_attention(encoder)
    encoder.save_pretrained(folder / "text_encoder")
    tokenizer.save_pretrained(folder / "tokenizer")
    return folder


@torch.no_grad()
def _local_context_attention(encoder) -> None:
    """Make every self-attention layer a fixed look at the neighbouring words: half the heads at the previous ones,
    half at the next ones (relative-position bias only; queries zeroed so content plays no part).

    Why: a UMT5 with random weights barely mixes its tokens, so its output is a bag of words, and "a magenta circle
    on a white background" cannot say which colour is the background's (a teacher trained on one drew muted
    magenta-white mixtures and could not bind colours to shapes). With the neighbours mixed in, the token
    "background" carries its colour and "circle" its colour and size, as a trained encoder's tokens would.
    """
    config = encoder.config
    half = config.relative_attention_num_buckets // 2   # encoder buckets: 0..half-1 look back, half.. look ahead
    for block in encoder.encoder.block:
        attention = block.layer[0].SelfAttention
        attention.q.weight.zero_()
        bias = torch.full((config.relative_attention_num_buckets, config.num_heads), -20.0)
        for head in range(config.num_heads):
            one, two = (1, 2) if head % 2 == 0 else (half + 1, half + 2)   # distance 1 and 2 behind / ahead
            bias[one, head], bias[two, head], bias[0, head] = 0.0, -1.0, -2.0
        attention.relative_attention_bias.weight.copy_(bias)


def load_shapes_text(cfg: Any, text_len: int, device: torch.device | str = "cpu"):
    from model.text_encoder import TextEncoder
    from trainer.builders import PromptEncoder
    if not cfg.model.text_encoder_path:
        raise InputError("model.world: shapes needs model.text_encoder_path (a folder with text_encoder/ and "
                         "tokenizer/; scripts/shapes_world.py creates it)")
    with reading(f"text_encoder_path {cfg.model.text_encoder_path}"):
        encoder = TextEncoder.from_diffusers_folder(cfg.model.text_encoder_path, text_len=text_len, device=device)
    return PromptEncoder(encoder, cfg.data.negative_prompt, device=device, cache_size=cfg.compute.prompt_cache_size)


def shapes_dit(cfg: Any, checkpoint: Optional[str], *, use_ema: bool = False) -> WanDiT:
    """A DiT of the configured size: weights from `checkpoint` when given, else the original initialisation."""
    wan_config = shapes_wan_config(cfg)
    model = WanDiT(wan_config)
    if checkpoint:
        if not Path(checkpoint).exists():
            raise MissingFileError(f"checkpoint {checkpoint} does not exist")
        state, _ = load_dit_state_dict(checkpoint, use_ema=use_ema)
        with reading(f"checkpoint {checkpoint}"):
            load_state_dict_strict(model, state, str(checkpoint))
    else:
        torch.manual_seed(cfg.seed or 0)
        model.init_weights()
    return model


def build_shapes_models(cfg: Any) -> Models:
    """The recipe's bundle: generator (causal unless `causal: false`), teacher and critic as the trainer needs."""
    from trainer.builders import needed_networks
    schedule = FlowMatchSchedule(cfg.rollout.generator_shift, cfg.model.num_train_timestep)
    generator_net = shapes_dit(cfg, cfg.model.generator_ckpt, use_ema=cfg.model.generator_ckpt_ema)
    bidirectional = cfg.trainer == "diffusion" and not cfg.pretraining.causal
    generator = Denoiser(generator_net, schedule, uniform_timestep=bidirectional)
    want_teacher, want_critic = needed_networks(cfg)
    teacher = critic = None
    score_schedule = FlowMatchSchedule(cfg.model.score_network_shift, cfg.model.num_train_timestep)
    if want_teacher:
        if not cfg.model.real_score_ckpt:
            raise InputError("this recipe needs a teacher: set model.real_score_ckpt (the pretrained shapes teacher)")
        teacher = Denoiser(frozen(shapes_dit(cfg, cfg.model.real_score_ckpt)), score_schedule, uniform_timestep=True)
    if want_critic:
        init = cfg.model.fake_score_ckpt or cfg.model.real_score_ckpt
        critic = Denoiser(shapes_dit(cfg, init).requires_grad_(True), score_schedule, uniform_timestep=True)
    text = load_shapes_text(cfg, generator_net.config.text_len)
    return Models(generator=generator, text=text, teacher=teacher, critic=critic, codec=shapes_codec(cfg))


class ShapesBatches:
    """Endless batches of rendered world videos encoded to latents: {"prompts", "latents" [B, F, C, h, w]}.

    Each rank draws its own scenes from a generator seeded by (seed, rank); its state is the resume position.
    """

    def __init__(self, cfg: Any, rank: int = 0, world_size: int = 1, seed: int = 0,
                 device: torch.device | str | None = None):
        from shapes import ShapesWorldDataset
        self.codec = shapes_codec(cfg)
        frames = cfg.rollout.image_or_video_shape[1]
        self.dataset = ShapesWorldDataset(frames, cfg.inference.height, cfg.inference.width, split="train", seed=seed,
                                          device=device, short_fraction=cfg.data.shapes_short_prompt_fraction)
        self.batch_size = cfg.optimiser.batch_size
        self.generator = torch.Generator().manual_seed(int(seed) * 1_000_003 + rank)
        self.switch_prompts = cfg.rollout.prompt_switch_prob > 0

    def __iter__(self) -> "ShapesBatches":
        return self

    def __next__(self) -> dict[str, Any]:
        batch = self.dataset.batch(self.batch_size, self.generator)
        out = {"prompts": batch["prompts"], "latents": self.codec.encode_to_latent(batch["video"])}
        if self.switch_prompts:
            # Prompt switches of long rollouts: the prompts of scenes drawn after the batch's own.
            from shapes.prompts import short_prompt
            from shapes.world import sample_scenes
            scenes = sample_scenes(self.batch_size, self.generator, self.dataset.split, self.dataset.num_shapes,
                                   self.dataset.short_fraction)
            out["switch_prompts"] = [short_prompt(scene) for scene in scenes]
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"rng": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["rng"])


def shapes_data(cfg: Any, rank: int = 0, world_size: int = 1, seed: int = 0) -> ShapesBatches:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return ShapesBatches(cfg, rank, world_size, seed, device=device)
