"""Clipping and exact budget restoration for per-block sparsities.

Every allocator ends here: its raw per-block sparsities are clipped to
``[lo, hi]`` and then moved, by one scalar, until their mean equals the target
exactly (plain mean, or the parameter-weighted mean when ``weights`` -- the
number of prunable parameters of each block -- are given).

Two ways to move them:

``"shift"``  (water-filling)
    ``s_l = clip(x_l + t, lo, hi)`` with ``x = clip(s, lo, hi)`` and one
    constant ``t``.  Entries that reach a bound stay there; the others keep
    their differences.  Equivalent to repeatedly adding a constant to the
    unclipped entries and pinning those that cross a bound, but solved in
    closed form (the mean is piecewise linear and monotone in ``t``).
``"rescale"``
    ``s_l = clip(c * x_l, lo, hi)`` with one factor ``c > 0`` -- the
    AlphaPruning way (it multiplies its ratios by ``S * sum(w) / sum(w * r)``).
    Keeps the ratios between unclipped entries.  When a factor cannot reach
    the target (e.g. all entries are 0) it falls back to ``"shift"``.

The result is exact to floating-point rounding (far inside the 1e-9 contract).
A target outside ``[lo, hi]`` cannot be met and raises
:class:`~sparsealloc.errors.UserError`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from ..errors import UserError

TOL = 1e-9
"""Budget tolerance promised by every allocator."""

METHODS = ("shift", "rescale")


def as_vector(values: Tensor | Sequence[float], name: str = "values") -> Tensor:
    """``values`` as a 1-D float64 CPU tensor; non-finite or empty input -> UserError."""
    t = torch.as_tensor(values, dtype=torch.float64).detach().cpu().reshape(-1).clone()
    if t.numel() == 0:
        raise UserError(f"{name} is empty; give one value per decoder block")
    if not bool(torch.isfinite(t).all()):
        raise UserError(
            f"{name} contains NaN or infinite values; check the statistics it came from"
        )
    return t


def check_weights(weights: Tensor | Sequence[float] | None, n: int) -> Tensor | None:
    """Validate per-block weights (parameter counts): length ``n``, finite, positive."""
    if weights is None:
        return None
    w = as_vector(weights, "weights")
    if w.numel() != n:
        raise UserError(
            f"got {w.numel()} block weights for {n} blocks; give one parameter count per block"
        )
    if bool((w <= 0).any()):
        raise UserError("block weights must be positive (they are parameter counts per block)")
    return w


def check_target(target: float, name: str = "target sparsity") -> float:
    """``target`` as a float in [0, 1); anything else -> UserError."""
    try:
        value = float(target)
    except (TypeError, ValueError):
        raise UserError(f"{name} must be a number in [0, 1), got {target!r}") from None
    if not (0.0 <= value < 1.0):
        raise UserError(f"{name} must be in [0, 1), got {value}; e.g. 0.7 for 70% sparsity")
    return value


def weighted_mean(
    s: Tensor | Sequence[float], weights: Tensor | Sequence[float] | None = None
) -> float:
    """Plain mean of ``s``, or ``sum(w * s) / sum(w)`` when ``weights`` are given."""
    x = as_vector(s, "sparsities")
    w = check_weights(weights, x.numel())
    if w is None:
        return float(x.mean())
    return float((w * x).sum() / w.sum())


def _solve_affine_clip(
    a: Tensor, b: Tensor, w: Tensor, target: float, lo: float, hi: float
) -> float:
    """Solve ``mean_w(clip(a + b * p, lo, hi)) == target`` for ``p`` (b >= 0, monotone).

    The left side is continuous, non-decreasing and linear between breakpoints
    (where an entry reaches ``lo`` or ``hi``), so bracket the target between
    consecutive breakpoints and interpolate linearly: exact.
    """
    wn = w / w.sum()

    def f(p: float) -> float:
        return float((wn * (a + b * p).clamp(lo, hi)).sum())

    moving = b > 0
    if not bool(moving.any()):
        return 0.0
    bps = torch.cat([(lo - a[moving]) / b[moving], (hi - a[moving]) / b[moving]])
    bps = torch.unique(bps)  # sorted ascending
    vals = [f(float(p)) for p in bps]
    if target <= vals[0]:
        return float(bps[0])
    if target >= vals[-1]:
        return float(bps[-1])
    for k in range(len(vals) - 1):
        f0, f1 = vals[k], vals[k + 1]
        if f0 <= target <= f1:
            p0, p1 = float(bps[k]), float(bps[k + 1])
            if f1 == f0:
                return p0
            return p0 + (target - f0) * (p1 - p0) / (f1 - f0)
    return float(bps[-1])  # unreachable for a monotone f


def restore_budget(
    s: Tensor | Sequence[float],
    target: float,
    weights: Tensor | Sequence[float] | None = None,
    lo: float = 0.0,
    hi: float = 0.99,
    method: str = "shift",
) -> Tensor:
    """Clip ``s`` to ``[lo, hi]`` and restore ``mean(s) == target`` exactly.

    Args:
        s: raw per-block sparsities (any real values).
        target: the required (plain or parameter-weighted) mean.
        weights: prunable parameters per block; ``None`` -> plain mean.
        lo, hi: bounds for every block, ``0 <= lo <= hi < 1``.
        method: ``"shift"`` (add one constant, water-filling) or ``"rescale"``
            (multiply by one factor); see the module docstring.

    Returns:
        1-D float64 tensor, values in ``[lo, hi]``, mean equal to ``target``
        within 1e-9.  A vector that already meets the budget inside the bounds
        comes back unchanged.

    Raises:
        UserError: target outside ``[lo, hi]``, bad bounds, bad weights or method.
    """
    x = as_vector(s, "sparsities")
    n = x.numel()
    w = check_weights(weights, n)
    w = torch.ones(n, dtype=torch.float64) if w is None else w
    if method not in METHODS:
        raise UserError(f"unknown budget method {method!r}; choose one of {', '.join(METHODS)}")
    if not (0.0 <= lo <= hi < 1.0):
        raise UserError(f"sparsity bounds must satisfy 0 <= lo <= hi < 1, got lo={lo}, hi={hi}")
    target = float(target)
    if not math.isfinite(target) or target < lo - TOL or target > hi + TOL:
        raise UserError(
            f"target sparsity {target} cannot be met with every block in [{lo}, {hi}]; "
            f"lower the target sparsity"
        )
    target = min(max(target, lo), hi)
    x = x.clamp(lo, hi)
    if abs(weighted_mean(x, w) - target) <= 1e-13:
        return x

    p = None
    if method == "rescale":
        c = _solve_affine_clip(torch.zeros_like(x), x, w, target, lo, hi)
        out = (c * x).clamp(lo, hi)
        if c > 0 and abs(weighted_mean(out, w) - target) <= TOL * 1e-3:
            p = c
    if p is None:
        p = _solve_affine_clip(x, torch.ones_like(x), w, target, lo, hi)
        out = (x + p).clamp(lo, hi)
    err = weighted_mean(out, w) - target
    if abs(err) > TOL:  # cannot happen for a feasible target; guard the contract anyway
        raise UserError(f"could not meet the sparsity budget {target} (off by {err:.3g})")
    return out
