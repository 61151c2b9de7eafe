"""A decoder block's sparsity split over its experts (``--expert-allocation``).

``uniform``: every expert at the block's sparsity. ``owl``: OWL's rule applied inside the
block -- each expert's outlier ratio (Wanda scores of its matrices, with input norms from the
tokens routed to it) maps to a sparsity around the block's, spanning ``2 * lambda``, with the
parameter-weighted mean over the experts equal to the block's sparsity. The block's other
layers stay at the block's sparsity, so the block's budget is met exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import UserError
from .owl import owl_allocation
from .registry import option, register_options

EXPERT_ALLOCATIONS = ("uniform", "owl")


def check_expert_allocation(name: str) -> str:
    if name not in EXPERT_ALLOCATIONS:
        raise UserError(f"--expert-allocation must be one of {', '.join(EXPERT_ALLOCATIONS)} "
                        f"(got {name!r})")
    return name


def expert_split(block_sparsity: float, ratios: Sequence[float], params: Sequence[float],
                 lam: float) -> list[float]:
    """Per-expert sparsities whose parameter-weighted mean is ``block_sparsity`` (within 1e-9).

    Args:
        block_sparsity: the block's sparsity.
        ratios: outlier ratio of every expert (more outliers -> less sparsity).
        params: weights per expert (the budget is parameter-weighted).
        lam: OWL lambda.
    """
    return [float(s) for s in owl_allocation(ratios, block_sparsity, lam, weights=params)]


@dataclass(frozen=True)
class ExpertOptions:
    allocation: str = option("uniform", "MoE: split each block's sparsity over its experts "
                             "uniformly or by their outlier ratios (owl); the block's budget "
                             "is exact")

    def __post_init__(self) -> None:
        check_expert_allocation(self.allocation)


register_options("expert", ExpertOptions)
