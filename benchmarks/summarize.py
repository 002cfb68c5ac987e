"""Print the benchmark results under benchmarks/results/ as a markdown table (pasted into the README).

    python benchmarks/summarize.py
"""
from __future__ import annotations

import json
from pathlib import Path

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
            figure = (f"{data['total_ms']:.0f} ms for {len(blocks)} blocks, {data['frames_per_s_dit_only']:.1f} frames/s "
                      f"(DiT only), block 0 {blocks[0]:.0f} ms, last {blocks[-1]:.0f} ms")
            if data.get("peak_gib") is not None:  # None on CPU
                figure += f", peak {data['peak_gib']:.1f} GiB"
            world = data.get("parallel", {}).get("world_size", 1)
            where = f", sequence parallel over {world} GPUs" if world > 1 else ""
            out.append(head + f"| rollout {data['args']['blocks']}x{data['args']['frames_per_block']} frames, "
                              f"window {data['args']['window']}, sink {data['args']['sink']}, rope {data['args']['rope']}"
                              f"{where} | {figure} |")
        elif "levers" in data:
            out.append(head + f"| speed levers, {data['args']['blocks']} blocks, {data['dtype']} | {speed_figure(data)} |")
        elif "speedup" in data:
            n, one, many = data["gpus"], data["one_gpu"], data[f"{data['gpus']}_gpus"]
            out.append(head + f"| sequence parallel, 1 vs {n} GPUs | steady block {one['steady_block_ms']:.0f} -> "
                              f"{many['steady_block_ms']:.0f} ms ({data['speedup']['steady_block']:.2f}x), block 60 "
                              f"{data['speedup']['block_60']:.2f}x, frames/s {data['speedup']['frames_per_s_60blocks']:.2f}x |")
        elif "stats" in data and "pixel_frames" in data["stats"]:  # inference.py stats (gpu_realsize.sh)
            st = data["stats"]
            out.append(head + f"| inference.py {data['what']}, {st['height']}x{st['width']} | {st['total_ms']:.0f} ms for "
                              f"{st['pixel_frames']} frames, {st['frames_per_s']:.1f} frames/s incl. decode, first "
                              f"frame {st['time_to_first_frame_ms']:.0f} ms, peak {memory_figure(st)} |")
        elif "ms_per_step_median" in data and "peak_gpu_memory_gib" in data:  # benchmarks/train_step.py
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


if __name__ == "__main__":
    print("\n".join(rows()))
