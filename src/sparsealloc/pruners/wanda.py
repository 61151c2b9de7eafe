"""Wanda: score |W_ij| * ||X_j||, compared within each output row (arXiv 2306.11695)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from sparsealloc.pruners.base import LayerStats, Pruner, apply_mask, register
from sparsealloc.pruners.masks import Pattern, nm_mask, unstructured_row_mask

__all__ = ["InputNormStats", "WandaPruner", "wanda_scores"]


class InputNormStats:
    """Running mean over all tokens of the squared input per column (Wanda's ``scaler_row``).

    After batches totalling N tokens, ``scaler_row[j] = sum_t x_tj^2 / N`` in float32.
    (The reference divides by the number of sequences instead of tokens; the two differ by
    a constant factor, which changes no score ranking.)

    Args:
        in_features: number of input columns of the linear layer.
        device: where the accumulator lives (the layer's device).
    """

    def __init__(self, in_features: int, device: torch.device | str | None = None) -> None:
        self.in_features = int(in_features)
        self.scaler_row = torch.zeros(self.in_features, dtype=torch.float32, device=device)
        self.nsamples = 0

    def add_batch(self, inp: Tensor) -> None:
        """Accumulate ``inp`` of shape ``(..., in_features)``; every leading index is a token."""
        if inp.shape[-1] != self.in_features:
            raise ValueError(f"expected (..., {self.in_features}) inputs, got {tuple(inp.shape)}")
        x = inp.detach().reshape(-1, self.in_features).to(self.scaler_row.device, torch.float32)
        tokens = x.shape[0]
        if tokens == 0:
            return
        total = self.nsamples + tokens
        self.scaler_row.mul_(self.nsamples / total)
        self.scaler_row.add_(torch.linalg.vector_norm(x, ord=2, dim=0).square_(), alpha=1 / total)
        self.nsamples = total


def wanda_scores(W: Tensor, col_sq_norm_mean: Tensor) -> Tensor:
    """Wanda importance ``|W_ij| * sqrt(scaler_row_j)`` in float32.

    Args:
        W: ``(out_features, in_features)`` weight.
        col_sq_norm_mean: ``(in_features,)`` mean squared input per column
            (:attr:`InputNormStats.scaler_row`).
    """
    if col_sq_norm_mean.shape != (W.shape[-1],):
        raise ValueError(
            f"input norms of shape {tuple(col_sq_norm_mean.shape)} do not match weight "
            f"{tuple(W.shape)}"
        )
    norms = col_sq_norm_mean.detach().to(W.device, torch.float32).sqrt()
    return W.detach().float().abs().mul_(norms.unsqueeze(0))


@register
class WandaPruner(Pruner):
    """Wanda pruning (no options): per-row lowest ``|W| * ||X||`` for unstructured,
    lowest per group of M for N:M."""

    name = "wanda"
    default_options: dict = {}

    def make_stats(self, layer: nn.Linear) -> InputNormStats:
        """An :class:`InputNormStats` on the layer's device."""
        return InputNormStats(layer.in_features, layer.weight.device)

    def prune_layer(
        self, layer: nn.Linear, stats: LayerStats | None, sparsity: float, pattern: Pattern
    ) -> None:
        """Zero the lowest-scoring weights of ``layer`` (see :meth:`Pruner.prune_layer`).

        ``stats`` must be the :class:`InputNormStats` from :meth:`make_stats`, fed at least
        one token.
        """
        value = self._check_call(layer, sparsity, pattern)
        if not isinstance(stats, InputNormStats) or stats.nsamples == 0:
            raise ValueError("wanda needs InputNormStats fed with calibration inputs")
        if not pattern.is_nm and value == 0.0:
            return
        scores = wanda_scores(layer.weight, stats.scaler_row)
        if pattern.is_nm:
            mask = nm_mask(scores, pattern.n, pattern.m)
        else:
            mask = unstructured_row_mask(scores, value)
        del scores
        apply_mask(layer, mask)
