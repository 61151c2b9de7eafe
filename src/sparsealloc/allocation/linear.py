"""ATP-style linear schedule: sparsity grows (or shrinks) linearly with depth.

``s_l = S - beta * (L - 1) / 2 + beta * l`` for ``l = 0..L-1``; its plain mean
is ``S`` by construction.  Values outside ``[lo, hi]`` are clipped and the
budget is restored by a shift (see :mod:`.budget`), so the mean stays exact
also for large ``beta`` or with ``weights`` (parameter-weighted mean).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..errors import UserError
from .budget import check_target, restore_budget


def linear_allocation(
    num_blocks: int,
    target: float,
    beta: float,
    weights: Tensor | Sequence[float] | None = None,
    lo: float = 0.0,
    hi: float = 0.99,
) -> Tensor:
    """Linear schedule with slope ``beta`` per block (``beta > 0``: deeper blocks sparser)."""
    n = int(num_blocks)
    if n < 1:
        raise UserError(f"need at least one decoder block, got {num_blocks}")
    target = check_target(target)
    beta = float(beta)
    idx = torch.arange(n, dtype=torch.float64)
    raw = target - beta * (n - 1) / 2.0 + beta * idx
    return restore_budget(raw, target, weights=weights, lo=lo, hi=hi, method="shift")
