"""The rollout's self-attention shapes, kernel by kernel: does splitting the keys (flash-decoding style) pay?

    python benchmarks/attention_split.py            # H100: 1.3B heads, 480x832, blocks 0..6 of a 7-block rollout
    python benchmarks/attention_split.py --size tiny  # harness check on CPU (math SDPA; correctness only)

A block's query (3 frames = 4680 tokens, 12 heads) makes only 37 row tiles of 128 per head: 444 tiles on 132 SMs is
3.4 waves, so the last wave runs a third full. Splitting the keys into `s` parts multiplies the tiles by `s`; the
parts are merged with their log-sum-exps (one fused elementwise pass). This script times, per block position, cuDNN
SDPA whole and split (model/attention.py's log-sum-exp partials and merge), flash-attn 4 whole and with
its own `num_splits`, the two halves of the keys as a batch of two in one cuDNN launch (`sdpa_cudnn_halves`), and the
query-length sweep that shows the wave effect; each split result is checked against
the whole one. Prints a table, writes JSON (benchmarks/results/<name>_<gpu>.json via common.write_result).
"""
from __future__ import annotations

import argparse
import traceback

import torch
from common import environment, print_table, write_result

from model import attention as attention_backends


def math_partial(q, k, v):
    """Exact attention with its log-sum-exp on `[B, L, H, D]` (the CPU stand-in for cuDNN's)."""
    q, k, v = (t.transpose(1, 2).float() for t in (q, k, v))
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    return (scores.softmax(-1) @ v).transpose(1, 2), scores.logsumexp(-1)


def split_attention(q, k, v, splits: int, partial, merge) -> torch.Tensor:
    """`[B, L, H, D]` attention with the keys in `splits` contiguous parts, one launch each."""
    bounds = [round(i * k.shape[1] / splits) for i in range(splits + 1)]
    parts = [partial(q, k[:, a:b], v[:, a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
    return merge(torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts]).transpose(2, 3))


def time_ms(fn, device, repeats: int) -> float:
    for _ in range(3):
        fn()
    if device.type != "cuda":
        return float("nan")
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=["real", "tiny"], default="real")
    parser.add_argument("--splits", default="2,3,4", help="key splits to time (comma-separated)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--name", default="attention_split")
    args = parser.parse_args(argv)
    tiny = args.size == "tiny"
    device = torch.device("cpu" if tiny else "cuda")
    dtype = torch.float32 if tiny else torch.bfloat16
    heads, dim, tokens_per_frame = (2, 16, 16) if tiny else (12, 128, 1560)
    block_tokens = 3 * tokens_per_frame
    splits = [int(s) for s in args.splits.split(",") if s]
    partial = math_partial if tiny else attention_backends._cudnn_attention_with_lse
    merge = (attention_backends.merge_attention_parts if tiny
             else torch.compile(attention_backends.merge_attention_parts, dynamic=False))
    flash = None
    if not tiny:
        try:
            from flash_attn.cute import flash_attn_func as flash
        except ImportError:
            pass
    result = {"env": environment(device), "args": vars(args), "blocks": [], "query_sweep": []}
    rows = [("device", result["env"]["device"])]
    g = torch.Generator(device=device).manual_seed(0)

    def tensors(lq, lk):  # [B, L, H, D], the model's layout
        return [torch.randn(1, n, heads, dim, generator=g, device=device, dtype=dtype) for n in (lq, lk, lk)]

    def tflops(lq, lk, ms):
        return 4 * lq * lk * heads * dim / (ms * 1e-3) / 1e12

    def sdpa(q, k, v):
        return math_partial(q, k, v)[0].to(q.dtype) if tiny else attention_backends._sdpa(q, k, v, "cudnn")

    for block in range(7):
        lq, lk = block_tokens, block_tokens * (block + 1)
        q, k, v = tensors(lq, lk)
        reference = sdpa(q, k, v)
        entry = {"block": block, "lq": lq, "lk": lk, "ms": {}, "tflops": {}, "rel_err": {}}
        candidates = {"cudnn": lambda: sdpa(q, k, v)}
        for s in splits:
            candidates[f"cudnn_split{s}"] = lambda s=s: split_attention(q, k, v, s, partial, merge)
        # The two halves of the keys as a batch of two in ONE launch (model/attention.py's *_halves back-ends).
        candidates["cudnn_halves"] = lambda: attention_backends._key_halves(q, k, v, partial=partial)
        if flash is not None:
            for s in [1, *splits, 0]:
                candidates[f"fa4_splits{s}"] = lambda s=s: flash(q, k, v, num_splits=s)[0]
            candidates["fa4_halves"] = lambda: attention_backends._key_halves(
                q, k, v, partial=attention_backends._flash_attention_lse)
        for label, fn in candidates.items():
            try:
                out = fn()
                err = ((out.float() - reference.float()).norm() / reference.float().norm()).item()
                ms = time_ms(fn, device, args.repeats)
            except Exception as e:  # noqa: BLE001 - a kernel that fails is a result to record
                entry["ms"][label] = f"{type(e).__name__}: {str(e)[:200]}"
                traceback.print_exc()
                continue
            entry["ms"][label], entry["tflops"][label], entry["rel_err"][label] = ms, tflops(lq, lk, ms), err
        result["blocks"].append(entry)
        rows.append((f"block {block} (Lk {lk})", "  ".join(
            f"{lbl} {ms:.3f} ms (err {entry['rel_err'][lbl]:.0e})" if isinstance(ms, float) else f"{lbl} error"
            for lbl, ms in entry["ms"].items())))
        write_result(args.name, result)
    # The wave effect: the same keys (block 3), query lengths around 4680.
    lk = block_tokens * 4
    for lq in ([block_tokens] if tiny else [4096, 4224, 4608, 4680, 4736, 5120, 5376]):
        q, k, v = tensors(lq, lk)
        ms = time_ms(lambda: sdpa(q, k, v), device, args.repeats)
        result["query_sweep"].append({"lq": lq, "lk": lk, "cudnn_ms": ms, "cudnn_tflops": tflops(lq, lk, ms)})
        rows.append((f"cudnn Lq {lq} Lk {lk}", f"{ms:.3f} ms  {tflops(lq, lk, ms):.0f} TFLOP/s"))
    write_result(args.name, result)
    print_table(rows)
    return result


if __name__ == "__main__":
    main()
