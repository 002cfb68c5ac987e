"""The Wan VAE decoder's convolutions alone, on the shapes of one streamed call (3 latent frames -> 12 pixel frames at
480x832): which layout, cuDNN setting and channel count runs them fastest.

    python benchmarks/conv_layouts.py             # H100: prints a table, writes conv_layouts.json under $OUT
    python benchmarks/conv_layouts.py --size tiny # harness check on CPU

Each case is one causal 3x3x3 conv as the decoder runs it (input already holding the 2 cached frames and the spatial
zero padding) or the 2-D 3x3 conv after a spatial upsample, in bf16: NCDHW or NDHWC (channels-last 3-D), with
`torch.backends.cudnn.benchmark` off or on, and the 96-channel full-resolution conv also with its channels zero-padded
to 128 (an exact rewrite of that stage: zero channels stay zero through RMS norm, SiLU and the residual). Reported:
median ms and achieved TFLOP/s of the real (unpadded) work.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from common import environment, print_table, timed, write_result

# (name, input channels, output channels, time steps after the conv, height, width, kernel): one call's convs.
REAL_CASES = (
    ("full-res 96->96 (x6 + head)", 96, 96, 12, 480, 832, 3),
    ("full-res 96->96 padded to 128", 128, 128, 12, 480, 832, 3),
    ("half-res 192->192 (x6)", 192, 192, 12, 240, 416, 3),
    ("quarter-res 384->384 (x6)", 384, 384, 6, 120, 208, 3),
    ("head 96->3", 96, 3, 12, 480, 832, 3),
    ("upsample conv2d 192->96", 192, 96, 12, 480, 832, 2),
    ("upsample conv2d 192->128 (padded)", 192, 128, 12, 480, 832, 2),
)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=["real", "tiny"], default="real")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--name", default="conv_layouts")
    args = parser.parse_args(argv)
    tiny = args.size == "tiny"
    device = torch.device("cpu" if tiny else "cuda")
    dtype = torch.float32 if tiny else torch.bfloat16
    result = {"env": environment(device), "args": vars(args), "cases": []}
    rows = [("device", result["env"]["device"])]
    for name, cin, cout, t, h, w, dims in REAL_CASES:
        if tiny:
            cin, cout, t, h, w = max(cin // 32, 1), max(cout // 32, 1), 2, 8, 12
        real_cin = 96 if "padded" in name and "conv2d" not in name and not tiny else cin
        real_cout = 96 if "padded" in name and not tiny else cout
        for layout in ("ncdhw", "ndhwc"):
            for benchmark in (False, True):
                torch.backends.cudnn.benchmark = benchmark
                try:
                    ms = time_conv(cin, cout, t, h, w, dims, layout, device, dtype, args.repeats)
                finally:
                    torch.backends.cudnn.benchmark = False
                flop = 2.0 * t * h * w * real_cout * real_cin * (27 if dims == 3 else 9)
                entry = {"case": name, "layout": layout, "cudnn_benchmark": benchmark, "ms": ms,
                         "tflops": flop / (ms / 1000.0) / 1e12, "shape": [cin, cout, t, h, w, dims]}
                result["cases"].append(entry)
                rows.append((f"{name} {layout}{' bench' if benchmark else ''}",
                             f"{ms:8.2f} ms  {entry['tflops']:6.1f} TFLOP/s"))
                write_result(args.name + ("_tiny_cpu" if tiny else ""), result)
    print_table(rows)
    return result


def time_conv(cin: int, cout: int, t: int, h: int, w: int, dims: int, layout: str, device: torch.device,
              dtype: torch.dtype, repeats: int) -> float:
    g = torch.Generator(device=device).manual_seed(0)
    if dims == 3:
        x = torch.randn(1, cin, t + 2, h + 2, w + 2, device=device, dtype=dtype, generator=g)
        weight = torch.randn(cout, cin, 3, 3, 3, device=device, dtype=dtype, generator=g) * 0.02
        memory_format = torch.channels_last_3d
        conv = F.conv3d
    else:
        x = torch.randn(t, cin, h, w, device=device, dtype=dtype, generator=g)
        weight = torch.randn(cout, cin, 3, 3, device=device, dtype=dtype, generator=g) * 0.02
        memory_format = torch.channels_last
        conv = lambda x, w: F.conv2d(x, w, padding=1)  # noqa: E731
    if layout == "ndhwc":
        x, weight = x.contiguous(memory_format=memory_format), weight.contiguous(memory_format=memory_format)
    with torch.no_grad():
        ms, out = timed(lambda: conv(x, weight), device, repeats=repeats, warmup=2)
    assert out.shape[1] == cout
    return ms


if __name__ == "__main__":
    main()
