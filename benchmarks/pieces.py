"""One KV-cached DiT call under variants of the compiled path: where the time outside GEMM and attention goes.

    python benchmarks/pieces.py                       # 1.3B, 480x832, bf16, a denoising call at block position 3
    python benchmarks/pieces.py --size tiny           # harness check on CPU

Each variant adds to the one before (`InferenceOptions` switches and inductor settings), compiles cold, then is
timed as CUDA-graph replays of the same call (median of `--repeats`), profiled once without graphs (GPU time by
kernel family and the top kernels, per call), and compared with the first variant's output on the same weights and
inputs. The full rollout is `benchmarks/speed.py`'s job; this isolates one call so each setting costs seconds.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import time
import traceback

import torch
from common import environment, kernel_table, print_table, random_dit, sync, timed, tiny_config, write_result
from speed import rel_error

from model.config import WAN_1_3B
from model.wan_block import EAGER_PIECES, InferenceOptions
from pipeline import compile as compilation
from pipeline.cuda_graphs import GraphedDiT
from pipeline.inductor_heuristics import persistent_reductions

# The options every variant starts from: the defaults without the levers measured here.
PIECES_BASE = InferenceOptions(gelu_epilogue=False, fused_cache_write=False)
# name -> (switches, inductor config), each on top of the previous variant's. The switches are `InferenceOptions`
# fields, and `compile` / `persistent_norms` for the compiled pieces (`pipeline.compile.CompiledPieces`).
COMPILE_SWITCHES = ("compile", "persistent_norms")
VARIANTS = {
    "compiled": ({"fused_qkv": True, "compile": True}, {}),
    "gelu_epilogue": ({"gelu_epilogue": True}, {}),
    "fused_cache_write": ({"fused_cache_write": True}, {}),
    "no_split_reductions": ({}, {"split_reductions": False}),
    "coordinate_descent": ({}, {"coordinate_descent_tuning": True}),
    "max_autotune": ({}, {"max_autotune": True}),
    "multi_kernel": ({}, {"triton.multi_kernel": 1}),
    "persistent_inner_2048": ({}, {"persistent_inner_max": 2048}),
    "persistent_norms": ({"persistent_norms": True}, {}),
}
COPY_OPS = ("aten::copy_", "aten::clone", "aten::contiguous", "aten::_to_copy", "aten::reshape")


def profile_call(fn, device: torch.device, calls: int = 3) -> dict:
    """GPU time per kernel family and the top kernels, per call."""
    fn()
    sync(device)
    activities = [torch.profiler.ProfilerActivity.CPU] + (
        [torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.profiler.profile(activities=activities, record_shapes=True) as prof:
        for _ in range(calls):
            fn()
        sync(device)
    copies = [{"op": e.key, "shapes": str(e.input_shapes)[:200], "calls": e.count / calls}
              for e in prof.key_averages(group_by_input_shape=True) if e.key in COPY_OPS]
    return dict(kernel_table(prof, device.type == "cuda", calls, top=14),
                host_copy_ops=sorted(copies, key=lambda c: -c["calls"])[:12])


def attention_ms(cfg, tokens: int, keys: int, device: torch.device, dtype: torch.dtype, repeats: int,
                 kernels: str) -> dict:
    """The call's attentions alone, median ms (event-free: synchronised wall clock over one launch).

    self / cross: the configured back-end on the model's layouts (`[B, L, heads, head_dim]` views, the KV cache's
    token-major slots). Then, for the self-attention shape, each of `kernels`: "cudnn_bhld" (cuDNN on head-major
    contiguous tensors), "flex" (compiled flex attention, no mask), "flex_autotune" (the same, max-autotune),
    "flash_attn" (the installed flash-attn 3, 4 or 2, on the model's layouts)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from model.attention import attention
    heads, dim = cfg.num_heads, cfg.head_dim
    q = torch.randn(1, tokens, heads, dim, device=device, dtype=dtype)
    k = torch.randn(1, keys, heads, dim, device=device, dtype=dtype)
    text = torch.randn(1, cfg.text_len, heads, dim, device=device, dtype=dtype)
    qh, kh = q.transpose(1, 2).contiguous(), k.transpose(1, 2).contiguous()
    fns = {"self": lambda: attention(q, k, k), "cross": lambda: attention(q, text, text)}
    for kernel in [x for x in kernels.split(",") if x]:
        if kernel == "cudnn_bhld":
            def cudnn_bhld():
                with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                    return torch.nn.functional.scaled_dot_product_attention(qh, kh, kh)
            fns[kernel] = cudnn_bhld
        elif kernel == "flash_attn":
            from model.attention import _flash_attn_func
            flash = _flash_attn_func()

            def missing():
                raise ImportError("none of flash-attn 3, 4 or 2 is installed")
            fns[kernel] = missing if flash is None else (lambda flash=flash: flash(q, k, k).transpose(1, 2))
        elif kernel in ("flex", "flex_autotune"):
            from torch.nn.attention.flex_attention import flex_attention
            mode = "max-autotune-no-cudagraphs" if kernel == "flex_autotune" else None
            flex = torch.compile(flex_attention, dynamic=False, mode=mode)
            fns[kernel] = lambda flex=flex: flex(qh, kh, kh)
        else:
            raise ValueError(f"unknown attention kernel {kernel!r}")
    out = {}
    reference = fns["self"]().transpose(1, 2).float()
    for label, fn in fns.items():
        try:
            out[label], result = timed(fn, device, repeats=repeats)  # the warm-up call compiles flex
            if label not in ("self", "cross"):
                out[label + "_rel_err"] = rel_error(result, reference)
        except Exception as err:  # noqa: BLE001 - a kernel that does not run here is a fact to record
            out[label] = f"{type(err).__name__}: {str(err)[:200]}"
    flops = 4.0 * tokens * keys * heads * dim
    out["self_tflops"] = {label: flops / (ms * 1e9) for label, ms in out.items()
                          if label not in ("cross",) and not label.endswith("_rel_err") and isinstance(ms, float)}
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=["real", "tiny"], default="real")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="cumulative, in order (default: %(default)s)")
    parser.add_argument("--position", type=int, default=3, help="block position of the call (cached blocks before it)")
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=832)
    parser.add_argument("--frames-per-block", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--attention-kernels", default="cudnn_bhld,flex,flex_autotune",
                        help="extra kernels timed on the self-attention shape (see attention_ms)")
    parser.add_argument("--name", default="pieces")
    args = parser.parse_args(argv)
    tiny = args.size == "tiny"
    device = torch.device("cpu" if tiny else "cuda")
    dtype = torch.float32 if tiny else torch.bfloat16
    cfg = tiny_config() if tiny else WAN_1_3B
    h, w = (6, 10) if tiny else (args.height // 8, args.width // 8)
    fpb, pos = args.frames_per_block, args.position
    model = random_dit(cfg, device, dtype)
    g = torch.Generator(device=device).manual_seed(0)
    context = torch.randn(1, cfg.text_len, cfg.text_dim, generator=g, device=device, dtype=dtype)
    x = torch.randn(1, (pos + 1) * fpb, cfg.in_dim, h, w, generator=g, device=device, dtype=dtype)
    t = torch.full((1, fpb), 900.0, device=device)
    cache = model.new_kv_cache(1, h, w, (pos + 1) * fpb)
    start = pos * fpb
    result = {"env": environment(device), "args": vars(args), "variants": {}}
    name = args.name + ("_tiny_cpu" if tiny else "")
    options, inductor, reference = {}, {}, None
    for variant in [v for v in args.variants.split(",") if v]:
        opt_step, ind_step = VARIANTS[variant]
        options, inductor = dict(options, **opt_step), dict(inductor, **ind_step)
        entry: dict = {"options": dict(options), "inductor": dict(inductor)}
        try:
            compilation._compiled.cache_clear()
            torch._dynamo.reset()
            model.inference_options = dataclasses.replace(
                PIECES_BASE, **{k: v for k, v in options.items() if k not in COMPILE_SWITCHES})
            model.cached_pieces = (compilation.CompiledPieces(persistent_norms=options.get("persistent_norms", False))
                                   if options.get("compile") else EAGER_PIECES)
            cache.reset()
            graphed = GraphedDiT(model, emulate=tiny)
            # No FX graph cache: its key does not cover the choices handler, and each variant compiles cold.
            patch = {k: v for k, v in inductor.items() if k != "persistent_inner_max"} | {"fx_graph_cache": False}
            # every inner reduction that wide persistent (the kept `persistent_norms` lever: the layer norms only)
            handler = (persistent_reductions(inductor["persistent_inner_max"], welford_only=False)
                       if "persistent_inner_max" in inductor else contextlib.nullcontext())
            with torch.no_grad(), torch._inductor.config.patch(patch), handler:
                sync(device)
                tic = time.perf_counter()
                for b in range(pos):  # the cached blocks before the call
                    model.write_cache(x[:, b * fpb:(b + 1) * fpb], torch.zeros_like(t), context, cache, b * fpb)
                chunk = x[:, start:]

                def call():
                    return graphed.forward_cached(chunk, t, context, cache, start)

                out = call()  # compiled by now, with the cached blocks' calls
                sync(device)
                entry["compile_s"] = time.perf_counter() - tic
                entry["call_ms"], out = timed(call, device, repeats=args.repeats)  # the warm-up call captures
                entry["graph_errors"] = graphed.errors
                entry["profile"] = profile_call(
                    lambda: model.forward_cached(chunk, t, context, cache, start), device)
            if reference is None:
                reference = out.float()
            entry["rel_error_vs_first"] = rel_error(out, reference)
        except Exception as err:  # noqa: BLE001 - record and go on with the next variant
            entry["error"] = f"{type(err).__name__}: {err}"
            entry["traceback"] = traceback.format_exc()[-3000:]
            options, inductor = {k: v for k, v in options.items() if k not in opt_step}, {
                k: v for k, v in inductor.items() if k not in ind_step}
        result["variants"][variant] = entry
        write_result(name, result)
        print(f"[pieces] {variant}: " + (entry.get("error") or f"{entry['call_ms']:.2f} ms"), flush=True)
    tpf = model.tokens_per_frame(h, w)
    result["attention_ms"] = attention_ms(cfg, fpb * tpf, (pos + 1) * fpb * tpf, device, dtype, args.repeats,
                                          args.attention_kernels if not tiny else "cudnn_bhld")
    write_result(name, result)
    rows = [("device", result["env"]["device"]), ("call", f"block position {pos}, {fpb} frames, {h}x{w} latents"),
            ("attention alone", ", ".join(f"{k} {v:.3f} ms" for k, v in result["attention_ms"].items()
                                          if isinstance(v, float) and not k.endswith("_rel_err"))),
            ("self-attention TFLOP/s", ", ".join(f"{k} {v:.0f}"
                                                 for k, v in result["attention_ms"]["self_tflops"].items()))]
    for variant, e in result["variants"].items():
        if "error" in e:
            rows.append((variant, "ERROR " + e["error"][:100]))
            continue
        fam = e["profile"]["by_family_ms"]
        rows.append((variant, f"{e['call_ms']:7.2f} ms/call  compile {e['compile_s']:5.1f} s  rel.err "
                              f"{e['rel_error_vs_first']:.1e}  | " + ", ".join(
                                  f"{k} {v:.2f}" for k, v in sorted(fam.items(), key=lambda kv: -kv[1]))))
    print_table(rows)
    return result


if __name__ == "__main__":
    main()
