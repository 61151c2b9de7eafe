"""Uniform allocation: every block gets the target sparsity."""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import UserError
from .budget import check_target
from .registry import AllocationContext, Allocator, Base, NoOptions, register


def uniform_allocation(num_blocks: int, target: float) -> Tensor:
    """``s_l = target`` for all ``num_blocks`` blocks (1-D float64 tensor)."""
    if int(num_blocks) < 1:
        raise UserError(f"need at least one decoder block, got {num_blocks}")
    return torch.full((int(num_blocks),), check_target(target), dtype=torch.float64)


@register
class Uniform(Allocator):
    """Every block at the target sparsity."""

    name = "uniform"

    def allocate(self, ctx: AllocationContext, target: float, opts: NoOptions,
                 arg: str | None) -> Base:
        return Base(uniform_allocation(ctx.num_blocks, target).tolist())
