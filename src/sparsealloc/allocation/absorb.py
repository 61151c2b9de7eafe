"""Absorption-aware correction of any base allocation (reconstructed; see METHOD.md).

Given the absorption coefficients ``r_l`` (drift at the last block / drift at
block ``l`` after a perturbation injected at ``l``; ``r > 1`` amplifies,
``r < 1`` absorbs):

* ``u_l = clip(ln r_l, -c, c)`` with ``c = ln 3`` by default;
* ``delta_l = -(u_l - mean(u))``, then scaled so ``max |delta| == 1``
  (all-equal ``r`` -> zero correction, no division by ~0);
* ``s'_l = base_l + gamma * delta_l``: an amplifying block loses sparsity, an
  absorbing block gains it, the largest shift is exactly ``gamma``;
* clip to ``[lo, hi]`` and restore the budget (plain or parameter-weighted
  mean == target; ``budget="shift"`` or ``"rescale"``, see :mod:`.budget`).

Choice recorded here: with ``weights`` the centring ``mean(u)`` is the
parameter-weighted mean (METHOD.md writes the plain mean; both agree when all
blocks have the same size).  This makes the correction budget-neutral before
clipping, so without clipping the final shift of every block is exactly
``gamma * delta_l``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

from ..errors import UserError
from .budget import as_vector, check_target, check_weights, restore_budget

DEFAULT_CLIP = math.log(3.0)
BASES = ("uniform", "owl", "alpha", "linear", "file")
ABSORB_SUFFIX = "+absorb"
SEARCH_PREFIX = "search"
_ZERO = 1e-12


def absorption_delta(
    r: Tensor | Sequence[float],
    weights: Tensor | Sequence[float] | None = None,
    clip: float = DEFAULT_CLIP,
) -> Tensor:
    """The unit correction direction ``delta`` (max |delta| == 1, or all zeros)."""
    rr = as_vector(r, "absorption coefficients")
    if bool((rr <= 0).any()):
        raise UserError("absorption coefficients must be positive (ratios of drifts); "
                        "re-run the probe")
    clip = float(clip)
    if not (clip > 0 and math.isfinite(clip)):
        raise UserError(f"the log-ratio clip must be a positive number, got {clip}")
    w = check_weights(weights, rr.numel())
    u = torch.log(rr).clamp(-clip, clip)
    centre = float(u.mean()) if w is None else float((w * u).sum() / w.sum())
    delta = -(u - centre)
    peak = float(delta.abs().max())
    if peak <= _ZERO:
        return torch.zeros_like(delta)
    return delta / peak


def absorption_correction(
    base: Tensor | Sequence[float],
    r: Tensor | Sequence[float],
    gamma: float,
    target: float,
    weights: Tensor | Sequence[float] | None = None,
    clip: float = DEFAULT_CLIP,
    budget: str = "shift",
    lo: float = 0.0,
    hi: float = 0.99,
) -> Tensor:
    """Correct a base allocation with absorption coefficients; budget exact afterwards.

    Args:
        base: per-block sparsities of any allocator.
        r: absorption coefficient per block (same length, positive).
        gamma: largest shift before clipping (0 -> base unchanged up to budget
            repair; negative values flip the direction, for ablations).
        target: required mean sparsity (parameter-weighted with ``weights``).
        weights: parameters per block, or ``None`` for the plain mean.
        clip: bound on ``|ln r|``.
        budget: ``"shift"`` or ``"rescale"`` restoration after clipping.
        lo, hi: per-block bounds.

    Returns:
        1-D float64 tensor in ``[lo, hi]`` whose (weighted) mean is ``target``.
    """
    b = as_vector(base, "base sparsities")
    target = check_target(target)
    gamma = float(gamma)
    if not math.isfinite(gamma):
        raise UserError(f"gamma must be a finite number, got {gamma}")
    delta = absorption_delta(r, weights, clip)
    if delta.numel() != b.numel():
        raise UserError(f"got {delta.numel()} absorption coefficients for {b.numel()} blocks; "
                        "probe the same model as the one being pruned")
    return restore_budget(b + gamma * delta, target, weights, lo, hi, method=budget)


class AllocationSpec(NamedTuple):
    """A parsed ``--allocation`` value."""

    base: str
    absorb: bool
    path: Path | None
    search: bool = False  # evolutionary search starting from the rest of the spec


def parse_allocation_spec(text: str) -> AllocationSpec:
    """Parse ``"owl"``, ``"alpha+absorb"``, ``"file:PATH"``, ``"file:PATH+absorb"``, ...

    Bases: uniform, owl, alpha, linear, file:PATH.  A trailing ``+absorb``
    adds the absorption correction.  ``search`` (from uniform) or ``search:SPEC``
    (e.g. ``search:owl+absorb``) runs the evolutionary search from SPEC's allocation.
    Names are case-insensitive; the path is kept verbatim (it may itself contain ``+``).
    """
    raw = str(text).strip()
    head, colon, rest = raw.partition(":")
    if head.strip().lower() == SEARCH_PREFIX:
        start = rest.strip() if colon else "uniform"
        if not start or start.lower().split(":")[0].strip() == SEARCH_PREFIX:
            raise UserError(f"allocation {raw!r}: write search or search:SPEC with a start "
                            "allocation, e.g. search:owl+absorb")
        return parse_allocation_spec(start)._replace(search=True)
    absorb = raw.lower().endswith(ABSORB_SUFFIX)
    core = raw[: -len(ABSORB_SUFFIX)] if absorb else raw
    choices = ("uniform, owl, alpha, linear, file:PATH (optionally followed by +absorb), or "
               "search / search:SPEC")
    if core.lower().startswith("file:"):
        path = core[len("file:"):].strip()
        if not path:
            raise UserError(
                f"allocation {raw!r} lacks a path; write file:PATH, e.g. file:sparsity.json"
            )
        return AllocationSpec("file", absorb, Path(path).expanduser())
    base = core.strip().lower()
    if base not in BASES or base == "file":
        raise UserError(f"unknown allocation {raw!r}; choose one of {choices}")
    return AllocationSpec(base, absorb, None)
