"""What the training loop needs from an algorithm, and the bundle of models an algorithm works with.

An algorithm (`trainer/dmd.py`, `sid.py`, `gan.py`, `ode.py`, `diffusion.py`, `causvid.py`) is a pair of loss
functions. The loop (`trainer/loop.py`) owns everything else: steps, the generator/critic alternation, optimizers,
accumulation, clipping, EMA, checkpoints, logging, distribution.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Protocol

from torch import Tensor, nn

from pipeline.denoiser import Denoiser

Batch = dict[str, Any]  # {"prompts": list[str], optional "latents" [B,F,C,H,W], "ode_latent" [B,K,F,C,H,W], ...}
Logs = dict[str, float]


class TextConditioner(Protocol):
    """Prompt embeddings for a batch of prompts, `[B, L, text_dim]`; the negative prompt cached per batch size."""

    def __call__(self, prompts: list[str]) -> Tensor: ...

    def negative(self, batch_size: int) -> Tensor: ...


@dataclass
class Models:
    """The networks of a recipe. `generator` is always trained; `critic` (fake score / discriminator trunk) is trained
    by algorithms that have one; `teacher` (real score) is frozen. Each comes with its own schedule via `Denoiser`."""

    generator: Denoiser
    text: TextConditioner
    teacher: Optional[Denoiser] = None
    critic: Optional[Denoiser] = None
    discriminator_heads: Optional[nn.Module] = None  # GAN heads on the critic trunk
    codec: Any = None  # latent codec (Wan VAE or the shapes-world codec), for the >21-frame window rule and samples
    extra: dict[str, Any] = field(default_factory=dict)


class Algorithm(Protocol):
    """A training recipe as losses. `has_critic` decides whether the loop alternates."""

    models: Models
    has_critic: bool

    def generator_loss(self, batch: Batch, step: int) -> tuple[Tensor, Logs]:
        """Scalar loss whose gradient trains the generator (and nothing else)."""

    def critic_loss(self, batch: Batch, step: int) -> tuple[Tensor, Logs]:
        """Scalar loss whose gradient trains the critic (and discriminator heads); only if `has_critic`."""

    def trainable_parameters(self) -> dict[str, list[nn.Parameter]]:
        """{"generator": [...], "critic": [...]} (critic only if has_critic)."""


def frozen(module: nn.Module) -> nn.Module:
    """Eval mode and no gradients: the teacher, the text encoder and the codec never train."""
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


AlgorithmFactory = Callable[[Any, Models], Algorithm]  # (Config, Models) -> Algorithm
