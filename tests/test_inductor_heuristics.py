"""The compiled pieces' inductor heuristic: which reductions become one persistent kernel (the layer norms of rows up
to 2048 wide), and that it is installed only while compiling under it."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import sympy
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
