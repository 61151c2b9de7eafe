"""LSA (layer-wise sparsity allocation from the minimal linear reconstruction error, ICLR 2026).

Reference code: github.com/BeiYazi0/LSA, ``layersp/blk.py`` (``BlockWanda.blk_s`` and
``blk_score``, selected by ``--layer lsa``).

* Statistic of one linear layer (:func:`lsa_reconstruction_error`): with
  ``H = (2/N) sum_t x_t x_t^T`` from the dense model's inputs, every row greedily drops
  ``int(width * ratio)`` weights of each group of ``block_size`` input columns (no weight
  update), each time the one whose removal adds the least output error given the weights
  already dropped -- the marginal cost ``w_j^2 H_jj + 2 w_j sum_{k dropped} w_k H_kj``.  The
  statistic is the sum of those marginal costs: ``sum_rows e_r^T H e_r``, the squared output
  error of that greedy uncompensated pruning.
* Block statistic: the plain mean of its linears' errors (:func:`lsa_block_error`).
* Mapping: :func:`~.importance.importance_allocation` (the same as DLP's): a block with a
  larger error is less important and gets more sparsity.
* Defaults (README command for ``--layer lsa``, argparse): ``block_size = 128``,
  ``ratio = 0.5`` (``--resp``), and ``alpha`` from the reference's per-sparsity table
  ``[_, 0.06, 0.02, 0.04, 0.02, 0.04, 0.1, 0.15, 0.12][int(10 * S)]`` -- 0.15 at 70%
  (:func:`lsa_default_alpha`).

Differences from the reference:

* a trailing group narrower than ``block_size`` drops ``int(width * ratio)`` weights; the
  reference drops ``int(block_size * ratio)`` and adds ``inf`` once a group runs out of
  weights (never the case for LLaMA widths, all multiples of 128);
* ``H`` is averaged over tokens rather than sequences: a common constant factor that the
  mapping's ``m_l / sum(m)`` removes;
* the alpha table has no entry at ``S >= 0.9`` (the reference raises ``IndexError``) nor a
  meaningful one below 0.1 (index 0 is its N:M ``--Lamda``); the nearest entry is used;
* budget handling as in :mod:`.importance`.

The reference's projection-wise variants (``lsab`` / ``lsac``: one sparsity per linear
layer) are not reproduced: allocators here give one sparsity per decoder block.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import UserError
from ..models.arch import in_features, weight_out_in
from ..pruners.sparsegpt import HessianStats
from ..runner import collect_inputs
from .budget import check_target
from .importance import importance_allocation
from .registry import AllocationContext, Allocator, Base, option, register

DEFAULT_BLOCK_SIZE = 128
DEFAULT_RATIO = 0.5
ALPHA_TABLE = (0.06, 0.06, 0.02, 0.04, 0.02, 0.04, 0.1, 0.15, 0.12)
"""The reference's ``alpha[int(10 * S)]`` (its entry 0, an N:M setting, replaced by entry 1)."""


def lsa_default_alpha(target: float) -> float:
    """The reference's alpha for target sparsity ``target`` (0.15 at 70%)."""
    index = int(check_target(target) * 10)
    return ALPHA_TABLE[min(index, len(ALPHA_TABLE) - 1)]


def lsa_reconstruction_error(
    W: Tensor, H: Tensor, block_size: int = DEFAULT_BLOCK_SIZE, ratio: float = DEFAULT_RATIO
) -> float:
    """Squared output error of LSA's greedy uncompensated pruning of one linear layer.

    Args:
        W: ``(out_features, in_features)`` weight.
        H: ``(in_features, in_features)`` input second moment (``HessianStats.H``).
        block_size: input columns per group (0: the whole row, the argparse default).
        ratio: share of each row's weights dropped in every group (``--resp``).

    Returns:
        ``sum_r e_r^T H e_r`` over rows ``r`` (``e_r``: the dropped weights of row ``r``).
    """
    if W.dim() != 2 or H.shape != (W.shape[1], W.shape[1]):
        raise ValueError(f"need W (rows, cols) and H (cols, cols); got {tuple(W.shape)}, "
                         f"{tuple(H.shape)}")
    if not (0.0 <= float(ratio) <= 1.0):
        raise UserError(f"the LSA pruning ratio must be in [0, 1], got {ratio}")
    if int(block_size) < 0:
        raise UserError(f"the LSA group size must be >= 0 (0: whole rows), got {block_size}")
    W = W.detach().float()
    H = H.detach().to(W.device, torch.float32)
    rows, cols = W.shape
    group = cols if int(block_size) == 0 else int(block_size)
    score = W.square() * H.diagonal().unsqueeze(0)
    index = torch.arange(rows, device=W.device)
    total = torch.zeros((), dtype=torch.float64, device=W.device)
    for i1 in range(0, cols, group):
        i2 = min(i1 + group, cols)
        w1, s1, h1 = W[:, i1:i2], score[:, i1:i2], H[i1:i2, i1:i2]
        dropped = torch.zeros_like(w1)
        for _ in range(int((i2 - i1) * float(ratio))):
            j = s1.argmin(dim=1)
            total += s1[index, j].double().sum()
            w = w1[index, j]
            s1.add_(w1 * w.unsqueeze(1) * h1[j], alpha=2.0)
            s1[index, j] = math.inf
            dropped[index, j] = w
        if i2 < cols:
            score[:, i2:].add_(W[:, i2:] * (dropped @ H[i1:i2, i2:]), alpha=2.0)
    return float(total)


def lsa_block_error(errors: Sequence[float]) -> float:
    """A block's statistic: ``|mean|`` of its linear layers' reconstruction errors."""
    values = [float(e) for e in errors]
    if not values:
        raise UserError("LSA error of an empty block: it has no linear layers")
    return abs(sum(values) / len(values))


def lsa_allocation(
    block_errors: Tensor | Sequence[float],
    target: float,
    alpha: float | None = None,
    weights: Tensor | Sequence[float] | None = None,
    lo: float = 0.0,
    hi: float = 0.99,
) -> Tensor:
    """Per-block sparsities from LSA's per-block reconstruction errors (larger -> sparser).

    Args:
        block_errors: :func:`lsa_block_error` of every block.
        target: mean sparsity ``S`` in [0, 1).
        alpha: half the span before clipping; ``None``: :func:`lsa_default_alpha`.
        weights: parameters per block; the mean is then parameter-weighted.
        lo, hi: per-block bounds.
    """
    a = lsa_default_alpha(target) if alpha is None else float(alpha)
    return importance_allocation(block_errors, target, a, weights, lo, hi)


@dataclass(frozen=True)
class LsaOptions:
    alpha: float | None = option(None, "LSA alpha (span 2 x alpha); default: the reference's "
                                 "per-sparsity table, 0.15 at 70%")
    block_size: int = option(DEFAULT_BLOCK_SIZE, "LSA input-column group size (0: whole rows)")
    ratio: float = option(DEFAULT_RATIO, "share of each group LSA drops to measure the "
                          "reconstruction error")

    def __post_init__(self) -> None:
        if self.block_size < 0 or not 0.0 < self.ratio <= 1.0:
            raise UserError("--lsa-block-size must be >= 0 (0: whole rows) and --lsa-ratio in "
                            f"(0, 1], got {self.block_size} and {self.ratio}")
        if self.alpha is not None and not 0 <= self.alpha < 0.5:
            raise UserError(f"--lsa-alpha must be in [0, 0.5) (got {self.alpha})")


def block_reconstruction_errors(session, block_size: int, ratio: float) -> list[float]:
    """LSA's per-block mean reconstruction error on the dense model (one pass, cached)."""
    def compute() -> list[float]:
        errors: list[float] = []
        with session.timed("lsa_stats"):
            for index, acts in session.dense_pass("LSA reconstruction errors"):
                linears = session.arch.linears(index)
                stats = {n: HessianStats(in_features(m), weight_out_in(m).device)
                         for n, m in linears.items()}
                with collect_inputs(linears, stats):
                    session.runner.pass_block(index, acts)
                per_linear = []
                for n, m in linears.items():
                    per_linear.append(lsa_reconstruction_error(weight_out_in(m), stats[n].H,
                                                               block_size, ratio))
                    stats[n].free()
                errors.append(lsa_block_error(per_linear))
        return errors

    return session.memo(f"lsa_errors:{block_size}:{ratio}", compute, counter="lsa_stats_passes")


@register
class LSA(Allocator):
    """LSA (ICLR 2026): a block's importance from the minimal linear reconstruction error of its
    layers on the dense model (greedy, uncompensated); a larger error gets more sparsity."""

    name = "lsa"
    Options = LsaOptions
    score_name = "reconstruction_error"

    def allocate(self, ctx: AllocationContext, target: float, opts: LsaOptions,
                 arg: str | None) -> Base:
        errors = block_reconstruction_errors(ctx.session, opts.block_size, opts.ratio)
        record = {"lsa_alpha_used": lsa_default_alpha(target)} if opts.alpha is None else {}
        return Base(lsa_allocation(errors, target, opts.alpha, weights=ctx.weights).tolist(),
                    errors, record=record)
