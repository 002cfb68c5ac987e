"""The compiled pieces' inductor heuristic: which reductions become one persistent kernel (the layer norms of rows up
to 2048 wide), and that it is installed only while compiling under it."""
from __future__ import annotations

import shutil
from types import SimpleNamespace

import pytest
import sympy
import torch
from torch._inductor.runtime.hints import ReductionHint

from model.inductor_heuristics import PERSISTENT_NORM_WIDTH, persistent_reductions, wants_persistent


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


@pytest.mark.slow
@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")), reason="inductor on CPU needs a C++ compiler")
def test_compiled_cached_calls_run_their_layers_under_it_and_plain_calls_do_not():
    from torch._inductor.virtualized import V

    from model.wan_block import InferenceOptions
    from tests.tiny import tiny_model
    model = tiny_model()
    seen = []
    for block in model.blocks:
        block.register_forward_pre_hook(lambda module, args: seen.append(type(V.choices).__name__))
    x, context = torch.randn(1, 2, 4, 4, 6), torch.randn(1, 6, 16)
    default = type(V.choices).__name__
    for persistent in (True, False):
        model.inference_options = InferenceOptions(compile=True, persistent_norms=persistent)
        with torch.no_grad():
            model.forward_cached(x, torch.full((1, 2), 500.0), context, model.new_kv_cache(1, 4, 6, 2))
    model(x, torch.full((1,), 500.0), context)  # no cache: never compiled, no heuristics
    layers = len(model.blocks)
    assert seen[:layers] == ["Choices"] * layers and default != "Choices"
    assert seen[layers:] == [default] * (2 * layers)
