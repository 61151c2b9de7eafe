"""OWL (outlier-weighted layer-wise sparsity, Yin et al. 2023, arXiv 2310.05175).

Faithful to the reference code (github.com/luuyin/OWL, ``lib/prune_all.py``,
``prune_wanda_outlier`` / ``prune_sparsegpt_outlier`` / ``prune_mag_outlier``
and ``check_outlier_mean``):

* Statistics: for every decoder block, the Wanda scores
  ``|W| * sqrt(scaler_row)`` of *all* its linear layers (whatever the base
  pruner -- also for magnitude/SparseGPT) are flattened and concatenated; the
  block's outlier ratio is the share of entries strictly greater than
  ``M * mean(all entries of the block)``.  The reference's ``scaler_row`` is
  ``||X_j||^2 / nsamples``; the positive constant does not change the ratio.
  The reference reports percent; here it is a fraction in [0, 1] (min-max
  normalisation below makes the scale irrelevant).
* Mapping: ``D~ = (D - min D) / (max D - min D) * 2 * lambda``;
  ``density_l = D~_l - mean(D~) + (1 - S)``; ``s_l = 1 - density_l``.
  (``prune_wanda_outlier_structure*`` -- the N:M variants -- use ``lambda``
  without the factor 2 and round; not reproduced here.)
* Defaults: ``lambda = 0.08``; ``M`` is the caller's choice -- the reference
  argparse default is ``Hyper_m = 3``, its README / published 70% runs use
  ``--Hyper_m 5 --Lamda 0.08``; the project default is M = 5, as in those runs.

Differences (all inactive at the published settings, S = 0.7, lambda = 0.08):

* the reference divides by ``max D - min D`` and gets NaN when all ratios are
  equal; here that case gives the uniform allocation;
* the reference only patches ``s <= 0`` to 0.01, with no budget repair; here
  values are clipped to ``[lo, hi]`` and the budget is restored by a shift;
* with ``weights`` (parameters per block) the centring uses the weighted mean
  so that the parameter-weighted mean sparsity is exactly ``S``; the reference
  uses the plain mean (identical when all blocks have the same size).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import UserError
from ..pruners.wanda import wanda_scores
from .budget import as_vector, check_target, check_weights, restore_budget
from .registry import AllocationContext, Allocator, Base, option, register

DEFAULT_M = 5.0
DEFAULT_LAMBDA = 0.08


def outlier_ratio(scores: Tensor | Sequence[Tensor], m: float) -> float:
    """Share of all entries of a block's score matrices that exceed ``m`` times their mean.

    ``scores`` is one tensor or a list of tensors (one per linear layer of the
    block, any shapes).  The mean is over the concatenation of all entries --
    i.e. ``sum of all entries / number of entries``, so large layers weigh more
    -- computed in float64 without materialising the concatenation.  The
    comparison is strict (``>``), as in the reference.

    Returns:
        A fraction in [0, 1] (the reference multiplies by 100).
    """
    tensors = [scores] if isinstance(scores, Tensor) else list(scores)
    if not tensors or sum(t.numel() for t in tensors) == 0:
        raise UserError("outlier ratio of an empty block: it has no linear layers to score")
    total = sum(float(t.detach().sum(dtype=torch.float64)) for t in tensors)
    count = sum(t.numel() for t in tensors)
    threshold = float(m) * total / count
    above = sum(int((t.detach().double() > threshold).sum()) for t in tensors)
    return above / count


def owl_allocation(
    ratios: Tensor | Sequence[float],
    target: float,
    lam: float = DEFAULT_LAMBDA,
    weights: Tensor | Sequence[float] | None = None,
    lo: float = 0.0,
    hi: float = 0.99,
) -> Tensor:
    """Per-block sparsities from per-block outlier ratios (more outliers -> less sparsity).

    Args:
        ratios: outlier ratio ``D_l`` of every block (any common scale).
        target: mean sparsity ``S`` in [0, 1).
        lam: ``lambda``; the sparsities span a range of ``2 * lam`` before clipping.
        weights: parameters per block; the mean is then parameter-weighted.
        lo, hi: per-block bounds.

    Returns:
        1-D float64 tensor with (weighted) mean ``S`` within 1e-9.
    """
    d = as_vector(ratios, "outlier ratios")
    target = check_target(target)
    w = check_weights(weights, d.numel())
    lam = float(lam)
    if lam < 0:
        raise UserError(f"OWL lambda must be >= 0, got {lam}")
    spread = float(d.max() - d.min())
    if spread <= 0.0 or lam == 0.0:
        return restore_budget(torch.full_like(d, target), target, w, lo, hi)
    dn = (d - d.min()) / spread * (2.0 * lam)
    centre = float(dn.mean()) if w is None else float((w * dn).sum() / w.sum())
    density = dn - centre + (1.0 - target)
    return restore_budget(1.0 - density, target, w, lo, hi, method="shift")


@dataclass(frozen=True)
class OwlOptions:
    m: float = option(DEFAULT_M, "OWL outlier threshold M (a score above M x the layer mean)")
    lambda_: float = option(DEFAULT_LAMBDA, "OWL lambda: block sparsities span 2 x lambda")

    def __post_init__(self) -> None:
        if not self.m > 0:
            raise UserError(f"--owl-m must be positive (got {self.m})")
        if not 0 <= self.lambda_ < 0.5:
            raise UserError(f"--owl-lambda must be in [0, 0.5) (got {self.lambda_})")


def block_outlier_ratios(session, m: float) -> list[float]:
    """OWL's outlier ratio of every block: Wanda scores of all its linears on the dense model."""
    norms = session.owl_norms()
    ratios = []
    for index, block_norms in enumerate(norms):
        weights = session.dense_weights(index)
        ratios.append(outlier_ratio([wanda_scores(weights[n], block_norms[n]) for n in weights],
                                    m))
    return ratios


@register
class OWL(Allocator):
    """OWL (Yin et al., ICML 2024): fewer pruned weights where activation outliers are many."""

    name = "owl"
    Options = OwlOptions
    score_name = "outlier_ratio"

    def allocate(self, ctx: AllocationContext, target: float, opts: OwlOptions,
                 arg: str | None) -> Base:
        ratios = block_outlier_ratios(ctx.session, opts.m)
        return Base(owl_allocation(ratios, target, opts.lambda_, weights=ctx.weights).tolist(),
                    ratios)
