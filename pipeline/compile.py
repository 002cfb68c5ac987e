"""`torch.compile` applied to the DiT from outside the model: the model's forward is the same with or without it.

Inference (`compile_pieces`, the `compile` lever): the three per-layer pieces around attention (`model/wan_block.py`)
run through inductor on the KV-cached no-grad path. Their shapes are static, so one graph per piece serves every
layer (parameters are graph inputs) and every block position of a rollout. The runner is installed as
`WanDiT.cached_pieces`, the seam through which a KV-cached call runs its pieces.

Training (`compile_models`, `compile: true`): whole blocks are compiled for whole-clip calls (regional compilation:
the blocks share one graph, so warm-up costs one block; small networks are dominated by kernel launches, and fusing
the elementwise work of a block cuts a training step several-fold). KV-cached calls (rollouts) run each block
uncompiled with the same compiled pieces, gradients included: a whole compiled block guards on the layer index and
the cache's Python state, so a rollout would recompile per layer and, past dynamo's recompile limit, run eager.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from pipeline.inductor_heuristics import persistent_reductions


class CompiledPieces:
    """Runs the per-layer pieces through `torch.compile` (a `WanDiT.cached_pieces` runner).

    persistent_norms: compile under `persistent_reductions` (the layer norms as persistent kernels).
    with_grad: compile calls that record gradients too (training); else they run the pieces eager.
    """

    def __init__(self, persistent_norms: bool = True, with_grad: bool = False):
        self.persistent_norms = persistent_norms
        self.with_grad = with_grad

    def __call__(self, fn: Callable) -> Callable:
        if torch.is_grad_enabled() and not self.with_grad:
            return fn
        return _compiled(fn, self.persistent_norms)

    def __repr__(self) -> str:
        return f"CompiledPieces(persistent_norms={self.persistent_norms}, with_grad={self.with_grad})"


@functools.cache
def _compiled(fn: Callable, persistent_norms: bool) -> Callable:
    """One compiled function per piece and setting, shared by every model and layer."""
    if not persistent_norms:
        # Inductor's on-disk graph cache does not key on the heuristics: only the compiles made under them may fill it.
        return torch.compile(fn, fullgraph=True, dynamic=False, options={"fx_graph_cache": False})
    compiled = torch.compile(fn, fullgraph=True, dynamic=False)

    @functools.wraps(fn)
    def under_heuristics(*args: Any) -> Any:
        with persistent_reductions():  # compilation happens inside the first call; later calls only enter it
            return compiled(*args)
    return under_heuristics


def compile_pieces(model: nn.Module, *, persistent_norms: bool = True) -> nn.Module:
    """Inference's compile lever on `model` (a `WanDiT`, or a shallow copy of one sharing its weights); returns it."""
    model.cached_pieces = CompiledPieces(persistent_norms=persistent_norms)
    return model


def compile_models(models: Any) -> None:
    """Training's `compile: true` on every DiT of a `Models` bundle (generator, critic, teacher), after
    `utils.distributed.parallelize_models` placed and sharded them."""
    for role in ("generator", "critic", "teacher"):
        denoiser = getattr(models, role, None)
        if denoiser is not None:
            compile_blocks(denoiser.model)


def compile_blocks(net: nn.Module) -> None:
    """Training's regional compilation of `net` in place: whole blocks for whole-clip calls, the compiled pieces for
    KV-cached ones. After sharding, so FSDP's hooks stay outside. Idempotent."""
    blocks = getattr(net, "blocks", None)
    if blocks is None:
        raise ValueError(f"compile: {type(net).__name__} has no `blocks` to compile")
    for block in blocks:
        if getattr(block, "_compiled_call_impl", None) is None:
            # What `nn.Module.compile` installs, routed by the kind of call.
            block._compiled_call_impl = _WholeClipCompiled(torch.compile(block._call_impl), block._call_impl)
    if hasattr(net, "cached_pieces"):
        net.cached_pieces = CompiledPieces(with_grad=True)


class _WholeClipCompiled:
    """A block's call: compiled whole without a KV cache, eager (with compiled pieces) with one. The block's context
    (`model.wan_block.Context`) is its fourth argument."""

    def __init__(self, compiled: Callable, eager: Callable):
        self.compiled, self.eager = compiled, eager

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        ctx = args[3]
        return (self.eager if ctx.cache is not None else self.compiled)(*args, **kwargs)
