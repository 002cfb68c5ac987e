"""Helpers shared by the benchmark scripts: random real-size models, CUDA timing, analytic FLOPs, result files."""
from __future__ import annotations

import json
import math
import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cycle_report import environment, print_table, write_result  # noqa: E402,F401 (re-exported)
from model.config import WanConfig  # noqa: E402
from model.wan import WanDiT  # noqa: E402


def positional_args(doc: str, counts: tuple[int, ...], argv: list[str] | None = None) -> list[str]:
    """The script's positional arguments; with -h/--help, or a count not in `counts`, its usage lines from `doc`
    (the indented `python benchmarks/...` lines) and exit status 0 or 2, rather than an IndexError."""
    args = sys.argv[1:] if argv is None else argv
    asked = bool({"-h", "--help"} & set(args))
    if asked or len(args) not in counts:
        usage = [line.strip() for line in doc.splitlines() if line.strip().startswith("python benchmarks/")]
        print("usage:\n  " + "\n  ".join(usage), file=sys.stdout if asked else sys.stderr)
        raise SystemExit(0 if asked else 2)
    return args


def random_dit(config: WanConfig, device: torch.device, dtype: torch.dtype, seed: int = 0) -> WanDiT:
    """A DiT with random weights built straight on `device` (timing does not depend on weight values)."""
    with torch.device("meta"):
        model = WanDiT(config)
    model = model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm_q.weight") or name.endswith("norm_k.weight") or name.endswith("norm3.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    return model.to(dtype).eval().requires_grad_(False)


def tiny_config() -> WanConfig:
    """The tiny DiT of the CPU harness checks (`--tiny` / `--size tiny`)."""
    return WanConfig(dim=64, ffn_dim=128, num_heads=4, num_layers=2, text_dim=32, freq_dim=32, text_len=16)


def random_codec(kind: str, device: torch.device, dtype: torch.dtype, tiny: bool = False, seed: int = 0):
    """A latent codec with random weights: "wan_vae" (the Wan2.1 VAE architecture), "wan_vae_cl" (the same, decoding
    in the channels-last 3-D layout), "wan_vae_compiled" (that decoder compiled whole), "wan_vae_compiled_pad" (and its
    full-resolution channels zero-padded, `WanVAE.pad_decoder_channels`), "wan_vae_pipeline" (what the inference
    pipeline runs with compile on CUDA: `WanVAE.speed_up_decoder`) or "taehv" (real sizes unless `tiny`). Decoding
    time does not depend on weight values."""
    torch.manual_seed(seed)
    if kind == "wan_vae_cl":
        return random_codec("wan_vae", device, dtype, tiny, seed).decoder_to_channels_last()
    if kind == "wan_vae_compiled":
        return random_codec("wan_vae_cl", device, dtype, tiny, seed).compile_decoder(regional=False)
    if kind == "wan_vae_compiled_pad":
        codec = random_codec("wan_vae_cl", device, dtype, tiny, seed)
        return codec.pad_decoder_channels(decoder_pad_multiple(tiny)).compile_decoder(regional=False)
    if kind == "wan_vae_pipeline":
        return random_codec("wan_vae", device, dtype, tiny, seed).speed_up_decoder(decoder_pad_multiple(tiny))
    if kind == "wan_vae":
        from diffusers import AutoencoderKLWan

        from model.vae import WAN21_VAE_CONFIG, WanVAE
        config = dict(WAN21_VAE_CONFIG, base_dim=8) if tiny else WAN21_VAE_CONFIG
        return WanVAE(AutoencoderKLWan(**config).eval()).to(device=device, dtype=dtype).requires_grad_(False)
    if kind == "taehv":
        from model.taehv import TAEHV, TAEHVCodec
        taehv = TAEHV(decoder_n_f=(16, 8, 8, 8), encoder_width=8) if tiny else TAEHV()
        return TAEHVCodec(taehv.eval()).to(device=device, dtype=dtype).requires_grad_(False)
    raise ValueError(f"codec must be wan_vae, wan_vae_cl, wan_vae_compiled, wan_vae_compiled_pad, wan_vae_pipeline or "
                     f"taehv, got {kind!r}")


def decoder_pad_multiple(tiny: bool) -> int:
    """`WanVAE.pad_decoder_channels`'s multiple: the pipeline's at real size; 16 for the tiny VAE (8 channels)."""
    from model.vae import DECODER_PAD_MULTIPLE
    return 16 if tiny else DECODER_PAD_MULTIPLE


class BlockClock:
    """Marks on the GPU timeline (CUDA events; the host clock on CPU) without synchronising: read the
    intervals after one sync at the end."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list = []

    def mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def intervals_ms(self) -> list[float]:
        """Milliseconds between consecutive marks."""
        if self.cuda:
            self.marks[-1].synchronize()
            return [a.elapsed_time(b) for a, b in zip(self.marks, self.marks[1:])]
        return [(b - a) * 1000.0 for a, b in zip(self.marks, self.marks[1:])]


def dit_call_flops(config: WanConfig, query_tokens: int, key_tokens: int, *, text_embedding: bool = True,
                   cross_kv: bool = False, head: bool = True) -> tuple[float, float]:
    """(GEMM FLOPs, attention FLOPs) of one DiT forward on `query_tokens` tokens attending to `key_tokens`
    self-attention keys (multiply-add = 2 FLOPs). Attention counts QK^T and PV of self- and cross-attention; the
    text embedding and the prompt's cross K/V projections only when computed in this call."""
    d, n, lt = config.dim, query_tokens, config.text_len
    layer = 2 * n * d * d * 4 + 2 * n * d * d * 2 + 2 * n * d * config.ffn_dim * 2  # qkvo, cross q/o, FFN
    if cross_kv:
        layer += 2 * lt * d * d * 2
    gemm = config.num_layers * layer
    gemm += 2 * n * config.in_dim * math.prod(config.patch_size) * d  # patch embedding
    if text_embedding:
        gemm += 2 * lt * config.text_dim * d + 2 * lt * d * d
    if head:
        gemm += 2 * n * d * config.out_dim * math.prod(config.patch_size)
    attn = config.num_layers * (4 * n * key_tokens * d + 4 * n * lt * d)
    return float(gemm), float(attn)


def rollout_flops(config: WanConfig, tokens_per_frame: int, num_blocks: int, frames_per_block: int, num_steps: int,
                  *, window_frames: int = -1, final_context_pass: bool = True,
                  text_every_call: bool = True) -> tuple[float, float]:
    """(GEMM, attention) FLOPs of a few-step rollout: per block `num_steps` denoising calls plus one cache pass
    (not after the last block unless `final_context_pass`), each attending to the frames cached so far (at most
    `window_frames` with a rolling cache). text_every_call: the text embedding in every call (else once)."""
    gemm = attn = 0.0
    calls = 0
    for block in range(num_blocks):
        end = (block + 1) * frames_per_block
        keys = (min(end, window_frames) if window_frames != -1 else end) * tokens_per_frame
        passes = num_steps + (1 if final_context_pass or block < num_blocks - 1 else 0)
        for _ in range(passes):
            g, a = dit_call_flops(config, frames_per_block * tokens_per_frame, keys,
                                  text_embedding=text_every_call or calls == 0, cross_kv=calls == 0)
            gemm, attn, calls = gemm + g, attn + a, calls + 1
    return gemm, attn


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeats: int = 3, warmup: int = 1) -> tuple[float, object]:
    """Median wall milliseconds of `fn()` over `repeats` runs after `warmup` runs, and its last result."""
    out = None
    for _ in range(warmup):
        out = fn()
    sync(device)
    times = []
    for _ in range(repeats):
        sync(device)
        tic = time.perf_counter()
        out = fn()
        sync(device)
        times.append((time.perf_counter() - tic) * 1000.0)
    times.sort()
    return times[len(times) // 2], out


# Kernel families by name (cuBLAS/CUTLASS GEMMs, flash/cuDNN attention, copies); the rest is elementwise work
# (norms, modulation, RoPE, casts): the part the speed issue says to fuse away.
# First match wins. Attention goes first: flash-attn 4's kernels are CUTLASS kernels ("kernel_cutlass_..._flash_fwd")
# and cuDNN's SDPA kernels are named "cudnn_generated_..._sdpa_..."; cuDNN's convolutions (implicit GEMMs, "xmma")
# count as GEMMs.
KERNEL_FAMILIES = (("attention", re.compile(r"flash|fmha|sdpa|attention", re.I)),
                   ("gemm", re.compile(r"gemm|nvjet|cutlass|xmma|cublas|aten::(add|b)?mm$|aten::linear$", re.I)),
                   ("copy", re.compile(r"memcpy|memset|copy|cat_", re.I)))


def kernel_family(name: str) -> str:
    """The family of a kernel (CUDA) or operator (CPU) name: attention, gemm, copy or other."""
    return next((f for f, pattern in KERNEL_FAMILIES if pattern.search(name)), "other")


def kernel_table(prof, cuda: bool, calls: int = 1, top: int = 20) -> dict:
    """A finished `torch.profiler` run as GPU time per kernel family and the top kernels (CPU: self time per
    operator), per call of `calls`. Profiler ranges ("## ...", e.g. a compiled graph's call) are not kernels."""
    rows = []
    for e in prof.key_averages():
        if e.key.startswith("## "):
            continue
        if cuda and e.device_type == torch.autograd.DeviceType.CUDA and e.self_device_time_total > 0:
            rows.append((e.key, e.self_device_time_total / 1000.0 / calls, e.count / calls))
        elif not cuda and e.self_cpu_time_total > 0:
            rows.append((e.key, e.self_cpu_time_total / 1000.0 / calls, e.count / calls))
    rows.sort(key=lambda r: -r[1])
    families: dict[str, float] = {}
    for name, ms, _ in rows:
        family = kernel_family(name)
        families[family] = families.get(family, 0.0) + ms
    return {"what": "GPU time per kernel" if cuda else "CPU self time per operator",
            "total_ms": sum(r[1] for r in rows), "by_family_ms": families,
            "top": [{"name": n[:120], "ms": ms, "calls": c} for n, ms, c in rows[:top]]}


def steady_block_ms(block_ms: list[float], window_frames: int = -1, frames_per_block: int = 3) -> float:
    """The per-block cost of a long rollout: the median over the blocks that attend to a full rolling window (from
    block window_frames // frames_per_block + 1 on); without a window (the cache only grows), of the last 5 blocks."""
    tail = block_ms[window_frames // frames_per_block + 1:] if window_frames > 0 else block_ms[-5:]
    tail = sorted(tail or block_ms)
    return tail[len(tail) // 2]


# ------------------------------------------------------------------- shapes-world ablations (single frames, CPU)

def small_shapes_setup(dim: int, layers: int, factor: int, prediction: str):
    """One CPU thread, seed 0, and (the shipped shapes text encoder, an x`factor` pixel codec, a fresh small DiT of
    `dim` width and `layers` layers with the given head) for the CPU ablations."""
    from model.pixel_codec import PixelShuffleCodec
    from model.text_encoder import TextEncoder
    torch.set_num_threads(1)
    torch.manual_seed(0)
    shipped = Path(__file__).resolve().parents[1] / "assets" / "shapes_base"
    text = TextEncoder.from_diffusers_folder(shipped, text_len=32, device="cpu")
    channels = 3 * factor * factor
    net = WanDiT(WanConfig(dim=dim, ffn_dim=4 * dim, num_heads=dim // 32, num_layers=layers, text_dim=64,
                           text_len=32, freq_dim=32, in_dim=channels, out_dim=channels, prediction=prediction))
    net.init_weights()
    return text, PixelShuffleCodec(spatial_factor=factor), net


def shapes_frames(text, codec, n: int, generator: torch.Generator, num_shapes=(1, 2), size: int = 64,
                  frames: int = 1):
    """`n` train-split scenes as `frames` `size`x`size` frames: (scenes, latents `[n, frames, C, h, w]`, prompt
    embeddings)."""
    from shapes import render, sample_scenes, short_prompt
    scenes = sample_scenes(n, generator, "train", num_shapes=num_shapes)
    with torch.no_grad():
        context = text([short_prompt(s) for s in scenes])
    return scenes, codec.encode_to_latent(render(scenes, frames, size, size)), context


def train_on_shapes_frames(net, text, codec, steps: int, lr: float, num_shapes=(1, 2), batch_size: int = 32,
                           log_every: int = 500, label: str = "", size: int = 64, frames: int = 1,
                           time_limit_s: float = math.inf):
    """Flow-matching training of `net` on shapes-world frames (single ones, or clips of `frames`; shift-5
    timesteps, plain MSE on the flow) for `steps` or `time_limit_s`; returns (last loss, steps done)."""
    from pipeline.schedule import FlowMatchSchedule
    schedule = FlowMatchSchedule(5.0)
    opt = torch.optim.AdamW(net.parameters(), lr=lr)
    device = next(net.parameters()).device  # scenes are drawn, rendered and encoded on the CPU, then moved
    g = torch.Generator().manual_seed(1)
    tic, loss = time.time(), torch.tensor(float("nan"))
    for step in range(steps):
        if time.time() - tic > time_limit_s:
            return float(loss.detach()), step
        _, x0, context = shapes_frames(text, codec, batch_size, g, num_shapes, size, frames)
        t = schedule.timesteps[torch.randint(0, schedule.num_train_timesteps, (batch_size,), generator=g)]
        noise = torch.randn(x0.shape, generator=g)
        x0, context, t, noise = x0.to(device), context.to(device), t.to(device), noise.to(device)
        x_t = schedule.add_noise(x0, noise, t[:, None].expand(x0.shape[:2]))
        loss = ((net(x_t, t, context) - (noise - x0)) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % log_every == 0:
            print(f"{label} step {step} loss {float(loss.detach()):.4f} ({time.time() - tic:.0f} s)", flush=True)
    return float(loss.detach()), steps


def train_and_probe(net, text, codec, seconds: float, frames: int, size: int, label: str,
                    num_scenes: int = 32, batch_size: int = 16) -> dict:
    """The from-scratch teacher ablations' protocol: flow-matching training on one-shape clips of `frames` frames
    (lr 5e-4) for `seconds`, then `scripts/probe_shapes_teacher.measure` (t = 1000, where the input is pure noise
    and the best prediction is the mean clip given the prompt, then 900, 700, 500) on the world as it is."""
    from pipeline.denoiser import Denoiser
    from pipeline.schedule import FlowMatchSchedule
    from scripts.probe_shapes_teacher import measure
    loss, steps = train_on_shapes_frames(net, text, codec, 10**9, lr=5e-4, num_shapes=1, batch_size=batch_size,
                                         log_every=500, label=label, size=size, frames=frames, time_limit_s=seconds)
    net.eval()
    result = measure(Denoiser(net, FlowMatchSchedule(5.0), uniform_timestep=True), text, codec, frames, size, size,
                     num_scenes=num_scenes, timesteps=(1000.0, 900.0, 700.0, 500.0))
    print(f"{label}: {steps} steps in {seconds:.0f} s, last loss {loss:.4f}")
    return {**result, "seconds": seconds, "steps": steps, "last_loss": loss, "batch_size": batch_size}


def write_ablation(result: dict, name: str) -> Path:
    """Write an ablation's result to runs/ablations/<name>.json (what later goes into benchmarks/results/)."""
    out = Path(__file__).resolve().parents[1] / "runs" / "ablations" / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    return out


def write_probe_result(result: dict, name: str) -> Path:
    """Print a probe table and write the result to runs/ablations/<name>.json."""
    from scripts.probe_shapes_teacher import print_table
    print_table(result)
    out = write_ablation(result, name)
    print(f"wrote {out}")
    return out
