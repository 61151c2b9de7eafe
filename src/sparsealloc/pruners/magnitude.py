"""Magnitude pruning: score |W_ij|, no calibration data."""

from __future__ import annotations

from torch import Tensor, nn

from sparsealloc.errors import UserError
from sparsealloc.pruners.base import LayerStats, Pruner, apply_mask, register
from sparsealloc.pruners.masks import (
    Pattern,
    nm_mask,
    unstructured_layer_mask,
    unstructured_row_mask,
)

__all__ = ["MagnitudePruner", "magnitude_scores"]


def magnitude_scores(W: Tensor) -> Tensor:
    """Return ``|W|`` in float32.

    Args:
        W: ``(out_features, in_features)`` weight.
    """
    return W.detach().float().abs()


@register
class MagnitudePruner(Pruner):
    """Magnitude pruning.

    Options:
        scope: ``"layer"`` (default; one threshold over the whole matrix, as the
            magnitude baseline in the Wanda, OWL and AlphaPruning code) or ``"row"``
            (each output row pruned to the same sparsity, Wanda's comparison group).
            N:M patterns always compare within groups of M input columns.
    """

    name = "magnitude"
    default_options = {"scope": "layer"}

    def _validate_options(self) -> None:
        if self.options["scope"] not in ("layer", "row"):
            raise UserError(
                f"magnitude option scope must be 'layer' or 'row', got {self.options['scope']!r}"
            )

    def make_stats(self, layer: nn.Linear) -> LayerStats | None:
        """Magnitude needs no data: always None."""
        return None

    def prune_layer(
        self, layer: nn.Linear, stats: LayerStats | None, sparsity: float, pattern: Pattern
    ) -> None:
        """Zero the lowest-|W| weights of ``layer`` (see :meth:`Pruner.prune_layer`)."""
        value = self._check_call(layer, sparsity, pattern)
        scores = magnitude_scores(layer.weight)
        if pattern.is_nm:
            mask = nm_mask(scores, pattern.n, pattern.m)
        elif value == 0.0:
            return
        elif self.options["scope"] == "row":
            mask = unstructured_row_mask(scores, value)
        else:
            mask = unstructured_layer_mask(scores, value)
        del scores
        apply_mask(layer, mask)
