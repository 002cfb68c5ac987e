"""Inductor heuristics for the compiled layer pieces (`pipeline/compile.py`).

Inductor keeps an inner reduction in one persistent kernel (the whole row in registers) only up to 1024 elements;
wider rows get a looped kernel that reads each row twice (statistics, then the normalised output). The 1.3B model's
rows are 1536 wide: its layer norms (mean/variance, a Welford reduction) as persistent kernels took 14 us instead of
24 us each on an H100, and the 7-block rollout 1831 ms instead of 1882
(`benchmarks/results/speed_persistent_norms_h100.json`; `benchmarks/speed.py`'s `persistent_norms` lever). The RMS
norms fused with RoPE got slower that way (`benchmarks/results/pieces_h100.json`), hence `welford_only`.
"""
from __future__ import annotations

import functools
from contextlib import AbstractContextManager

import sympy

# Layer-norm rows up to this wide stay in registers: the 1.3B model's 1536; the 14B model's 5120 keeps the default.
PERSISTENT_NORM_WIDTH = 2048
_WELFORD = ("welford_reduce", "welford_combine")


def wants_persistent(features, max_width: int, welford_only: bool) -> bool:
    """Whether a kernel (inductor's `SIMDKernelFeatures`) should be one persistent reduction: an inner reduction of
    a static width up to `max_width`, and with `welford_only` a mean/variance one."""
    from torch._inductor.runtime.hints import ReductionHint
    width = sympy.sympify(features.reduction_numel)
    if features.get_reduction_hint() != ReductionHint.INNER or not width.is_Integer or int(width) > max_width:
        return False
    if not welford_only:
        return True
    return any(getattr(node.node, "get_reduction_type", lambda: None)() in _WELFORD
               for node in features.reduction_nodes())


def persistent_reductions(max_width: int = PERSISTENT_NORM_WIDTH, welford_only: bool = True
                          ) -> AbstractContextManager[None]:
    """A context under which inductor compiles with `wants_persistent` added to its choices (this thread only).
    Enter it around the first call of a compiled function: compilation happens there."""
    from torch._inductor.virtualized import V
    return V.set_choices_handler(_choices(max_width, welford_only))


@functools.cache
def _choices(max_width: int, welford_only: bool):
    """One handler per setting: entering the context on every call of a compiled piece stays cheap."""
    from torch._inductor.choices import InductorChoices

    class Choices(InductorChoices):
        @staticmethod
        def should_use_persistent_reduction(features, cooperative_reduction):
            if not cooperative_reduction and wants_persistent(features, max_width, welford_only):
                return True
            return InductorChoices.should_use_persistent_reduction(features, cooperative_reduction)

    return Choices()
