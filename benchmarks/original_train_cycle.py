"""Time the ORIGINAL Self Forcing's DMD training cycles, driving its own code from a checkout of its repository.

    git clone https://github.com/guandeh17/Self-Forcing .original/Self-Forcing     # git-ignored, never committed
    python benchmarks/original_train_cycle.py --original-dir .original/Self-Forcing --warmup 1 --cycles 3 --profile
    python benchmarks/original_train_cycle.py --original-dir .original/Self-Forcing --tiny          # CPU, toy widths

What runs is the original's: its `ScoreDistillationTrainer` (trainer/distillation.py: process group, FSDP1 wrapping
of generator / real score / fake score / text encoder with its mixed-precision policy and sharding strategy, its
AdamW optimizers, data loader and `train()` loop with `fwdbwd_one_step`), its `DMD` (model/dmd.py, model/base.py),
its rollout (pipeline/self_forcing_training.py) and its networks (wan/modules), configured from its own
configs/default_config.yaml + configs/self_forcing_dmd.yaml as its train.py merges them.

What the harness changes, at run time and only in this process (none of the original's files is edited):
  * networks: `WanModel.from_pretrained` / `CausalWanModel.from_pretrained` build the Wan2.1-T2V-1.3B
    architecture with its own random init (no weights exist here); the teacher is the 1.3B (`real_name`), as in
    this project's configs/self_forcing_dmd_1.3b_teacher.yaml; `enable_gradient_checkpointing` does what the
    original's pinned diffusers 0.31 did (later diffusers call the model's `_set_gradient_checkpointing` with
    other arguments);
  * text encoder: a stub returning random `[B, 512, 4096]` embeddings (the shape and dtype UMT5-XXL gives the
    original) on the device; the VAE: an empty module (the 21-frame recipe never decodes);
  * flash-attn, when missing: the original's `flash_attention` becomes torch SDPA (its `attention` already falls
    back to SDPA by itself);
  * third-party packages the original imports but this benchmark never uses (wandb, lmdb, ...), when missing: an
    empty stand-in module (listed in the JSON); easydict, used by its wan/configs at import time, by a dict with
    attribute access;
  * `generator_ckpt` none, prompts from a temporary file, no wandb, no saving, no visualisation;
  * timing: the trainer's `fwdbwd_one_step` and its optimizers' step post-hooks report to `CycleClock`
    (benchmarks/cycle_report.py); the run stops after the last timed cycle;
  * `--tiny` (CPU): gloo instead of NCCL, CUDA device calls answered with the CPU, the network's 12 heads x 128
    kept (the original's KV cache hard-codes them) with 1 layer, a narrow MLP and 32-wide text embeddings, 8x8
    latents, and the rollout's / wrapper's hard-coded token counts (1560 per frame,
    32760 per clip) set to the tiny clip's.
Writes `original_train_cycle_<gpu>.json` with the same keys as `train_cycle.py` (under $OUT when set).
"""
from __future__ import annotations

import argparse
import importlib
import os
import socket
import sys
import tempfile
import types
from pathlib import Path

import torch

from cycle_report import CycleClock, CyclesDone, environment, gpu_name_tag, print_table, write_result

REPO_ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = Path(__file__).resolve().parent
ORIGINAL_PACKAGES = ("wan", "utils", "model", "pipeline", "trainer", "demo_utils")
REQUIRED = ("diffusers", "einops", "omegaconf")  # used on the timed path: no stand-in can replace them
# Wan2.1-T2V-1.3B (its config.json); `window_size` only exists for the bidirectional WanModel.
WAN_1_3B = dict(model_type="t2v", patch_size=(1, 2, 2), text_len=512, in_dim=16, dim=1536, ffn_dim=8960,
                freq_dim=256, text_dim=4096, out_dim=16, num_heads=12, num_layers=30, qk_norm=True,
                cross_attn_norm=True, eps=1e-6)
TINY = dict(WAN_1_3B, ffn_dim=256, num_layers=1, text_dim=32)
REAL_SHAPE, TINY_SHAPE = [1, 21, 16, 60, 104], [1, 21, 16, 8, 8]
TEXT_LEN = 512  # the original pads prompts to 512 tokens (and sizes its cross-attention cache so)
UMT5_XXL_ENCODER_PARAMS = 5.68e9  # held in fp32 by the original's FSDP wrap of the text encoder
PROMPTS = ("a cat walks on the beach at sunset, camera slowly close up", "a dog runs through the snow",
           "a red car in the city at night")


class MissingPackageError(RuntimeError):
    pass


def _absent_module(name: str) -> types.ModuleType:
    """A stand-in for a package the original imports at module level but the benchmark never calls."""
    module = types.ModuleType(name)
    module.__path__ = []  # a package, so `import name.sub` finds the (also absent) submodule

    def missing(attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Absent(f"{name}.{attr}")
    module.__getattr__ = missing
    return module


class _Absent:
    def __init__(self, what: str):
        self.what = what

    def __call__(self, *args, **kwargs):
        raise MissingPackageError(f"{self.what} was called, but its package is not installed here (the benchmark "
                                  "replaced it by an empty stand-in, assuming the timed path never uses it)")

    def __getattr__(self, attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Absent(f"{self.what}.{attr}")


class AttributeDict(dict):
    """What the original uses of `easydict.EasyDict` (its wan/configs build config dicts at import time)."""

    def __getattr__(self, key):
        try:
            return self[key]
        except KeyError as err:
            raise AttributeError(key) from err

    def __setattr__(self, key, value):
        self[key] = value


def _stand_in(name: str) -> types.ModuleType:
    if name == "easydict":
        module = types.ModuleType(name)
        module.EasyDict = AttributeDict
        return module
    return _absent_module(name)


def import_original(original_dir: Path) -> tuple[types.ModuleType, list[str]]:
    """Import the original's trainer module from `original_dir` (first on sys.path, ahead of this project, whose
    packages share its package names); returns it and the third-party modules replaced by stand-ins."""
    clash = [m for m in ORIGINAL_PACKAGES if m in sys.modules]
    if clash:
        raise RuntimeError(f"packages {clash} were imported before the original's: run this script on its own")
    for name in REQUIRED:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as err:
            raise MissingPackageError(f"the original needs {name!r} on its timed path; install it (PYTHONPATH)") \
                from err
    ours = {str(REPO_ROOT), str(BENCHMARKS), "", "."}
    sys.path[:] = [str(original_dir)] + [p for p in sys.path if p not in ours] + [str(BENCHMARKS)]
    stand_ins: list[str] = []
    for _ in range(50):
        try:
            module = importlib.import_module("trainer.distillation")
            break
        except ModuleNotFoundError as err:
            root = (err.name or "").split(".")[0]
            if not err.name or root in ORIGINAL_PACKAGES or root in REQUIRED or root == "torch":
                raise
            for name in [m for m in sys.modules if m.split(".")[0] in ORIGINAL_PACKAGES]:
                del sys.modules[name]  # half-imported modules of the original are imported again
            sys.modules[err.name] = _stand_in(err.name)
            stand_ins.append(err.name)
    else:
        raise RuntimeError("too many missing packages while importing the original")
    where = Path(sys.modules["trainer"].__file__).resolve()
    if original_dir.resolve() not in where.parents:
        raise RuntimeError(f"imported trainer from {where}, not from {original_dir}")
    return module, stand_ins


def sdpa_flash_attention(q, k, v, q_lens=None, k_lens=None, dropout_p=0.0, softmax_scale=None, q_scale=None,
                         causal=False, window_size=(-1, -1), deterministic=False, dtype=torch.bfloat16, version=None):
    """The original's `flash_attention` contract ([B, L, N, C] in and out, half precision inside, padded keys
    masked) on torch SDPA, for machines without flash-attn."""
    out_dtype = q.dtype
    half = (torch.float16, torch.bfloat16)
    q, k, v = (x if x.dtype in half else x.to(dtype) for x in (q, k, v))
    if q_scale is not None:
        q = q * q_scale
    mask = None
    if k_lens is not None:
        keys = torch.arange(k.shape[1], device=k.device)
        mask = (keys[None, :] < k_lens.to(k.device)[:, None])[:, None, None, :]
    if q_lens is not None or window_size != (-1, -1):
        raise NotImplementedError("the SDPA stand-in covers the calls of the DMD recipe (no q_lens, no window)")
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2).to(q.dtype), v.transpose(1, 2).to(q.dtype), attn_mask=mask,
        dropout_p=dropout_p, is_causal=causal, scale=softmax_scale)
    return out.transpose(1, 2).contiguous().type(out_dtype)


class StubTextEncoder(torch.nn.Module):
    """Random `[B, 512, 4096]` prompt embeddings on the device, in the precision the original's FSDP-wrapped
    UMT5-XXL returns them (bf16 under mixed precision). One tiny parameter so that FSDP has something to wrap."""

    def __init__(self, dtype: torch.dtype, text_dim: int):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1), requires_grad=False)
        self.out_dtype, self.text_dim = dtype, text_dim

    def forward(self, text_prompts: list[str]) -> dict:
        embeds = torch.randn(len(text_prompts), TEXT_LEN, self.text_dim, device=self.anchor.device,
                             dtype=self.out_dtype)
        return {"prompt_embeds": embeds}


class StubVAE(torch.nn.Module):
    """The 21-frame recipe never decodes or encodes; anything that tries fails loudly."""

    def decode_to_pixel(self, *args, **kwargs):
        raise RuntimeError("the benchmark's VAE stand-in cannot decode (num_training_frames > 21?)")

    encode_to_latent = decode_to_pixel


def patch_networks(net_config: dict) -> None:
    from wan.modules.causal_model import CausalWanModel
    from wan.modules.model import WanModel

    def random_causal(cls, path, local_attn_size=-1, sink_size=0, **_):
        return cls(**net_config, local_attn_size=local_attn_size, sink_size=sink_size)

    def random_bidirectional(cls, path, **_):
        return cls(**net_config)
    CausalWanModel.from_pretrained = classmethod(random_causal)
    WanModel.from_pretrained = classmethod(random_bidirectional)

    def enable_gradient_checkpointing(self):  # what the original's pinned diffusers 0.31 did
        self._set_gradient_checkpointing(self, value=True)
    for cls in (CausalWanModel, WanModel):
        cls.enable_gradient_checkpointing = enable_gradient_checkpointing


def patch_attention() -> bool:
    """SDPA for the original's flash_attention when flash-attn is absent; True when patched."""
    import wan.modules.attention as attention
    if attention.FLASH_ATTN_2_AVAILABLE or attention.FLASH_ATTN_3_AVAILABLE:
        return False
    import wan.modules.model as wan_model
    attention.flash_attention = sdpa_flash_attention
    wan_model.flash_attention = sdpa_flash_attention
    return True


def answer_cuda_with_cpu() -> None:
    """Before the original is imported: some of its modules ask for the current CUDA device at import time, for
    defaults the benchmark never uses (0 keeps their f"cuda:{...}" strings valid); `patch_for_cpu` then answers
    the CPU for the trainer's device."""
    torch.cuda.current_device = lambda: 0
    torch.cuda.set_device = lambda *_: None
    torch.Tensor.cuda = lambda self, *_, **__: self


def patch_for_cpu(tokens_per_frame: int, clip_tokens: int) -> None:
    """Run the CUDA-only original on the CPU at toy size (harness checks): gloo, CPU for every CUDA device call,
    and the token counts its rollout and wrapper hard-code set to the tiny clip's."""
    import model.base as base
    import trainer.distillation as distillation
    from pipeline.self_forcing_training import SelfForcingTrainingPipeline
    from utils.distributed import launch_distributed_job
    from utils.wan_wrapper import WanDiffusionWrapper

    torch.cuda.current_device = lambda: torch.device("cpu")
    distillation.launch_distributed_job = lambda backend="gloo": launch_distributed_job("gloo")

    class TinyPipeline(SelfForcingTrainingPipeline):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.frame_seq_length = tokens_per_frame
            self.kv_cache_size = self.kv_cache_size // 1560 * tokens_per_frame
    base.SelfForcingTrainingPipeline = TinyPipeline
    wrapper_init = WanDiffusionWrapper.__init__

    def tiny_wrapper_init(self, *args, **kwargs):
        wrapper_init(self, *args, **kwargs)
        self.seq_len = clip_tokens
    WanDiffusionWrapper.__init__ = tiny_wrapper_init


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_trainer(args, original_dir: Path, work: Path):
    """The original's trainer for the DMD recipe with the harness's replacements; returns it with a description of
    what ran (the JSON's `note`, `settings` and the stand-ins)."""
    if args.tiny:
        answer_cuda_with_cpu()
    distillation, stand_ins = import_original(original_dir)
    from omegaconf import OmegaConf
    import model.base as base

    net_config = TINY if args.tiny else WAN_1_3B
    shape = TINY_SHAPE if args.tiny else REAL_SHAPE
    patch_networks(net_config)
    sdpa = patch_attention()
    if args.tiny:
        tokens = shape[3] * shape[4] // 4  # 2x2 patches
        patch_for_cpu(tokens, tokens * shape[1])
    # As its train.py merges them.
    config = OmegaConf.merge(OmegaConf.load(original_dir / "configs" / "default_config.yaml"),
                             OmegaConf.load(original_dir / "configs" / "self_forcing_dmd.yaml"))
    prompts = work / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    config.merge_with({"real_name": "Wan2.1-T2V-1.3B", "generator_ckpt": None, "data_path": str(prompts),
                       "no_save": True, "no_visualize": True, "disable_wandb": True, "logdir": str(work),
                       "wandb_save_dir": str(work), "config_name": "self_forcing_dmd", "image_or_video_shape": shape,
                       "batch_size": 1})
    if args.sharding_strategy:
        config.sharding_strategy = args.sharding_strategy
    text_dtype = torch.bfloat16 if config.mixed_precision else torch.float32
    base.WanTextEncoder = lambda: StubTextEncoder(text_dtype, net_config["text_dim"])
    base.WanVAEWrapper = StubVAE
    os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())})
    trainer = distillation.Trainer(config)
    note = ("the original Self Forcing's own trainer/distillation.py Trainer (FSDP1 "
            f"{config.sharding_strategy}, which torch runs as NO_SHARD on one rank, mixed_precision="
            f"{config.mixed_precision}, its AdamW and train() loop), model/dmd.py DMD and its rollout, networks "
            "from wan/modules with random init (generator, critic and teacher: the 1.3B unless --tiny). Harness: "
            "stub text encoder (random [B, 512, 4096] embeddings on the device; the real UMT5-XXL would add "
            f"{UMT5_XXL_ENCODER_PARAMS * 4 / 2**30:.1f} GiB of fp32 weights under the original's FSDP wrap, plus "
            "an encoding per step), empty VAE, prompts from a temporary file"
            + ("; flash-attn absent: its flash_attention ran on torch SDPA" if sdpa else "; flash-attn present")
            + (f"; stand-ins for unused packages: {', '.join(stand_ins)}" if stand_ins else "")
            + ("; --tiny: CPU, gloo, 1 layer, 8x8 latents, token counts patched" if args.tiny else ""))
    settings = {"original_dir": str(args.original_dir), "batch_size": 1, "image_or_video_shape": list(shape),
                "dfake_gen_update_ratio": config.dfake_gen_update_ratio, "world_size": 1,
                "sharding_strategy": config.sharding_strategy, "mixed_precision": config.mixed_precision,
                "gradient_checkpointing": config.gradient_checkpointing, "compile": False}
    return trainer, {"note": note, "settings": settings, "text_encoder_gib": 0.0, "stand_in_packages": stand_ins,
                     "sdpa_for_flash_attention": sdpa}


def time_cycles(trainer, clock: CycleClock) -> None:
    """Run the original's own `train()` loop, its losses and optimizer steps reporting to `clock`, until the clock
    has its cycles."""
    fwdbwd = trainer.fwdbwd_one_step

    def timed_fwdbwd(batch, train_generator):
        clock.start("generator" if train_generator else "critic")
        return fwdbwd(batch, train_generator)
    trainer.fwdbwd_one_step = timed_fwdbwd
    trainer.generator_optimizer.register_step_post_hook(lambda *_: clock.end("generator"))
    trainer.critic_optimizer.register_step_post_hook(lambda *_: clock.end("critic"))
    try:
        trainer.train()  # an endless loop in the original
    except CyclesDone:
        pass


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--original-dir", required=True, help="checkout of github.com/guandeh17/Self-Forcing")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--cycles", type=int, default=3)
    p.add_argument("--profile", action="store_true", help="one more cycle under torch.profiler")
    p.add_argument("--tiny", action="store_true", help="CPU, toy widths (harness checks)")
    p.add_argument("--sharding-strategy", default=None,
                   help="override the original config's sharding_strategy (hybrid_full)")
    p.add_argument("--name", default=None, help="result name (default original_train_cycle_<gpu>)")
    args = p.parse_args(argv)
    original_dir = Path(args.original_dir).resolve()
    if not (original_dir / "trainer" / "distillation.py").is_file():
        raise SystemExit(f"original_train_cycle.py: error: {original_dir} is not a Self-Forcing checkout "
                         f"(no trainer/distillation.py)")
    if not args.tiny and not torch.cuda.is_available():
        raise SystemExit("original_train_cycle.py: error: the original trains on CUDA only; use --tiny on the CPU")
    with tempfile.TemporaryDirectory() as work:
        trainer, described = build_trainer(args, original_dir, Path(work))
        device = torch.device("cpu") if args.tiny else torch.device("cuda", torch.cuda.current_device())
        name = args.name or "original_train_cycle_" + gpu_name_tag(device)
        result = {"side": "original", "env": environment(device), **described}
        clock = CycleClock(device, args.warmup, args.cycles + int(args.profile),
                           profile_cycle=args.cycles if args.profile else None,
                           on_cycle=lambda c: write_result(name, {**result, **c.summary()}))
        time_cycles(trainer, clock)
    summary = clock.summary()
    if summary["profile"]:
        print(summary["profile"])
    print_table([("device", result["env"]["device"]), ("side", "original"), *clock.rows()])
    print("wrote", write_result(name, {**result, **summary}))
    import torch.distributed as dist
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
