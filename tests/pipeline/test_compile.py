"""Compilation applied from outside the model (`pipeline/compile.py`): the seam through which KV-cached calls run their
per-layer pieces, the compiled runners inference and training install there, and the inductor heuristic they compile
under (which reductions become one persistent kernel: the layer norms of rows up to 2048 wide)."""
from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import sympy
import torch
from torch._inductor.runtime.hints import ReductionHint

from model.wan_block import EAGER_PIECES
from pipeline import compile as compilation
from pipeline.compile import CompiledPieces, compile_blocks, compile_pieces
from pipeline.inductor_heuristics import PERSISTENT_NORM_WIDTH, persistent_reductions, wants_persistent
from tests.tiny import tiny_model


def features(width, reduction_type: str, hint=ReductionHint.INNER):
    node = SimpleNamespace(node=SimpleNamespace(get_reduction_type=lambda: reduction_type))
    return SimpleNamespace(reduction_numel=width, get_reduction_hint=lambda: hint, reduction_nodes=lambda: [node])


@pytest.mark.parametrize("width, kind, hint, welford_only, expected", [
    (1536, "welford_reduce", ReductionHint.INNER, True, True),      # the 1.3B layer norm
    (sympy.Integer(1536), "welford_combine", ReductionHint.INNER, True, True),
    (1536, "sum", ReductionHint.INNER, True, False),                # an RMS norm: left to inductor
    (1536, "sum", ReductionHint.INNER, False, True),
    (5120, "welford_reduce", ReductionHint.INNER, True, False),      # the 14B model's rows: too wide
    (1536, "welford_reduce", ReductionHint.OUTER, True, False),     # not a row reduction
    (sympy.Symbol("s0"), "welford_reduce", ReductionHint.INNER, True, False),  # dynamic width
])
def test_only_static_inner_layer_norm_rows_up_to_the_width_go_persistent(width, kind, hint, welford_only, expected):
    assert wants_persistent(features(width, kind, hint), PERSISTENT_NORM_WIDTH, welford_only) is expected


def test_the_heuristic_is_installed_only_inside_its_context():
    from torch._inductor.virtualized import V
    before = type(V.choices)
    with persistent_reductions():
        inside = V.choices
        assert inside.should_use_persistent_reduction(features(1536, "welford_reduce"), False)
    assert type(V.choices) is before and type(inside) is not before


@pytest.fixture
def traced_compile(monkeypatch):
    """`torch.compile` as the identity (its contract without minutes of CPU compilation), recording what it got."""
    compiled = []

    def fake_compile(fn, **kwargs):
        compiled.append((fn, kwargs))
        return fn
    monkeypatch.setattr(compilation.torch, "compile", fake_compile)
    compilation._compiled.cache_clear()
    yield compiled
    compilation._compiled.cache_clear()


def cached_and_clip_calls(model):
    x, context = torch.randn(1, 2, 4, 4, 6), torch.randn(1, 6, 16)
    with torch.no_grad():
        model.forward_cached(x, torch.full((1, 2), 500.0), context, model.new_kv_cache(1, 4, 6, 2))
        model(x, torch.full((1,), 500.0), context)


def test_only_kv_cached_calls_run_their_pieces_through_the_installed_runner():
    model = tiny_model()
    assert model.cached_pieces is EAGER_PIECES
    asked = []

    def recording(piece):
        asked.append(piece.__name__)
        return piece
    model.cached_pieces = recording
    cached_and_clip_calls(model)  # the whole-clip call after the cached one asks nothing
    assert asked == ["_attention_inputs", "_cross_query", "_feed_forward"] * len(model.blocks)


def test_compiled_pieces_compile_under_the_heuristic_and_only_without_grad(traced_compile):
    from torch._inductor.virtualized import V
    default = type(V.choices).__name__

    def piece(x):
        return x, type(V.choices).__name__
    with torch.no_grad():
        assert CompiledPieces()(piece)(1) == (1, "Choices")  # entered around each call: compilation happens there
        assert CompiledPieces(persistent_norms=False)(piece)(1) == (1, default)
    assert CompiledPieces()(piece) is piece  # a call that records gradients runs the piece eager
    assert CompiledPieces(with_grad=True)(piece)(1) == (1, "Choices")
    assert [(fn, kwargs.get("options")) for fn, kwargs in traced_compile] == [(piece, None),
                                                                              (piece, {"fx_graph_cache": False})]
    assert all(kwargs["fullgraph"] and kwargs["dynamic"] is False for _, kwargs in traced_compile)


def test_compile_pieces_installs_on_a_twin_without_touching_the_model(traced_compile):
    model = tiny_model()
    twin = compile_pieces(copy.copy(model), persistent_norms=False)
    assert model.cached_pieces is EAGER_PIECES and twin.blocks is model.blocks
    assert repr(twin.cached_pieces) == "CompiledPieces(persistent_norms=False, with_grad=False)"
    cached_and_clip_calls(twin)
    assert {fn.__name__ for fn, _ in traced_compile} == {"_attention_inputs", "_cross_query", "_feed_forward"}


def test_compile_blocks_compiles_whole_clip_calls_and_routes_cached_ones_to_the_pieces(traced_compile):
    model = tiny_model()
    compile_blocks(model)
    routers = [block._compiled_call_impl for block in model.blocks]
    compile_blocks(model)  # idempotent: a second call leaves the blocks' calls as they are
    assert [block._compiled_call_impl for block in model.blocks] == routers
    assert repr(model.cached_pieces) == "CompiledPieces(persistent_norms=True, with_grad=True)"
    whole, eager = [], []
    for router in routers:  # record which of the two a call takes
        compiled, plain = router.compiled, router.eager
        router.compiled = lambda *a, f=compiled, **k: whole.append(1) or f(*a, **k)
        router.eager = lambda *a, f=plain, **k: eager.append(1) or f(*a, **k)
    x, context = torch.randn(1, 2, 4, 4, 6), torch.randn(1, 6, 16)
    model(x, torch.full((1,), 500.0), context)
    assert (len(whole), len(eager)) == (len(model.blocks), 0)
    model.forward_cached(x, torch.full((1, 2), 500.0), context, model.new_kv_cache(1, 4, 6, 2))
    assert (len(whole), len(eager)) == (len(model.blocks), len(model.blocks))
    with pytest.raises(ValueError, match="has no `blocks` to compile"):
        compile_blocks(torch.nn.Linear(2, 2))
