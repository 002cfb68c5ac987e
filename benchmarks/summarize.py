"""The README's results table, computed from the JSON files under benchmarks/results/.

    python benchmarks/summarize.py          # the table in README.md, exactly (tests/repo/test_readme.py checks it)
    python benchmarks/summarize.py --all    # one row per result file

Every figure comes from a result file named in its row; the only numbers typed in here are the original's: as its
paper reports them, and as its own inference.py measured on one H100 (below, with how).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from scripts import shapes_results  # noqa: E402  (the shapes-world numbers mean what that script says)

RESULTS = Path(__file__).with_name("results")


def memory_figure(stats: dict) -> str:
    """inference.py's peaks: allocated and reserved (stats before both were kept: allocated only)."""
    if "peak_reserved_gib" in stats:
        return f"{stats['peak_allocated_gib']:.1f} GiB allocated, {stats['peak_reserved_gib']:.1f} GiB reserved"
    return f"{stats['peak_gpu_memory_gib']:.1f} GiB"


def rows() -> list[str]:
    out = ["| result file | device | torch | what | figure |", "| --- | --- | --- | --- | --- |"]
    for path in sorted(RESULTS.glob("*.json")):
        if path.name.endswith("_tiny_cpu.json"):  # harness checks on CPU, not results (git ignores them)
            continue
        data = json.loads(path.read_text())
        env = data.get("env", {})
        head = f"| `{path.name}` | {env.get('device', '?')} | {env.get('torch', '?')} "
        if "mp4_bytes" in data:  # benchmarks/demo_smoke.py: the demo's routes end to end
            blocks = data["block_ms"]
            out.append(head + f"| demo app, {data['blocks']} blocks, {data['frames']} frames | first block "
                              f"{blocks[0]:.0f} ms, then {min(blocks[1:]):.0f}-{max(blocks[1:]):.0f} ms a block "
                              f"(Wan VAE decode included), mp4 {data['mp4_bytes'] / 2**20:.1f} MiB |")
        elif "total_ms" in data and "block_ms" in data:
            blocks = data["block_ms"]
            figure = (f"{data['total_ms']:.0f} ms for {len(blocks)} blocks, "
                      f"{data['frames_per_s_dit_only']:.1f} frames/s (DiT only), block 0 {blocks[0]:.0f} ms, "
                      f"last {blocks[-1]:.0f} ms")
            if data.get("peak_gib") is not None:  # None on CPU
                figure += f", peak {data['peak_gib']:.1f} GiB"
            world = data.get("parallel", {}).get("world_size", 1)
            where = f", sequence parallel over {world} GPUs" if world > 1 else ""
            a = data["args"]
            out.append(head + f"| rollout {a['blocks']}x{a['frames_per_block']} frames, window {a['window']}, "
                              f"sink {a['sink']}, rope {a['rope']}{where} | {figure} |")
        elif "levers" in data:
            out.append(head + f"| speed levers, {data['args']['blocks']} blocks, {data['dtype']} | "
                              f"{speed_figure(data)} |")
        elif "speedup" in data:
            n, one, many = data["gpus"], data["one_gpu"], data[f"{data['gpus']}_gpus"]
            up = data["speedup"]
            out.append(head + f"| sequence parallel, 1 vs {n} GPUs | steady block {one['steady_block_ms']:.0f} -> "
                              f"{many['steady_block_ms']:.0f} ms ({up['steady_block']:.2f}x), block 60 "
                              f"{up['block_60']:.2f}x, frames/s {up['frames_per_s_60blocks']:.2f}x |")
        elif "stats" in data and "pixel_frames" in data["stats"]:  # inference.py stats (gpu_realsize.sh)
            st = data["stats"]
            out.append(head + f"| inference.py {data['what']}, {st['height']}x{st['width']} | "
                              f"{st['total_ms']:.0f} ms for {st['pixel_frames']} frames, "
                              f"{st['frames_per_s']:.1f} frames/s incl. decode, "
                              f"first frame {st['time_to_first_frame_ms']:.0f} ms, peak {memory_figure(st)} |")
        elif "ms_per_step_median" in data and "peak_gpu_memory_gib" in data:  # the former benchmarks/train_step.py
            peaks = data.get("peak_gpu_memory_gib_per_rank") or [data["peak_gpu_memory_gib"]]
            memory = "-" if peaks[0] is None else " / ".join(f"{p:.1f}" for p in peaks) + " GiB"
            out.append(head + f"| training steps, {Path(data['config']).stem}, {data.get('world_size', 1)} rank(s) | "
                              f"{data['ms_per_step_median'] / 1000:.1f} s/step median, "
                              f"{data['ms_per_step_mean'] / 1000:.1f} s mean over {len(data['ms_per_step'])} steps, "
                              f"peak {memory} per rank |")
        elif "runs" in data and all("variants" in r for r in data["runs"]):  # benchmarks/pieces.py runs
            for run in data["runs"]:
                parts = []
                for variant, v in run["variants"].items():
                    if "call_ms" not in v:
                        continue
                    fam = v.get("profile", {}).get("by_family_ms", {})
                    elementwise = f" (other+copy {fam.get('other', 0) + fam.get('copy', 0):.1f})" if fam else ""
                    parts.append(f"{variant} {v['call_ms']:.1f} ms{elementwise}")
                rates = run.get("attention_ms", {}).get("self_tflops", {})
                if len(rates) > 1:  # several attention kernels were timed on the call's shape
                    parts.append("self-attention TFLOP/s " + ", ".join(f"{k} {r:.0f}" for k, r in rates.items()))
                out.append(head + f"| one cached call, {run['label']} | {'; '.join(parts)} |")
        elif "codecs" in data:  # benchmarks/decode.py
            parts = [f"{label} {e['total_ms']:.0f} ms ({e['frames_per_s']:.1f} frames/s"
                     + (f", warm-up {e['warmup_s']:.0f} s)" if e.get("warmup_s", 0) >= 5 else ")")
                     for label, e in data["codecs"].items() if "total_ms" in e]
            out.append(head + f"| streamed decode alone, {data['args']['blocks']} blocks | {'; '.join(parts)} |")
        elif "phases" in data:  # benchmarks/warmup.py
            parts = []
            for phase, e in data["phases"].items():
                detail = (f" (DiT {e['dit_first_s']:.1f} -> {e['dit_warm_s']:.2f} s, decoder "
                          f"{e['decoder_first_s']:.1f} -> {e['decoder_warm_s']:.2f} s)" if "dit_first_s" in e else
                          f" (first video {e['videos'][0]['wall_ms'] / 1e3:.1f} s, last "
                          f"{e['videos'][-1]['wall_ms'] / 1e3:.2f} s)")
                parts.append(f"{phase} compile cache: warm-up {e['warmup_s']:.1f} s{detail}")
            out.append(head + f"| first-run warm-up, decoder {data['args']['decode']} | {'; '.join(parts)} |")
        elif "query_sweep" in data:  # benchmarks/attention_split.py
            last = data["blocks"][-1]
            parts = [f"{k} {v:.2f} ms" for k, v in last["ms"].items() if isinstance(v, float)]
            sweep = ", ".join(f"{q['lq']}: {q['cudnn_ms']:.2f}" for q in data["query_sweep"])
            out.append(head + f"| self-attention kernels, block {last['block']} (Lk {last['lk']}) | "
                              f"{'; '.join(parts)}; cuDNN ms by query length at Lk "
                              f"{data['query_sweep'][0]['lk']}: {sweep} |")
        elif "cases" in data:  # benchmarks/conv_layouts.py
            parts = [f"{c['case']} {c['layout']}{' bench' if c['cudnn_benchmark'] else ''} {c['ms']:.2f} ms "
                     f"({c['tflops']:.0f} TFLOP/s)" for c in data["cases"] if "ms" in c and not c["cudnn_benchmark"]]
            out.append(head + f"| Wan VAE decoder convolutions, one 12-frame call (cuDNN heuristics) | "
                              f"{'; '.join(parts)} |")
        elif "steady_video_fps_wan_vae" in data:  # benchmarks/user_path.py
            out.append(head + f"| inference.py as users run it, {data['height']}x{data['width']} | "
                              f"{user_path_figure(data)} |")
        elif "bidirectional" in data:
            parts = [f"{k.replace('_', ' ')} {v['ms']:.0f} ms ({v['peak_gib']:.1f} GiB peak)"
                     for k, v in data.items() if isinstance(v, dict) and "ms" in v]
            out.append(head + f"| DiT forwards, latent {data['latent']} | {'; '.join(parts)} |")
    return out


def user_path_figure(data: dict) -> str:
    """The user's-path figures that were measured (benchmarks/user_path.py)."""
    labels = (("steady_video_fps_wan_vae", "{:.1f} frames/s Wan VAE"), ("steady_video_fps_taehv", "{:.1f} TAEHV"),
              ("ttff_ms_steady", "first frame {:.0f} ms"), ("first_video_s_cold", "first video {:.1f} s cold"),
              ("first_video_s_warm_cache", "{:.1f} s warm cache"), ("long_block_ms_steady", "long {:.0f} ms/block"),
              ("peak_reserved_gib", "peak reserved {:.1f} GiB (text on CPU)"),
              ("peak_reserved_gib_text_on_gpu", "{:.1f} GiB (UMT5-XXL on GPU)"))
    return ", ".join(text.format(data[key]) for key, text in labels if data.get(key) is not None)


def speed_figure(data: dict) -> str:
    """Eager vs every lever, decode frames/s and first frame, the floor ratio (benchmarks/speed.py)."""
    parts = []
    for lever, e in data["levers"].items():
        if "rollout_ms" in e:
            parts.append(f"{lever} {e['rollout_ms']:.0f} ms ({e['frames_per_s_dit_only']:.1f} fps, "
                         f"rel.err {e.get('rel_error_vs_eager', 0):.1e})")
        else:
            parts.append(f"{lever} failed")
    decoders = (("decode_wan_vae", "Wan VAE"), ("decode_wan_vae_cl", "Wan VAE NDHWC"),
                ("decode_wan_vae_compiled", "Wan VAE NDHWC compiled"),
                ("decode_wan_vae_compiled_pad", "Wan VAE NDHWC compiled, 96 -> 128 channels"),
                ("decode_wan_vae_pipeline", "Wan VAE as the pipeline runs it"),
                ("decode_taehv", "TAEHV"))
    for key, label in decoders:
        e = data.get(key, {})
        if "frames_per_s" in e:
            parts.append(f"{label} {e['frames_per_s']:.1f} fps, first frame {e['time_to_first_frame_ms']:.0f} ms")
    fp8 = data.get("fp8", {})
    if "rollout_ms" in fp8:
        parts.append(f"fp8 (apart) {fp8['rollout_ms']:.0f} ms (rel.err {fp8['rel_error_vs_eager']:.1e})")
    if "floor_ratio" in data:
        parts.append(f"{data['floor_ratio']:.2f}x the {data['flops']['floor_ms']:.0f} ms floor")
    if "steady_block_ms" in data.get("long", {}):
        long = data["long"]
        parts.append(f"{long['blocks']} blocks window {long['window']} sink {long['sink']}: "
                     f"{long['steady_block_ms']:.0f} ms/block steady")
    return "; ".join(parts)


# Huang et al. 2025 (arXiv 2506.08009), Table 1: the original Self Forcing (chunk-wise) on one H100, decode
# included.
PAPER_FRAMES_PER_S, PAPER_LATENCY_S = 17.0, 0.69


# The original's inference.py on one H100 80GB (2026-12-07; random real-size weights, 480x832, 81 frames, 4 steps,
# eager, Wan VAE): 15.4 frames/s end to end, 12.8 GiB peak allocated (max_memory_allocated). Measured beside this
# code's benchmarks on the same kind of card, from a git-ignored checkout of its repository.
ORIGINAL_FRAMES_PER_S, ORIGINAL_PEAK_ALLOCATED_GIB = 15.4, 12.8


def median_steady(section: dict) -> float:
    """A user_path section's median frames/s over its videos after the first (compiled, captured)."""
    values = sorted(v["frames_per_s"] for v in section["videos"][1:])
    return values[len(values) // 2]


def _load(name: str) -> dict:
    return json.loads((RESULTS / name).read_text())


def _speed_rows() -> list[str]:
    fa4 = _load("speed_fa4_pipeline_h100.json")
    eager, best = fa4["levers"]["eager"], fa4["levers"][list(fa4["levers"])[-1]]
    vae, taehv = fa4["decode_wan_vae_pipeline"], fa4["decode_taehv"]
    sdpa = _load("speed_pipeline_h100.json")["levers"]["persistent_norms"]
    warm = _load("warmup_fa4_pipeline_h100.json")["phases"]
    train = _load("train_step_dmd_1.3b_h200.json")
    f = "`speed_fa4_pipeline_h100.json`"
    user = _load("user_path_h100.json")
    cold = user["sections"]["cold"]
    fps = user["steady_video_fps_wan_vae"]
    # The Wan VAE sections by latent frames per decoder call (the default changed from a block to one frame).
    by_call = {sec["levers"]["decode_frames_per_call"] or 3: sec for name, sec in user["sections"].items()
               if name in ("cold", "decode_1_per_call", "decode_3_per_call") and "error" not in sec}
    whole, one = by_call[3], by_call[1]
    one_fps = median_steady(one)
    ends = cold["videos"][0]["block_end_ms"]
    decoder_compile_s = max(b - a for a, b in zip(ends, ends[1:])) / 1000  # the longest wait after block 0
    u = "`user_path_h100.json`"
    return [
        f"| `inference.py`, 4 prompts, 81 frames at 480x832, Wan VAE, SDPA (no flash-attn), steady | {fps:.1f} "
        f"frames/s ({81 / fps:.2f} s a video), first frame {user['ttff_ms_steady']:.0f} ms | original's "
        f"inference.py: {ORIGINAL_FRAMES_PER_S} frames/s ({fps / ORIGINAL_FRAMES_PER_S:.2f}x) | {u} |",
        f"| `inference.py` peak GPU memory, UMT5 on the CPU | one latent frame per Wan VAE call (the default): "
        f"{one['peak_allocated_gib']:.1f} GiB allocated, {one['peak_reserved_gib']:.1f} GiB reserved at "
        f"{one_fps:.1f} frames/s; a block per call: {whole['peak_allocated_gib']:.1f} / "
        f"{whole['peak_reserved_gib']:.1f} GiB | original: {ORIGINAL_PEAK_ALLOCATED_GIB} GiB allocated "
        f"({one['peak_allocated_gib'] / ORIGINAL_PEAK_ALLOCATED_GIB:.2f}x) | {u} |",
        f"| `inference.py` first video, compile and graph capture included | {user['first_video_s_cold']:.1f} s from "
        f"a cold compile cache (of it one block's {decoder_compile_s:.0f} s: the Wan VAE decoder compiling), "
        f"{user['first_video_s_warm_cache']:.1f} s from a warm one | | {u} |",
        f"| `inference.py --preset long`, 60 blocks; `--preset taehv` | {user['long_block_ms_steady']:.0f} ms a "
        f"12-frame block steady (Wan VAE); TAEHV {user['steady_video_fps_taehv']:.1f} frames/s | | {u} |",
        f"| Video streamed, Wan VAE decoding beside the DiT | {vae['frames_per_s']:.1f} frames/s, first frame "
        f"{vae['time_to_first_frame_ms']:.0f} ms | original: {PAPER_FRAMES_PER_S} frames/s, "
        f"{PAPER_LATENCY_S} s latency (its paper; not re-run here) | {f} |",
        f"| Video streamed, TAEHV decoding | {taehv['frames_per_s']:.1f} frames/s, first frame "
        f"{taehv['time_to_first_frame_ms']:.0f} ms | | {f} |",
        f"| DiT rollout alone, every speed option (compile, CUDA graphs, flash-attn 4) | {best['rollout_ms']:.0f} ms, "
        f"{best['frames_per_s_dit_only']:.1f} frames/s, {fa4['floor_ratio']:.2f}x the analytic floor "
        f"({fa4['flops']['floor_ms']:.0f} ms) | every option off: {eager['rollout_ms']:.0f} ms, "
        f"{eager['frames_per_s_dit_only']:.1f} frames/s | {f} |",
        f"| The same without flash-attn (PyTorch SDPA, cuDNN) | {sdpa['rollout_ms']:.0f} ms, "
        f"{sdpa['frames_per_s_dit_only']:.1f} frames/s | | `speed_pipeline_h100.json` |",
        f"| Warm-up of a fresh process (compile, first calls) | {warm['cold']['warmup_s']:.1f} s, "
        f"{warm['warm']['warmup_s']:.1f} s with a warm compile cache | | `warmup_fa4_pipeline_h100.json` |",
        f"| DMD training step, 1.3B generator, critic and teacher, one {train['env']['device'].split()[-1]} | "
        f"{train['ms_per_step_median'] / 1000:.1f} s median, peak {train['peak_gpu_memory_gib']:.1f} GiB "
        f"(UMT5 on the CPU) | | `train_step_dmd_1.3b_h200.json` |",
    ]


def _shapes_rows() -> list[str]:
    sr = shapes_results
    run = _load("shapes_recipe_h100.json")["evaluation"]  # the bundled student and its teacher
    evals = _load("shapes_recipe_baselines_h100.json")["evaluations"]  # every stage, an earlier teacher
    full = sr.merge_evals(list(evals.values()), list(evals))

    def m(stage: str, key: str, split: str = "train", data: dict = run) -> float:
        return sr.metric(data, stage, key, split=split)

    def acc(stage: str) -> str:
        return f"{m(stage, 'attribute_accuracy'):.2f} / {m(stage, 'attribute_accuracy', 'heldout'):.2f}"

    def motion(stage: str) -> str:
        return f"{m(stage, 'motion_correct'):.2f}; {m(stage, 'direction_accuracy'):.2f}"

    def timing(stage: str) -> str:
        t = run["stages"][stage]["timing_batch1"]
        return f"{t['time_to_first_frame_ms']:.0f} ms, {t['frames_per_s_per_video']:.0f} frames/s"

    def overall(stages: tuple[str, ...]) -> str:
        return ", ".join(f"{sr.LABELS[s].replace('Self Forcing ', 'SF ')} {m(s, 'overall', data=full):.3f}"
                         for s in stages)

    steps = {stage: run["stages"][stage]["steps_per_block"] for stage in ("dmd", "teacher")}
    gaps = ", ".join(f"{sr._gap(full, n, 'overall'):+.3f} at {n}x" for n in sr.lengths(full))
    f, g = "`shapes_recipe_h100.json`", "`shapes_recipe_baselines_h100.json`"
    return [
        f"| Shapes world: attribute accuracy held-in / held-out, bundled DMD student ({steps['dmd']} steps) | "
        f"{acc('dmd')} | teacher ({steps['teacher']} steps, CFG): {acc('teacher')} | {f} |",
        f"| Shapes world, held-in: videos with every motion right; shapes moving the prompted direction | "
        f"{motion('dmd')} | teacher {motion('teacher')} | {f} |",
        f"| Shapes world: first frame and frames/s at batch 1 | {timing('dmd')} | teacher {timing('teacher')} | {f} |",
        f"| Claim: the few-step student is close to the teacher (overall score) | {m('dmd', 'overall'):.3f} | "
        f"teacher {m('teacher', 'overall'):.3f} | {f} |",
        f"| Claim: Self Forcing beats teacher / diffusion forcing (overall, 1x) | {overall(sr.SELF_FORCING)} | "
        f"{overall(sr.BASELINES)} | {g} |",
        f"| Claim: the gap grows with video length (Self Forcing minus baselines) | {gaps} | | {g} |",
    ]


def _bundled_rows() -> list[str]:
    """The bundled student re-scored at 256 prompts a split, every figure with its 95% interval."""
    sr = shapes_results
    data = _load("shapes_bundled_eval_cpu.json")
    f = "`shapes_bundled_eval_cpu.json`"

    def ci(key: str, split: str = "train", length: int = 1) -> str:
        r = sr.entry(data, "model", split, length)
        low, high = r["ci"][key]["low"], r["ci"][key]["high"]
        return f"{r[key]:.2f} ({low:.2f}-{high:.2f})"

    def acc(length: int) -> str:
        return f"{ci('attribute_accuracy', length=length)} / {ci('attribute_accuracy', 'heldout', length)}"

    n = data["settings"]["num_prompts"]
    rows = [f"| Shapes world, bundled DMD student re-scored: {n} prompts a split (CPU, float32), 95% intervals; "
            f"attribute accuracy held-in / held-out | {acc(1)} | | {f} |",
            f"| The same, held-in: videos with every motion right; shapes moving the prompted direction | "
            f"{ci('motion_correct')}; {ci('direction_accuracy')} | | {f} |"]
    rows += [f"| The same at {length}x the training length (rolling cache), attribute accuracy held-in / held-out | "
             f"{acc(length)} | | {f} |" for length in sr.lengths(data) if length != 1]
    return rows


def readme_table() -> str:
    """The README's one results table (markdown)."""
    lines = ["| measured | this code | compared with | result file |", "| --- | --- | --- | --- |"]
    return "\n".join(lines + _speed_rows() + _shapes_rows() + _bundled_rows())


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--all", action="store_true", help="one row per result file instead of the README table")
    print("\n".join(rows()) if parser.parse_args().all else readme_table())
