"""Score every stage of a shapes-world run (scripts/shapes_world.py) against the world's ground truth.

    python scripts/evaluate_shapes.py --run runs/shapes                          # all stages found, -> eval.json
    python scripts/evaluate_shapes.py --run runs/shapes --stages dmd,teacher_forcing --lengths 1,3
    python scripts/evaluate_shapes.py --model assets/shapes_world --output runs/eval_bundled.json  # a model folder

For each stage: the same seeded held-in (train split) and held-out scenes, their short prompts, the same initial
noise. Causal models roll out 1x, 3x, 10x their training length (`image_or_video_shape[1]` latent frames; the
codec has temporal factor 1, so pixel frames = latent frames). Beyond 1x the KV cache rolls: window = the training
length (what every query attended to in training), sink = one block (the first block stays visible, the attention
sink), RoPE "relative" (keys rotated by their slot in the window, so no position exceeds the trained range; with
"absolute" a 10x rollout would query positions never seen in training). At 1x the stage's own cache settings are
used, which for a window-less model is the training setting exactly.

Steps: the few-step models (ode_init, dmd, sid, gan, causvid) run their own warped 4-step list (a trailing 0 of the
ODE-regression list is dropped: it is the clean target, not a step); teacher forcing and diffusion forcing are
diffusion models, sampled with `--baseline-steps` timesteps evenly spaced on the config's 0..1000 scale and warped
like the few-step list, by the same x0-prediction / re-noise chain of the rollout; the bidirectional teacher runs
`--teacher-steps` Euler (ODE-pair recipe, CFG in x0) or UniPC (CFG in flow) steps with the negative prompt, at 1x
only (it denoises a whole clip at once: there is no rollout). A "reference" entry scores the rendered ground truth
(the evaluator's ceiling). Timings come from the pipeline's stats after a warm-up call, for the batch and for one
prompt alone. `--model DIR` scores one exported model folder (the bundled assets/shapes_world included) as the stage
"model": its weights, text encoder and codec, with the rollout settings stored in its transformer/config.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
REPO = Path(__file__).resolve().parents[1]

from scripts.shapes_results import FORMAT, format_compact, nan_to_none, pool_reports, pool_timing
from utils.errors import InputError, MissingFileError, UserError, one_line

EVAL_STAGES = ("teacher", "teacher_forcing", "diffusion_forcing", "causvid", "dmd", "sid", "gan", "ode_init")
BASELINES = ("teacher_forcing", "diffusion_forcing")
SPLITS = ("train", "heldout")
MODEL_STAGE = "model"  # the stage name of a model folder scored with --model
# (scenes, latent frames, noise generator) -> (video [B, T, 3, H, W] in [0, 1] on the CPU, pipeline stats)
Sampler = Callable[[list[Any], int, torch.Generator], tuple[Tensor, dict[str, Any]]]


@dataclass
class EvalSettings:
    num_prompts: int = 64
    lengths: tuple[int, ...] = (1, 3, 10)
    weights: str = "ema"
    teacher_steps: int = 48
    teacher_sampler: str = "euler"
    baseline_steps: int = 16
    batch_size: int = 16
    seed: int = 0
    device: str = "cpu"
    fp8: bool = False  # the networks' block linears in FP8 (model/fp8.py): the lever's quality delta
    short_fraction: float = 0.0  # scenes prompted in a short form (size and/or speed left out, and not scored)


# ---------------------------------------------------------------------------------------------------- stages
def stage_files(run: Path, stage: str, weights: str) -> tuple[Path, Path]:
    """(config.yaml, weights file) of a finished stage; FileNotFoundError naming what is missing."""
    config = run / stage / "config.yaml"
    ckpt = run / stage / ("generator_ema.safetensors" if weights == "ema" else "generator.safetensors")
    for path in (config, ckpt):
        if not path.is_file():
            raise MissingFileError(f"stage {stage!r}: {path} does not exist (run scripts/shapes_world.py "
                                    f"--out {run} --stages {stage} first)")
    return config, ckpt


def available_stages(run: Path, requested: list[str] | None, weights: str) -> list[str]:
    """Requested stages must all exist; by default every finished stage of `EVAL_STAGES` is taken."""
    if requested is not None:
        unknown = sorted(set(requested) - set(EVAL_STAGES))
        if unknown:
            raise InputError(f"--stages: unknown stage(s) {unknown}; choose from {list(EVAL_STAGES)}")
        for stage in requested:
            stage_files(run, stage, weights)
        return [s for s in EVAL_STAGES if s in requested]
    found = []
    for stage in EVAL_STAGES:
        try:
            stage_files(run, stage, weights)
            found.append(stage)
        except FileNotFoundError:
            pass
    if not found:
        raise MissingFileError(f"{run}: no finished stage among {list(EVAL_STAGES)} (expected "
                                f"<stage>/config.yaml and <stage>/generator*.safetensors)")
    return found


def load_stage_config(run: Path, stage: str) -> Any:
    from utils.config import load_config
    cfg = load_config(run / stage / "config.yaml")
    # The stored path is the one of the machine that trained; the run's own base/ wins when it is there.
    if (run / "base" / "text_encoder").is_dir():
        cfg.model.text_encoder_path = str(run / "base")
    return cfg


def training_frames(cfg: Any) -> int:
    return int(cfg.rollout.image_or_video_shape[1])


def frames_at(cfg: Any, factor: int) -> int:
    """Latent frames at `factor` x the training length (an independent first frame is counted once)."""
    first = 1 if cfg.rollout.independent_first_frame else 0
    return first + factor * (training_frames(cfg) - first)


def causal_steps(stage: str, cfg: Any, schedule: Any, baseline_steps: int) -> list[float]:
    """The timesteps a causal stage runs per block (warped like its training list)."""
    T = schedule.num_train_timesteps
    if stage in BASELINES:
        raw = [round(T * (baseline_steps - i) / baseline_steps) for i in range(baseline_steps)]
    else:
        raw = [int(s) for s in cfg.rollout.denoising_step_list if s != 0]
    return schedule.denoising_steps(raw, cfg.rollout.warp_denoising_step)


def causal_settings(cfg: Any, steps: list[float], factor: int) -> Any:
    from pipeline.inference import CausalSettings
    r = cfg.rollout
    train = training_frames(cfg)
    window, sink, rope = r.local_attn_size, r.sink_size, r.rope
    if factor > 1:
        window = r.local_attn_size if r.local_attn_size != -1 else train
        # the sink is kept only if the window still holds recent frames beside it and the block being generated;
        # otherwise each block would see the first block alone and lose the motion it has to continue
        sink = r.num_frame_per_block if r.num_frame_per_block < window - r.num_frame_per_block else 0
        rope = "relative"
    return CausalSettings(steps=steps, frames_per_block=r.num_frame_per_block,
                          independent_first_frame=r.independent_first_frame, context_noise=r.context_noise,
                          window_frames=window, sink_frames=sink, rope=rope, max_frames_without_window=train)


# ---------------------------------------------------------------------------------------------------- samplers
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def load_networks(cfg: Any, ckpt: Path, device: torch.device, dtype: torch.dtype) -> tuple[Any, Any]:
    """(DiT in eval mode on `device`/`dtype`, prompt encoder) of one stage."""
    from shapes.components import load_shapes_text, shapes_dit
    net = shapes_dit(cfg, str(ckpt)).to(device, dtype).eval()
    return net, load_shapes_text(cfg, net.config.text_len, device=device)


def load_model_folder(folder: Path, device: torch.device, dtype: torch.dtype) -> tuple[Any, Any, Any, Any]:
    """(config, DiT, prompt encoder, codec) of an exported model folder: the shapes base config under the rollout
    settings the folder stores with its transformer, its own text encoder and codec."""
    from pipeline.loading import model_folder
    from shapes.components import load_shapes_text
    from utils.config import load_config
    if not model_folder.is_model_folder(folder):
        raise MissingFileError(f"--model {folder}: not a model folder (expected {folder / 'model_index.json'})")
    for part in ("text_encoder", "tokenizer"):
        if not (folder / part).is_dir():
            raise MissingFileError(f"--model {folder}: {part}/ is missing (export with --include-base)")
    if not model_folder.has_codec(folder):
        raise MissingFileError(f"--model {folder}: codec/config.json is missing (not a shapes-world model)")
    net, causal = model_folder.load_transformer(folder, device=device, dtype=dtype)
    if not causal:
        raise InputError(f"--model {folder}: transformer/config.json has no 'causal' settings (expected the rollout "
                         "settings an export stores)")
    overrides = [f"text_encoder_path={folder}"] + [f"{key}={json.dumps(value)}" for key, value in causal.items()
                                                   if key != "model_kwargs"]
    overrides += [f"model_kwargs.{key}={json.dumps(value)}" for key, value in causal.get("model_kwargs", {}).items()]
    cfg = load_config(REPO / "configs" / "shapes" / "base.yaml", overrides)
    text = load_shapes_text(cfg, net.config.text_len, device=device)
    return cfg, net, text, model_folder.load_codec(folder, device=device, dtype=dtype)


def causal_sampler(cfg: Any, net: Any, text: Any, steps: list[float], factor: int, codec: Any = None) -> Sampler:
    from pipeline.inference import CausalInferencePipeline, VideoRequest
    from pipeline.schedule import FlowMatchSchedule
    from shapes import short_prompt
    from shapes.components import shapes_codec
    schedule = FlowMatchSchedule(cfg.rollout.generator_shift, cfg.model.num_train_timestep)
    pipe = CausalInferencePipeline(net, text, codec or shapes_codec(cfg), schedule,
                                   causal_settings(cfg, steps, factor), negative_prompt=cfg.data.negative_prompt)

    def sample(scenes: list[Any], frames: int, gen: torch.Generator) -> tuple[Tensor, dict[str, Any]]:
        request = VideoRequest(frames, cfg.inference.height, cfg.inference.width, generator=gen)
        out = pipe.generate([short_prompt(s) for s in scenes], request)
        return out.video.float().cpu(), out.stats
    return sample


def teacher_sampler(cfg: Any, net: Any, text: Any, settings: EvalSettings) -> Sampler:
    from pipeline.denoiser import Denoiser
    from pipeline.schedule import FlowMatchSchedule
    from pipeline.teacher import sample_bidirectional
    from shapes import short_prompt
    from shapes.components import shapes_codec
    device, dtype = net.patch_embedding.weight.device, net.patch_embedding.weight.dtype
    denoiser = Denoiser(net, FlowMatchSchedule(cfg.rollout.generator_shift, cfg.model.num_train_timestep),
                        uniform_timestep=True)
    codec = shapes_codec(cfg)
    s = codec.spatial_factor
    # each sampler with the guidance space of the original recipe that uses it (ODE pairs / diffusion inference)
    cfg_space = "x0" if settings.teacher_sampler == "euler" else "flow"

    def sample(scenes: list[Any], frames: int, gen: torch.Generator) -> tuple[Tensor, dict[str, Any]]:
        tic = time.perf_counter()
        context = text([short_prompt(sc) for sc in scenes]).to(device, dtype)
        negative = text.negative(len(scenes)).to(device, dtype)
        noise = torch.randn(len(scenes), frames, net.config.in_dim, cfg.inference.height // s, cfg.inference.width // s,
                            generator=gen).to(device, dtype)
        latents = sample_bidirectional(denoiser, noise, context, negative, sampler=settings.teacher_sampler,
                                       num_steps=settings.teacher_steps, shift=cfg.rollout.generator_shift,
                                       guidance_scale=cfg.distillation.guidance_scale, cfg_space=cfg_space).latents
        video = (codec.decode_to_pixel(latents).float() * 0.5 + 0.5).clamp(0, 1)
        _sync(device)
        total_ms = (time.perf_counter() - tic) * 1000.0
        # every frame of a bidirectional sample arrives at the end
        return video.cpu(), {"total_ms": total_ms, "time_to_first_frame_ms": total_ms,
                             "pixel_frames": video.shape[1],
                             "frames_per_s": video.shape[1] * len(scenes) / (total_ms / 1000.0)}
    return sample


def reference_sampler(cfg: Any) -> Sampler:
    """The rendered ground truth, for the evaluator's ceiling (no timing)."""
    from shapes import render

    def sample(scenes: list[Any], frames: int, gen: torch.Generator) -> tuple[Tensor, dict[str, Any]]:
        video = render(scenes, frames, cfg.inference.height, cfg.inference.width)  # [B, 3, T, H, W] in [-1, 1]
        return (video.transpose(1, 2) * 0.5 + 0.5).clamp(0, 1), {}
    return sample


# ---------------------------------------------------------------------------------------------------- scoring
def score(sample: Sampler, scenes_by_split: dict[str, list[Any]], frames: int, settings: EvalSettings,
          factor: int) -> dict[str, dict[str, Any]]:
    """Generate and score every split at one length -> {split: pooled report + timing}."""
    from shapes import evaluate
    from shapes.intervals import score_intervals
    out = {}
    for split, scenes in scenes_by_split.items():
        reports, shapes, stats, per_video = [], [], [], []
        for start in range(0, len(scenes), settings.batch_size):
            batch = scenes[start:start + settings.batch_size]
            # the same noise for every model: seeded by (seed, split, length, batch), drawn on the CPU
            gen = torch.Generator().manual_seed(settings.seed * 1_000_003 + SPLITS.index(split) * 10_007
                                                + factor * 101 + start)
            video, st = sample(batch, frames, gen)
            report = evaluate(video, batch, value_range=(0, 1), layout="BTCHW", per_video=True)
            per_video += report.pop("per_video")
            reports.append(report)
            shapes.append(sum(len(s.shapes) for s in batch))
            stats.append((len(batch), st))
        # bootstrap resamples seeded like the noise: reruns give the same intervals
        ci = score_intervals(per_video, seed=settings.seed * 1_000_003 + SPLITS.index(split) * 10_007 + factor * 101)
        out[split] = {**pool_reports(reports, shapes), "ci": ci, "timing": pool_timing(stats)}
    return out


# ---------------------------------------------------------------------------------------------------- the run
def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _entries(stage: str, factor: int, frames: int, per_split: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"stage": stage, "split": split, "length": factor, "latent_frames": frames,
             "pixel_frames": len(report["per_frame"]["frame_quality"]), **report}
            for split, report in per_split.items()]


def _batch1_timing(sample: Sampler, scene: Any, frames: int) -> dict[str, Any]:
    """Latency of one prompt alone (the paper's setting), after a warm-up call with that batch size."""
    gen = torch.Generator().manual_seed(0)
    sample([scene], frames, gen)
    _, st = sample([scene], frames, gen)
    return pool_timing([(1, st)])


def evaluate_stage(run: Path, stage: str, scenes: dict[str, list[Any]], settings: EvalSettings,
                   device: torch.device, dtype: torch.dtype) -> tuple[dict[str, Any], list[dict[str, Any]], Any]:
    """One stage of a run at every length -> (its `stages` entry, its `results` entries, its config)."""
    cfg = load_stage_config(run, stage)
    _, ckpt = stage_files(run, stage, settings.weights)
    net, text = load_networks(cfg, ckpt, device, dtype)
    return evaluate_networks(stage, cfg, net, text, None, str(ckpt), scenes, settings)


def evaluate_networks(stage: str, cfg: Any, net: Any, text: Any, codec: Any, source: str,
                      scenes: dict[str, list[Any]],
                      settings: EvalSettings) -> tuple[dict[str, Any], list[dict[str, Any]], Any]:
    """Loaded networks of one stage (codec None: the config's) at every length -> (info, results, config)."""
    from pipeline.schedule import FlowMatchSchedule
    if settings.fp8:
        from model.fp8 import convert_to_fp8
        convert_to_fp8(net)
    info: dict[str, Any] = {"checkpoint": source, "training_frames": training_frames(cfg), "fp8": settings.fp8}
    if stage == "teacher":
        factors = (1,)
        samplers = {1: teacher_sampler(cfg, net, text, settings)}
        info.update(kind="teacher", steps_per_block=settings.teacher_steps, sampler=settings.teacher_sampler,
                    guidance_scale=cfg.distillation.guidance_scale)
    else:
        factors = settings.lengths
        steps = causal_steps(stage, cfg, FlowMatchSchedule(cfg.rollout.generator_shift,
                                                           cfg.model.num_train_timestep), settings.baseline_steps)
        # 1x too when not asked for: the warm-up and the batch-1 timing run at the training length.
        samplers = {f: causal_sampler(cfg, net, text, steps, f, codec) for f in sorted({1, *factors})}
        long = causal_settings(cfg, steps, 2)
        info.update(kind="diffusion" if stage in BASELINES else "few_step", steps_per_block=len(steps),
                    timesteps=steps, frames_per_block=cfg.rollout.num_frame_per_block,
                    long_cache={"window_frames": long.window_frames, "sink_frames": long.sink_frames,
                                "rope": long.rope})
    warm = scenes["train"][:settings.batch_size]
    samplers[1](warm, frames_at(cfg, 1), torch.Generator().manual_seed(0))
    info["timing_batch1"] = _batch1_timing(samplers[1], warm[0], frames_at(cfg, 1))
    results = []
    for factor in factors:
        frames = frames_at(cfg, factor)
        results += _entries(stage, factor, frames, score(samplers[factor], scenes, frames, settings, factor))
    return info, results, cfg


def evaluate_run(run: str | Path | None, stages: list[str] | None, settings: EvalSettings,
                 log: Callable[[str], None] = print,
                 on_progress: Callable[[dict[str, Any]], None] | None = None,
                 model: str | Path | None = None) -> dict[str, Any]:
    """Generate and score every stage of `run` (or the model folder `model`, as the stage "model"), then the
    rendered reference -> the eval JSON dict (layout: see `main`). `on_progress` gets the document so far
    (`"complete": false`) after each stage, so a run cut short (a killed or time-limited job) keeps the stages it
    finished."""
    from shapes import sample_scenes
    if (run is None) == (model is None):
        raise InputError("give --run RUN (a scripts/shapes_world.py folder) or --model DIR (a model folder), one")
    device = torch.device(settings.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if model is not None:
        run, names = Path(model), [MODEL_STAGE]
    else:
        run = Path(run)
        if not run.is_dir():
            raise MissingFileError(f"--run {run} is not a folder (expected the --out of scripts/shapes_world.py)")
        names = available_stages(run, stages, settings.weights)
    scenes = {split: sample_scenes(settings.num_prompts, torch.Generator().manual_seed(settings.seed * 7919 + i),
                                   split=split, short_fraction=settings.short_fraction)
              for i, split in enumerate(SPLITS)}
    info: dict[str, Any] = {}
    results: list[dict[str, Any]] = []
    configs = {}

    def document(complete: bool) -> dict[str, Any]:
        return nan_to_none({
            "format": FORMAT, "run": str(run), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "device": device_name(device), "torch": torch.__version__, "dtype": str(dtype).replace("torch.", ""),
            "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(settings).items()},
            "complete": complete, "stages": info, "results": results})

    for stage in names:
        tic = time.perf_counter()
        if stage == MODEL_STAGE:
            cfg, net, text, codec = load_model_folder(run, device, dtype)
            info[stage], entries, configs[stage] = evaluate_networks(stage, cfg, net, text, codec, str(run),
                                                                     scenes, settings)
        else:
            info[stage], entries, configs[stage] = evaluate_stage(run, stage, scenes, settings, device, dtype)
        results += entries
        if device.type == "cuda":
            torch.cuda.empty_cache()
        log(f"[eval] {stage}: {time.perf_counter() - tic:.1f} s")
        if on_progress is not None:
            on_progress(document(complete=False))
    causal = [s for s in names if s != "teacher"]
    ref_cfg = configs[causal[0] if causal else names[0]]
    info["reference"] = {"kind": "reference", "steps_per_block": None, "training_frames": training_frames(ref_cfg)}
    for factor in settings.lengths if causal else (1,):
        frames = frames_at(ref_cfg, factor)
        results += _entries("reference", factor, frames,
                            score(reference_sampler(ref_cfg), scenes, frames, settings, factor))
    return document(complete=True)


def write_json_atomic(path: str | Path, data: dict[str, Any]) -> Path:
    """Temp file in the same folder + rename: a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, allow_nan=False)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _positive_ints(text: str, flag: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise InputError(f"{flag} must be comma-separated positive integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise InputError(f"{flag} must be comma-separated positive integers, got {text!r}")
    return tuple(sorted(set(values)))


def check_stage_flags(args: argparse.Namespace) -> None:
    """--weights picks between the two weight sets of a --run's stages; a model folder holds one, so the flag is an
    error with --model rather than a silent no-op. (--teacher-steps, --teacher-sampler and --baseline-steps are
    recorded by every evaluation, so that evaluations of stage groups made apart share their settings and merge.)"""
    if args.model and args.weights is not None:
        raise InputError(f"--weights {args.weights} picks the generator_ema or generator weights of a --run's stages; "
                         f"the model folder --model {args.model} holds one set")


def main(argv: list[str] | None = None) -> int:
    """JSON layout: device, torch, dtype, settings, complete (false while stages remain: rewritten after each);
    `stages`: per stage its kind (teacher / few_step / diffusion /
    reference), steps per block, timesteps, cache used beyond 1x, batch-1 timing; `results`: one entry per (stage,
    split, length factor) with the evaluator's scores pooled over batches, `frame_quality_first/last` (first and
    last quarter of the frames), `per_frame` curves, `timing` (batched) and `ci`: per headline score its mean and
    95% interval over the scenes (`shapes/intervals.py`: Wilson for yes/no scores, else a scene bootstrap)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", help="the --out folder of scripts/shapes_world.py")
    source.add_argument("--model", help="an exported model folder (e.g. assets/shapes_world); needs --output")
    p.add_argument("--stages", default=None, help=f"comma-separated subset of {','.join(EVAL_STAGES)} "
                                                  "(default: every finished one)")
    p.add_argument("--prompts", "--num-prompts", dest="num_prompts", type=int, default=64,
                   help="scenes per split (default: %(default)s; 256 or more for intervals worth quoting)")
    p.add_argument("--lengths", default="1,3,10", help="multiples of the training length (default: %(default)s)")
    # None: not given (`check_stage_flags`). The stage flags below are recorded in every evaluation's settings, also
    # where no stage they tune runs: evaluations of stage groups made apart merge only with equal settings.
    p.add_argument("--weights", choices=["ema", "raw"], help="generator_ema or generator weights of a --run's stages "
                   f"(default: {EvalSettings.weights})")
    p.add_argument("--teacher-steps", type=int,
                   help=f"teacher sampling steps, used by the teacher stage (default: {EvalSettings.teacher_steps})")
    p.add_argument("--teacher-sampler", choices=["euler", "unipc"],
                   help=f"the teacher stage's sampler (default: {EvalSettings.teacher_sampler})")
    p.add_argument("--baseline-steps", type=int,
                   help="steps per block for the teacher_forcing / diffusion_forcing stages only (default: "
                   f"{EvalSettings.baseline_steps})")
    p.add_argument("--batch-size", type=int, default=16, help="prompts per generation call (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--output", default=None, help="default: <run>/eval.json")
    p.add_argument("--fp8", action="store_true",
                   help="sample with FP8 block linears (model/fp8.py), to compare with an evaluation without")
    p.add_argument("--short-fraction", type=float, default=0.0,
                   help="fraction of scenes prompted in a short form that leaves out size and/or speed; those "
                        "attributes are not scored (1: short prompts only; default: %(default)s)")
    args = p.parse_args(argv)
    try:
        if not 0.0 <= args.short_fraction <= 1.0:
            raise InputError(f"--short-fraction must be in [0, 1], got {args.short_fraction}")
        for flag in ("num_prompts", "teacher_steps", "baseline_steps", "batch_size"):
            if getattr(args, flag) is not None and getattr(args, flag) < 1:
                raise InputError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
        stages = [s.strip() for s in args.stages.split(",") if s.strip()] if args.stages else None
        if args.model and (args.stages or not args.output):
            raise InputError("--model scores the one folder it names: give --output FILE (nothing is written into "
                             "the model folder) and no --stages")
        check_stage_flags(args)
        given = {k: getattr(args, k) for k in ("weights", "teacher_steps", "teacher_sampler", "baseline_steps")
                 if getattr(args, k) is not None}
        settings = EvalSettings(
            num_prompts=args.num_prompts, lengths=_positive_ints(args.lengths, "--lengths"),
            batch_size=args.batch_size, seed=args.seed,
            device=args.device or ("cuda" if torch.cuda.is_available() else "cpu"), fp8=args.fp8,
            short_fraction=args.short_fraction, **given)
        output = args.output or Path(args.run) / "eval.json"
        data = evaluate_run(args.run, stages, settings, on_progress=lambda doc: write_json_atomic(output, doc),
                            model=args.model)
    except UserError as err:  # only the project's own errors: a bug keeps its traceback
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 2
    out = write_json_atomic(output, data)
    print(format_compact(data))
    print(f"[eval] wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
