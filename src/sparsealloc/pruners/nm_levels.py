"""Mixed N:M: one N per block, M fixed, from any per-block allocation.

OWL's code prunes N:M models with a per-layer N (its ``prune_wanda_outlier_structure``: the
outlier ratios are mapped to a span of ``Lamda`` N-units around the target N, rounded). Here
any allocation (OWL, AlphaPruning, a corrected one, a file) becomes per-block levels the same
way, from its sparsities: ``N_l ~ s_l * M``, rounded so the parameter-weighted budget
``sum_l w_l N_l / (M sum_l w_l)`` is as close to the target ``n / m`` as the levels allow
(largest remainders first; a block whose rounding would overshoot is left down). N_l = 0 leaves
a block dense; N_l <= M - 1.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from ..errors import UserError


def nm_levels(block_sparsity: Sequence[float], m: int, weights: Sequence[float] | None = None,
              target: float | None = None) -> list[int]:
    """Per-block N (pruned weights per group of ``m``) for the given sparsities.

    Args:
        block_sparsity: the allocation, one value per block in [0, 1).
        m: the group size M.
        weights: prunable parameters per block (None: equal blocks).
        target: the budget to approach (default: the allocation's own weighted mean).
    """
    if m < 2:
        raise UserError(f"N:M needs M >= 2 (got {m})")
    s = [float(x) for x in block_sparsity]
    w = [1.0] * len(s) if weights is None else [float(x) for x in weights]
    if len(w) != len(s) or not s:
        raise ValueError("one weight per block is needed")
    total = sum(w)
    goal = (sum(wi * si for wi, si in zip(w, s, strict=True)) / total if target is None
            else float(target)) * m * total  # in weighted N units
    x = [min(max(si * m, 0.0), m - 1.0) for si in s]
    levels = [math.floor(xi + 1e-9) for xi in x]
    current = sum(wi * n for wi, n in zip(w, levels, strict=True))
    # largest remainder first (ties: the earlier block), each step only if it gets closer
    order = sorted(range(len(s)), key=lambda i: (-(x[i] - levels[i]), i))
    for i in order:
        if levels[i] >= m - 1:
            continue
        if abs(current + w[i] - goal) < abs(current - goal) - 1e-12:
            levels[i] += 1
            current += w[i]
    return levels


def achieved_budget(levels: Sequence[int], m: int, weights: Sequence[float] | None = None) -> float:
    """The parameter-weighted sparsity ``sum w_l N_l / (M sum w_l)`` of per-block levels."""
    w = [1.0] * len(levels) if weights is None else [float(x) for x in weights]
    return sum(wi * n for wi, n in zip(w, levels, strict=True)) / (m * sum(w))


def check_levels_meet(levels: Sequence[int], m: int, target: float,
                      weights: Sequence[float] | None = None, spec: str = "") -> float:
    """The achieved budget; UserError when the levels cannot come within half a level of it."""
    got = achieved_budget(levels, m, weights)
    if abs(got - target) > 0.5 / m + 1e-9:
        raise UserError(
            f"allocation {spec!r} cannot be honoured with N:{m} levels: its blocks reach a "
            f"budget of {got:.4f} instead of {target:.4f}; use unstructured pruning or an "
            f"allocation whose sparsities stay below {(m - 1) / m:g}"
        )
    return got
