"""Generate videos from prompts with a Self Forcing causal generator.

    python inference.py                                   # the bundled shapes-world model, a few built-in prompts
    python inference.py --prompt "a red circle moves left on a blue background"
    python inference.py --model exported_model/ --data_path prompts.txt --output-dir videos/
    python inference.py --config_path configs/inference_official.yaml \\
        --checkpoint_path checkpoints/self_forcing_dmd.pt --model-root wan_models --data_path prompts.txt --use_ema
    torchrun --nproc_per_node=8 inference.py ...          # prompts sharded over ranks, none dropped
    torchrun --nproc_per_node=4 inference.py --parallel sequence ...   # one video at a time, its tokens on 4 GPUs
    torchrun --nproc_per_node=8 inference.py --parallel sequence --sequence-parallel-size 4 ...  # 2 videos at a time

Outputs per prompt and sample: `<index>-<slug>.mp4` and `stats_<index>-<slug>.json`, written atomically; a rerun
skips outputs finished under the same settings (other settings are an error naming the setting; --overwrite
regenerates), and processes sharing a folder claim each prompt (docs/failure_behaviour.md). Trailing `key=value`
arguments override config keys (see configs/default_config.yaml).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from model.attention import ATTENTION_BACKENDS
from pipeline.levers import Levers
from utils.errors import InputError as UsageError  # bad flags and inputs (the name demo.py and the tests use)
from utils.errors import MissingFileError
from utils.gpu_memory import MEMORY_KEYS, format_memory, memory_report

if TYPE_CHECKING:
    from pipeline.inference import CausalSettings
    from pipeline.schedule import FlowMatchSchedule

REPO_ROOT = Path(__file__).resolve().parent
DEFAULT_MODEL = REPO_ROOT / "assets" / "shapes_world"
PRESETS = {name: REPO_ROOT / "configs" / f"inference_{name}.yaml" for name in ("official", "taehv", "long")}


def add_model_arguments(p: argparse.ArgumentParser):
    """The flags that choose and load a model (`build_pipeline` reads them); shared with demo.py. Returns the group."""
    src = p.add_argument_group("model")
    src.add_argument("--model", help="exported model folder (default: the bundled assets/shapes_world)")
    src.add_argument("--config_path", help="YAML merged onto configs/default_config.yaml (original flag)")
    src.add_argument("--preset", choices=sorted(PRESETS), help="rollout preset, for any model (the bundled one "
                     "too): long = sink 5 + window 21 latent frames + relative RoPE, for long steady rollouts; "
                     "taehv = the TAEHV decoder (taehv_path); official = the released checkpoint's steps and blocks. "
                     "It never chooses the model: with Wan weights (no --model) the released checkpoint's settings "
                     "lie under it")
    src.add_argument("--checkpoint_path", help="generator weights: Self-Forcing .pt, safetensors or a folder")
    src.add_argument("--use_ema", action="store_true", help="load generator_ema from the checkpoint")
    src.add_argument("--model-root", help="folder holding the Wan model folders (config key model_root)")
    return src


def add_device_arguments(group) -> None:
    """Where and in which precision the model runs (`pick_device`, `build_pipeline`); shared with demo.py."""
    group.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    group.add_argument("--dtype", choices=["bfloat16", "float16", "float32"],
                       help="generator precision (default: bfloat16 on GPU, float32 on CPU)")
    group.add_argument("--text-encoder-device", help="device of the text encoder; cpu keeps UMT5-XXL (11 GB in "
                       "bf16) off the GPU for good: the way onto a card of 24 GB or less (prompts are encoded once, "
                       "before generating)")
    group.add_argument("--gpu-memory-limit-gib", type=float, metavar="GIB",
                       help="cap this process's GPU memory (allocations beyond it fail as out of memory), e.g. 24 to "
                       "check on a large card that a run fits a 24 GB one, or to share a GPU")
    group.add_argument("--fp8", action="store_true", help="FP8 (e4m3) linear layers in the transformer blocks, for "
                       "GPUs with FP8 tensor cores (Ada, Hopper); speed and quality are measured by speed.py --fp8 and "
                       "evaluate_shapes.py --fp8 (not yet on a GPU); emulated, slower, elsewhere")


def add_speed_arguments(group, *, compile_flag: bool = True) -> None:
    """The speed levers (pipeline/levers.py): on by default on CUDA, each flag turns one off or pins it; shared with
    demo.py (whose page switches compile per video: compile_flag=False)."""
    if compile_flag:
        group.add_argument("--compile", action=argparse.BooleanOptionalAction,
                           help="torch.compile the generator's layer pieces and the Wan VAE's steady decoder (config "
                           "key compile; default: on with CUDA where Triton is installed, off on the CPU)")
    group.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction,
                       help="replay one CUDA graph per block position (config key cuda_graphs; default: on with CUDA)")
    group.add_argument("--fused-qkv", action=argparse.BooleanOptionalAction,
                       help="one GEMM for the self-attention q/k/v projections (default: on with CUDA)")
    group.add_argument("--attention-backend", choices=ATTENTION_BACKENDS,
                       help="pin the unmasked attention kernel (config key attention_backend). Default auto: with "
                       "CUDA the fastest available one, timed at start-up on the last block's shape; else SDPA's "
                       "choice (flash-attn if installed). sdpa_cudnn_halves / flash_attn_halves split the cache's "
                       "keys in two halves, faster at batch 1 on an H100/H200 (benchmarks/attention_split.py)")
    group.add_argument("--decode-frames-per-call", type=int, metavar="N",
                       help="latent frames per Wan VAE decoder call (default: 1 on CUDA, as fast as a whole block "
                       "and less memory; 3, one block, elsewhere); the same frames either way")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p)
    inp = p.add_argument_group("prompts")
    inp.add_argument("--prompt", help="the prompt text (a file of prompts goes to --data_path)")
    inp.add_argument("--data_path", help="prompt file, one prompt per line; with --i2v also the original's image-text "
                     "pair folder (target_crop_info_<ratio>.json + <ratio>/ images) (original flag)")
    inp.add_argument("--extended_prompt_path", help="longer prompts used for generation, line by line with the prompts")
    inp.add_argument("--prompt-schedule", help="switch prompts at block boundaries: a file of `block: prompt` lines "
                     "or JSON; applies to every generated video")
    inp.add_argument("--i2v", action="store_true", help="image-to-video: condition on --image (original flag)")
    inp.add_argument("--image", help="first frame for --i2v (needs rollout.independent_first_frame=true)")
    inp.add_argument("--video", help="video to extend: its frames are encoded and written into the cache first")
    out = p.add_argument_group("output")
    out.add_argument("--output_folder", "--output-dir", dest="output_dir", default="outputs",
                     help="where videos and stats go (default: %(default)s)")
    out.add_argument("--save_with_index", action="store_true", help="name files by index only (no prompt slug)")
    out.add_argument("--overwrite", action="store_true", help="regenerate outputs that already exist")
    out.add_argument("--fps", type=int, help="frames per second of the mp4 (default: config fps, 16)")
    gen = p.add_argument_group("generation")
    gen.add_argument("--num_samples", type=int, default=1, help="samples per prompt (default: %(default)s)")
    gen.add_argument("--seed", type=int, default=0, help="base seed; each prompt index gets its own (default: 0)")
    gen.add_argument("--num_output_frames", type=int, help="latent frames to generate (original flag; default 21)")
    gen.add_argument("--total-blocks", type=int, help="blocks to generate (frames = blocks x num_frame_per_block)")
    gen.add_argument("--height", type=int, help="pixels (default: config height)")
    gen.add_argument("--width", type=int, help="pixels (default: config width)")
    run = p.add_argument_group("runtime")
    add_device_arguments(run)
    add_speed_arguments(run)
    run.add_argument("--offload-text-encoder", action="store_true",
                     help="encode every prompt first, then move the text encoder to the CPU and return its GPU memory "
                     "(its weights still pass through the GPU once; --text-encoder-device cpu never puts them there)")
    run.add_argument("--parallel", choices=["data", "sequence"], default="data",
                     help="under torchrun: data = each rank generates its own share of the prompts; sequence = the "
                     "ranks of a group split the tokens (and KV cache heads) of ONE video, for lower latency per "
                     "video; its first rank decodes and writes (default: %(default)s)")
    run.add_argument("--sequence-parallel-size", type=int, metavar="K",
                     help="ranks per video with --parallel sequence (default: all of them); the processes form "
                     "world/K data-parallel groups that share the prompts")
    p.add_argument("overrides", nargs="*", help="config overrides, key=value")
    return p


def resolve_config(args: argparse.Namespace, folder_causal: dict[str, Any] | None, device_type: str = "cpu"):
    """default_config.yaml <- the device's lever defaults <- the model folder's settings <- the preset <- --config_path
    <- flags and key=value overrides. folder_causal None means Wan weights without a folder: the released checkpoint's
    settings (configs/inference_official.yaml) then lie under any preset, as a folder's own settings do."""
    from pipeline.levers import config_defaults
    from utils.config import load_config
    overrides = list(args.overrides)
    if args.model_root:
        overrides.append(f"model.model_root={args.model_root}")
    for flag, key in (("compile", "compute.compile"), ("cuda_graphs", "inference.cuda_graphs")):
        if getattr(args, flag, None) is not None:  # None: the flag was not given, the config and device decide
            overrides.append(f"{key}={str(getattr(args, flag)).lower()}")
    if getattr(args, "attention_backend", None):
        overrides.append(f"inference.attention_backend={args.attention_backend}")
    defaults = config_defaults(device_type)
    layers = [(f"{device_type} defaults", defaults)] if defaults else []
    layers += [("model folder settings", folder_causal)] if folder_causal else []
    extra = []
    if args.preset:
        extra = [PRESETS["official"]] if folder_causal is None and args.preset != "official" else []
        extra.append(PRESETS[args.preset])
    return load_config(args.config_path, overrides, layers=layers, extra_paths=extra)


@dataclasses.dataclass(frozen=True)
class RunOptions:
    """What the user's flags and config keys make of the pipeline and of every video (`run_options`)."""

    schedule: FlowMatchSchedule
    """the flow-matching noise schedule (shift and training timesteps)"""
    settings: CausalSettings
    """how the generator rolls out: steps, blocks, context noise, cache window and sink, RoPE"""
    levers: Levers
    """the speed levers (`pipeline.levers.levers_for`); an attention back-end of `MEASURE` is timed at start-up"""
    height: int
    """pixels of every video"""
    width: int
    """pixels of every video"""
    fps: int
    """frames per second of the written mp4s"""
    latent_frames: int
    """new latent frames per video (after those of an initial image or video)"""


def run_options(args: argparse.Namespace, cfg, device_type: str) -> RunOptions:
    """The one place where the user's options (flags, then the config `cfg` resolved for `device_type`) become the
    pipeline's settings, its speed levers and each video's size and length; inference.py and demo.py both build from
    it. Flags a command does not have (demo.py has no --height) leave the config's value."""
    from pipeline.inference import CausalSettings
    from pipeline.levers import levers_for
    from pipeline.schedule import FlowMatchSchedule

    per_call = _flag_or(args, "decode_frames_per_call", None)
    if per_call is not None and per_call < 1:
        raise UsageError(f"--decode-frames-per-call must be >= 1, got {per_call}")
    schedule = FlowMatchSchedule(shift=cfg.rollout.generator_shift, num_train_timesteps=cfg.model.num_train_timestep)
    settings = CausalSettings.from_config(cfg, schedule)
    levers = levers_for(cfg, device_type, fused_qkv=_flag_or(args, "fused_qkv", None), decode_frames_per_call=per_call)
    video = cfg.inference
    return RunOptions(schedule=schedule, settings=settings, levers=levers,
                      height=_flag_or(args, "height", video.height), width=_flag_or(args, "width", video.width),
                      fps=_flag_or(args, "fps", video.fps),
                      latent_frames=latent_frames(args, cfg, settings))


def _flag_or(args: argparse.Namespace, name: str, default: Any) -> Any:
    """The flag's value where the command has the flag and it was given, else `default`."""
    value = getattr(args, name, None)
    return default if value is None else value


def latent_frames(args: argparse.Namespace, cfg, settings) -> int:
    """New latent frames per video: --total-blocks, --num_output_frames or the config's length."""
    total_blocks, num_output_frames = _flag_or(args, "total_blocks", None), _flag_or(args, "num_output_frames", None)
    if total_blocks is not None and num_output_frames is not None:
        raise UsageError("give --total-blocks or --num_output_frames, not both")
    if total_blocks is not None:
        if total_blocks < 1:
            raise UsageError(f"--total-blocks must be >= 1, got {total_blocks}")
        # An independent first frame is its own block, unless it comes from --i2v (--image or a pair folder) / --video.
        given = bool(getattr(args, "i2v", False) or getattr(args, "image", None) or getattr(args, "video", None))
        return settings.latent_frames_for_blocks(total_blocks, with_initial_latent=given)
    frames = num_output_frames if num_output_frames is not None else cfg.rollout.image_or_video_shape[1]
    if frames < 1:
        raise UsageError(f"--num_output_frames must be >= 1, got {frames}")
    return frames


# ---------------------------------------------------------------------------------------------------- components
def parse_device(text: str, flag: str) -> torch.device:
    """A device flag's value, checked to exist on this machine."""
    try:
        device = torch.device(text)
    except RuntimeError:
        raise UsageError(f"{flag} {text!r} is not a device: expected cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"{flag} {text} was asked for, but CUDA is not available")
    if device.type not in ("cpu", "cuda", "meta"):
        try:
            torch.empty(0, device=device)
        except (RuntimeError, AssertionError) as err:
            raise UsageError(f"{flag} {text} is not available here: {str(err).splitlines()[0]}") from None
    return device


def pick_device(args: argparse.Namespace) -> tuple[torch.device, torch.dtype]:
    device = parse_device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"), "--device")
    if device.type == "cuda" and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UsageError(f"--device {device} was asked for, but only {torch.cuda.device_count()} CUDA devices exist")
    text_device = device
    if getattr(args, "text_encoder_device", None):
        text_device = parse_device(args.text_encoder_device, "--text-encoder-device")
    if getattr(args, "offload_text_encoder", False) and text_device.type == "cpu":
        raise UsageError("--offload-text-encoder returns the text encoder's GPU memory after encoding; here the "
                         "encoder runs on the CPU already" + (" (--text-encoder-device cpu)" if device != text_device
                                                               else ""))
    if getattr(args, "gpu_memory_limit_gib", None) is not None:
        limit_gpu_memory(device, args.gpu_memory_limit_gib)
    if getattr(args, "cuda_graphs", None) and device.type != "cuda":  # asked for by name: never dropped in silence
        raise UsageError(f"--cuda-graphs records CUDA graphs; this run is on {device}")
    default = torch.bfloat16 if device.type == "cuda" else torch.float32
    return device, getattr(torch, args.dtype) if args.dtype else default


def limit_gpu_memory(device: torch.device, gib: float) -> None:
    """At most `gib` GiB for this process on `device` (the caching allocator's share of the card)."""
    if device.type != "cuda":
        raise UsageError(f"--gpu-memory-limit-gib {gib:g} limits a CUDA device; this run is on {device}")
    total = torch.cuda.get_device_properties(device).total_memory
    if not 0 < gib * 2**30 <= total:
        raise UsageError(f"--gpu-memory-limit-gib {gib:g} must be above 0 and at most the card's "
                         f"{total / 2**30:.1f} GiB")
    torch.cuda.set_per_process_memory_fraction(gib * 2**30 / total, device)


class LoadedPipeline(NamedTuple):
    pipe: Any  # pipeline.inference.CausalInferencePipeline
    cfg: Any  # the resolved config
    source: str  # what was loaded: the model folder or the checkpoint
    options: RunOptions  # the user's options as the pipeline was built with them (levers as applied)


def build_pipeline(args: argparse.Namespace, device: torch.device, dtype: torch.dtype, *,
                   compile_pipeline: bool = True) -> LoadedPipeline:
    """Load the model `args` name and build its pipeline with `run_options`. compile_pipeline False leaves the pipeline
    uncompiled whatever the options say (demo.py compiles a twin for each video that asks)."""
    from pipeline.inference import CausalInferencePipeline
    from pipeline.loading import model_folder, wan_components

    folder = Path(args.model) if args.model else None
    model_root = model_root_given(args)
    if folder is None and not (args.config_path or args.checkpoint_path):  # a preset never chooses the model
        if model_root:  # it names where Wan weights come from; the bundled model would run without them
            raise UsageError(f"{model_root} is the folder of the Wan weights that --checkpoint_path or --config_path "
                             "load (or that an exported --model lacks); with none of those the bundled model runs "
                             "and would not read it")
        if not model_folder.is_model_folder(DEFAULT_MODEL):
            raise UsageError(f"no model given and the bundled default {DEFAULT_MODEL} is missing: pass --model DIR "
                             "(an exported model folder) or --config_path/--checkpoint_path with Wan weights")
        folder = DEFAULT_MODEL
    text_device = torch.device(args.text_encoder_device) if args.text_encoder_device else device
    if folder is not None:
        if not model_folder.is_model_folder(folder):
            raise UsageError(f"{folder} is not a model folder (no model_index.json)")
        if args.use_ema and not args.checkpoint_path:
            raise UsageError(f"--use_ema picks generator_ema from a --checkpoint_path (.pt or training checkpoint "
                             f"folder); the model folder {folder} "
                             "holds one set of weights (an export keeps the EMA ones when the run had them)")
        generator, causal = model_folder.load_transformer(folder, device=device, dtype=dtype)
        cfg = resolve_config(args, causal, device.type)
        from_base = not (folder / "text_encoder").is_dir() or (cfg.inference.decoder != "taehv"
                                                                 and not model_folder.has_codec(folder))
        if model_root and not from_base:
            raise UsageError(f"{model_root}: the model folder {folder} holds every part itself (text_encoder/ and its "
                             "decoder); the Wan model root supplies those an export leaves out")
        if args.checkpoint_path:
            from pipeline.loading.checkpoint import load_dit_state_dict, load_state_dict_strict
            from utils.errors import reading
            state, _ = load_dit_state_dict(args.checkpoint_path, use_ema=args.use_ema)
            with reading(f"--checkpoint_path {args.checkpoint_path}"):
                load_state_dict_strict(generator, state, args.checkpoint_path)
        # An export without --include-base carries only the transformer: the rest comes from the Wan folder. Every
        # part runs in the generator's precision (the original casts the whole pipeline to bf16).
        if cfg.inference.decoder == "taehv":
            codec = load_taehv(cfg, device, dtype)
        elif model_folder.has_codec(folder):
            codec = model_folder.load_codec(folder, device=device, dtype=dtype)
        else:
            codec = wan_components.load_wan_vae(base_model_dir(folder, cfg, "vae/ or codec/"), device=device,
                                                dtype=dtype)
        if (folder / "text_encoder").is_dir():
            text_encoder = model_folder.load_text_encoder(folder, generator.config.text_len, device=text_device,
                                                          dtype=dtype)
        else:
            text_encoder = wan_components.load_wan_text_encoder(
                base_model_dir(folder, cfg, "text_encoder/"), text_len=generator.config.text_len,
                device=text_device, dtype=dtype)
        source = str(folder)
    else:
        cfg = resolve_config(args, None, device.type)
        wan_dir = wan_components.model_dir(cfg.model.model_root, cfg.model.generator_name)
        if not args.checkpoint_path and not cfg.model.generator_ckpt:
            raise UsageError("--checkpoint_path is required with Wan weights (a Self Forcing generator)")
        # model.generator_ckpt_ema belongs to model.generator_ckpt: it picks the EMA weights where that file is used.
        use_ema = args.use_ema or (not args.checkpoint_path and cfg.model.generator_ckpt_ema)
        generator = wan_components.load_wan_dit(wan_dir, checkpoint=args.checkpoint_path or cfg.model.generator_ckpt,
                                                use_ema=use_ema, device=device, dtype=dtype)
        text_encoder = wan_components.load_wan_text_encoder(wan_dir, text_len=generator.config.text_len,
                                                            device=text_device, dtype=dtype)
        if cfg.inference.decoder == "taehv":
            codec = load_taehv(cfg, device, dtype)
        else:
            codec = wan_components.load_wan_vae(wan_dir, device=device, dtype=dtype)
        source = str(args.checkpoint_path or cfg.model.generator_ckpt)
    if cfg.inference.decoder == "pixel" and type(codec).__name__ != "PixelShuffleCodec":
        raise UsageError(f"inference.decoder pixel is the shapes world's codec; the model {source} decodes with "
                         f"{type(codec).__name__} (decoder wan: the model's own, or taehv)")
    if args.fp8:
        from model.fp8 import convert_to_fp8, fp8_matmul_supported
        if not fp8_matmul_supported(device):
            print(f"warning: --fp8 on {device} is emulated (no FP8 tensor cores): slower than without", flush=True)
        convert_to_fp8(generator)
    options = run_options(args, cfg, device.type)
    options = dataclasses.replace(options, levers=configure_levers(options, generator, codec, device, dtype))
    levers = options.levers if compile_pipeline else dataclasses.replace(options.levers, compile=False)
    pipe = CausalInferencePipeline(generator, text_encoder, codec, options.schedule, options.settings,
                                   negative_prompt=cfg.data.negative_prompt, compile=levers.compile,
                                   cuda_graphs=levers.cuda_graphs, decode_side_stream=levers.decode_side_stream,
                                   decode_frames_per_call=levers.decode_frames_per_call)
    pipe.levers = levers
    return LoadedPipeline(pipe, cfg, source, options)


def check_decode_frames_flag(args: argparse.Namespace, codecs) -> None:
    """--decode-frames-per-call sets the Wan VAE's decoder calls: with no decoder that takes it, an error."""
    import inspect
    if getattr(args, "decode_frames_per_call", None) is None:
        return
    if not any("frames_per_call" in inspect.signature(c.stream_decoder).parameters for c in codecs):
        names = ", ".join(type(c).__name__ for c in codecs)
        raise UsageError(f"--decode-frames-per-call {args.decode_frames_per_call} sets the Wan VAE's decoder calls; "
                         f"this model decodes with {names}")


def load_taehv(cfg, device: torch.device, dtype: torch.dtype):
    if not cfg.inference.taehv_path:
        raise UsageError("inference.decoder=taehv needs inference.taehv_path (the taew2_1.pth weights)")
    from model.taehv import TAEHVCodec
    from utils.errors import reading
    with reading(f"taehv_path {cfg.inference.taehv_path}"):
        return TAEHVCodec.from_checkpoint(cfg.inference.taehv_path, device=device, dtype=dtype)


def configure_levers(options: RunOptions, generator, codec, device: torch.device, dtype: torch.dtype) -> Levers:
    """Set the options' speed levers on the generator and the process (the attention back-end, timed first where it
    is `MEASURE`, at the videos' size and the cache's length); returns the levers with the back-end that was set."""
    from pipeline.levers import MEASURE, apply_attention_backend, attention_shape
    levers = options.levers
    generator.inference_options = levers.inference_options(generator.inference_options)
    shape = None
    if levers.attention_backend == MEASURE:
        s, st = codec.spatial_factor, options.settings
        window = st.window_frames if st.window_frames != -1 else st.max_frames_without_window
        shape = attention_shape(generator.config, generator.tokens_per_frame(options.height // s, options.width // s),
                                st.frames_per_block, window)
    try:
        levers, measured = apply_attention_backend(levers, device, dtype, shape)
    except ValueError as err:  # a back-end name not known, or a flash-attn that is not installed
        raise UsageError(f"attention_backend: {err}") from None
    if measured is not None and int(os.environ.get("RANK", "0")) == 0:
        timings = ", ".join(f"{k} {v:.2f} ms" for k, v in measured["ms"].items() if isinstance(v, float))
        print(f"attention back-end: {levers.attention_backend} (timed: {timings})", flush=True)
    return levers


def model_root_given(args: argparse.Namespace) -> str | None:
    """How the user named the Wan model root, in their words: `--model-root DIR`, else the last `key=value` override
    of model.model_root (either spelling), as the config resolves them; None when neither is given. The checks of
    where a model root cannot act judge this one answer, so the flag and the key behave the same."""
    from utils.config.original_keys import FLAT_KEYS
    if args.model_root:
        return f"--model-root {args.model_root}"
    for item in reversed(args.overrides):
        key = item.split("=", 1)[0].strip()
        if FLAT_KEYS.get(key, key) == "model.model_root":
            return item
    return None


def base_model_dir(folder: Path, cfg, part: str) -> Path:
    """The Wan folder that supplies `part`, which an export without --include-base leaves out."""
    wan_dir = Path(cfg.model.model_root) / cfg.model.generator_name
    if not wan_dir.is_dir():
        raise MissingFileError(f"model folder {folder} has no {part} (exported without --include-base), and the base "
                               f"model folder {wan_dir} it would come from does not exist: pass --model-root with the "
                               f"folder that holds {cfg.model.generator_name}/")
    return wan_dir


# ---------------------------------------------------------------------------------------------------- the job
def collect_prompts(args: argparse.Namespace, schedule: list[tuple[int, str]] | None = None):
    from utils.prompts import Prompt, attach_extended, read_image_pair_dir, read_prompt_file, read_prompts
    if args.prompt is not None and args.data_path is not None:
        raise UsageError("give --prompt or --data_path, not both")
    for flag, value in (("--prompt", args.prompt), ("--data_path", args.data_path)):
        if value is not None and not value.strip():  # an unset shell variable: never fall back to the built-ins
            raise UsageError(f"{flag} is empty; give the prompt text (--prompt) or a prompt file (--data_path)")
    if args.prompt is not None:
        # --prompt is always the text itself; files are read only through --data_path (never a file's content by
        # accident because the text happened to name one).
        if args.prompt.strip().lower().endswith(".txt") or os.path.isfile(args.prompt):
            raise UsageError(f"--prompt {args.prompt!r} names a file; --prompt takes the prompt text, to read "
                             f"prompts from a file use --data_path {args.prompt}")
        prompts = read_prompts([args.prompt])
    elif args.data_path and Path(args.data_path).is_dir():
        if not args.i2v:
            raise UsageError(f"--data_path {args.data_path} is a folder: the original's image-text pairs, which need "
                             "--i2v (a text-to-video prompt list is a .txt file)")
        if args.image:
            raise UsageError("give --image or an i2v --data_path folder (its images), not both")
        prompts = read_image_pair_dir(args.data_path)
    elif args.data_path:
        prompts = read_prompt_file(args.data_path)
    elif schedule:  # the schedule is what gets generated: one video, named after its first prompt
        prompts = [Prompt(0, schedule[0][1])]
    else:
        prompts = [Prompt(i, text) for i, text in enumerate(BUILTIN_PROMPTS)]
    if args.extended_prompt_path:
        prompts = attach_extended(prompts, args.extended_prompt_path)
    return prompts


# In the bundled shapes-world model's language (shapes/prompts.py), combinations seen in training.
BUILTIN_PROMPTS = [
    "a large red circle moves slowly left on a blue background",
    "a small yellow square moves quickly up on a black background",
    "a large green triangle moves slowly to the lower right on a white background",
    "a large white circle moves quickly right and a small red square moves slowly down on a blue background",
]


def image_latent(pipe, path: str, height: int, width: int, crop=None) -> torch.Tensor:
    """One image as a 1-frame latent `[1, 1, C, h, w]`: cut to `crop` (left, top, right, bottom) if given, then
    scaled to cover height x width and centre-cropped."""
    from utils.video import read_image, resize_center_crop
    image = read_image(path)
    if crop is not None:
        left, top, right, bottom = crop
        if right > image.shape[2] or bottom > image.shape[1]:
            raise UsageError(f"{path}: crop box {crop} exceeds the image ({image.shape[2]}x{image.shape[1]})")
        image = image[:, top:bottom, left:right]
    image = resize_center_crop(image, height, width)
    return pipe.codec.encode_to_latent(image[None, :, None].to(pipe.device))


def initial_latent(args: argparse.Namespace, pipe, cfg, height: int, width: int) -> torch.Tensor | None:
    """The prefix shared by every prompt (--image / --video); per-prompt images of an i2v folder come later."""
    from utils.video import read_video, resize_center_crop
    if args.i2v or args.image:
        folder = args.data_path is not None and Path(args.data_path).is_dir()
        if not (args.image or folder):
            raise UsageError("image-to-video needs --i2v with --image PATH, or --i2v with an image-text pair "
                             "folder as --data_path")
        if not args.i2v:
            raise UsageError("--image needs --i2v")
        if not cfg.rollout.independent_first_frame:
            raise UsageError("--i2v conditions on one frame, which needs rollout.independent_first_frame=true")
        return image_latent(pipe, args.image, height, width) if args.image else None
    if args.video:
        frames, _ = read_video(args.video)  # [T, H, W, 3] uint8
        video = frames.permute(3, 0, 1, 2).float().div(127.5).sub(1)  # [3, T, H, W] in [-1, 1]
        video = torch.stack([resize_center_crop(f, height, width) for f in video.unbind(1)], dim=1)
        tf = pipe.codec.temporal_factor
        keep = 1 + ((video.shape[1] - 1) // tf) * tf
        return pipe.codec.encode_to_latent(video[None, :, :keep].to(pipe.device))
    return None


def parallel_layout(args: argparse.Namespace, rank: int, world: int):
    """How the torchrun ranks share the work: `--parallel data` is sequence groups of one."""
    from pipeline.sequence_parallel import parallel_layout as layout
    if args.parallel == "data":
        if args.sequence_parallel_size is not None:
            raise UsageError("--sequence-parallel-size needs --parallel sequence")
        return layout(world, rank, 1)
    try:
        chosen = layout(world, rank, args.sequence_parallel_size)
    except ValueError as err:
        raise UsageError(f"--sequence-parallel-size: {err}") from None
    if chosen.sequence_size == 1:  # groups of one rank: --parallel data, under another name
        raise UsageError(f"--parallel sequence splits each video over several processes; here each has one ({world} "
                         "process(es), sequence-parallel size 1): run under torchrun with 2 or more per video, or "
                         "drop --parallel sequence")
    return chosen


# Flags whose value must be a positive number (None: the config's value).
POSITIVE_FLAGS = {"height": "--height", "width": "--width", "fps": "--fps", "num_samples": "--num_samples",
                  "num_output_frames": "--num_output_frames", "total_blocks": "--total-blocks",
                  "sequence_parallel_size": "--sequence-parallel-size"}


def check_args(args: argparse.Namespace) -> None:
    """What the command line alone decides, judged before any model loads."""
    from utils.video import MAX_FPS
    for attr, flag in POSITIVE_FLAGS.items():
        value = getattr(args, attr, None)
        if value is not None and value < 1:
            raise UsageError(f"{flag} must be >= 1, got {value}")
    if args.fps is not None and args.fps > MAX_FPS:
        raise UsageError(f"--fps must be at most {MAX_FPS}, got {args.fps}")
    if args.video and (args.i2v or args.image):
        # One prefix per video: the image of --i2v would replace the video's frames.
        raise UsageError("--video extends a video, --i2v/--image start from one image: give one of them")


def output_names(args: argparse.Namespace, prompt) -> list[str]:
    from utils.prompts import output_name
    if args.save_with_index:
        return [f"{prompt.index:04d}" + (f"-s{s}" if args.num_samples > 1 else "") for s in range(args.num_samples)]
    return [output_name(prompt.index, prompt.text, s, args.num_samples) for s in range(args.num_samples)]


def prepare_outputs(output_dir: str, rank: int) -> Path:
    """The output folder, checked writable; the first rank removes what an interrupted run left there."""
    from utils import outputs
    out_dir = outputs.prepare_output_dir(output_dir)
    if rank == 0:
        swept = outputs.sweep_leftovers(out_dir)
        if swept:
            print(f"removed {len(swept)} file(s) an interrupted run left in {out_dir}", flush=True)
    return out_dir


def sequence_group(pipe, layout):
    """The process group of this rank's video under --parallel sequence, installed on the generator (None: a video
    per rank)."""
    if layout.sequence_size == 1:
        return None
    from pipeline.sequence_parallel import enable_sequence_parallel, new_sequence_group
    group = new_sequence_group(layout)
    enable_sequence_parallel(pipe.generator, group)
    return group


@dataclasses.dataclass
class Job:
    """A run's fixed parts, shared by its videos: the loaded pipeline and options, the ranks' layout, where the
    outputs go, and the inputs every prompt shares."""

    args: argparse.Namespace
    loaded: LoadedPipeline
    device: torch.device
    dtype: torch.dtype
    layout: Any  # pipeline.sequence_parallel.ParallelLayout
    group: Any  # the process group of this rank's video (None: a video per rank)
    out_dir: Path
    prompt_schedule: list[tuple[int, str]] | None
    prefix: torch.Tensor | None  # the initial latent every prompt shares (--image, --video)

    @property
    def options(self) -> RunOptions:
        return self.loaded.options

    def request(self, prompt=None):
        """The prompt's video, drawn from its own seed; an i2v folder's prompt brings its own first frame. Without a
        prompt: what every video shares (no seed), for checking the request before any is made."""
        from pipeline.inference import VideoRequest
        o, args = self.options, self.args
        first = self.prefix
        if prompt is not None and prompt.image is not None:
            first = image_latent(self.loaded.pipe, prompt.image, o.height, o.width, prompt.crop)
        seed = None if prompt is None else torch.Generator().manual_seed(args.seed * 1_000_003 + prompt.index)
        return VideoRequest(o.latent_frames, o.height, o.width, generator=seed, initial_latent=first,
                            prompt_schedule=self.prompt_schedule)

    def check(self) -> None:
        """The pipeline's own check of sizes and lengths, as a one-line error before any output is written."""
        o = self.options
        try:
            self.loaded.pipe.latent_grid(o.height, o.width)
        except ValueError as err:
            raise UsageError(f"--height/--width (or the config's height/width): {err}") from None
        try:
            # An image folder (--i2v without --image): each prompt brings one image frame, not known yet.
            image_frames = 1 if self.args.i2v and self.prefix is None else None
            self.loaded.pipe.check_request(self.request(), initial_frames=image_frames)
        except ValueError as err:  # the video's length against the cache, or the schedule against the blocks
            raise UsageError(str(err)) from None

    def record(self, prompt) -> dict[str, Any]:
        """What decides the look of a prompt's videos (compared on reruns)."""
        from utils import outputs
        args, o, pipe = self.args, self.options, self.loaded.pipe
        return outputs.settings_record(
            model_prompt=prompt.model_text, image=prompt.image or args.image, video=args.video, seed=args.seed,
            prompt_seed=args.seed * 1_000_003 + prompt.index, height=o.height, width=o.width, fps=o.fps,
            latent_frames=o.latent_frames, source=self.loaded.source, checkpoint=args.checkpoint_path,
            use_ema=args.use_ema, fp8=args.fp8, dtype=str(self.dtype), prompt_schedule=self.prompt_schedule,
            settings=vars(pipe.settings))

    def pending(self, prompts) -> list:
        """[(prompt, output names)] of this rank's share not finished under the same settings (all of them with
        --overwrite); every rank stops on one rank's settings mismatch, and the ranks of a video take their leader's
        list."""
        from utils import outputs
        from utils.prompts import shard
        mine = shard(prompts, self.layout.data_rank, self.layout.data_size)
        todo = [(p, output_names(self.args, p)) for p in mine]
        problem = None
        try:
            if not self.args.overwrite:
                todo = [(p, names) for p, names in todo if not outputs.finished(self.out_dir, names, self.record(p))]
        except UsageError as err:
            problem = err
        world = self.layout.world
        if world > 1:  # rather than leaving the other ranks at a barrier
            found = [None] * world
            torch.distributed.all_gather_object(found, problem)
            problem = next((p for p in found if p is not None), None)
        if problem is not None:
            raise problem
        todo = self.leaders(todo)
        o, done = self.options, len(mine) - len(todo)
        print(f"[rank {self.layout.rank}/{world}] {len(todo)} of {len(mine)} prompts to generate ({done} done), "
              f"{o.latent_frames} latent frames at {o.height}x{o.width}, model {self.loaded.source}", flush=True)
        return todo

    def leaders(self, value):
        """The value of this video's leading rank (every rank's own under --parallel data)."""
        if self.layout.sequence_size == 1:
            return value
        box = [value]
        torch.distributed.broadcast_object_list(box, src=self.layout.rank - self.layout.sequence_rank,
                                                group=self.group)
        return box[0]

    def encode_prompts(self, todo) -> float | None:
        """Encode every prompt up front, off the generation path (so the encoder can be offloaded afterwards);
        returns the milliseconds it took (None: nothing to encode)."""
        pipe = self.loaded.pipe
        texts = [p.model_text for p, _ in todo]
        if self.prompt_schedule and todo:
            texts += [text for _, text in self.prompt_schedule]
        text_ms = None
        if texts:
            tic = time.perf_counter()
            pipe.encode_prompts(texts)
            text_ms = (time.perf_counter() - tic) * 1000.0  # reported apart: the videos' own clocks start after it
        if self.args.offload_text_encoder:
            pipe.text_encoder.offload()
        return text_ms

    def skip_reason(self, prompt, names):
        """(claim, why this prompt is skipped or None): another process sharing the folder may be generating it (or
        have finished it meanwhile). The claim is a lock its process holds until it is done, released by the kernel
        if that process dies."""
        from utils import outputs
        claim = outputs.claim_all(self.out_dir, names) if self.layout.is_leader else None
        skip = None
        if self.layout.is_leader and claim is None:
            skip = f"{outputs.claimed_by(self.out_dir, names)} is generating it"
        elif self.layout.is_leader and not self.args.overwrite and outputs.finished(self.out_dir, names,
                                                                                    self.record(prompt)):
            skip = "another process finished it"
        return claim, self.leaders(skip)

    def write_videos(self, prompt, names) -> dict[str, Any]:
        """Generate the prompt's samples and write them (the leading rank of a video only); returns the stats."""
        from pipeline.inference import Delivery
        from utils.video import BackgroundVideoWriter
        # Under --parallel sequence every rank of the group rolls out the same video; only its leader decodes.
        # x264 runs on each writer's own thread, beside the next block's denoising (each block's frames are a fresh
        # host tensor, so the queue may hold them).
        leader = self.layout.is_leader
        writers = [BackgroundVideoWriter(self.out_dir / f"{n}.mp4", fps=self.options.fps) for n in names] if leader \
            else []
        try:
            def write_frames(block: int, pixels: torch.Tensor) -> None:
                if writers:
                    pixels = pixels.cpu()  # already there on CUDA (frames_on_host); on other devices one copy
                for sample, writer in enumerate(writers):
                    writer.append(pixels[sample])
            # The frames go to the writers as they come: none are kept on the device (keep_video=False).
            result = self.loaded.pipe.generate([prompt.model_text] * self.args.num_samples, self.request(prompt),
                                               Delivery(decode=leader, on_frames=write_frames, keep_video=False,
                                                        frames_on_host=True))
            tic = time.perf_counter()
            for w in writers:
                w.close()
            # How long the writers' tail held up the next video (x264 runs beside the generation until here).
            result.stats["mp4_wait_ms"] = (time.perf_counter() - tic) * 1000.0
        except BaseException:
            for w in writers:
                w.abort()
            raise
        return result.stats

    def write_stats(self, prompt, names, stats: dict[str, Any], run_stats: dict[str, Any]) -> None:
        from utils.video import write_json_atomic
        args, o, pipe, layout = self.args, self.options, self.loaded.pipe, self.layout
        for sample, name in enumerate(names if layout.is_leader else []):
            write_json_atomic(self.out_dir / f"stats_{name}.json", {
                "prompt": prompt.text, "model_prompt": prompt.model_text, "image": prompt.image or args.image,
                "index": prompt.index, "sample": sample,
                "seed": args.seed, "prompt_seed": args.seed * 1_000_003 + prompt.index, "video": f"{name}.mp4",
                "height": o.height, "width": o.width, "fps": o.fps, "source": self.loaded.source,
                "device": str(self.device), "dtype": str(self.dtype), "steps": pipe.settings.steps,
                "prompt_schedule": self.prompt_schedule, "settings": vars(pipe.settings),
                "levers": dataclasses.asdict(pipe.levers), **run_stats,
                "parallel": {"mode": args.parallel, "sequence_size": layout.sequence_size,
                             "data_size": layout.data_size},
                "run_settings": self.record(prompt), **stats})


def run(args: argparse.Namespace) -> int:
    import transformers
    transformers.utils.logging.disable_progress_bar()  # our own bars report progress; keep stderr for errors
    from tqdm import tqdm

    from utils.prompts import parse_prompt_schedule

    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    # 1. what the command line alone decides, before any model loads
    check_args(args)
    device, dtype = pick_device(args)
    schedule = parse_prompt_schedule(args.prompt_schedule) if args.prompt_schedule else None
    prompts = collect_prompts(args, schedule=schedule)
    layout = parallel_layout(args, rank, world)
    out_dir = prepare_outputs(args.output_dir, rank)
    if world > 1:
        from utils.distributed import init_distributed
        init_distributed("cpu" if device.type == "cpu" else None)  # NCCL (multicast off) or gloo
    # 2. the model, its pipeline and the run's options (`run_options`)
    loaded = build_pipeline(args, device, dtype)
    check_decode_frames_flag(args, [loaded.pipe.codec])
    taehv = loaded.cfg.inference
    if taehv.taehv_path and taehv.decoder != "taehv":  # demo.py reads it to offer TAEHV beside the model's decoder
        raise UsageError(f"inference.taehv_path {taehv.taehv_path} is read with inference.decoder taehv (or --preset "
                         f"taehv); this run decodes with {taehv.decoder}")
    group = sequence_group(loaded.pipe, layout)
    o = loaded.options
    job = Job(args, loaded, device, dtype, layout, group, out_dir, schedule,
              prefix=initial_latent(args, loaded.pipe, loaded.cfg, o.height, o.width))
    job.check()
    # 3. the prompts still to generate, encoded up front
    todo = job.pending(prompts)
    text_ms = job.encode_prompts(todo)
    # Loading and text encoding: each video's stats then carry the peaks of its own generation.
    setup_peaks = memory_report(device)
    run_stats = {"text_encoding_ms_all_prompts": text_ms, **{f"setup_{k}": v for k, v in setup_peaks.items()}}
    peaks = dict(setup_peaks)
    # 4. generate and write, prompt by prompt
    for prompt, names in tqdm(todo, desc="prompts", disable=rank != 0 or not todo):
        claim, skip = job.skip_reason(prompt, names)
        try:
            if skip:
                print(f"skipping {names[0]}: {skip}", flush=True)
                continue
            stats = job.write_videos(prompt, names)
            peaks = {k: max(filter(None, (peaks.get(k), stats.get(k))), default=None) for k in MEMORY_KEYS}
            job.write_stats(prompt, names, stats, run_stats)
        finally:
            if claim is not None:
                claim.release()
    if todo and layout.is_leader:
        print(f"[rank {rank}/{world}] {format_memory(peaks)}", flush=True)
    if world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return 0


def run_reporting_errors(run_fn, args: argparse.Namespace) -> int:
    """`run_fn(args)`, with the project's own errors (bad flags, config, input files: `utils.errors.UserError`)
    reported in one line and exit code 2; any other exception is a bug and keeps its traceback. Shared with demo.py."""
    from utils.errors import report_user_errors
    from utils.outputs import disk_errors, missing_root, remove_created

    out_dir = Path(args.output_dir)
    created = missing_root(out_dir)

    def guarded() -> int:
        with disk_errors(out_dir):  # a full disk or a read-only folder is the environment's fault
            return run_fn(args)
    try:
        code = report_user_errors(guarded)
    except BaseException:
        remove_created(out_dir, created)  # a run that failed leaves no empty folders behind
        raise
    if code:
        remove_created(out_dir, created)
    return code


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)  # flags and key=value overrides in any order
    return run_reporting_errors(run, args)


def exit_on_sigterm(signum, frame) -> None:
    """SIGTERM (a scheduler's stop, `kill`) unwinds like Ctrl+C: writers discard their temp files, claims are
    released, instead of the process vanishing mid-write."""
    raise SystemExit(128 + signum)


if __name__ == "__main__":
    import signal
    signal.signal(signal.SIGTERM, exit_on_sigterm)
    sys.exit(main())
