"""CUDA graphs for the KV-cached generator calls: one graph per cache plan, replayed with fresh inputs.

A rollout calls the DiT a few times per block with identical shapes and cache slots (the denoising steps and the
clean-context pass rewrite the same block), so the host work of ~30 layers x dozens of kernels can be recorded
once per block position and replayed as one launch. What changes between calls of one plan (latents, timesteps,
prompt embeddings, RoPE tables) is copied into static buffers first; the cache bookkeeping (`plan`, rolling,
sink re-rotation) and the prompt's cross-attention K/V run eagerly before the replay. The cache buffers are
static by construction (`KVCache`), so a graph reads and writes them in place.

`GraphedDiT(model)` is used like the model: its KV-cached modes (`forward_cached`, `write_cache`) are graphed, every
other mode and the calls it cannot graph (gradients, CPU tensors) go to the model unchanged. The first call of a plan runs eagerly (its result is the answer; it also
warms up cuBLAS and compiled kernels) and is then captured. Weights must not change after capture (`reset()`).
A capture that fails is recorded in `errors` and that plan keeps running eagerly.
"""
from __future__ import annotations

import copy
import dataclasses
import gc
from typing import Any

import torch
from torch import Tensor

from model.kv_cache import KVCache
from model.rope import Rotation
from model.wan import WanDiT
from model.wan_block import Context


def _clone_rotation(rot: Rotation | None) -> Rotation | None:
    if rot is None:
        return None
    static = copy.copy(rot)
    static.cos, static.sin, static.cos2, static.sin2 = (t.clone() for t in rot.tensors())
    return static


class _Captured:
    """One recorded call: static inputs, the static context, the graph (or, emulated, the call to re-run)."""

    def __init__(self, model: WanDiT, mode: str, x: Tensor, t: Tensor, context: Tensor, ctx: Context,
                 kv_cache: KVCache, pool: Any, emulate: bool):
        self.x, self.t, self.context = x.clone(), t.clone(), context.clone()
        self.ctx = copy.copy(ctx)
        self.ctx.rope = _clone_rotation(ctx.rope)
        self.ctx.cache_rope = _clone_rotation(ctx.cache_rope)
        self.out: Tensor | None = None
        # No closure over self: a reference cycle would keep the graph alive until the cyclic collector runs, and
        # a graph destroyed while another is being captured breaks that capture.
        self.model, self.mode, self.kv_cache = model, mode, kv_cache
        self.graph = None
        if emulate:
            return
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.out = self._call()

    def _call(self) -> Tensor | None:
        return _run_mode(self.model, self.mode, self.x, self.t, self.context, self.kv_cache, self.ctx)

    def replay(self, x: Tensor, t: Tensor, context: Tensor, ctx: Context) -> Tensor | None:
        self.x.copy_(x)
        self.t.copy_(t)
        self.context.copy_(context)
        for dst, src in zip(self.ctx.tensors(), ctx.tensors()):
            dst.copy_(src)
        if self.graph is None:
            self.out = self._call()
        else:
            self.graph.replay()
        return None if self.out is None else self.out.clone()


def _run_mode(model: WanDiT, mode: str, x: Tensor, t: Tensor, context: Tensor, kv_cache: KVCache,
              ctx: Context) -> Tensor | None:
    """`model.forward_cached` or `model.write_cache` on the planned call `ctx`."""
    return getattr(model, mode)(x, t, context, kv_cache, prepared=ctx)


class GraphedDiT:
    """A `WanDiT` whose KV-cached no-grad calls replay CUDA graphs (see the module docstring).

    emulate: record and "replay" by re-running the call on the static buffers, on any device (tests the plumbing
      where no GPU is at hand).
    """

    def __init__(self, model: WanDiT, *, emulate: bool = False):
        self.model = model
        self.emulate = emulate
        self.errors: list[str] = []
        self.captures = 0
        self.replays = 0
        self._graphs: dict[tuple, _Captured | None] = {}
        self._pool = None

    def __getattr__(self, name: str) -> Any:  # config, parameters, new_kv_cache ... come from the model
        return getattr(self.model, name)

    def reset(self) -> None:
        """Drop every graph (after changing weights, or to free their memory)."""
        self._graphs.clear()
        self._pool = None

    def __call__(self, x: Tensor, t: Tensor, context: Tensor, **kwargs: Any) -> Tensor:
        return self.model(x, t, context, **kwargs)  # a whole clip: nothing to graph

    def forward_cached(self, x: Tensor, t: Tensor, context: Tensor, kv_cache: KVCache,
                       start_frame: int = 0) -> Tensor:
        """`WanDiT.forward_cached`, replayed from a graph per cache plan."""
        return self._graphed("forward_cached", x, t, context, kv_cache, start_frame)

    def write_cache(self, x: Tensor, t: Tensor, context: Tensor, kv_cache: KVCache, start_frame: int = 0) -> None:
        """`WanDiT.write_cache`, replayed from a graph per cache plan."""
        self._graphed("write_cache", x, t, context, kv_cache, start_frame)

    def _graphable(self, x: Tensor, kv_cache: KVCache) -> bool:
        if torch.is_grad_enabled():
            return False
        return self.emulate or (x.is_cuda and kv_cache.k.is_cuda)

    def _graphed(self, mode: str, x: Tensor, t: Tensor, context: Tensor, kv_cache: KVCache,
                 start_frame: int) -> Tensor | None:
        if not self._graphable(x, kv_cache):
            return getattr(self.model, mode)(x, t, context, kv_cache, start_frame)
        model = self.model
        model._check_inputs(x, t, context)
        pt, ph, pw = model.config.patch_size
        grid = (x.shape[1] // pt, x.shape[3] // ph, x.shape[4] // pw)
        ctx = model.prepare_cached_call(kv_cache, start_frame, grid)
        if not kv_cache.text_ready:
            model.cache_text(kv_cache, context)  # outside the graph: a prompt switch refills the same buffers
        plan = ctx.plan
        key = (id(kv_cache), tuple(x.shape), x.dtype, tuple(t.shape), t.dtype, tuple(context.shape), context.dtype,
               plan.write_start, plan.write_end, plan.read_start, mode,
               dataclasses.astuple(model.inference_options))
        captured = self._graphs.get(key, False)
        if captured is False:  # first call of this plan: run it, then record it
            out = _run_mode(model, mode, x, t, context, kv_cache, ctx)
            self._graphs[key] = self._capture(mode, x, t, context, ctx, kv_cache)
            return out
        if captured is None:  # capture failed before: stay eager
            return _run_mode(model, mode, x, t, context, kv_cache, ctx)
        self.replays += 1
        return captured.replay(x, t, context, ctx)

    def _capture(self, mode, x, t, context, ctx, kv_cache) -> _Captured | None:
        if not self.emulate and self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        # No garbage collection during a capture: it may destroy a dead runner's graphs, which a capture forbids
        # (the capture fails, and the CUDA generator is left expecting one).
        gc_was_enabled = gc.isenabled()
        gc.disable()
        try:
            captured = _Captured(self.model, mode, x, t, context, ctx, kv_cache, self._pool, self.emulate)
        except Exception as err:  # noqa: BLE001 - any capture failure falls back to eager for this plan
            self.errors.append(f"{type(err).__name__}: {err}")
            if x.is_cuda:
                torch.cuda.synchronize(x.device)
            return None
        finally:
            if gc_was_enabled:
                gc.enable()
        self.captures += 1
        return captured
