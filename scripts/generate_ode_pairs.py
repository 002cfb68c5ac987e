"""Generate ODE pairs: teacher ODE trajectories for ODE-regression initialisation (docs/method.md), in safetensors.

    python scripts/generate_ode_pairs.py --prompts prompts.txt --output data/ode_pairs \\
        --model-root wan_models --teacher-name Wan2.1-T2V-1.3B --negative-prompt "<Wan negative prompt>"
    torchrun --nproc_per_node=8 scripts/generate_ode_pairs.py --teacher exported/ --prompts p.txt --output ode/

Per prompt: noise `[1, F, C, H, W]` drawn from a generator seeded by (seed, prompt index), so the pairs do not
depend on the number of ranks; 48 Euler steps of the shift-8 flow ODE with CFG 6 in x0 space; the states before
steps [0, 12, 24, 36] and the final sample are kept (t = 1000, 960, 888.89, 727.27, 0: the shift-8 warped
[1000, 750, 500, 250, 0] an ODE-regression config names). Prompts are split round-robin over ranks (none dropped,
none duplicated); each rank writes its own shards and rank 0 writes index.json once all are done (format:
trainer/ode_pairs.py). Train on the folder with `trainer: ode`, `ode_data_path: <output>`.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch import Tensor  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from pipeline.denoiser import Denoiser  # noqa: E402
from pipeline.teacher import ode_pair_timesteps, sample_bidirectional  # noqa: E402
from trainer.ode_pairs import DTYPES, OdePairWriter, clear_output, finalize_index  # noqa: E402
from utils.distributed import barrier  # noqa: E402
from utils.errors import InputError, MissingFileError, UserError, one_line  # noqa: E402
from utils.prompts import Prompt, read_prompt_file, shard  # noqa: E402

WAN_SPATIAL_FACTOR = 8  # the Wan2.1 VAE
# The original's teacher wrapper converts flow <-> x0 on a shift-8 grid whatever the sampler's shift (docs/original.md).
TEACHER_SHIFT = 8.0
DEFAULT_MODEL_ROOT, DEFAULT_TEACHER_NAME = "wan_models", "Wan2.1-T2V-1.3B"


def prompt_seed(seed: int, index: int) -> int:
    """The noise seed of the prompt at `index` in the prompt file (the convention of inference.py)."""
    return seed * 1_000_003 + index


def _as_prompts(prompts: Sequence[str] | Sequence[Prompt]) -> list[Prompt]:
    out = []
    for n, p in enumerate(prompts):
        out.append(p if isinstance(p, Prompt) else Prompt(index=n, text=str(p)))
    return out


def generate_ode_pairs(teacher: Denoiser, text_encoder_fn: Callable[[list[str]], Tensor],
                       prompts: Sequence[str] | Sequence[Prompt], output: str | Path, *,
                       latent_shape: Sequence[int], negative_prompt: str = "", num_steps: int = 48,
                       shift: float = 8.0, guidance_scale: float = 6.0,
                       record_steps: Sequence[int] = (0, 12, 24, 36, 48), batch_size: int = 1, seed: int = 0,
                       shard_size: int = 64, rank: int = 0, world_size: int = 1,
                       storage_dtype: torch.dtype = torch.bfloat16, teacher_name: str = "", overwrite: bool = False,
                       progress: bool = True) -> Path:
    """Sample the teacher's ODE for this rank's share of `prompts` and write the ODE-pair folder `output`.

    teacher: the bidirectional teacher (`uniform_timestep=True`, shift-8 schedule as the original's wrapper), on
      the device to run on. text_encoder_fn: prompts -> embeddings `[B, L, text_dim]`.
    prompts: strings (indexed by position) or `Prompt`s (their `.index` seeds the noise).
    latent_shape: `[F, C, H, W]` of one sample. record_steps: Euler step indices to keep; the last must be
      `num_steps` (the clean sample ODE regression regresses to).
    Under torchrun every rank calls this with the same arguments and its own `rank`; collectives run only when a
    process group exists. Returns `output`.
    """
    record = [int(k) for k in record_steps]
    if not record or record[-1] != num_steps:
        raise InputError(f"record_steps {record} must end with num_steps={num_steps}: the last trajectory entry "
                         "is the clean sample that ODE regression regresses to")
    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}")
    if negative_prompt and guidance_scale == 1.0:
        raise InputError("negative_prompt (--negative-prompt) is the unconditional branch of CFG, which guidance_scale "
                         "(--guidance-scale) 1 turns off: give a scale other than 1, or no negative prompt")
    if len(latent_shape) != 4:
        raise InputError(f"latent_shape must be [F, C, H, W], got {list(latent_shape)}")
    timesteps = ode_pair_timesteps(num_steps, shift, record, teacher.schedule.num_train_timesteps)
    output = Path(output)
    clear_output(output, overwrite, delete=rank == 0)
    barrier()
    mine = shard(_as_prompts(prompts), rank, world_size)
    device = next(teacher.model.parameters()).device
    negative = text_encoder_fn([negative_prompt]).to(device) if guidance_scale != 1.0 else None
    bar = tqdm(total=len(mine), desc="ODE pairs", unit="prompt", disable=not progress or rank != 0)
    with OdePairWriter(output, rank, shard_size, timesteps=timesteps, dtype=storage_dtype) as writer:
        for start in range(0, len(mine), batch_size):
            batch = mine[start:start + batch_size]
            noise = torch.stack([torch.randn(*latent_shape, generator=torch.Generator().manual_seed(
                prompt_seed(seed, p.index))) for p in batch]).to(device)
            context = text_encoder_fn([p.model_text for p in batch]).to(device)
            result = sample_bidirectional(teacher, noise, context, negative, sampler="euler", num_steps=num_steps,
                                          shift=shift, guidance_scale=guidance_scale, cfg_space="x0",
                                          record_steps=record)
            # The text the teacher was conditioned on is the text ODE regression conditions the generator on.
            writer.add([p.model_text for p in batch], result.trajectory, indices=[p.index for p in batch])
            bar.update(len(batch))
    bar.close()
    barrier()
    if rank == 0:
        sampler = {"name": "euler", "num_steps": num_steps, "shift": shift, "guidance_scale": guidance_scale,
                   "cfg_space": "x0", "record_steps": record, "negative_prompt": negative_prompt, "seed": seed,
                   "teacher_shift": teacher.schedule.shift, "num_prompts": len(prompts)}
        finalize_index(output, timesteps=timesteps, teacher=teacher_name, sampler=sampler)
    barrier()
    return output


# ------------------------------------------------------------------------------------------------------- CLI

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_argument_group("teacher")
    src.add_argument("--teacher", help="an exported model folder (model_index.json, with text_encoder/ and "
                     "tokenizer/ and codec/ or vae/), or an original Wan folder; default: "
                     "<--model-root>/<--teacher-name>")
    src.add_argument("--model-root", help=f"folder holding original Wan model folders, without --teacher (default: "
                     f"{DEFAULT_MODEL_ROOT})")
    src.add_argument("--teacher-name", help="Wan folder under --model-root, without --teacher; its text encoder and "
                     f"tokenizer are used too (default: {DEFAULT_TEACHER_NAME})")
    src.add_argument("--teacher-shift", type=float, default=TEACHER_SHIFT, help="shift of the teacher's own "
                     "flow <-> x0 conversion grid (the original's wrapper: %(default)s)")
    io = p.add_argument_group("data")
    io.add_argument("--prompts", required=True, help="UTF-8 text file, one prompt per line (blank lines skipped)")
    io.add_argument("--output", required=True, help="output folder (index.json + shard-r*-*.safetensors)")
    io.add_argument("--max-prompts", type=int, help="use only the first N prompts of the file")
    io.add_argument("--shard-size", type=int, default=64, help="pairs per shard file (default: %(default)s)")
    io.add_argument("--storage-dtype", choices=list(DTYPES), default="bfloat16",
                    help="dtype of the stored trajectories (default: %(default)s)")
    io.add_argument("--overwrite", action="store_true", help="replace ODE pairs already in --output")
    smp = p.add_argument_group("sampling")
    smp.add_argument("--num-frames", type=int, default=21, help="latent frames (default: %(default)s)")
    smp.add_argument("--height", type=int, help="pixel height; latent H = height / the codec's spatial factor (8 for "
                     "the Wan VAE). Default: the model folder's setting, else 480")
    smp.add_argument("--width", type=int, help="pixel width (default: the model folder's setting, else 832)")
    smp.add_argument("--num-steps", type=int, default=48, help="Euler steps (default: %(default)s)")
    smp.add_argument("--shift", type=float, default=8.0, help="sampler timestep shift (default: %(default)s)")
    smp.add_argument("--guidance-scale", type=float, default=6.0, help="CFG scale, applied to the x0 predictions "
                     "(default: %(default)s; 1 disables the negative prompt)")
    smp.add_argument("--record", type=int, nargs="+", default=[0, 12, 24, 36, 48], help="step indices whose state "
                     "is kept; the last must equal --num-steps (the clean sample). Default: %(default)s")
    smp.add_argument("--negative-prompt", default="", help="negative prompt for CFG (default: empty; the Wan "
                     "recipes pass Wan's standard negative prompt)")
    smp.add_argument("--batch-size", type=int, default=1, help="prompts per teacher call (default: %(default)s)")
    smp.add_argument("--seed", type=int, default=0, help="noise of prompt i is seeded by (seed, i) "
                     "(default: %(default)s)")
    run = p.add_argument_group("device")
    run.add_argument("--device", help="cpu, cuda, cuda:N (default: cuda when available; under torchrun each rank "
                     "uses its LOCAL_RANK GPU)")
    run.add_argument("--dtype", choices=list(DTYPES), default="float32",
                     help="teacher weights' dtype (the original sampled in float32; default: %(default)s)")
    return p


def load_teacher(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """{"denoiser", "encode", "spatial_factor", "channels", "height", "width", "name"} for the CLI's teacher."""
    from pipeline.loading.model_folder import is_model_folder, load_codec, load_text_encoder, load_transformer
    from pipeline.schedule import FlowMatchSchedule
    text_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.teacher:
        for flag, value in (("--model-root", args.model_root), ("--teacher-name", args.teacher_name)):
            if value is not None:
                raise InputError(f"{flag} {value} locates a teacher under the Wan model root; --teacher {args.teacher} "
                                 "names the teacher's folder itself: give one of them")
    if args.teacher and is_model_folder(args.teacher):
        folder = Path(args.teacher)
        net, causal = load_transformer(folder, device=device, dtype=dtype)
        if not (folder / "text_encoder").is_dir():
            raise MissingFileError(f"model folder {folder} has no text_encoder/; the teacher needs its encoder")
        encoder = load_text_encoder(folder, text_len=net.config.text_len, device=device, dtype=text_dtype)
        factor = load_codec(folder).spatial_factor
        height, width, name = causal.get("height", 480), causal.get("width", 832), str(folder)
    else:
        from pipeline.loading.wan_components import load_wan_dit, load_wan_text_encoder, model_dir
        folder = Path(args.teacher) if args.teacher else model_dir(args.model_root or DEFAULT_MODEL_ROOT,
                                                                   args.teacher_name or DEFAULT_TEACHER_NAME)
        if not folder.is_dir():
            raise MissingFileError(f"teacher folder {folder} does not exist")
        net = load_wan_dit(folder, device=device, dtype=dtype)
        encoder = load_wan_text_encoder(folder, text_len=net.config.text_len, device=device, dtype=text_dtype)
        factor, height, width, name = WAN_SPATIAL_FACTOR, 480, 832, str(folder)
    net.requires_grad_(False)
    denoiser = Denoiser(net, FlowMatchSchedule(args.teacher_shift), uniform_timestep=True)
    return {"denoiser": denoiser, "encode": lambda prompts: encoder.encode(prompts, output_device=device),
            "spatial_factor": int(factor), "channels": net.config.in_dim, "patch": net.config.patch_size,
            "height": args.height or height, "width": args.width or width, "name": name}


def latent_grid(height: int, width: int, factor: int, patch: Sequence[int]) -> tuple[int, int]:
    h, w = height // factor, width // factor
    if height % factor or width % factor or h % patch[1] or w % patch[2] or h < 1 or w < 1:
        raise InputError(f"--height/--width {height}x{width} must be multiples of the codec's spatial factor "
                         f"{factor} times the DiT patch size {list(patch[1:])}")
    return h, w


def run(args: argparse.Namespace) -> int:
    import transformers
    transformers.utils.logging.disable_progress_bar()  # our own bar reports progress; keep stderr for errors
    from utils.distributed import cleanup_distributed, init_distributed
    for name in ("num_frames", "num_steps", "batch_size", "shard_size"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    prompts = read_prompt_file(args.prompts)
    if args.max_prompts is not None:
        if args.max_prompts < 1:
            raise InputError(f"--max-prompts must be >= 1, got {args.max_prompts}")
        prompts = prompts[:args.max_prompts]
    state = init_distributed(device="cpu" if args.device == "cpu" else None)
    device = torch.device(args.device) if args.device and state.world_size == 1 else state.device
    teacher = load_teacher(args, device, DTYPES[args.dtype])
    h, w = latent_grid(teacher["height"], teacher["width"], teacher["spatial_factor"], teacher["patch"])
    if state.is_main:
        print(f"[ode pairs] {len(prompts)} prompts over {state.world_size} rank(s), latents "
              f"[{args.num_frames}, {teacher['channels']}, {h}, {w}], teacher {teacher['name']} on {device}",
              flush=True)
    generate_ode_pairs(teacher["denoiser"], teacher["encode"], prompts, args.output,
                       latent_shape=(args.num_frames, teacher["channels"], h, w),
                       negative_prompt=args.negative_prompt, num_steps=args.num_steps, shift=args.shift,
                       guidance_scale=args.guidance_scale, record_steps=args.record, batch_size=args.batch_size,
                       seed=args.seed, shard_size=args.shard_size, rank=state.rank, world_size=state.world_size,
                       storage_dtype=DTYPES[args.storage_dtype], teacher_name=teacher["name"],
                       overwrite=args.overwrite)
    # Only on success: after an error on one rank a barrier would wait for peers that never come; exiting
    # non-zero lets torchrun stop the others instead.
    cleanup_distributed(state)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except UserError as err:  # only the project's own errors: a bug keeps its traceback
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
