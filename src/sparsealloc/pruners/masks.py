"""Pruning masks as pure tensor functions. ``True`` in a mask means *prune* (set to zero).

All selections are deterministic: scores are ordered with a stable sort, so among equal
scores the lower index (row-major for whole-matrix masks) is pruned first.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from sparsealloc.errors import UserError

__all__ = [
    "UNSTRUCTURED",
    "Pattern",
    "check_pattern_fits",
    "check_pattern_target",
    "check_sparsity",
    "nm_mask",
    "parse_pattern",
    "prune_count",
    "unstructured_layer_mask",
    "unstructured_row_mask",
]

_NM_RE = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


@dataclass(frozen=True)
class Pattern:
    """Sparsity pattern of a pruned weight matrix.

    Attributes:
        kind: ``"unstructured"`` (any positions) or ``"nm"`` (N:M semi-structured).
        n: for ``"nm"``, weights pruned in every group of ``m`` consecutive input columns.
        m: for ``"nm"``, the group size.
    """

    kind: Literal["unstructured", "nm"]
    n: int = 0
    m: int = 0

    def __post_init__(self) -> None:
        if self.kind == "unstructured":
            if self.n or self.m:
                raise UserError("unstructured pattern takes no N:M numbers")
        elif self.kind == "nm":
            if not (0 < self.n < self.m):
                raise UserError(f"N:M pattern needs 0 < N < M, got {self.n}:{self.m}")
        else:
            raise UserError(f"unknown pattern kind {self.kind!r}; use 'unstructured' or 'nm'")

    @property
    def is_nm(self) -> bool:
        """True for an N:M pattern."""
        return self.kind == "nm"

    @property
    def nm_sparsity(self) -> float:
        """n/m for an N:M pattern (the sparsity it imposes); 0.0 for unstructured."""
        return self.n / self.m if self.is_nm else 0.0

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.is_nm else "unstructured"


UNSTRUCTURED = Pattern("unstructured")


def check_pattern_target(pattern: Pattern, sparsity: float, option: str = "--sparsity") -> None:
    """An N:M pattern prunes exactly n/m of every layer: refuse a different target sparsity."""
    if pattern.is_nm and abs(sparsity - pattern.nm_sparsity) > 1e-9:
        raise UserError(
            f"--pattern {pattern} prunes {pattern.nm_sparsity:g} of every group of {pattern.m}, "
            f"not {option} {sparsity:g}: pass {option} {pattern.nm_sparsity:g}, or drop "
            "--pattern for unstructured pruning"
        )


def parse_pattern(text: str) -> Pattern:
    """Parse ``"unstructured"`` or ``"N:M"`` (e.g. ``"2:4"``, ``"4:8"``) into a :class:`Pattern`.

    Args:
        text: the pattern as the user wrote it (case and surrounding spaces ignored).

    Raises:
        UserError: the text is neither ``unstructured`` nor ``N:M`` with ``0 < N < M``.
    """
    if not isinstance(text, str):
        raise UserError(f"sparsity pattern must be a string, got {text!r}")
    clean = text.strip().lower()
    if clean == "unstructured":
        return Pattern("unstructured")
    match = _NM_RE.match(clean)
    if match is None:
        raise UserError(
            f"bad sparsity pattern {text!r}; use 'unstructured' or 'N:M' such as '2:4' or '4:8'"
        )
    n, m = int(match.group(1)), int(match.group(2))
    if not (0 < n < m):
        raise UserError(f"bad sparsity pattern {text!r}: N:M needs 0 < N < M (e.g. '2:4')")
    return Pattern("nm", n, m)


def check_sparsity(sparsity: float) -> float:
    """Return ``sparsity`` as a float if it lies in [0, 1), else raise :class:`UserError`.

    Args:
        sparsity: fraction of weights to prune.
    """
    try:
        value = float(sparsity)
    except (TypeError, ValueError):
        raise UserError(f"sparsity must be a number in [0, 1), got {sparsity!r}") from None
    if not (math.isfinite(value) and 0.0 <= value < 1.0):
        raise UserError(f"sparsity must be in [0, 1), got {sparsity!r}")
    return value


def prune_count(total: int, sparsity: float) -> int:
    """Number of weights to prune out of ``total``: ``floor(total * sparsity)``.

    The product is rounded to 6 decimals first so that float error cannot drop one
    (``100 * 0.29 == 28.999999999999996`` gives 29, not 28).

    Args:
        total: number of candidate weights.
        sparsity: fraction in [0, 1) (validated).
    """
    return min(total, math.floor(round(total * check_sparsity(sparsity), 6)))


def check_pattern_fits(shape: Sequence[int], pattern: Pattern) -> None:
    """Raise :class:`UserError` if an N:M ``pattern`` cannot tile the input columns.

    Args:
        shape: weight shape ``(out_features, in_features)``.
        pattern: the sparsity pattern.
    """
    if pattern.is_nm and shape[-1] % pattern.m != 0:
        raise UserError(
            f"N:M pattern {pattern} does not fit a layer of shape {tuple(shape)}: "
            f"in_features={shape[-1]} is not a multiple of M={pattern.m}; "
            "use 'unstructured' or another N:M"
        )


def _check_2d(scores: Tensor) -> None:
    if scores.dim() != 2:
        shape = tuple(scores.shape)
        raise ValueError(f"scores must be 2-D (out_features, in_features), got {shape}")


def _lowest_per_row(scores: Tensor, k: int) -> Tensor:
    """In each row, mark the ``k`` lowest scores; among equal scores the lower column first.

    The same mask as a stable sort's first ``k`` indices, found in linear time: the k-th
    smallest value of each row (``kthvalue``), every score below it, then the lowest-index
    scores equal to it until the row has ``k``. Rows holding NaN use the stable sort (NaN
    orders last there).
    """
    rows, cols = scores.shape
    mask = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    if k == 0:
        return mask
    if k >= cols:
        return mask.fill_(True)
    if bool(torch.isnan(scores).any()):
        return mask.scatter_(1, torch.sort(scores, dim=1, stable=True).indices[:, :k], True)
    kth = torch.kthvalue(scores, k, dim=1, keepdim=True).values
    torch.lt(scores, kth, out=mask)
    need = k - mask.sum(dim=1)  # >= 1: the k-th value itself is not below itself
    row, col = torch.nonzero(scores == kth, as_tuple=True)  # row-major: columns ascending
    counts = torch.bincount(row, minlength=rows)
    first = torch.cumsum(counts, 0) - counts
    rank = torch.arange(row.numel(), device=scores.device) - first[row]
    take = rank < need[row]
    mask[row[take], col[take]] = True
    return mask


def unstructured_row_mask(scores: Tensor, sparsity: float) -> Tensor:
    """Per output row, mark the ``prune_count(cols, sparsity)`` lowest scores for pruning.

    This is Wanda's comparison group (each row is pruned to the same sparsity).

    Args:
        scores: ``(out_features, in_features)`` importance scores; higher = keep.
        sparsity: fraction in [0, 1) pruned in every row.

    Returns:
        Bool tensor of ``scores``' shape, ``True`` = prune.
    """
    _check_2d(scores)
    return _lowest_per_row(scores, prune_count(scores.shape[1], sparsity))


def unstructured_layer_mask(scores: Tensor, sparsity: float) -> Tensor:
    """Over the whole matrix, mark the ``prune_count(numel, sparsity)`` lowest scores.

    This is the comparison group of the magnitude baseline in the Wanda / OWL /
    AlphaPruning reference code (one threshold per layer).

    Args:
        scores: ``(out_features, in_features)`` importance scores; higher = keep.
        sparsity: fraction in [0, 1) pruned in the matrix.

    Returns:
        Bool tensor of ``scores``' shape, ``True`` = prune.
    """
    _check_2d(scores)
    k = prune_count(scores.numel(), sparsity)
    return _lowest_per_row(scores.reshape(1, -1), k).view(scores.shape)


def nm_mask(scores: Tensor, n: int, m: int) -> Tensor:
    """In every group of ``m`` consecutive input columns of each row, mark the ``n`` lowest.

    Args:
        scores: ``(out_features, in_features)`` importance scores; higher = keep.
        n: weights pruned per group.
        m: group size; must divide ``in_features``.

    Returns:
        Bool tensor of ``scores``' shape, ``True`` = prune, exactly ``n`` per group.

    Raises:
        UserError: ``m`` does not divide ``in_features`` (message names shape and pattern).
    """
    _check_2d(scores)
    pattern = Pattern("nm", n, m)
    check_pattern_fits(scores.shape, pattern)
    rows, cols = scores.shape
    groups = scores.reshape(rows, cols // m, m)
    order = torch.sort(groups, dim=2, stable=True).indices[..., :n]
    mask = torch.zeros(groups.shape, dtype=torch.bool, device=scores.device)
    return mask.scatter_(2, order, True).view(rows, cols)
