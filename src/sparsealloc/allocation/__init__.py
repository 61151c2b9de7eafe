"""Allocators: per-block statistics -> one sparsity per decoder block, budget met exactly.

Every allocator returns a 1-D float64 tensor of length L, values in
``[lo, hi]`` (defaults 0 and 0.99), whose mean -- parameter-weighted when
``weights`` (prunable parameters per block) are given -- equals the target
within 1e-9.  The exception is :func:`file_allocation`: an explicit list is
used as written.
"""

from __future__ import annotations

from .absorb import (
    TUNED_BASES,
    AllocationSpec,
    absorption_correction,
    absorption_delta,
    parse_allocation_spec,
)
from .alpha import alpha_allocation, esd_eigenvalues, hill_alpha
from .budget import restore_budget, weighted_mean
from .dlp import dlp_allocation, dlp_block_score
from .importance import importance_allocation, layer_importance
from .linear import linear_allocation
from .listfile import file_allocation
from .lsa import lsa_allocation, lsa_block_error, lsa_default_alpha, lsa_reconstruction_error
from .owl import outlier_ratio, owl_allocation
from .spectra import block_alphas, weights_fingerprint
from .uniform import uniform_allocation

__all__ = [
    "TUNED_BASES",
    "AllocationSpec",
    "absorption_correction",
    "absorption_delta",
    "alpha_allocation",
    "block_alphas",
    "dlp_allocation",
    "dlp_block_score",
    "esd_eigenvalues",
    "file_allocation",
    "hill_alpha",
    "importance_allocation",
    "layer_importance",
    "linear_allocation",
    "lsa_allocation",
    "lsa_block_error",
    "lsa_default_alpha",
    "lsa_reconstruction_error",
    "outlier_ratio",
    "owl_allocation",
    "parse_allocation_spec",
    "restore_budget",
    "uniform_allocation",
    "weighted_mean",
    "weights_fingerprint",
]
