"""The inference speed levers a user gets, decided in one place: `inference.py`, `demo.py` and the benchmarks build
their pipelines through `levers_for`, so what `benchmarks/speed.py` and `benchmarks/user_path.py` measure is what the
command line runs.

On CUDA every lever that `benchmarks/speed.py` stacks is on by default: the per-layer compiled pieces (and, with them,
the Wan VAE's compiled, padded, channels-last decoder), one CUDA graph per KV-cache plan, the fused q/k/v GEMM and the
fastest attention back-end, timed at start-up on the shape of the last block's self-attention. The levers that are
exact everywhere (real RoPE tables, cached text K/V, the K/V-only cache pass, the GELU epilogue, fused cache writes)
are `InferenceOptions`' own defaults on every device, and compiling means compiling under the persistent-norm
heuristics (`pipeline/compile.py`). On the CPU nothing else changes. Each default is a config value under the user's:
a config file, a `key=value` override or a flag (`--no-compile`, `--no-cuda-graphs`, `--no-fused-qkv`,
`--attention-backend NAME`) turns it off or pins it.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import time
from typing import Any

import torch

from model import attention as attention_backends
from model.wan_block import InferenceOptions

# The attention back-end value that asks for a measurement at start-up (what `attention_backend: auto` means on CUDA).
MEASURE = "measure"


def compiler_available() -> bool:
    """Whether torch.compile can build GPU kernels here (inductor's CUDA code is Triton)."""
    return importlib.util.find_spec("triton") is not None


def config_defaults(device_type: str) -> dict[str, Any]:
    """The config keys whose default depends on the device: merged under every file and override of the user.
    Compile is a default only where Triton is installed (asked for without it, it fails, naming the cause)."""
    if device_type != "cuda":
        return {}
    return {"compile": compiler_available(), "cuda_graphs": True}


@dataclasses.dataclass(frozen=True)
class Levers:
    """What a pipeline is built with. attention_backend: a name of `ATTENTION_BACKENDS`, or `MEASURE`."""

    compile: bool = False
    cuda_graphs: bool = False
    fused_qkv: bool = False
    attention_backend: str = "auto"
    decode_side_stream: bool = True
    decode_frames_per_call: int | None = None  # the Wan VAE's latent frames per decoder call (None: its default)

    def inference_options(self, base: InferenceOptions | None = None) -> InferenceOptions:
        """`base` (default: `InferenceOptions()`, the exact levers on) with this set's generator switches (compile is
        applied apart, by the pipeline: `pipeline.compile.compile_pieces`)."""
        return dataclasses.replace(base or InferenceOptions(), fused_qkv=self.fused_qkv)


# On CUDA the Wan VAE decodes one latent frame per call unless asked otherwise: measured through inference.py on an
# H100 (benchmarks/results/user_path_h100.json, sections cold and decode_1_per_call), one frame per call streams as
# fast as a whole block per call (30.1 vs 29.8 frames/s) and peaks 8 GiB lower allocated, 30 GiB lower reserved.
CUDA_DECODE_FRAMES_PER_CALL = 1


def levers_for(cfg: Any, device_type: str, *, fused_qkv: bool | None = None,
               decode_frames_per_call: int | None = None) -> Levers:
    """The levers of a resolved config (`config_defaults` merged in) on a device. On CUDA `attention_backend: auto`
    becomes a measurement (`fastest_attention_backend`), the fused q/k/v GEMM is on unless `fused_qkv` is False and
    the Wan VAE decodes `CUDA_DECODE_FRAMES_PER_CALL` latent frames per call unless `decode_frames_per_call` is given;
    CUDA graphs exist on CUDA only."""
    cuda = device_type == "cuda"
    if decode_frames_per_call is None and cuda:
        decode_frames_per_call = CUDA_DECODE_FRAMES_PER_CALL
    backend = MEASURE if cuda and cfg.inference.attention_backend == "auto" else cfg.inference.attention_backend
    return Levers(compile=bool(cfg.compute.compile), cuda_graphs=bool(cfg.inference.cuda_graphs) and cuda,
                  fused_qkv=cuda if fused_qkv is None else fused_qkv, attention_backend=backend,
                  decode_frames_per_call=decode_frames_per_call)


def attention_shape(config: Any, tokens_per_frame: int, frames_per_block: int, cache_frames: int) -> dict[str, int]:
    """The self-attention of a rollout's last block: one block of queries over the filled cache (batch 1)."""
    return {"num_heads": config.num_heads, "head_dim": config.head_dim,
            "query_tokens": frames_per_block * tokens_per_frame, "key_tokens": cache_frames * tokens_per_frame}


def fastest_attention_backend(device: torch.device, dtype: torch.dtype, *, num_heads: int, head_dim: int,
                              query_tokens: int, key_tokens: int, repeats: int = 5) -> dict[str, Any]:
    """Time every available unmasked attention back-end on one shape; returns {"ms": name -> median ms or the error
    of a back-end that cannot run here, "fastest": the name}. The process-wide back-end is left as it was."""
    previous = attention_backends._backend
    gen = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(1, query_tokens, num_heads, head_dim, generator=gen, device=device, dtype=dtype)
    kv = torch.randn(1, key_tokens, num_heads, head_dim, generator=gen, device=device, dtype=dtype)
    times: dict[str, Any] = {}
    try:
        for name in attention_backends.ATTENTION_BACKENDS:
            if name == "sdpa_math":  # materialises the score matrix: never the fastest, only slow to time
                continue
            try:
                attention_backends.set_attention_backend(name)
                times[name] = _median_ms(lambda: attention_backends.attention(q, kv, kv), device, repeats)
            except Exception as err:  # noqa: BLE001 - a back-end missing here is a fact to record
                times[name] = f"{type(err).__name__}: {str(err)[:200]}"
    finally:
        attention_backends.set_attention_backend(previous)
    ok = {k: v for k, v in times.items() if isinstance(v, float)}
    return {"ms": times, "fastest": min(ok, key=ok.get) if ok else "auto"}


def _median_ms(fn, device: torch.device, repeats: int) -> float:
    fn()  # warm-up: kernel selection, lazy initialisation
    samples = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
        else:
            tic = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - tic) * 1000.0)
    return sorted(samples)[len(samples) // 2]


def apply_attention_backend(levers: Levers, device: torch.device, dtype: torch.dtype,
                            shape: dict[str, int] | None) -> tuple[Levers, dict[str, Any] | None]:
    """Set the process-wide attention back-end of `levers` (measured first if it is `MEASURE`, on `shape`); returns
    the levers with the back-end that was set, and the measurement (None when none was made)."""
    measured = None
    backend = levers.attention_backend
    if backend == MEASURE:
        if shape is None:
            raise ValueError("attention_backend measure needs the attention shape to time")
        measured = fastest_attention_backend(device, dtype, **shape)
        backend = measured["fastest"]
    attention_backends.set_attention_backend(backend)  # raises if it names a flash-attn that is missing
    return dataclasses.replace(levers, attention_backend=backend), measured
