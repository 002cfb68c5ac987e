"""The one training loop: steps, the generator/critic alternation, AdamW, accumulation, clipping, warm-up, EMA,
non-finite guards, logging and checkpoints with exact resume. Algorithms only supply the two losses (`trainer/base.py`).

Step semantics (docs/method.md, "Update schedule"): the step counter counts loop iterations. With a critic, the
generator is updated when `step % dfake_gen_update_ratio == 0`, before that step's critic update; the critic is
updated every step. Without a critic the generator is updated every step. Each update draws its own batches from
the data iterator (the original fetches another prompt batch for the critic).
"""
from __future__ import annotations

import gc
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from trainer import train_state as ts
from trainer.base import Algorithm, Logs
from trainer.ema import EMA, trainable_named_parameters
from trainer.train_state import CheckpointIO
from utils.distributed import (DistState, all_finite, all_gather_object, any_rank, barrier, clip_grad_norm,
                               full_optimizer_state_dict, load_full_optimizer_state_dict, mean_over_ranks,
                               rng_state, seed_everything, set_rng_state)
from utils.errors import InputError, InputKeyError
from utils.logging import RunLogger, warn


class NonFiniteLossError(RuntimeError):
    """Too many consecutive updates with a NaN/inf loss or gradient norm."""


def micro_steps_for(cfg: Any, world_size: int) -> int:
    """Micro-batches per update so that batch_size * world_size * micro = total_batch_size (null: 1)."""
    settings = cfg.optimiser
    per_pass = settings.batch_size * world_size
    if settings.total_batch_size is None:
        return 1
    if settings.total_batch_size < per_pass or settings.total_batch_size % per_pass:
        raise InputError(f"optimiser.total_batch_size {settings.total_batch_size} must be a positive multiple of "
                         f"batch_size x world size = {settings.batch_size} x {world_size} = {per_pass}")
    return settings.total_batch_size // per_pass


class Trainer:
    """Runs `algorithm` on batches from `data` until `optimiser.max_steps`. Models must already be on their device and
    sharded (`utils.distributed.parallelize_models`) before the algorithm collected its parameters.

    `seed`: the resolved run seed (identical on all ranks); per-rank RNGs are seeded with seed + rank here, and
    `shared_generator` (seeded with `seed` on every rank) is handed to the algorithm for choices that must agree
    across ranks (exit steps): see `_share_generator`; also `models.extra["shared_generator"]`.

    Optional algorithm hooks: `set_shared_generator(g)`; `critic_param_groups(step)` + `critic_phase(step)` (critic
    AdamW groups; a new optimizer when the phase changes, e.g. GAN discriminator warm-up); `state_dict()` /
    `load_state_dict()` for algorithm state that a resume must restore.
    """

    def __init__(self, cfg: Any, algorithm: Algorithm, data: Any, *, dist: DistState | None = None,
                 logdir: str | Path | None = None, seed: int | None = None, logger: RunLogger | None = None,
                 sample_fn: Optional[Callable[[int], None]] = None):
        self.cfg = cfg
        self.algorithm = algorithm
        self.data = data
        self.dist = dist or DistState()
        self.logdir = Path(logdir or cfg.logging.logdir or ".")
        self.seed = int(cfg.seed if seed is None else seed)
        self.logger = logger
        self.sample_fn = sample_fn
        self.step = 0
        self.nonfinite_run = 0
        self.micro_steps = micro_steps_for(cfg, self.dist.world_size)
        seed_everything(self.seed + self.dist.rank)
        self.shared_generator = torch.Generator().manual_seed(self.seed)
        models = algorithm.models
        models.extra["shared_generator"] = self.shared_generator
        _share_generator(algorithm, self.shared_generator)
        self.io = CheckpointIO(models, lora_rank=cfg.model.lora_rank, lora_alpha=cfg.model.lora_alpha)
        params = algorithm.trainable_parameters()
        self.roles = ["generator"] + (["critic"] if algorithm.has_critic else [])
        self.trainable: dict[str, list[nn.Parameter]] = {}
        for role in self.roles:
            if not params.get(role):
                raise ValueError(f"{type(algorithm).__name__}.trainable_parameters() has no {role!r} parameters")
            self.trainable[role] = list(params[role])
            self._check_owned(role, self.trainable[role])
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.params: dict[str, list[nn.Parameter]] = {}  # what each optimizer steps (and clipping covers)
        self._critic_phase = self._phase(0)
        for role in self.roles:
            self._build_optimizer(role, 0)
        self.ema: EMA | None = None
        if cfg.optimiser.ema_weight > 0:
            self.ema = EMA(cfg.optimiser.ema_weight, cfg.optimiser.ema_start_step)
        self._ema_params = trainable_named_parameters(self.io.module("generator"), self.trainable["generator"])
        self._last_save_step = -1
        self._cleaned = False
        self.last_logs: Logs = {}  # the last logged step's scalars, averaged over ranks

    # ------------------------------------------------------------------------------------------------ optimizers
    def _check_owned(self, role: str, params: list[nn.Parameter]) -> None:
        owned = {id(p) for p in self.io.module(role).parameters()}
        foreign = [p for p in params if id(p) not in owned]
        if foreign:
            raise ValueError(f"{len(foreign)} {role} parameter(s) from trainable_parameters() do not belong to the "
                             f"{role} network (or its discriminator heads); the loop cannot save or shard them")

    def _phase(self, step: int) -> str:
        hook = getattr(self.algorithm, "critic_phase", None)
        return hook(step) if (hook is not None and self.algorithm.has_critic) else "main"

    def _param_groups(self, role: str, step: int) -> list[dict[str, Any]]:
        """AdamW groups with `base_lr` (warm-up scales it). The critic's come from the algorithm's optional
        `critic_param_groups(step)` hook (`params`, `lr_scale`, optional `betas`), else critic trunk + heads."""
        cfg, settings = self.cfg, self.cfg.optimiser
        if role == "generator":
            return [{"params": self.trainable[role], "base_lr": settings.lr, "betas": (settings.beta1, settings.beta2)}]
        lr = settings.lr_critic if settings.lr_critic is not None else settings.lr
        betas = (settings.beta1_critic, settings.beta2_critic)
        hook = getattr(self.algorithm, "critic_param_groups", None)
        if hook is not None:
            return [{"params": list(g["params"]), "base_lr": lr * g.get("lr_scale", 1.0),
                     "betas": tuple(g.get("betas", betas))} for g in hook(step) if list(g["params"])]
        heads = self.algorithm.models.discriminator_heads
        head_ids = {id(p) for p in heads.parameters()} if heads is not None else set()
        params = self.trainable[role]
        groups = [{"params": [p for p in params if id(p) not in head_ids], "base_lr": lr, "betas": betas},
                  {"params": [p for p in params if id(p) in head_ids],
                   "base_lr": lr * cfg.distillation.gan.discriminator_lr_multiplier, "betas": betas}]
        return [g for g in groups if g["params"]]

    def _build_optimizer(self, role: str, step: int) -> None:
        groups = self._param_groups(role, step)
        for g in groups:
            g["lr"] = g["base_lr"]
        # foreach: one multi-tensor kernel per group instead of ~6 launches per parameter (the per-parameter loop
        # dominated the step time of small models on GPU).
        self.optimizers[role] = torch.optim.AdamW(groups, lr=groups[0]["lr"],
                                                  weight_decay=self.cfg.optimiser.weight_decay, foreach=True)
        self.params[role] = [p for g in groups for p in g["params"]]

    def _warmup_factor(self) -> float:
        warm = self.cfg.optimiser.lr_warmup_steps
        return min(1.0, (self.step + 1) / warm) if warm > 0 else 1.0

    # ------------------------------------------------------------------------------------------------- updates
    def _update(self, role: str, loss_fn: Callable[[Any, int], tuple[Tensor, Logs]]) -> Logs:
        """One optimizer update of `role` over `micro_steps` micro-batches; {} when skipped (non-finite)."""
        opt, params = self.optimizers[role], self.params[role]
        self._zero_grad(role)
        total_loss, sums = 0.0, {}
        autocast = self.algorithm.models.extra.get("autocast_dtype")
        for _ in range(self.micro_steps):
            with torch.autocast(self.dist.device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
                loss, logs = loss_fn(next(self.data), self.step)
            if any_rank(not bool(torch.isfinite(loss.detach()).all()), self.dist.device):
                return self._skip(role, "loss")
            (loss / self.micro_steps).backward()
            total_loss += float(loss.detach())
            for key, value in logs.items():
                sums[key] = sums.get(key, 0.0) + float(value)
        settings = self.cfg.optimiser
        max_norm = settings.max_grad_norm_generator if role == "generator" else settings.max_grad_norm_critic
        norm = clip_grad_norm(params, max_norm)
        if not torch.isfinite(torch.tensor(norm)):
            return self._skip(role, "gradient norm")
        factor = self._warmup_factor()
        for group in opt.param_groups:
            group["lr"] = group["base_lr"] * factor
        opt.step()
        self._zero_grad(role)
        self.nonfinite_run = 0
        out = {key: value / self.micro_steps for key, value in sums.items()}
        out.update({f"{role}_loss": total_loss / self.micro_steps, f"{role}_grad_norm": norm,
                    f"{role}_lr": opt.param_groups[0]["lr"]})
        return out

    def _zero_grad(self, role: str) -> None:
        """Every trainable parameter of the role, not only those the optimizer steps (a GAN warm-up trains the
        heads alone, but the trunk may still receive gradients that must not pile up)."""
        self.optimizers[role].zero_grad(set_to_none=True)
        for p in self.trainable[role]:
            p.grad = None

    def _skip(self, role: str, what: str) -> Logs:
        self._zero_grad(role)
        self.nonfinite_run += 1
        limit = self.cfg.optimiser.max_nonfinite_steps
        warn(f"step {self.step}: non-finite {role} {what} on at least one rank; update skipped "
             f"({self.nonfinite_run} in a row, abort at {limit})")
        if self.nonfinite_run >= limit:
            raise NonFiniteLossError(f"step {self.step}: {self.nonfinite_run} consecutive non-finite updates "
                                     f"(max_nonfinite_steps = {limit}); last: {role} {what}. The last checkpoint "
                                     f"in {self.logdir} predates the problem.")
        return {f"{role}_skipped": 1.0}

    def train_step(self) -> Logs:
        """One loop step (docs/method.md, "Update schedule"); returns its scalar logs (this rank's values)."""
        start = time.perf_counter()
        ema = self.ema
        if ema is not None and not ema.started and self.step >= ema.start_step:
            ema.start(self._ema_params)
        phase = self._phase(self.step)
        if phase != self._critic_phase:  # e.g. the end of the GAN discriminator warm-up: a fresh critic optimizer
            self._build_optimizer("critic", self.step)
            self._critic_phase = phase
        logs: Logs = {}
        has_critic = self.algorithm.has_critic
        if not has_critic or self.step % self.cfg.distillation.dfake_gen_update_ratio == 0:
            gen_logs = self._update("generator", self.algorithm.generator_loss)
            logs.update(gen_logs)
            if ema is not None and ema.started and "generator_loss" in gen_logs:
                ema.update(self._ema_params)
        if has_critic:
            logs.update(self._update("critic", self.algorithm.critic_loss))
        self.step += 1
        logs["iter_time"] = time.perf_counter() - start
        return logs

    # ------------------------------------------------------------------------------------------------- the run
    def train(self) -> Logs:
        """Train until max_steps, checkpointing every log_iters steps and at the end; returns the logs of the last
        step averaged over ranks (identical on every rank)."""
        cfg, shown = self.cfg, {}
        # Scalars are averaged over every step since the last log line: a generator update happens only every
        # dfake_gen_update_ratio steps, so logging one step's values would miss it whenever the intervals align.
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}
        started = time.perf_counter()
        try:
            while self.step < cfg.optimiser.max_steps:
                limit_s = cfg.optimiser.time_limit_s
                if limit_s > 0 and any_rank(time.perf_counter() - started > limit_s):
                    # A time-boxed run ends like a finished one: the final checkpoint below is written.
                    if self.dist.is_main:
                        warn(f"optimiser.time_limit_s={limit_s} reached at step {self.step}; stopping")
                    break
                for key, value in self.train_step().items():
                    sums[key] = sums.get(key, 0.0) + float(value)
                    counts[key] = counts.get(key, 0) + 1
                if self.step % max(1, cfg.logging.log_every) == 0 or self.step == cfg.optimiser.max_steps:
                    logs = {key: sums[key] / counts[key] for key in sums}
                    sums, counts = {}, {}
                    shown = self.last_logs = mean_over_ranks(logs)
                    if self.logger is not None:
                        self.logger.log(self.step, shown)
                        self.logger.progress(self.step, shown)
                if cfg.checkpointing.interval > 0 and self.step % cfg.checkpointing.interval == 0:
                    self.save_checkpoint()
                if self.sample_fn is not None and cfg.logging.sample_every > 0 and not cfg.logging.no_visualize \
                        and self.step % cfg.logging.sample_every == 0:
                    self.sample_fn(self.step)
                if cfg.compute.gc_interval > 0 and self.step % cfg.compute.gc_interval == 0:
                    gc.collect()
                    if torch.cuda.is_available():
                        torch.cuda.empty_cache()
            if self._last_save_step != self.step:
                self.save_checkpoint()
        finally:
            if self.logger is not None:
                self.logger.close()
        return shown

    # --------------------------------------------------------------------------------------------- checkpoints
    def save_checkpoint(self) -> Optional[Path]:
        """Write `checkpoint_model_{step:06d}/` (collective: every rank must call it). Refuses non-finite weights."""
        if self.cfg.checkpointing.no_save:
            return None
        all_params = [p for params in self.trainable.values() for p in params]
        if not all_finite(all_params):
            raise NonFiniteLossError(f"step {self.step}: trainable weights hold NaN/inf; refusing to write a "
                                     f"poisoned checkpoint")
        tensors = self.io.gather(self.ema)
        state: dict[str, Any] = {
            "step": self.step,
            "seed": self.seed,
            "world_size": self.dist.world_size,
            "nonfinite_run": self.nonfinite_run,
            "critic_phase": self._critic_phase,
            "optimizers": {role: full_optimizer_state_dict(self.io.module(role), opt)
                           for role, opt in self.optimizers.items()},
            "ema": self.ema.state() if self.ema is not None else None,
            "rng": all_gather_object(rng_state()),
            "shared_rng": self.shared_generator.get_state(),
            "data": all_gather_object(self.data.state_dict()),
        }
        if hasattr(self.algorithm, "state_dict"):
            state["algorithm"] = self.algorithm.state_dict()
        path = None
        if self.dist.is_main:
            if not self._cleaned:  # leftovers of a save that was killed (e.g. the run this one resumes)
                ts.remove_stale_temporaries(self.logdir)
                self._cleaned = True
            path = ts.write_checkpoint(self.logdir, self.step, tensors=tensors, training_state=state,
                                       texts=self.io.texts(self.cfg))
            ts.prune_checkpoints(self.logdir, self.cfg.checkpointing.keep)
        self._last_save_step = self.step
        barrier()
        return path

    def resume(self, folder: str | Path) -> None:
        """Restore everything `save_checkpoint` wrote so the run continues exactly (collective)."""
        folder = Path(folder)
        state = ts.load_training_state(folder)
        self.io.restore(folder, self.ema, self._ema_params, is_main=self.dist.is_main)
        self.step = int(state["step"])
        self._critic_phase = state.get("critic_phase", "main")
        for role in self.roles:
            if role not in state["optimizers"]:
                raise InputKeyError(f"{folder}: training state has no optimizer for {role!r}")
            # Rebuilt as it was when saved (the groups of the step before), then the state is loaded into it.
            self._build_optimizer(role, max(0, self.step - 1))
            load_full_optimizer_state_dict(self.io.module(role), self.optimizers[role], state["optimizers"][role])
            self._reset_lr_from_config(role, max(0, self.step - 1))
        self.seed = int(state["seed"])
        self.nonfinite_run = int(state.get("nonfinite_run", 0))
        if self.ema is not None and state.get("ema"):
            self.ema.num_updates = int(state["ema"]["num_updates"])
        self.shared_generator.set_state(state["shared_rng"])
        data_states = state["data"]
        self.data.load_state_dict(data_states[self.dist.rank] if len(data_states) == self.dist.world_size
                                  else data_states[0])
        rngs = state["rng"]
        if len(rngs) == self.dist.world_size:
            set_rng_state(rngs[self.dist.rank])
        else:
            warn(f"{folder} was saved by {len(rngs)} rank(s), this run has {self.dist.world_size}: per-rank random "
                 f"streams are re-seeded, so the continuation is not bit-identical")
            seed_everything(self.seed + self.dist.rank + 7919 * self.step)
        if "algorithm" in state and hasattr(self.algorithm, "load_state_dict"):
            self.algorithm.load_state_dict(state["algorithm"])
        self._last_save_step = self.step

    def _reset_lr_from_config(self, role: str, step: int) -> None:
        """The configuration, not the checkpoint, sets learning rates (identical when resuming the same config)."""
        for group, new in zip(self.optimizers[role].param_groups, self._param_groups(role, step)):
            group["base_lr"], group["betas"] = new["base_lr"], new["betas"]
            group["weight_decay"] = self.cfg.optimiser.weight_decay


def _share_generator(algorithm: Algorithm, generator: torch.Generator) -> None:
    """Give the algorithm the loop's rank-shared generator (whose state checkpoints carry): through its optional
    `set_shared_generator(g)` hook, else by replacing its self-forcing rollout's `shared_generator`."""
    hook = getattr(algorithm, "set_shared_generator", None)
    if hook is not None:
        hook(generator)
        return
    rollout = getattr(algorithm, "rollout", None)
    if isinstance(getattr(rollout, "shared_generator", None), torch.Generator):
        rollout.shared_generator = generator
