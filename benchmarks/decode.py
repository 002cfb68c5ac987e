"""Streamed decoding alone: the latent codecs on a 7-block video, block by block, under a few settings.

    python benchmarks/decode.py                 # Wan VAE (both layouts) and TAEHV, random weights, 480x832, bf16
    python benchmarks/decode.py --size tiny     # harness check on CPU
    python benchmarks/decode.py --codecs wan_vae_cl --settings plain,compile --profile
    python benchmarks/decode.py --codecs wan_vae_cl --settings compile --frames-per-call 1,3

Settings: `plain`; `cudnn_benchmark` (`torch.backends.cudnn.benchmark`: cuDNN times the convolution algorithms of
every new shape once, in the warm-up video, and keeps the fastest; off, its heuristics choose); `compile` (the whole
decoder as one graph under `torch.compile`, `WanVAE.compile_decoder(regional=False)`, so its fp32 RMS norms, SiLUs and
cache copies fuse around the cuDNN convolutions; a stream's first two calls run eagerly while its conv caches fill);
`compile_pad` (that, with the full-resolution stage's 96 channels zero-padded to 128, `WanVAE.pad_decoder_channels`);
`compile_pad_inside` (and the convolutions' spatial zero padding done inside cuDNN, `WanVAE.pad_decoder_convs_inside`);
`pipeline` (what the pipeline runs: those levers with one compiled graph per distinct layer instead of one for the
whole decoder, `WanVAE.speed_up_decoder`); `pipeline_from_second` (and the first block's second call compiled too, its
caches completed with zero frames: `steady_from_second_call`). Each setting gets a fresh
codec, one warm-up video (the compile's time is reported), then the median of `--repeats` videos: total ms, pixel
frames/s and the first block's ms; `--profile` adds GPU time per kernel family for one video. A setting that
raises is recorded with its error. `--frames-per-call` (Wan VAE): latent frames per decoder call, each value timed
and labelled when there are several (1 is the reference's frame-by-frame loop; the first frame of a video always
passes alone).
"""
from __future__ import annotations

import argparse
import time
import traceback

import torch
from common import decoder_pad_multiple, environment, kernel_table, print_table, random_codec, sync, write_result

SETTINGS = ("plain", "cudnn_benchmark", "compile", "compile_pad", "compile_pad_inside", "pipeline",
            "pipeline_from_second")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=["real", "tiny"], default="real")
    parser.add_argument("--codecs", default="wan_vae,wan_vae_cl,taehv")
    parser.add_argument("--blocks", type=int, default=7)
    parser.add_argument("--frames-per-block", type=int, default=3)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=832)
    parser.add_argument("--settings", default="plain,cudnn_benchmark", help=f"any of {', '.join(SETTINGS)}")
    parser.add_argument("--profile", action="store_true", help="GPU time per kernel family for one video")
    parser.add_argument("--profile-top", type=int, default=10, help="kernels listed by --profile (default 10)")
    parser.add_argument("--frames-per-call", default="3",
                        help="Wan VAE: latent frames per decoder call, comma-separated values to time (default 3)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--name", default="decode")
    args = parser.parse_args(argv)
    tiny = args.size == "tiny"
    device = torch.device("cpu" if tiny else "cuda")
    dtype = torch.float32 if tiny else torch.bfloat16
    h, w = (4, 6) if tiny else (args.height // 8, args.width // 8)
    fpb = args.frames_per_block
    g = torch.Generator(device=device).manual_seed(0)
    latents = torch.randn(1, args.blocks * fpb, 16, h, w, generator=g, device=device, dtype=dtype)
    result = {"env": environment(device), "args": vars(args), "codecs": {}}
    name = args.name + ("_tiny_cpu" if tiny else "")
    rows = [("device", result["env"]["device"])]
    settings = [x for x in args.settings.split(",") if x]
    try:
        per_call = [int(x) for x in args.frames_per_call.split(",") if x]
    except ValueError:
        parser.error(f"--frames-per-call: comma-separated integers, got {args.frames_per_call!r}")
    if not per_call or min(per_call) < 1:
        parser.error(f"--frames-per-call: integers >= 1, got {args.frames_per_call!r}")
    if unknown := sorted(set(settings) - set(SETTINGS)):
        parser.error(f"--settings: unknown {unknown}; choose from {', '.join(SETTINGS)}")
    for kind in [k for k in args.codecs.split(",") if k]:
        for setting, frames_per_call in [(s, n) for s in settings
                                         for n in (per_call if kind.startswith("wan_vae") else [None])]:
            label = kind if setting == "plain" else f"{kind} {setting}"
            if frames_per_call is not None and len(per_call) > 1:
                label += f" {frames_per_call}/call"
            try:
                entry = time_setting(kind, setting, latents, fpb, args, tiny, frames_per_call)
            except Exception as err:  # noqa: BLE001 - a setting that fails is a result to record
                entry = {"error": f"{type(err).__name__}: {str(err)[:300]}",
                         "traceback": traceback.format_exc()[-2000:]}
                rows.append((label, entry["error"]))
            else:
                rows.append((label, f"{entry['total_ms']:8.1f} ms  {entry['frames_per_s']:6.1f} frames/s  first block "
                                    f"{entry['first_block_ms']:6.1f} ms  ({entry['pixel_frames']} frames)  warm-up "
                                    f"{entry['warmup_s']:5.1f} s"))
                if "profile" in entry:
                    fam = entry["profile"]["by_family_ms"]
                    rows.append(("", "profile " + ", ".join(f"{k} {v:.0f} ms" for k, v in fam.items())))
            result["codecs"][label] = entry
            write_result(name, result)
    print_table(rows)
    return result


def time_setting(kind: str, setting: str, latents: torch.Tensor, fpb: int, args, tiny: bool,
                 frames_per_call: int | None = None) -> dict:
    device = latents.device
    codec = random_codec(kind, device, latents.dtype, tiny=tiny)
    if setting.startswith("compile") or setting.startswith("pipeline"):
        if not hasattr(codec, "compile_decoder"):
            raise ValueError(f"the {setting} setting is for the Wan VAE decoder, not {kind}")
        if setting.startswith("pipeline"):
            codec.speed_up_decoder(decoder_pad_multiple(tiny),
                                   steady_from_second_call=setting == "pipeline_from_second")
        else:
            if setting.startswith("compile_pad"):
                codec.pad_decoder_channels(decoder_pad_multiple(tiny))
            if setting == "compile_pad_inside":
                codec.pad_decoder_convs_inside()
            codec.compile_decoder(regional=False)
    torch.backends.cudnn.benchmark = setting == "cudnn_benchmark"
    try:
        def video() -> tuple[float, float, int]:
            decoder = codec.stream_decoder() if frames_per_call is None else codec.stream_decoder(
                frames_per_call=frames_per_call)
            sync(device)
            tic = time.perf_counter()
            first_ms, frames = None, 0
            with torch.no_grad():
                for start in range(0, latents.shape[1], fpb):
                    frames += decoder.decode_chunk(latents[:, start:start + fpb]).shape[1]
                    if first_ms is None:
                        sync(device)
                        first_ms = (time.perf_counter() - tic) * 1000.0
            sync(device)
            return (time.perf_counter() - tic) * 1000.0, first_ms, frames

        tic = time.perf_counter()
        video()  # warm-up: the algorithm search or the compile happens here
        warmup_s = time.perf_counter() - tic
        runs = sorted(video() for _ in range(args.repeats))
        total_ms, first_ms, frames = runs[len(runs) // 2]
        entry = {"frames_per_call": frames_per_call, "total_ms": total_ms, "first_block_ms": first_ms,
                 "pixel_frames": frames,
                 "frames_per_s": frames / (total_ms / 1000.0), "warmup_s": warmup_s}
        if args.profile:
            activities = [torch.profiler.ProfilerActivity.CPU] + (
                [torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else [])
            with torch.profiler.profile(activities=activities) as prof:
                video()
            entry["profile"] = kernel_table(prof, device.type == "cuda", top=args.profile_top)
        return entry
    finally:
        torch.backends.cudnn.benchmark = False


if __name__ == "__main__":
    main()
