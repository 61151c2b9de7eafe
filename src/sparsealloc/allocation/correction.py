"""Absorption-aware correction of any base allocation (the seed paper's method, arXiv 2606.15161,
reconstructed from its abstract: the body was not available).

Given the absorption coefficients ``r_l`` (drift at the end / drift at block ``l`` after a
perturbation injected at ``l``, measured by :mod:`sparsealloc.probe.coefficients`; ``r > 1``
amplifies, ``r < 1`` absorbs):

* ``u_l = clip(ln r_l, -c, c)`` with ``c = ln 3`` by default;
* ``delta_l = -(u_l - mean(u))``, then scaled so ``max |delta| == 1``
  (all-equal ``r`` -> zero correction, no division by ~0);
* ``s'_l = base_l + gamma * delta_l``: an amplifying block loses sparsity, an
  absorbing block gains it, the largest shift is exactly ``gamma``;
* clip to ``[lo, hi]`` and restore the budget (plain or parameter-weighted
  mean == target; ``budget="shift"`` or ``"rescale"``, see :mod:`.budget`).

With ``weights`` the centring ``mean(u)`` is the parameter-weighted mean (both agree when all
blocks have the same size), which makes the correction budget-neutral before clipping.

``gamma="auto"`` picks gamma from a grid that includes 0 by perplexity on the *tuning* slice
of the calibration corpus (never the evaluation corpus), so the correction cannot do worse
than its base on the data it sees. ``"auto:0,0.05,0.1"`` searches a grid of your own (0 is
always added).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from ..errors import UserError
from ..tuning import beyond_the_grid, check_rule, choose_on_tuning_slice, tune_corpus
from .budget import as_vector, check_target, check_weights, restore_budget
from .registry import option, register_options

DEFAULT_CLIP = math.log(3.0)
AUTO_GAMMAS = (0.0, 0.02, 0.04, 0.08, 0.12, 0.16)
FINALS = ("last", "norm", "kl", "abs", "damage")
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


def parse_gamma(text: float | str) -> float | str:
    """``--absorb-gamma``: a number, ``auto`` (the default grid) or ``auto:g1,g2,...``."""
    if isinstance(text, (int, float)):
        return float(text)
    text = str(text).strip()
    if text == "auto":
        return text
    if text.startswith("auto:"):
        gamma_grid(text)  # validates
        return text
    try:
        value = float(text)
    except ValueError:
        raise UserError(
            f"--absorb-gamma must be a number, 'auto' or 'auto:g1,g2,...' (got {text!r})"
        ) from None
    if not 0 <= value < 1:
        raise UserError(f"--absorb-gamma must be in [0, 1) (got {text}): it is the largest "
                        "sparsity shift; the correction's direction comes from the coefficients")
    return value


def is_auto(gamma: float | str) -> bool:
    return isinstance(gamma, str) and (gamma == "auto" or gamma.startswith("auto:"))


def gamma_grid(gamma: str) -> tuple[float, ...]:
    """The gammas ``auto`` searches: the default grid, or the listed ones plus 0, sorted."""
    if gamma == "auto":
        return AUTO_GAMMAS
    items = [x.strip() for x in gamma[len("auto:"):].split(",") if x.strip()]
    try:
        values = {float(x) for x in items}
    except ValueError:
        raise UserError(
            f"--absorb-gamma {gamma!r}: the grid after 'auto:' must be comma-separated numbers, "
            f"e.g. auto:0.02,0.05,0.1"
        ) from None
    if not values or any(v < 0 or v >= 1 for v in values):
        raise UserError(
            f"--absorb-gamma {gamma!r}: give at least one gamma in [0, 1), e.g. auto:0.02,0.05"
        )
    return tuple(sorted(values | {0.0}))



@dataclass(frozen=True)
class AbsorbOptions:
    """The correction's options (``+absorb``); recorded as ``absorb_*``."""

    eta: float = option(1e-2, "noise magnitude of the absorption probe (noise mode)")
    gamma: float | str = option(0.04, "largest sparsity shift; 'auto' chooses it from "
                                "0,0.02,0.04,0.08,0.12,0.16 on held-out calibration text; "
                                "'auto:0.05,0.1' from your own grid")
    clip: float = option(DEFAULT_CLIP, "bound on |ln r|")
    final: str = option("last", "final drift: last, norm, kl, abs (absolute gain, no "
                        "residual-growth dilution) or damage (sqrt KL, not a ratio: a "
                        "reference point)")
    mode: str = option("prune", "prune (the block pruned alone) or noise (Gaussian, relative "
                       "size --absorb-eta)")
    budget: str = option("shift", "budget restoration: shift or rescale")
    positions: str = option("all", "perturbed positions: all or skip-first")
    scale: str = option("state", "noise relative to the hidden state (state, the seed paper) "
                        "or to the block's update (update)")
    nsamples: int = option(16, "calibration sequences the absorption probe uses (the first "
                           "ones)")
    draws: int = option(1, "noise draws per sequence for the probe")
    select: str = option("min", "--absorb-gamma auto: min keeps the gamma of lowest tuning "
                         "perplexity; 1se the smallest gamma within one paired standard error "
                         "of it", when_set=True)

    def __post_init__(self) -> None:
        object.__setattr__(self, "gamma", parse_gamma(self.gamma))
        for name, value, allowed in (("--absorb-final", self.final, FINALS),
                                     ("--absorb-mode", self.mode, ("noise", "prune")),
                                     ("--absorb-budget", self.budget, ("shift", "rescale")),
                                     ("--absorb-positions", self.positions, ("all", "skip-first")),
                                     ("--absorb-scale", self.scale, ("state", "update"))):
            if value not in allowed:
                raise UserError(f"{name} must be one of {', '.join(allowed)} (got {value!r})")
        check_rule(self.select, "--absorb-select")
        checks = ((self.eta > 0, f"--absorb-eta must be positive (got {self.eta})"),
                  (self.clip > 0, f"--absorb-clip must be positive (got {self.clip})"),
                  (self.nsamples >= 1,
                   f"--absorb-nsamples must be at least 1 (got {self.nsamples})"),
                  (self.draws >= 1, f"--absorb-draws must be at least 1 (got {self.draws})"))
        for ok, message in checks:
            if not ok:
                raise UserError(message)


register_options("absorb", AbsorbOptions)


def coefficients(session, opts: AbsorbOptions, target: float, pruner: str = "wanda",
                 pattern: str = "unstructured") -> list[float]:
    """The absorption coefficients of the row's pruner and pattern (prune mode prunes each block
    alone exactly as the row will)."""
    return session.absorption(
        eta=opts.eta, final=opts.final, mode=opts.mode, positions=opts.positions,
        nsamples=opts.nsamples, draws=opts.draws, scale=opts.scale, pruner=pruner,
        sparsity=target, pattern=pattern,
    )


def corrected(session, base: list[float], r: list[float], gamma: float, target: float,
              opts: AbsorbOptions) -> list[float]:
    s = absorption_correction(base, r, gamma, target, weights=session.params_per_block,
                              clip=opts.clip, budget=opts.budget)
    return [float(x) for x in s]


def choose_gamma(session, base: list[float], r: list[float], target: float,
                 opts: AbsorbOptions, pruner: str, pattern: str,
                 gammas: tuple[float, ...] = AUTO_GAMMAS) -> tuple[float, list[dict]]:
    """Prune at every gamma and keep the one with the lowest tuning-slice perplexity."""
    candidates = [(gamma, corrected(session, base, r, gamma, target, opts)) for gamma in gammas]
    return choose_on_tuning_slice(session, "gamma", candidates, pruner, pattern, opts.select)


def apply_correction(session, alloc, opts: AbsorbOptions, pruner: str = "wanda",
                     pattern: str = "unstructured"):
    """Return ``alloc`` (an :class:`~sparsealloc.allocation.options.Allocation`) corrected with
    the dense model's absorption coefficients."""
    r = coefficients(session, opts, alloc.target_sparsity, pruner, pattern)
    base = list(alloc.block_sparsity)
    gamma, curve = opts.gamma, None
    if is_auto(gamma):
        gamma, curve = choose_gamma(session, base, r, alloc.target_sparsity, opts, pruner,
                                    pattern, gamma_grid(gamma))
    options = dict(alloc.options, absorb_gamma_used=gamma)
    if curve is not None:
        options["gamma_curve"] = curve
        options["gamma_tuned_on"] = "/".join(tune_corpus(session.protocol.calib))
        wider = beyond_the_grid(curve, "gamma", float(gamma), 1.0)
        if wider:
            grid = ",".join(f"{x:g}" for x in wider)
            options["advice"] = list(alloc.options.get("advice", [])) + [
                f"--absorb-gamma auto chose the largest gamma it tried ({float(gamma):g}); a "
                f"larger one may be better: try --absorb-gamma auto:{grid}"]
    return replace(alloc, block_sparsity=corrected(session, base, r, float(gamma),
                                                   alloc.target_sparsity, opts),
                   base_block_sparsity=base, absorption=r, options=options)
