"""Allocators: per-block statistics -> one sparsity per decoder block, budget met exactly.

Every allocator is one class registered in :mod:`.registry` (one file each: uniform, owl,
alpha, linear, listfile, dlp, lsa) beside the pure tensor function it calls; the absorption
correction (:mod:`.correction`) and the per-expert split (:mod:`.experts`) register option
groups of their own. Importing this package registers them all.

The pure functions return a 1-D float64 tensor of length L, values in ``[lo, hi]`` (defaults
0 and 0.99), whose mean -- parameter-weighted when ``weights`` (prunable parameters per block)
are given -- equals the target within 1e-9. The exception is :func:`file_allocation`: an
explicit list is used as written.
"""

from __future__ import annotations

from ..stats.spectra import block_alphas, esd_eigenvalues, hill_alpha, weights_fingerprint
from .alpha import alpha_allocation
from .budget import restore_budget, weighted_mean
from .correction import AbsorbOptions, absorption_correction, absorption_delta
from .dlp import dlp_allocation, dlp_block_score
from .experts import ExpertOptions, expert_split
from .importance import importance_allocation, layer_importance
from .linear import linear_allocation
from .listfile import file_allocation
from .lsa import lsa_allocation, lsa_block_error, lsa_default_alpha, lsa_reconstruction_error
from .options import Allocation, AllocationOptions
from .owl import outlier_ratio, owl_allocation
from .registry import ALLOCATORS, OPTION_GROUPS, AllocationContext, Allocator, Base, register
from .search import SearchOptions
from .spec import AllocationSpec, parse_allocation_spec
from .uniform import uniform_allocation

__all__ = [
    "ALLOCATORS",
    "OPTION_GROUPS",
    "SearchOptions",
    "AbsorbOptions",
    "Allocation",
    "AllocationContext",
    "AllocationOptions",
    "AllocationSpec",
    "Allocator",
    "Base",
    "ExpertOptions",
    "absorption_correction",
    "absorption_delta",
    "alpha_allocation",
    "block_alphas",
    "dlp_allocation",
    "dlp_block_score",
    "esd_eigenvalues",
    "expert_split",
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
    "register",
    "restore_budget",
    "uniform_allocation",
    "weighted_mean",
    "weights_fingerprint",
]
