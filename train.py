"""Train a Self Forcing generator (or its ODE / diffusion / GAN variants) from a recipe.

    python train.py --config_path configs/self_forcing_dmd.yaml --logdir logs/dmd
    torchrun --nproc_per_node 8 train.py --config_path configs/self_forcing_dmd.yaml --logdir logs/dmd --resume

Flow: config (YAML merged onto configs/default_config.yaml, then key=value overrides) -> `build_models` (Wan
folders under model_root) -> `parallelize_models` (device, FSDP2) -> `build_algorithm` (trainer /
distribution_loss) -> `Trainer.train()`. `main(argv, models=..., data=..., algorithm_factory=...)` lets tests and
the shapes world inject their own networks and data.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from utils.errors import BusyError, InputError, UserError

LOCK_FILE = ".lock"  # in the logdir, while a run holds it

EPILOG = """\
overrides:
  Trailing key=value pairs override any config key (section.key; the original's flat names load too), e.g.
    optimiser.lr=1e-6 optimiser.max_steps=100 rollout.local_attn_size=12 logging.disable_wandb=true
  Unknown keys are errors; configs/default_config.yaml documents every key.

outputs (in --logdir):
  metrics.jsonl                      one JSON line of scalars per logged step
  checkpoint_model_XXXXXX/           every checkpointing.interval steps and at the end (newest checkpointing.keep kept):
    generator.safetensors, generator_ema.safetensors, critic.safetensors   original Wan keys, loadable by
                                     inference.py / pipeline.loading.checkpoint.load_dit_state_dict
    training_state.pt, config.yaml, config.json                              what --resume needs
  wandb/                             offline wandb run (sync with `wandb sync`) unless --disable-wandb;
                                     online when logging.wandb_key or logging.wandb_host is set

distributed:
  Single process: python train.py ...   Several GPUs / nodes: torchrun ... train.py ... (NCCL; gloo on CPU).
  Global batch = optimiser.batch_size x GPUs x accumulation; set optimiser.total_batch_size to accumulate.

one run per logdir:
  A run holds the lock file .lock in its logdir while it runs; a second run on the same logdir stops with a
  one-line error naming the holder. A killed run leaves no live lock (the kernel releases it with the process).
  On --resume, metrics.jsonl keeps only the rows up to the checkpoint's step, so no step is listed twice.
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="train.py", description=__doc__.split("\n\n")[0],
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config_path", required=True, help="recipe YAML (merged onto configs/default_config.yaml)")
    p.add_argument("--logdir", default=None,
                   help="where checkpoints, metrics and wandb files go (default: logs/<config name>)")
    p.add_argument("--no_save", action="store_true", help="write no checkpoints")
    p.add_argument("--no_visualize", action="store_true", help="draw no sample videos (and load no VAE for them)")
    p.add_argument("--wandb-save-dir", dest="wandb_save_dir", default=None,
                   help="folder for wandb's files (default: the logdir)")
    p.add_argument("--disable-wandb", dest="disable_wandb", action="store_true", help="no wandb at all")
    p.add_argument("--resume", nargs="?", const="latest", default=None, metavar="PATH",
                   help="continue exactly from the newest checkpoint in the logdir (starts fresh if there is none),"
                        " or from PATH (a checkpoint_model_XXXXXX folder, or a logdir). Write --resume=PATH or put"
                        " key=value overrides before --resume")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_intermixed_args(argv)  # flags and key=value overrides in any order
    # `--resume key=value` would swallow the override as a path.
    if args.resume not in (None, "latest") and "=" in args.resume and not Path(args.resume).exists():
        args.overrides.insert(0, args.resume)
        args.resume = "latest"
    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        parser.error(f"expected key=value overrides, got {bad}")
    return args


def load_run_config(args: argparse.Namespace):
    """The validated Config with the command-line flags applied (as the original's train.py sets them)."""
    from utils.config import load_config

    cfg = load_config(args.config_path, args.overrides)
    cfg.logging.logdir = args.logdir or cfg.logging.logdir or str(Path("logs") / (cfg.logging.config_name or "run"))
    cfg.checkpointing.no_save = args.no_save or cfg.checkpointing.no_save
    cfg.logging.no_visualize = args.no_visualize or cfg.logging.no_visualize
    cfg.logging.disable_wandb = args.disable_wandb or cfg.logging.disable_wandb
    if args.wandb_save_dir and cfg.logging.disable_wandb:
        raise InputError(f"--wandb-save-dir {args.wandb_save_dir} is wandb's folder, but wandb is off (--disable-wandb "
                         "or logging.disable_wandb): drop one of them")
    cfg.logging.wandb_save_dir = args.wandb_save_dir or cfg.logging.wandb_save_dir or cfg.logging.logdir
    return cfg


def _setup(args: argparse.Namespace, dist_state, models: Any, data: Any, algorithm_factory: Any):
    """The ready `Trainer`, holding the logdir's lock (`trainer.logdir_lock`, released by `main`)."""
    cfg = load_run_config(args)
    if cfg.optimiser.max_steps == 0 and cfg.checkpointing.no_save:
        raise InputError("max_steps=0 with --no_save would do nothing: max_steps=0 only writes the initial weights as "
                         "checkpoint 0")
    from utils.outputs import missing_root, remove_created
    created = missing_root(Path(cfg.logging.logdir))
    lock = lock_logdir(cfg.logging.logdir, dist_state)
    try:
        trainer = _build(args, cfg, dist_state, models, data, algorithm_factory)
    except BaseException:
        if lock is not None:
            lock.release()
            remove_created(Path(cfg.logging.logdir), created)  # a run that failed to start leaves no empty logdir
        raise
    trainer.logdir_lock = lock
    return trainer


def lock_logdir(logdir: str, dist_state):
    """Claim the logdir for this run (rank 0 holds the lock until the run ends; the kernel drops it if the process
    dies): two runs writing one logdir would interleave their metrics and overwrite each other's checkpoints. A
    `BusyError` naming the holder while another live run has it."""
    from utils.distributed import all_gather_object
    from utils.locks import describe_holder, try_lock
    path = Path(logdir)
    lock, problem = None, None
    if dist_state.rank == 0:
        if path.exists() and not path.is_dir():
            problem = InputError(f"logdir {path} is a file; expected a folder for checkpoints and metrics")
        else:
            try:
                path.mkdir(parents=True, exist_ok=True)
                lock = try_lock(path / LOCK_FILE)
            except OSError as err:
                problem = InputError(f"logdir {path} cannot be written: {err.strerror or err}")
            else:
                if lock is None:
                    problem = BusyError(f"logdir {path} is in use by {describe_holder(path / LOCK_FILE)}; wait for "
                                        f"that run to end, or choose another --logdir")
    problem = all_gather_object(problem)[0]  # every rank stops together
    if problem is not None:
        raise problem
    return lock


def _build(args: argparse.Namespace, cfg, dist_state, models: Any, data: Any, algorithm_factory: Any):
    from trainer.builders import prepare_injected_models
    from trainer.loop import Trainer
    from trainer.train_state import list_checkpoints, resolve_resume
    from utils.distributed import parallelize_models, resolve_seed, seed_everything
    from utils.logging import RunLogger, wandb_mode

    resume = resolve_resume(args.resume, cfg.logging.logdir)
    existing = list_checkpoints(cfg.logging.logdir)
    if resume is None and existing and not cfg.checkpointing.no_save:
        # A fresh run would interleave its checkpoints with the old ones, and a later --resume would pick the newest.
        raise InputError(f"logdir {cfg.logging.logdir} already holds {existing[-1][1].name}; pass --resume to continue "
                         f"from it, or choose another --logdir")
    seed = resolve_seed(cfg.seed)
    # Identical on every rank: FSDP2 shards whatever each rank initialised (e.g. GAN heads) without syncing it.
    # The Trainer then re-seeds each rank with seed + rank for the per-rank noise.
    seed_everything(seed)
    if models is None:
        models = _world_models(cfg)
    elif callable(models):
        models = models(cfg)
    models = prepare_injected_models(models, cfg)
    parallelize_models(models, cfg, dist_state)
    if cfg.compute.compile:
        from pipeline.compile import compile_models
        compile_models(models)
    if algorithm_factory is None:
        from trainer.registry import build_algorithm as algorithm_factory
    algorithm = algorithm_factory(cfg, models)
    parallelize_models(models, cfg, dist_state)  # modules the algorithm added (GAN heads)
    if data is None:
        data = _world_data(cfg, dist_state.rank, dist_state.world_size, seed)
    elif callable(data) and not hasattr(data, "__next__"):
        data = data(cfg, dist_state.rank, dist_state.world_size, seed)
    from trainer.samples import make_sample_fn
    log = cfg.logging
    sample_fn = make_sample_fn(cfg, models, log.logdir, dist_state.rank) if log.sample_every > 0 else None
    trainer = Trainer(cfg, algorithm, data, dist=dist_state, logdir=log.logdir, seed=seed, sample_fn=sample_fn)
    if resume is not None:
        trainer.resume(resume)
    import dataclasses
    trainer.logger = RunLogger(log.logdir, rank=dist_state.rank, config=dataclasses.asdict(cfg),
                               wandb_mode=wandb_mode(cfg), wandb_dir=log.wandb_save_dir, run_name=log.config_name,
                               wandb_project=log.wandb_project, wandb_entity=log.wandb_entity,
                               wandb_host=log.wandb_host, wandb_key=log.wandb_key, total_steps=cfg.optimiser.max_steps,
                               initial_step=trainer.step)
    return trainer


def _world_models(cfg) -> Any:
    """The recipe's networks: real Wan components from disk, or the shapes world's, built by code. Chosen here, on
    top, because the core (utils/, model/, pipeline/, trainer/) never imports the world built on it."""
    if cfg.model.world == "shapes":
        from shapes.components import build_shapes_models
        return build_shapes_models(cfg)
    from trainer.builders import build_models
    return build_models(cfg)


def _world_data(cfg, rank: int, world_size: int, seed: int) -> Any:
    """The recipe's batches: the shapes world renders videos (and their prompts) with no files, except for the ODE
    pairs of `trainer: ode`, which are read like any other world's."""
    if cfg.model.world == "shapes" and cfg.trainer != "ode":
        from shapes.components import shapes_data
        return shapes_data(cfg, rank, world_size, seed)
    from trainer.data import build_data
    return build_data(cfg, rank, world_size, seed)


def main(argv: Optional[Sequence[str]] = None, *, models: Any = None, data: Any = None,
         algorithm_factory: Optional[Callable[[Any, Any], Any]] = None):
    """Run training; returns the finished `Trainer`.

    models: a `Models` bundle or `cfg -> Models` (default: `_world_models`: Wan components from cfg.model.model_root, or
    the shapes world's).
    data: a batch iterator or `(cfg, rank, world_size, seed) -> iterator` (default: `_world_data`).
    algorithm_factory: `(cfg, models) -> Algorithm` (default: `trainer.registry.build_algorithm`).
    Bad user input (config, paths, shapes) ends the process with a one-line error and exit status 2.
    """
    args = parse_args(argv)
    from trainer.loop import NonFiniteLossError
    from utils.distributed import cleanup_distributed, init_distributed

    dist_state = init_distributed()
    try:
        try:
            trainer = _setup(args, dist_state, models, data, algorithm_factory)
        except UserError as err:  # only the project's own errors: a bug keeps its traceback
            _fail(err, 2)
        try:
            trainer.train()
        except NonFiniteLossError as err:
            _fail(err, 1)
        finally:
            if trainer.logdir_lock is not None:
                trainer.logdir_lock.release()
        return trainer
    finally:
        cleanup_distributed(dist_state)


def _fail(err: BaseException, status: int) -> None:
    from utils.errors import one_line
    print(f"train.py: error: {one_line(err)}", file=sys.stderr)
    raise SystemExit(status)


if __name__ == "__main__":
    main()
