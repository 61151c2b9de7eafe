"""Absorption-aware correction of any base allocation (the seed paper's method, reconstructed).

s'_l = s_l + gamma * delta_l with delta_l = -(u_l - mean u) / max|.|, u_l = clip(ln r_l, +-c):
blocks whose perturbations the rest of the network amplifies (r_l > 1) get less sparsity,
absorbing blocks (r_l < 1) more; the budget is restored exactly afterwards.

``gamma="auto"`` picks gamma from a grid that includes 0 by perplexity on the *tuning* slice
of the calibration corpus (never the evaluation corpus), so the correction cannot do worse
than its base on the data it sees.
"""

from __future__ import annotations

from dataclasses import replace

from . import allocation as A
from .errors import UserError
from .evaluation.perplexity import perplexity
from .session import Session

AUTO_GAMMAS = (0.0, 0.01, 0.02, 0.04, 0.08)


def coefficients(session: Session, opts, target: float, pruner: str = "wanda") -> list[float]:
    from .probe import absorption_coefficients

    return absorption_coefficients(
        session, eta=opts.absorb_eta, final=opts.absorb_final, mode=opts.absorb_mode,
        positions=opts.absorb_positions, nsamples=opts.absorb_nsamples, draws=opts.absorb_draws,
        scale=opts.absorb_scale,
        pruner=pruner, sparsity=target,
    )


def corrected(session: Session, base: list[float], r: list[float], gamma: float,
              target: float, opts) -> list[float]:
    s = A.absorption_correction(base, r, gamma, target, weights=session.params_per_block,
                                clip=opts.absorb_clip, budget=opts.absorb_budget)
    return [float(x) for x in s]


def tune_corpus(calib: str) -> tuple[str, str]:
    """The held-out slice of the calibration corpus used to choose gamma."""
    if calib in ("c4", "wiki"):
        return calib, "tune"
    if calib == "wikitext2":
        return "wikitext2:validation", "eval"
    raise UserError(
        f"--absorb-gamma auto needs a calibration corpus with a held-out slice (c4, wiki or "
        f"wikitext2), not '{calib}'; give a number instead, e.g. --absorb-gamma 0.02"
    )


def choose_gamma(session: Session, base: list[float], r: list[float], target: float, opts,
                 pruner: str, pattern: str, gammas=AUTO_GAMMAS) -> tuple[float, list[dict]]:
    """Prune at every gamma and keep the one with the lowest tuning-slice perplexity."""
    from .allocate import Allocation
    from .pipeline import prune_with

    name, split = tune_corpus(session.protocol.calib)
    windows = session.eval_ids(name, split)
    curve = []
    for gamma in gammas:
        alloc = Allocation(spec=f"gamma={gamma}", target_sparsity=target,
                           block_sparsity=corrected(session, base, r, gamma, target, opts))
        prune_with(session, pruner, pattern, alloc)
        with session.timed("gamma_search"):
            ppl = perplexity(session.model, windows, session.protocol.device,
                             progress=session.progress, desc=f"tune gamma={gamma}")["ppl"]
        curve.append({"gamma": gamma, "tune_ppl": ppl})
    session.restore_dense()
    best = min(curve, key=lambda c: (c["tune_ppl"], abs(c["gamma"])))
    return best["gamma"], curve


def apply_correction(session: Session, alloc, opts, pruner: str = "wanda",
                     pattern: str = "unstructured"):
    """Return ``alloc`` corrected with the dense model's absorption coefficients."""
    r = coefficients(session, opts, alloc.target_sparsity, pruner)
    base = list(alloc.block_sparsity)
    gamma, curve = opts.absorb_gamma, None
    if gamma == "auto":
        gamma, curve = choose_gamma(session, base, r, alloc.target_sparsity, opts, pruner,
                                    pattern)
    options = dict(alloc.options, absorb_gamma_used=gamma)
    if curve is not None:
        options["gamma_curve"] = curve
        options["gamma_tuned_on"] = "/".join(tune_corpus(session.protocol.calib))
    return replace(alloc, block_sparsity=corrected(session, base, r, float(gamma),
                                                   alloc.target_sparsity, opts),
                   base_block_sparsity=base, absorption=r, options=options)
