"""The DLP / LSA mapping from one positive statistic per block to per-block sparsities.

Both reference implementations (github.com/ironartisan/DLP ``lib/prune.py::get_dlp_ratios``
and github.com/BeiYazi0/LSA ``layersp/blk.py::blk_score``) end with the same formula, given
one non-negative statistic ``m_l`` per block (DLP: the median Wanda score of the block; LSA:
the mean linear reconstruction error of its linears):

* importance ``I_l = 1 - m_l / sum(m)`` (a larger statistic means a *less* important block);
* ``I~ = (I - min I) / (max I - min I) * 2 * alpha``;
* ``s_l = S + mean(I~) - I~_l`` (DLP writes density ``I~ - mean(I~) + (1 - S)``: the same).

Because ``I`` is affine in ``m``, this equals ``s_l = S + 2 alpha (m_l - mean m) / (max m - min
m)``: sparsity grows linearly with the statistic and spans exactly ``2 * alpha``.

Differences from the references (none active at their published settings):

* all-equal statistics (the references divide by zero) give the uniform allocation;
* the references only patch ``s <= 0`` (to 0.01, DLP's pruning loop) and never repair the
  budget; here the values are clipped to ``[lo, hi]`` and the budget is restored by a shift;
* with ``weights`` (parameters per block) the centring uses the weighted mean, so the
  parameter-weighted mean sparsity is exactly ``S`` (identical when blocks are equal in size).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..errors import UserError
from .budget import as_vector, check_target, check_weights, restore_budget


def layer_importance(stats: Tensor | Sequence[float]) -> Tensor:
    """``I_l = 1 - m_l / sum(m)`` from non-negative per-block statistics (float64)."""
    m = as_vector(stats, "block statistics")
    if bool((m < 0).any()):
        raise UserError("block statistics must be non-negative (scores or squared errors)")
    total = float(m.sum())
    if total <= 0.0:
        return torch.ones_like(m)
    return 1.0 - m / total


def importance_allocation(
    stats: Tensor | Sequence[float],
    target: float,
    alpha: float,
    weights: Tensor | Sequence[float] | None = None,
    lo: float = 0.0,
    hi: float = 0.99,
) -> Tensor:
    """Per-block sparsities from per-block statistics (larger statistic -> more sparsity).

    Args:
        stats: one non-negative statistic ``m_l`` per block.
        target: mean sparsity ``S`` in [0, 1).
        alpha: half the span of the sparsities before clipping (``>= 0``).
        weights: parameters per block; the mean is then parameter-weighted.
        lo, hi: per-block bounds.

    Returns:
        1-D float64 tensor with (weighted) mean ``S`` within 1e-9.
    """
    imp = layer_importance(stats)
    target = check_target(target)
    w = check_weights(weights, imp.numel())
    alpha = float(alpha)
    if not alpha >= 0.0:
        raise UserError(f"the allocation range alpha must be >= 0, got {alpha}")
    spread = float(imp.max() - imp.min())
    if spread <= 0.0 or alpha == 0.0:
        return restore_budget(torch.full_like(imp, target), target, w, lo, hi)
    scaled = (imp - imp.min()) / spread * (2.0 * alpha)
    centre = float(scaled.mean()) if w is None else float((w * scaled).sum() / w.sum())
    return restore_budget(target + centre - scaled, target, w, lo, hi, method="shift")
