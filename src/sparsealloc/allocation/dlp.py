"""DLP (dynamic layerwise pruning, Chen et al., ICML 2025, arXiv 2505.23807).

Reference code: github.com/ironartisan/DLP, ``lib/prune.py::get_dlp_ratios`` (also
re-implemented in github.com/BeiYazi0/LSA, ``layersp/dlp.py::dlp_score``).

* Statistic: for every decoder block, the Wanda scores ``|W| * sqrt(scaler_row)`` of *all*
  its linear layers on the dense model (inputs from the dense blocks before it) are
  flattened and concatenated; the block's statistic is ``|median|`` of that concatenation
  (``torch.median``: the lower middle value for an even count).
* Mapping: :func:`~.importance.importance_allocation` -- importance ``1 - m_l / sum(m)``,
  min-max scaled to ``[0, 2 alpha]``, ``s_l = S + mean - scaled_l``.  A block with a larger
  median score is less important and gets more sparsity.
* Defaults: ``alpha = 0.15`` (argparse default, README and every script at 70% sparsity),
  statistic ``median`` (the paper, argparse ``--strategy median`` and the LSA repository's
  re-implementation).

One discrepancy inside the reference: its ``get_dlp_ratios`` (the unstructured path that
produced the published table) computes ``torch.mean`` regardless of ``--strategy``; only its
N:M path honours ``--strategy``.  ``statistic="mean"`` reproduces that code path.  The
reference's ``scaler_row`` divides by sequences, ours by tokens: a common constant factor
that ``m_l / sum(m)`` removes.  See :mod:`.importance` for the budget handling.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import UserError
from ..pruners.wanda import wanda_scores
from .importance import importance_allocation
from .registry import AllocationContext, Allocator, Base, option, register

DEFAULT_ALPHA = 0.15
STATISTICS = ("median", "mean")


def dlp_block_score(scores: Tensor | Sequence[Tensor], statistic: str = "median") -> float:
    """``|median|`` (or ``|mean|``) of all entries of a block's Wanda score matrices.

    ``scores`` is one tensor or a list of tensors (one per linear layer, any shapes); the
    statistic is over their concatenation, so larger layers contribute more entries.
    """
    if statistic not in STATISTICS:
        raise UserError(f"unknown DLP statistic {statistic!r}; choose one of "
                        f"{', '.join(STATISTICS)}")
    tensors = [scores] if isinstance(scores, Tensor) else list(scores)
    if not tensors or sum(t.numel() for t in tensors) == 0:
        raise UserError("DLP score of an empty block: it has no linear layers to score")
    flat = torch.cat([t.detach().reshape(-1).float().cpu() for t in tensors])
    value = flat.median() if statistic == "median" else flat.double().mean()
    return abs(float(value))


def dlp_allocation(
    block_scores: Tensor | Sequence[float],
    target: float,
    alpha: float = DEFAULT_ALPHA,
    weights: Tensor | Sequence[float] | None = None,
    lo: float = 0.0,
    hi: float = 0.99,
) -> Tensor:
    """Per-block sparsities from DLP's per-block median Wanda scores (larger -> sparser).

    Args:
        block_scores: :func:`dlp_block_score` of every block.
        target: mean sparsity ``S`` in [0, 1).
        alpha: DLP's ``alpha``; the sparsities span ``2 * alpha`` before clipping.
        weights: parameters per block; the mean is then parameter-weighted.
        lo, hi: per-block bounds.
    """
    return importance_allocation(block_scores, target, alpha, weights, lo, hi)


@dataclass(frozen=True)
class DlpOptions:
    alpha: float = option(DEFAULT_ALPHA, "DLP alpha: block sparsities span 2 x alpha (the "
                          "reference's 0.15)")
    statistic: str = option("median", "DLP block statistic of the Wanda scores: median (the "
                            "paper) or mean (the reference code's unstructured path)")

    def __post_init__(self) -> None:
        if not 0 <= self.alpha < 0.5:
            raise UserError(f"--dlp-alpha must be in [0, 0.5) (got {self.alpha})")
        if self.statistic not in STATISTICS:
            raise UserError(f"--dlp-statistic must be one of {', '.join(STATISTICS)} (got "
                            f"{self.statistic!r})")


def block_dlp_scores(session, statistic: str) -> list[float]:
    """DLP's per-block |median| (or |mean|) Wanda score on the dense model (cached)."""
    def compute() -> list[float]:
        norms = session.owl_norms()
        out = []
        for index, block_norms in enumerate(norms):
            weights = session.dense_weights(index)
            out.append(dlp_block_score([wanda_scores(weights[n], block_norms[n])
                                        for n in weights], statistic))
        return out

    return session.memo(f"dlp_scores:{statistic}", compute)


@register
class DLP(Allocator):
    """DLP (Chen et al., ICML 2025): a block's importance from the median Wanda score of all
    its linears on the dense model; a larger score gets more sparsity."""

    name = "dlp"
    Options = DlpOptions

    def allocate(self, ctx: AllocationContext, target: float, opts: DlpOptions,
                 arg: str | None) -> Base:
        scores = block_dlp_scores(ctx.session, opts.statistic)
        return Base(dlp_allocation(scores, target, opts.alpha, weights=ctx.weights).tolist(),
                    scores, record={"score_name": f"{opts.statistic}_wanda_score"})
