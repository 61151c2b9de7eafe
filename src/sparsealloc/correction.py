"""Absorption-aware correction of any base allocation (the seed paper's method, reconstructed).

s'_l = s_l + gamma * delta_l with delta_l = -(u_l - mean u) / max|.|, u_l = clip(ln r_l, +-c):
blocks whose perturbations the rest of the network amplifies (r_l > 1) get less sparsity,
absorbing blocks (r_l < 1) more; the budget is restored exactly afterwards.

``gamma="auto"`` picks gamma from a grid that includes 0 by perplexity on the *tuning* slice
of the calibration corpus (never the evaluation corpus), so the correction cannot do worse
than its base on the data it sees. ``"auto:0,0.05,0.1"`` searches a grid of your own (0 is
always added).
"""

from __future__ import annotations

from dataclasses import replace

from . import allocation as A
from .errors import UserError
from .session import Session
from .tuning import choose_on_tuning_slice, tune_corpus

__all__ = ["AUTO_GAMMAS", "apply_correction", "choose_gamma", "coefficients", "corrected",
           "gamma_grid", "is_auto", "parse_gamma", "tune_corpus"]

AUTO_GAMMAS = (0.0, 0.02, 0.04, 0.08, 0.12, 0.16)


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


def coefficients(session: Session, opts, target: float, pruner: str = "wanda",
                 pattern: str = "unstructured") -> list[float]:
    """The absorption coefficients of the row's pruner and pattern (prune mode prunes each block
    alone exactly as the row will)."""
    from .probe import absorption_coefficients

    return absorption_coefficients(
        session, eta=opts.absorb_eta, final=opts.absorb_final, mode=opts.absorb_mode,
        positions=opts.absorb_positions, nsamples=opts.absorb_nsamples, draws=opts.absorb_draws,
        scale=opts.absorb_scale, pruner=pruner, sparsity=target, pattern=pattern,
    )


def corrected(session: Session, base: list[float], r: list[float], gamma: float,
              target: float, opts) -> list[float]:
    s = A.absorption_correction(base, r, gamma, target, weights=session.params_per_block,
                                clip=opts.absorb_clip, budget=opts.absorb_budget)
    return [float(x) for x in s]


def choose_gamma(session: Session, base: list[float], r: list[float], target: float, opts,
                 pruner: str, pattern: str,
                 gammas: tuple[float, ...] = AUTO_GAMMAS) -> tuple[float, list[dict]]:
    """Prune at every gamma and keep the one with the lowest tuning-slice perplexity."""
    candidates = [(gamma, corrected(session, base, r, gamma, target, opts)) for gamma in gammas]
    return choose_on_tuning_slice(session, "gamma", candidates, pruner, pattern)


def apply_correction(session: Session, alloc, opts, pruner: str = "wanda",
                     pattern: str = "unstructured"):
    """Return ``alloc`` corrected with the dense model's absorption coefficients."""
    r = coefficients(session, opts, alloc.target_sparsity, pruner, pattern)
    base = list(alloc.block_sparsity)
    gamma, curve = opts.absorb_gamma, None
    if is_auto(gamma):
        gamma, curve = choose_gamma(session, base, r, alloc.target_sparsity, opts, pruner,
                                    pattern, gamma_grid(gamma))
    options = dict(alloc.options, absorb_gamma_used=gamma)
    if curve is not None:
        options["gamma_curve"] = curve
        options["gamma_tuned_on"] = "/".join(tune_corpus(session.protocol.calib))
    return replace(alloc, block_sparsity=corrected(session, base, r, float(gamma),
                                                   alloc.target_sparsity, opts),
                   base_block_sparsity=base, absorption=r, options=options)
