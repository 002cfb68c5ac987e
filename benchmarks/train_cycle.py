"""Time Self Forcing DMD training cycles through train.py's trainer, and show where a cycle goes (torch.profiler).

    python benchmarks/random_wan_folder.py --out runs/wan_random/Wan2.1-T2V-1.3B       # once (random weights)
    python benchmarks/train_cycle.py --model-root runs/wan_random --warmup 1 --cycles 3 --profile
    python benchmarks/train_cycle.py --config_path configs/shapes/self_forcing_dmd.yaml ...   # any recipe
    torchrun --nproc_per_node=2 benchmarks/train_cycle.py ...                                  # FSDP over 2 GPUs
    python benchmarks/train_cycle.py --tiny                                                    # CPU, toy widths

The trainer is built exactly as `train.py` builds it (`train._setup`: models from the folder, FSDP2 / precision /
activation checkpointing from the recipe), with the real recipe's settings for this measurement: batch 1 (no
accumulation), 21 latent frames at 480x832, `dfake_gen_update_ratio` 5, UMT5 on the GPU (`text_encoder_cpu_offload`
false), nothing saved or drawn. A cycle is one generator update and `dfake_gen_update_ratio` critic updates
(`benchmarks/cycle_report.py`); per timed cycle: seconds, seconds per generator and per critic step, peak allocated
and reserved GPU memory. `--profile` adds one cycle under torch.profiler (left out of the medians) and stores its
top operators. Writes `train_cycle_<gpu>.json` (rank 0; `_<N>gpu` under torchrun) under $OUT when set, else
benchmarks/results/, after every cycle. `--tiny` builds a toy-width random folder (`random_wan_folder.py --tiny`)
and runs on the CPU in seconds (harness checks, no figures).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

from cycle_report import CycleClock, CyclesDone, environment, gpu_name_tag, print_table, write_result

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

PROMPTS = ("a cat walks on the beach at sunset, camera slowly close up", "a dog runs through the snow",
           "a red car in the city at night")
REAL_SHAPE = "[1,21,16,60,104]"  # batch 1, 21 latent frames of 480x832 video
TINY_SHAPE = "[1,21,16,8,8]"


def text_encoder_gib(models) -> float:
    """GPU memory held by the text encoder's weights (0 when it stays on the CPU)."""
    encoder = getattr(models.text, "encoder", None)
    if not isinstance(encoder, torch.nn.Module):
        return 0.0
    return sum(p.numel() * p.element_size() for p in encoder.parameters() if p.is_cuda) / 2**30


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config_path", default=str(REPO_ROOT / "configs" / "self_forcing_dmd_1.3b_teacher.yaml"))
    p.add_argument("--model-root", default="runs/wan_random", help="folder holding Wan2.1-T2V-1.3B/ (random weights)")
    p.add_argument("--warmup", type=int, default=1, help="cycles run before timing")
    p.add_argument("--cycles", type=int, default=3, help="timed cycles")
    p.add_argument("--profile", action="store_true", help="one more cycle under torch.profiler")
    p.add_argument("--tiny", action="store_true", help="CPU, toy widths, a temporary random folder")
    p.add_argument("--name", default=None, help="result name (default <prefix>_<gpu>)")
    p.add_argument("--prefix", default="train_cycle", help="the default name's prefix (default: %(default)s)")
    p.add_argument("overrides", nargs="*", help="further key=value config overrides")
    args = p.parse_intermixed_args(argv)
    import train
    from utils.distributed import cleanup_distributed, init_distributed

    dist = init_distributed(device="cpu" if args.tiny else None)
    device = dist.device
    with tempfile.TemporaryDirectory() as work:
        root = Path(args.model_root)
        if args.tiny:
            import random_wan_folder
            root = Path(work) / "wan_tiny"
            random_wan_folder.main(["--tiny", "--device", "cpu", "--out", str(root / "Wan2.1-T2V-1.3B")])
        prompts = Path(work) / "prompts.txt"
        prompts.write_text("\n".join(PROMPTS) + "\n")
        recipe = [f"model_root={root}", "generator_ckpt=null", f"data_path={prompts}", "batch_size=1",
                  "total_batch_size=null", "text_encoder_cpu_offload=false", "dfake_gen_update_ratio=5",
                  f"image_or_video_shape={TINY_SHAPE if args.tiny else REAL_SHAPE}", "log_every=1000000"]
        command = ["--config_path", args.config_path, "--logdir", str(Path(work) / "logs"), "--no_save",
                   "--no_visualize", "--disable-wandb", *recipe, *args.overrides]
        # The recipe's update ratio, as the overrides may set it.
        ratio = train.load_run_config(train.parse_args(command)).distillation.dfake_gen_update_ratio
        # One step more than the cycles: its generator start closes the last cycle.
        total_steps = (args.warmup + args.cycles + int(args.profile)) * ratio + 1
        targs = train.parse_args([*command, f"max_steps={total_steps}"])
        trainer = train._setup(targs, dist, None, None, None)
        cfg = trainer.cfg
        name = args.name or (f"{args.prefix}_" + gpu_name_tag(device)
                             + (f"_{dist.world_size}gpu" if dist.world_size > 1 else ""))
        compute = cfg.compute
        settings = {"config": args.config_path, "overrides": [*recipe, *args.overrides],
                    "batch_size": cfg.optimiser.batch_size,
                    "image_or_video_shape": list(cfg.rollout.image_or_video_shape),
                    "dfake_gen_update_ratio": cfg.distillation.dfake_gen_update_ratio, "world_size": dist.world_size,
                    "sharding_strategy": compute.sharding_strategy, "mixed_precision": compute.mixed_precision,
                    "gradient_checkpointing": compute.gradient_checkpointing,
                    "checkpoint_keeps_attention": compute.checkpoint_keeps_attention, "compile": compute.compile}
        note = ("this project's train.py trainer (train._setup, Trainer.train) on a random-weight folder "
                f"{root}; generator, critic and teacher real-size 1.3B unless --tiny; text encoder on "
                f"{'the GPU' if device.type == 'cuda' else 'the CPU'}")
        base = {"side": "ours", "env": environment(device), "settings": settings, "note": note,
                "text_encoder_gib": text_encoder_gib(trainer.algorithm.models)}

        def report(clock: CycleClock) -> None:
            if dist.rank == 0:
                write_result(name, {**base, **clock.summary()})
        clock = CycleClock(device, args.warmup, args.cycles + int(args.profile),
                           profile_cycle=args.cycles if args.profile else None, on_cycle=report,
                           log=print if dist.rank == 0 else (lambda _: None))
        update = trainer._update

        def timed_update(role, loss_fn):  # the loop's one optimizer update of a role, between clock events
            clock.start(role)
            logs = update(role, loss_fn)
            clock.end(role)
            return logs
        trainer._update = timed_update
        try:
            trainer.train()  # the loop of train.py's runs; it stops at the generator start after the last cycle
        except CyclesDone:
            pass
        finally:
            if trainer.logdir_lock is not None:
                trainer.logdir_lock.release()
    cleanup_distributed(dist)
    if dist.rank == 0:
        summary = clock.summary()
        if summary["profile"]:
            print(summary["profile"])
        print_table([("device", base["env"]["device"]), ("side", "ours"),
                     ("text encoder on GPU", f"{base['text_encoder_gib']:.1f} GiB"), *clock.rows()])
        print("wrote", write_result(name, {**base, **summary}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
