"""SparseGPT: OBS-style column-by-column pruning with weight updates (arXiv 2301.00774).

Follows the reference ``SparseGPT.fasterprune`` (IST-DASLab/sparsegpt): H accumulated in
float32, dead inputs (zero diagonal) get H_jj = 1 and their weights zeroed, dampening
``percdamp * mean(diag H)``, the upper Cholesky factor of H^-1, lazy batch updates per block
of ``blocksize`` columns; unstructured masks are chosen per block from ``w^2 / d^2`` over all
rows of the block, N:M masks every M columns inside the block from the updated weights.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import Tensor, nn

from sparsealloc.errors import UserError
from sparsealloc.pruners.base import LayerStats, Pruner, register
from sparsealloc.pruners.masks import (
    Pattern,
    check_pattern_fits,
    check_sparsity,
    nm_mask,
    unstructured_layer_mask,
)

__all__ = ["HessianStats", "SparseGPTPruner", "sparsegpt_prune"]

log = logging.getLogger(__name__)


class HessianStats:
    """Running ``H = (2 / N) * sum_t x_t x_t^T`` over the N tokens seen, in float32.

    (The reference divides by the number of sequences rather than tokens; SparseGPT is
    invariant to that constant factor, dampening included.)

    Args:
        in_features: number of input columns of the linear layer.
        device: where H lives (the layer's device).
    """

    def __init__(self, in_features: int, device: torch.device | str | None = None) -> None:
        self.in_features = int(in_features)
        self.H: Tensor | None = torch.zeros(
            (self.in_features, self.in_features), dtype=torch.float32, device=device
        )
        self.nsamples = 0

    def add_batch(self, inp: Tensor) -> None:
        """Accumulate ``inp`` of shape ``(..., in_features)``; every leading index is a token."""
        if self.H is None:
            raise RuntimeError("HessianStats was freed")
        if inp.shape[-1] != self.in_features:
            raise ValueError(f"expected (..., {self.in_features}) inputs, got {tuple(inp.shape)}")
        x = inp.detach().reshape(-1, self.in_features).to(self.H.device, torch.float32)
        tokens = x.shape[0]
        if tokens == 0:
            return
        total = self.nsamples + tokens
        self.H.addmm_(x.t(), x, beta=self.nsamples / total, alpha=2.0 / total)
        self.nsamples = total

    def free(self) -> None:
        """Drop H (the pruner calls this once the layer is pruned)."""
        self.H = None


def _try_inverse_cholesky(H: Tensor) -> Tensor | None:
    """Upper Cholesky factor of ``H^-1``, or None if a factorisation fails or is not finite."""
    L, info = torch.linalg.cholesky_ex(H)
    if int(info) != 0:
        return None
    Hinv = torch.cholesky_inverse(L)
    del L
    U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
    del Hinv
    if int(info) != 0 or not bool(torch.isfinite(U).all()):
        return None
    return U


def _inverse_cholesky_upper(H: Tensor, percdamp: float, max_retries: int) -> Tensor:
    """Upper Cholesky factor U of ``(H + damp I)^-1`` (``U^T U = (H + damp I)^-1``).

    ``H`` is dampened in place. A failed factorisation (non-PD, or non-finite result) is
    retried with 10x the dampening up to ``max_retries`` times, each logged as a warning;
    if all fail, the diagonal approximation ``diag(1 / sqrt(H_jj + damp))`` is used.
    """
    diag = H.diagonal()
    mean_diag = float(diag.mean())
    frac, applied = percdamp, 0.0
    for attempt in range(max_retries + 1):
        damp = frac * mean_diag
        diag.add_(damp - applied)
        applied = damp
        U = _try_inverse_cholesky(H)
        if U is not None:
            return U
        nxt = frac * 10 if frac > 0 else 0.01
        if attempt < max_retries:
            log.warning(
                "SparseGPT: Cholesky failed (H of size %d) with dampening %g x mean diag; "
                "retrying with %g",
                H.shape[0],
                frac,
                nxt,
            )
        frac = nxt
    log.warning(
        "SparseGPT: Cholesky failed after %d retries (dampening up to %g x mean diag); "
        "using the diagonal of H only",
        max_retries,
        applied / mean_diag if mean_diag else 0.0,
    )
    return torch.diag(diag.clamp_min(torch.finfo(torch.float32).tiny).rsqrt())


def sparsegpt_prune(
    W: Tensor,
    H: Tensor,
    sparsity: float,
    pattern: Pattern,
    blocksize: int = 128,
    percdamp: float = 0.01,
    *,
    max_damp_retries: int = 4,
    overwrite_h: bool = False,
) -> tuple[Tensor, Tensor]:
    """Prune ``W`` with SparseGPT given the layer Hessian ``H``; inputs are not modified.

    Args:
        W: ``(out_features, in_features)`` weight, any float dtype (computed in float32).
        H: ``(in_features, in_features)`` Hessian, e.g. :attr:`HessianStats.H`.
        sparsity: fraction in [0, 1); in every block of columns exactly
            ``prune_count(rows * block_cols, sparsity)`` weights are pruned (the reference
            thresholds with ``<=``, which prunes one more). 0 returns an unchanged copy.
            Ignored for N:M patterns (n/m pruned).
        pattern: unstructured or N:M (``blocksize`` must be a multiple of M).
        blocksize: columns per lazy-update block (reference: 128).
        percdamp: dampening as a fraction of mean(diag H) (reference: 0.01).
        max_damp_retries: Cholesky retries, each with 10x the dampening.
        overwrite_h: allow using ``H``'s memory as scratch (it is then destroyed).

    Returns:
        ``(W_new, mask)``: the pruned and updated weight in ``W``'s dtype, and the bool mask
        of pruned positions chosen by the algorithm. Columns whose input was always zero
        (dead diagonal) are also zeroed in ``W_new``, as in the reference.
    """
    value = check_sparsity(sparsity)
    if W.dim() != 2 or H.shape != (W.shape[1], W.shape[1]):
        raise ValueError(
            f"need W (rows, cols) and H (cols, cols); got {tuple(W.shape)}, {tuple(H.shape)}"
        )
    check_pattern_fits(W.shape, pattern)
    if int(blocksize) != blocksize or blocksize <= 0:
        raise UserError(f"sparsegpt blocksize must be a positive integer, got {blocksize!r}")
    if pattern.is_nm and blocksize % pattern.m:
        raise UserError(f"sparsegpt blocksize {blocksize} must be a multiple of M for {pattern}")
    if not (math.isfinite(percdamp) and percdamp >= 0):
        raise UserError(f"sparsegpt percdamp must be a finite number >= 0, got {percdamp!r}")
    rows, cols = W.shape
    mask = torch.zeros((rows, cols), dtype=torch.bool, device=W.device)
    if not pattern.is_nm and value == 0.0:
        return W.detach().clone(), mask

    out_dtype = W.dtype
    W = W.detach().to(torch.float32, copy=True)
    H = H.detach().to(W.device, torch.float32, copy=not overwrite_h)
    if not bool(torch.isfinite(H).all()):
        raise UserError(
            "SparseGPT: the Hessian has inf/nan entries (calibration activations overflowed); "
            "load the model in float32 or bfloat16"
        )
    dead = H.diagonal() == 0
    H.diagonal()[dead] = 1
    W[:, dead] = 0
    Hinv = _inverse_cholesky_upper(H, percdamp, max_damp_retries)
    del H

    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        d1 = Hinv1.diagonal()
        if pattern.is_nm:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        else:
            mask1 = unstructured_layer_mask(W1.square() / d1.square().unsqueeze(0), value)
        for i in range(i2 - i1):
            if pattern.is_nm and i % pattern.m == 0:
                j = i + pattern.m
                scores = W1[:, i:j].square() / d1[i:j].square().unsqueeze(0)
                mask1[:, i:j] = nm_mask(scores, pattern.n, pattern.m)
            w = W1[:, i]
            q = w.masked_fill(mask1[:, i], 0.0)
            Q1[:, i] = q
            err = (w - q) / d1[i]
            W1[:, i:].addr_(err, Hinv1[i, i:], alpha=-1.0)
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        mask[:, i1:i2] = mask1
        W[:, i2:].addmm_(Err1, Hinv[i1:i2, i2:], alpha=-1.0)
        del W1, Q1, Err1, mask1
    del Hinv
    return W.to(out_dtype), mask


@register
class SparseGPTPruner(Pruner):
    """SparseGPT pruning.

    Options:
        blocksize: columns per lazy-update block (default 128, as the reference).
        percdamp: dampening fraction of mean(diag H) (default 0.01).
        max_damp_retries: Cholesky retries with 10x dampening each (default 4).
    """

    name = "sparsegpt"
    default_options = {"blocksize": 128, "percdamp": 0.01, "max_damp_retries": 4}

    def _validate_options(self) -> None:
        o = self.options
        if not isinstance(o["blocksize"], int) or o["blocksize"] <= 0:
            raise UserError(
                f"sparsegpt blocksize must be a positive integer, got {o['blocksize']!r}"
            )
        if not isinstance(o["percdamp"], int | float) or not (
            math.isfinite(o["percdamp"]) and o["percdamp"] >= 0
        ):
            raise UserError(f"sparsegpt percdamp must be a number >= 0, got {o['percdamp']!r}")
        if not isinstance(o["max_damp_retries"], int) or o["max_damp_retries"] < 0:
            raise UserError(
                f"sparsegpt max_damp_retries must be an integer >= 0, got {o['max_damp_retries']!r}"
            )

    def make_stats(self, layer: nn.Linear) -> HessianStats:
        """A :class:`HessianStats` on the layer's device."""
        return HessianStats(layer.in_features, layer.weight.device)

    def prune_layer(
        self, layer: nn.Linear, stats: LayerStats | None, sparsity: float, pattern: Pattern
    ) -> None:
        """Prune and update ``layer.weight`` in place (see :meth:`Pruner.prune_layer`).

        ``stats`` must be the :class:`HessianStats` from :meth:`make_stats`, fed at least one
        token; it is consumed (its H is freed).
        """
        value = self._check_call(layer, sparsity, pattern)
        if not isinstance(stats, HessianStats) or stats.H is None or stats.nsamples == 0:
            raise ValueError("sparsegpt needs HessianStats fed with calibration inputs")
        if not pattern.is_nm and value == 0.0:
            stats.free()
            return
        o = self.options
        new_w, _ = sparsegpt_prune(
            layer.weight,
            stats.H,
            value,
            pattern,
            o["blocksize"],
            o["percdamp"],
            max_damp_retries=o["max_damp_retries"],
            overwrite_h=True,
        )
        stats.free()
        with torch.no_grad():
            layer.weight.copy_(new_w)
        del new_w
