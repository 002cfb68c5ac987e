"""What a user gets: `inference.py` itself, one fresh process per section (so a cold start is cold), over a prompt
file of 4 prompts; every figure comes from the stats JSON the command writes for each video.

    python benchmarks/random_wan_folder.py --out runs/wan_t5x2 --t5-layers 2     # random real-size weights
    python benchmarks/random_wan_folder.py --out runs/wan_t5x24                  # with the full UMT5-XXL
    python benchmarks/user_path.py --model runs/wan_t5x2 --model-full-t5 runs/wan_t5x24
    python benchmarks/user_path.py --tiny         # harness check on the CPU (tests/entry/test_user_path_benchmark.py)

Sections (the command's defaults otherwise: on CUDA every speed lever, pipeline/levers.py):
  cold         4 prompts, 81 frames (21 latent) at 480x832, Wan VAE, text encoder on the CPU, an empty compile cache:
               the first video (compile and graph capture included), videos 2-4 steady (frames/s end to end, time
               to first frame), peak memory (loading and text encoding included);
  warm_cache   the same in a new process, with the compile cache the cold run filled: the first video;
  taehv        the same with `--preset taehv` (random TAEHV weights, written here): steady frames/s;
  long         one prompt, 60 blocks, `--preset long`, Wan VAE: ms per block from the first block that attends to a
               full window until the last frame is decoded;
  text_on_gpu  the model folder with all 24 UMT5-XXL layers (`--model-full-t5`), its text encoder on the GPU: peaks;
  decode_3_per_call  as cold with `--decode-frames-per-call 3` (a whole block per Wan VAE call; the CUDA default
               is 1) and a warm cache: the larger decoder's peaks and steady frames/s.
  limit_24gib  as cold with a warm cache and `--gpu-memory-limit-gib 24`: whether the defaults run on a 24 GB card
               (the allocator gives back cached memory before it fails) and how fast.
  expandable   as cold with a warm cache and PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True: how much of the
               reserved memory is the caching allocator's fragmentation.
Text encoding is timed apart (the videos' clocks start after it); the command writes mp4s on background threads, off
the generation path. Writes `user_path_<gpu>.json` under $OUT or benchmarks/results/ (atomically, after every
section, so a run cut short keeps what it measured) and prints a table.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import environment, print_table, write_result

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["a cat walks on the beach at sunset, camera slowly close up",
           "a dog runs through the snow at night",
           "a red car in the city street in the rain, wide shot",
           "a green forest with blue sky at day, camera fast"]
# The targets on one H100 (SDPA only, 480x832): (key, bound, "<=" or ">=").
TARGETS = [("steady_video_fps_wan_vae", 32.0, ">="), ("steady_video_fps_taehv", 45.0, ">="),
           ("ttff_ms_steady", 200.0, "<="), ("first_video_s_cold", 20.0, "<="),
           ("first_video_s_warm_cache", 6.0, "<="), ("long_block_ms_steady", 420.0, "<="),
           ("peak_reserved_gib", 14.0, "<="), ("peak_reserved_gib_text_on_gpu", 24.0, "<=")]
SECTIONS = ("cold", "warm_cache", "taehv", "long", "text_on_gpu", "decode_3_per_call", "limit_24gib", "expandable")
# Environment of a section's process beyond the run's own.
SECTION_ENV = {"expandable": {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="model folder (benchmarks/random_wan_folder.py --t5-layers 2)")
    p.add_argument("--model-full-t5", help="the same with all 24 UMT5-XXL layers, for text_on_gpu (else skipped)")
    p.add_argument("--tiny", action="store_true", help="a tiny random folder on the CPU: the harness, not figures")
    p.add_argument("--sections", default=",".join(SECTIONS), help="any of %(default)s, in this order")
    p.add_argument("--height", type=int, help="default: 480 (64 with --tiny)")
    p.add_argument("--width", type=int, help="default: 832 (96 with --tiny)")
    p.add_argument("--latent-frames", type=int, default=21, help="per video, 81 pixel frames (default: %(default)s)")
    p.add_argument("--long-blocks", type=int, default=60)
    p.add_argument("--cli-arg", action="append", default=[], metavar="ARG",
                   help="passed to every inference.py call (repeat; e.g. --cli-arg=--no-cuda-graphs)")
    p.add_argument("--alloc-conf", help="PYTORCH_CUDA_ALLOC_CONF for every call (default: the environment's)")
    p.add_argument("--budget-s", type=float, default=540.0, help="sections are skipped once this much time is spent")
    p.add_argument("--work-dir", help="videos, prompt files and the compile cache (default: a temporary folder)")
    p.add_argument("--name", help="result name (default: user_path_<gpu>, user_path_tiny_cpu with --tiny)")
    return p


def gpu_slug(name: str) -> str:
    """`NVIDIA H100 80GB HBM3` -> `h100`; other names lower-cased with non-alphanumerics as underscores."""
    known = re.search(r"\b([AHBL]\d{2,3}S?|GH200|GB200)\b", name, re.IGNORECASE)
    return known.group(1).lower() if known else re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def median(values: list[float]) -> float | None:
    values = sorted(v for v in values if v is not None)
    return values[len(values) // 2] if values else None


def peak(stats: list[dict], key: str) -> float | None:
    """The process's peak: loading and text encoding (`setup_<key>`) and every video's generation."""
    values = [s.get(k) for s in stats for k in (f"setup_{key}", key)]
    return max((v for v in values if v is not None), default=None)


def run_cli(argv: list[str], out_dir: Path, env: dict[str, str], timeout: float) -> tuple[list[dict], float]:
    """`inference.py argv --output-dir out_dir` in a new process; (its stats, video order, and its wall seconds)."""
    cmd = [sys.executable, str(REPO / "inference.py"), *argv, "--output-dir", str(out_dir), "--overwrite"]
    tic = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=max(timeout, 1.0),
                          check=False)
    wall = time.perf_counter() - tic
    log = [line for line in (proc.stdout + proc.stderr).splitlines() if "it/s]" not in line and "s/it]" not in line]
    print("\n".join(f"    {line}" for line in log[-12:]), flush=True)
    if proc.returncode != 0:
        raise RuntimeError(f"inference.py exited with {proc.returncode}: {' | '.join(log[-5:])}")
    stats = [json.loads(p.read_text()) for p in out_dir.glob("stats_*.json")]
    return sorted(stats, key=lambda s: s["index"]), wall


def video_figures(stats: list[dict]) -> dict:
    """Per video: seconds, frames/s, first frame, and what bounds it (the DiT's blocks vs the decoder's tail)."""
    return {"videos": [{"total_s": s["total_ms"] / 1000.0, "frames_per_s": s.get("frames_per_s"),
                        "time_to_first_frame_ms": s.get("time_to_first_frame_ms"),
                        "dit_blocks_ms": s["block_end_ms"][-1] if s.get("block_end_ms") else None,
                        "decode_tail_ms": (s["done_ms"] - s["block_end_ms"][-1]) if s.get("block_end_ms") else None,
                        "block_end_ms": s.get("block_end_ms"), "pixel_frames": s.get("pixel_frames"),
                        "mp4_wait_ms": s.get("mp4_wait_ms"),
                        # Each video's own peaks (reset when it starts), the memory after each block was queued and
                        # the allocator's pools and streams at its end: where in a run the memory goes.
                        **{key: s.get(key) for key in ("peak_allocated_gib", "peak_reserved_gib", "block_allocated_gib",
                                                       "block_reserved_gib", "allocator")}}
                       for s in stats],
            "text_encoding_ms_all_prompts": stats[0].get("text_encoding_ms_all_prompts") if stats else None,
            "peak_allocated_gib": peak(stats, "peak_allocated_gib"),
            "peak_reserved_gib": peak(stats, "peak_reserved_gib"),
            "levers": stats[0].get("levers") if stats else None}


def steady(section: dict, key: str) -> float | None:
    """The median over the videos after the first (warm: compiled, captured)."""
    return median([v[key] for v in section["videos"][1:]])


def long_block_ms(stats: dict) -> float:
    """Device ms per block from the first block attending to a full window until the last frame was decoded."""
    window, fpb = stats["settings"]["window_frames"], stats["settings"]["frames_per_block"]
    ends = stats["block_end_ms"]
    first = min(window // fpb + 1, len(ends) - 1)  # the first steady block; its start is the previous block's end
    return (stats["done_ms"] - ends[first - 1]) / (len(ends) - first)


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    start = time.perf_counter()
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="user_path_")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    tiny = args.tiny
    height, width = args.height or (64 if tiny else 480), args.width or (96 if tiny else 832)
    if tiny and not args.model:
        import random_wan_folder
        args.model = str(work / "tiny_wan")
        random_wan_folder.main(["--tiny", "--out", args.model, "--device", "cpu"])
        args.model_full_t5 = args.model_full_t5 or args.model
    if not args.model:
        raise SystemExit("--model is required (or --tiny)")
    args.model = str(Path(args.model).resolve())
    args.model_full_t5 = str(Path(args.model_full_t5).resolve()) if args.model_full_t5 else None
    taehv_path = work / "taehv_random.safetensors"
    write_random_taehv(taehv_path, tiny)
    device = torch.device("cpu" if tiny or not torch.cuda.is_available() else "cuda")
    env_info = environment(device)
    name = args.name or ("user_path_tiny_cpu" if tiny else f"user_path_{gpu_slug(env_info['device'])}")
    compile_cache = work / "compile_cache"  # empty until the cold run fills it
    if "cold" in args.sections.split(",") and compile_cache.exists():
        shutil.rmtree(compile_cache)
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false",
               TORCHINDUCTOR_CACHE_DIR=str(compile_cache))
    if args.alloc_conf is not None:
        env["PYTORCH_CUDA_ALLOC_CONF"] = args.alloc_conf
    (work / "prompts_4.txt").write_text("\n".join(PROMPTS) + "\n")
    (work / "prompts_1.txt").write_text(PROMPTS[0] + "\n")
    common = [*(["--device", "cpu"] if tiny else []), "--height", str(height), "--width", str(width),
              *args.cli_arg]
    video = ["--data_path", str(work / "prompts_4.txt"), "--num_output_frames", str(args.latent_frames),
             "--text-encoder-device", "cpu"]
    calls = {"cold": ["--model", args.model, *video],
             "warm_cache": ["--model", args.model, *video],
             "taehv": ["--model", args.model, *video, "--preset", "taehv", f"taehv_path={taehv_path}"],
             "long": ["--model", args.model, "--data_path", str(work / "prompts_1.txt"), "--preset", "long",
                      "--total-blocks", str(args.long_blocks), "--text-encoder-device", "cpu"],
             "text_on_gpu": ["--model", str(args.model_full_t5), "--data_path", str(work / "prompts_1.txt"),
                             "--num_output_frames", str(args.latent_frames)],
             "decode_3_per_call": ["--model", args.model, *video, "--decode-frames-per-call", "3"],
             "limit_24gib": ["--model", args.model, *video, *([] if tiny else ["--gpu-memory-limit-gib", "24"])],
             "expandable": ["--model", args.model, *video]}
    result = {"device": env_info["device"], "env": env_info, "args": vars(args),
              "alloc_conf": env.get("PYTORCH_CUDA_ALLOC_CONF"), "height": height,
              "width": width, "sections": {}, "skipped": []}
    for section in [s for s in args.sections.split(",") if s]:
        if section not in calls:
            raise SystemExit(f"unknown section {section!r}; expected some of {SECTIONS}")
        left = args.budget_s - (time.perf_counter() - start)
        if left <= 0 or (section == "text_on_gpu" and not args.model_full_t5):
            result["skipped"].append(section)
            continue
        print(f"[user_path] {section} ...", flush=True)
        try:
            stats, wall = run_cli(calls[section] + common, work / section, env | SECTION_ENV.get(section, {}), left)
            entry = dict(video_figures(stats), process_s=wall, env=SECTION_ENV.get(section, {}))
            if section == "long":
                entry["steady_block_ms"] = long_block_ms(stats[0])
                entry["blocks"] = len(stats[0]["block_end_ms"])
        except (RuntimeError, subprocess.TimeoutExpired) as err:
            entry = {"error": f"{type(err).__name__}: {err}"[-2000:]}
        result["sections"][section] = entry
        result.update(headline(result["sections"]))
        write_result(name, result)
    result.update(headline(result["sections"]))
    if not tiny:  # the targets are an H100's at 480x832
        result["targets"] = {key: {"bound": f"{op} {bound}", "value": result.get(key),
                                   "met": None if result.get(key) is None else
                                   (result[key] <= bound if op == "<=" else result[key] >= bound)}
                             for key, bound, op in TARGETS}
    result["total_s"] = time.perf_counter() - start
    path = write_result(name, result)
    print_summary(result)
    print("wrote", path)
    return result


def headline(sections: dict) -> dict:
    """The issue's figures, from whatever sections ran (None where a section is missing)."""
    ok = {k: v for k, v in sections.items() if "error" not in v}
    cold, warm, taehv, long_, text, block, small_card, expandable = (ok.get(k) for k in SECTIONS)
    first = lambda s: s["videos"][0]["total_s"] if s and s["videos"] else None  # noqa: E731
    return {"steady_video_fps_wan_vae": steady(cold, "frames_per_s") if cold else None,
            "steady_video_fps_taehv": steady(taehv, "frames_per_s") if taehv else None,
            "ttff_ms_steady": steady(cold, "time_to_first_frame_ms") if cold else None,
            "first_video_s_cold": first(cold), "first_video_s_warm_cache": first(warm),
            "long_block_ms_steady": long_["steady_block_ms"] if long_ else None,
            "peak_allocated_gib": cold["peak_allocated_gib"] if cold else None,
            "peak_reserved_gib": cold["peak_reserved_gib"] if cold else None,
            "peak_allocated_gib_text_on_gpu": text["peak_allocated_gib"] if text else None,
            "peak_reserved_gib_text_on_gpu": text["peak_reserved_gib"] if text else None,
            "peak_reserved_gib_decode_3_per_call": block["peak_reserved_gib"] if block else None,
            "steady_video_fps_wan_vae_decode_3_per_call": steady(block, "frames_per_s") if block else None,
            # None: the section did not run, or failed (its error is in `sections`).
            "steady_video_fps_wan_vae_24gib": steady(small_card, "frames_per_s") if small_card else None,
            "peak_reserved_gib_expandable": expandable["peak_reserved_gib"] if expandable else None,
            "steady_video_fps_wan_vae_expandable": steady(expandable, "frames_per_s") if expandable else None,
            "text_encoding_ms_per_prompt_cpu": (cold["text_encoding_ms_all_prompts"] / len(PROMPTS)
                                                if cold and cold["text_encoding_ms_all_prompts"] else None),
            # The mp4 writers' tail after a video's last frame, before the next video starts (off the clocks above).
            "mp4_wait_ms_max": max((v["mp4_wait_ms"] for v in cold["videos"] if v.get("mp4_wait_ms") is not None),
                                   default=None) if cold else None}


def write_random_taehv(path: Path, tiny: bool) -> None:
    """Random TAEHV weights of the real architecture (toy widths with `tiny`): decoding time does not depend on them."""
    from safetensors.torch import save_file

    from model.taehv import TAEHV
    torch.manual_seed(0)
    model = TAEHV(decoder_n_f=(16, 8, 8, 8), encoder_width=8) if tiny else TAEHV()
    tmp = path.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
    tmp.replace(path)


def print_summary(result: dict) -> None:
    rows = [("device", result["device"])]
    for key, value in result.items():
        if key in ("device", "env", "args", "alloc_conf", "sections", "skipped", "targets", "total_s", "height",
                   "width"):
            continue
        rows.append((key, "-" if value is None else f"{value:.2f}"))
    for section, entry in result["sections"].items():
        if "error" in entry:
            rows.append((section, "ERROR " + entry["error"][:160]))
    for key, target in result.get("targets", {}).items():
        if target["value"] is not None:
            rows.append((f"target {key} {target['bound']}", "met" if target["met"] else "NOT met"))
    if result["skipped"]:
        rows.append(("skipped", ", ".join(result["skipped"])))
    print_table(rows)


if __name__ == "__main__":
    main()
