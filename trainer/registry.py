"""Which algorithm a config asks for (docs/training.md): `trainer` picks the family, `distribution_loss` the score-
distillation variant."""
from __future__ import annotations

import inspect

from trainer.base import Algorithm, Models
from utils.errors import InputError

SCORE_DISTILLATION = ("dmd", "sid", "causvid")
TRAINERS = ("score_distillation", "gan", "ode", "diffusion")


def algorithm_class(trainer: str, distribution_loss: str = "dmd") -> type:
    """The algorithm class for `trainer` (and `distribution_loss` under score_distillation)."""
    if trainer == "score_distillation":
        if distribution_loss == "dmd":
            from trainer.dmd import DMD
            return DMD
        if distribution_loss == "sid":
            from trainer.sid import SiD
            return SiD
        if distribution_loss == "causvid":
            from trainer.causvid import CausVid
            return CausVid
        raise InputError(f"distribution_loss = {distribution_loss!r} is not one of {list(SCORE_DISTILLATION)}")
    if trainer == "gan":
        from trainer.gan import GAN
        return GAN
    if trainer == "ode":
        from trainer.ode import ODERegression
        return ODERegression
    if trainer == "diffusion":
        from trainer.diffusion import Diffusion
        return Diffusion
    raise InputError(f"trainer = {trainer!r} is not one of {list(TRAINERS)}")


def build_algorithm(cfg, models: Models) -> Algorithm:
    """The algorithm for `cfg.trainer` / `cfg.distillation.distribution_loss`, bound to the models."""
    cls = algorithm_class(cfg.trainer, cfg.distillation.distribution_loss)
    if "cache_dtype" in inspect.signature(cls).parameters:
        # Under FSDP mixed precision the stored parameters stay fp32 while K/V are computed in bf16.
        return cls(cfg, models, cache_dtype=models.extra.get("compute_dtype"))
    return cls(cfg, models)
