"""AlphaPruning (Lu et al., NeurIPS 2024, arXiv 2410.10912): heavy-tail exponents -> sparsities.

Faithful to the reference code (github.com/haiquanlu/AlphaPruning,
``lib/esd_utils.py::net_esd_estimator`` and ``lib/prune.py::ww_sparsity``).

Estimator (per weight matrix W, rows x cols):

* ESD: ``eigs = svdvals(W.float32) ** 2`` (eigenvalues of ``W^T W``), sorted
  ascending; the reference does not filter near-zero values
  (``filter_zeros=False``).  Here exactly-zero / non-finite values are always
  dropped (their log is -inf and would poison the fit) and
  ``filter_zeros=True`` drops values <= 1e-5 like the reference option.
* Hill / continuous power-law MLE for every candidate ``xmin = eigs[i]``
  (all but the largest): ``alpha = 1 + n / (sum_{j>=i} ln eigs[j] - n ln eigs[i])``
  with ``n = N - i``.  ``alpha`` is the exponent of the *density*
  ``p(x) ~ x^-alpha``: a Pareto law of shape ``a`` has ``alpha = a + 1``.
* KS distance ``D = max_k |1 - (x_k / xmin)^(1 - alpha) - k / n|`` over the
  tail ``x_0 <= ... <= x_{n-1}`` (only for ``alpha > 1``); the candidate with
  the least ``D`` wins (first one on ties, like ``torch.argmin``).
* ``"alpha_peak"`` (reference ``fix_fingers="xmin_peak"``, the published
  metric): candidates are restricted around the peak of a ``bins``-bin
  histogram (``torch.histc``) of ``log10(eigs)``.  The peak location is the
  *left edge* of the fullest bin, ``p = 10 ** edge``.  Upper bound
  ``1.5 * p``.  Lower bound -- the reference writes
  ``xmin_min = torch.log10(0.95 * p)`` and compares it with eigenvalues, i.e.
  a log10 value against a linear one.  ``window_mode="reference"`` (default)
  reproduces that behaviour (for typical LLM spectra, peak below ~1, the lower
  bound is negative and inactive, so candidates run from the smallest
  eigenvalue up to ``1.5 * p``); ``window_mode="literal"`` uses
  ``[0.95 * p, 1.5 * p]`` as the paper's text (arXiv 2410.10912) describes it.
  If no candidate lies in the window (the reference would then return
  ``alpha = 0``), the unrestricted search is used instead.
* ``"alpha_mid"`` (``fix_fingers="xmin_mid"``): ``xmin = eigs[N // 2]``.
* ``"alpha_full"`` (``fix_fingers=None``): least-KS over all candidates.

Arithmetic is float64 here (the reference uses float32 sums); differences are
at the float32 rounding level.  All candidates are evaluated vectorised, in
chunks, instead of the reference's Python loop.

Allocation (``ww_sparsity``, ``mapping_type="block_wise"``): per-block metric
= mean alpha over the block's linear layers; ratios
``r = (a - min a) / (max a - min a) * 2 eps + (1 - eps)``; sparsity
``s = r * S * sum(w) / sum(w * r)`` with ``w`` the prunable parameters (the
reference weights every linear layer by its ``numel``; with identical layers
inside a block that equals block-level weights = parameters per block).
Larger alpha -> more sparsity.  The reference neither clips nor handles
equal alphas (0/0); here results are clipped to ``[lo, hi]`` with the budget
restored by rescaling (identical to the reference when nothing is clipped),
and equal alphas give the uniform allocation.  The reference default is
``epsilon = 0.3``; its published scripts use 0.2 or 0.3 depending on the
model and base pruner (e.g. LLaMA-7B: 0.3 magnitude, 0.2 Wanda/SparseGPT).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import UserError
from ..stats.spectra import esd_eigenvalues, hill_alpha  # noqa: F401 - the estimator it maps
from .budget import as_vector, check_target, check_weights, restore_budget
from .registry import AllocationContext, Allocator, Base, option, register

DEFAULT_EPS = 0.3


def alpha_allocation(
    block_alphas: Tensor | Sequence[float],
    target: float,
    eps: float = DEFAULT_EPS,
    weights: Tensor | Sequence[float] | None = None,
    lo: float = 0.0,
    hi: float = 0.99,
) -> Tensor:
    """Per-block sparsities from per-block mean alphas (larger alpha -> more sparsity).

    Min-max maps alphas to ratios in ``[1 - eps, 1 + eps]`` and scales them so
    the (parameter-weighted, when ``weights`` are given) mean equals ``target``;
    then clips to ``[lo, hi]`` and restores the budget by rescaling.
    """
    a = as_vector(block_alphas, "block alphas")
    target = check_target(target)
    w = check_weights(weights, a.numel())
    eps = float(eps)
    if not (0.0 <= eps <= 1.0):
        raise UserError(f"AlphaPruning epsilon must be in [0, 1], got {eps}")
    spread = float(a.max() - a.min())
    if spread <= 0.0:
        return restore_budget(torch.full_like(a, target), target, w, lo, hi)
    ratios = (a - a.min()) / spread * (2.0 * eps) + (1.0 - eps)
    ww = torch.ones_like(a) if w is None else w
    scale = target * float(ww.sum()) / float((ww * ratios).sum())
    return restore_budget(ratios * scale, target, w, lo, hi, method="rescale")


@dataclass(frozen=True)
class AlphaOptions:
    eps: float = option(DEFAULT_EPS, "AlphaPruning epsilon: ratios span [1 - eps, 1 + eps]")

    def __post_init__(self) -> None:
        if not 0 <= self.eps < 1:
            raise UserError(f"--alpha-eps must be in [0, 1) (got {self.eps})")


@register
class Alpha(Allocator):
    """AlphaPruning (Lu et al., NeurIPS 2024): more sparsity where weight spectra are lighter-
    tailed (larger Hill exponent)."""

    name = "alpha"
    Options = AlphaOptions
    score_name = "mean_alpha"

    def allocate(self, ctx: AllocationContext, target: float, opts: AlphaOptions,
                 arg: str | None) -> Base:
        alphas = ctx.session.alphas()
        return Base(alpha_allocation(alphas, target, opts.eps, weights=ctx.weights).tolist(),
                    alphas)
