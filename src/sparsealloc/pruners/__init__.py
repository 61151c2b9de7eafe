"""Base pruners as pure tensor code: masks, scores, and one small class per method.

Use :func:`get_pruner` (``"magnitude"``, ``"wanda"``, ``"sparsegpt"``) and the
``make_stats`` / ``add_batch`` / ``prune_layer`` protocol of :class:`Pruner`.
"""

from sparsealloc.pruners.base import PRUNERS, LayerStats, Pruner, apply_mask, get_pruner
from sparsealloc.pruners.magnitude import MagnitudePruner, magnitude_scores
from sparsealloc.pruners.masks import (
    Pattern,
    check_pattern_fits,
    check_sparsity,
    nm_mask,
    parse_pattern,
    prune_count,
    unstructured_layer_mask,
    unstructured_row_mask,
)
from sparsealloc.pruners.sparsegpt import HessianStats, SparseGPTPruner, sparsegpt_prune
from sparsealloc.pruners.wanda import InputNormStats, WandaPruner, wanda_scores

__all__ = [
    "PRUNERS",
    "HessianStats",
    "InputNormStats",
    "LayerStats",
    "MagnitudePruner",
    "Pattern",
    "Pruner",
    "SparseGPTPruner",
    "WandaPruner",
    "apply_mask",
    "check_pattern_fits",
    "check_sparsity",
    "get_pruner",
    "magnitude_scores",
    "nm_mask",
    "parse_pattern",
    "prune_count",
    "sparsegpt_prune",
    "unstructured_layer_mask",
    "unstructured_row_mask",
    "wanda_scores",
]
