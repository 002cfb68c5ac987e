"""CUDA graphs for the KV-cached generator calls: one graph per cache plan, replayed with fresh inputs.

A rollout calls the DiT a few times per block with identical shapes and cache slots (the denoising steps and the
clean-context pass rewrite the same block), so the host work of ~30 layers x dozens of kernels can be recorded
once per block position and replayed as one launch. What changes between calls of one plan (latents, timesteps,
prompt embeddings, RoPE tables) is copied into static buffers first; the cache bookkeeping (`plan`, rolling,
sink re-rotation) and the prompt's cross-attention K/V run eagerly before the replay. The cache buffers are
static by construction (`KVCache`), so a graph reads and writes them in place.

`GraphedDiT(model)` is called like the model; calls it cannot graph (no cache, gradients, CPU tensors, extra
arguments) go to the model unchanged. The first call of a plan runs eagerly (its result is the answer; it also
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

    def __init__(self, model: WanDiT, x: Tensor, t: Tensor, context: Tensor, ctx: Context, kv_cache: KVCache,
                 cache_only: bool, pool: Any, emulate: bool):
        self.x, self.t, self.context = x.clone(), t.clone(), context.clone()
        self.ctx = copy.copy(ctx)
        self.ctx.rope = _clone_rotation(ctx.rope)
        self.ctx.cache_rope = _clone_rotation(ctx.cache_rope)
        self.out: Tensor | None = None
        # No closure over self: a reference cycle would keep the graph alive until the cyclic collector runs, and
        # a graph destroyed while another is being captured breaks that capture.
        self.model, self.kv_cache, self.cache_only = model, kv_cache, cache_only
        self.graph = None
        if emulate:
            return
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.out = self._call()

    def _call(self) -> Tensor | None:
        return self.model(self.x, self.t, self.context, kv_cache=self.kv_cache, prepared=self.ctx,
                          cache_only=self.cache_only)

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

    def _graphable(self, x: Tensor, kv_cache: KVCache | None, kwargs: dict) -> bool:
        if kv_cache is None or kwargs or torch.is_grad_enabled():
            return False
        return self.emulate or (x.is_cuda and kv_cache.k.is_cuda)

    def __call__(self, x: Tensor, t: Tensor, context: Tensor, *, kv_cache: KVCache | None = None,
                 start_frame: int = 0, cache_only: bool = False, **kwargs: Any) -> Tensor | None:
        if not self._graphable(x, kv_cache, kwargs):
            return self.model(x, t, context, kv_cache=kv_cache, start_frame=start_frame, cache_only=cache_only,
                              **kwargs)
        model = self.model
        model._check_inputs(x, t, context)
        pt, ph, pw = model.config.patch_size
        grid = (x.shape[1] // pt, x.shape[3] // ph, x.shape[4] // pw)
        ctx = model.prepare_cached_call(kv_cache, start_frame, grid)
        if not kv_cache.text_ready:
            model.cache_text(kv_cache, context)  # outside the graph: a prompt switch refills the same buffers
        plan = ctx.plan
        key = (id(kv_cache), tuple(x.shape), x.dtype, tuple(t.shape), t.dtype, tuple(context.shape), context.dtype,
               plan.write_start, plan.write_end, plan.read_start, cache_only,
               dataclasses.astuple(model.inference_options))
        captured = self._graphs.get(key, False)
        if captured is False:  # first call of this plan: run it, then record it
            out = model(x, t, context, kv_cache=kv_cache, prepared=ctx, cache_only=cache_only)
            self._graphs[key] = self._capture(x, t, context, ctx, kv_cache, cache_only)
            return out
        if captured is None:  # capture failed before: stay eager
            return model(x, t, context, kv_cache=kv_cache, prepared=ctx, cache_only=cache_only)
        self.replays += 1
        return captured.replay(x, t, context, ctx)

    def _capture(self, x, t, context, ctx, kv_cache, cache_only) -> _Captured | None:
        if not self.emulate and self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        # No garbage collection during a capture: it may destroy a dead runner's graphs, which a capture forbids
        # (the capture fails, and the CUDA generator is left expecting one).
        gc_was_enabled = gc.isenabled()
        gc.disable()
        try:
            captured = _Captured(self.model, x, t, context, ctx, kv_cache, cache_only, self._pool, self.emulate)
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
