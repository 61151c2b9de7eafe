"""Choosing a hyperparameter by pruning at each candidate and scoring held-out calibration text.

Used by ``--absorb-gamma auto`` (the correction's gamma) and ``linear:auto`` (the slope of
ATP's linear schedule). The score is the perplexity on the *tuning* slice of the calibration
corpus (never the evaluation corpus); the model is restored to its dense weights afterwards.
"""

from __future__ import annotations

from collections.abc import Sequence

from .errors import UserError
from .session import Session

_NO_SLICE_FIX = ("give a number instead, e.g. --absorb-gamma 0.02 or --allocation linear")


def tune_corpus(calib: str, what: str = "choosing a value on held-out text (--absorb-gamma "
                "auto, linear:auto)", fix: str = _NO_SLICE_FIX) -> tuple[str, str]:
    """The held-out slice of the calibration corpus used to choose a hyperparameter."""
    if calib in ("c4", "wiki"):
        return calib, "tune"
    if calib == "wikitext2":
        return "wikitext2:validation", "eval"
    raise UserError(
        f"{what} needs a calibration corpus with a held-out slice (c4, wiki or wikitext2), "
        f"not '{calib}'; {fix}"
    )


def choose_on_tuning_slice(session: Session, label: str,
                           candidates: Sequence[tuple[float, Sequence[float]]],
                           pruner: str, pattern: str) -> tuple[float, list[dict]]:
    """Prune with each ``(value, block_sparsity)`` and keep the value of lowest tuning perplexity.

    Ties go to the value closest to 0. Returns the value and the curve
    ``[{label: value, "tune_ppl": ...}, ...]``; the model is dense again afterwards.
    """
    if not candidates:
        raise UserError(f"no {label} values to choose from; give at least one")
    name, split = tune_corpus(session.protocol.calib)
    curve = []
    for value, block_sparsity in candidates:
        session.prune(pruner, pattern, block_sparsity, spec=f"{label}={value:g}")
        ppl = session.perplexity([name], split, stage=f"{label}_search")[name]["ppl"]
        curve.append({label: value, "tune_ppl": ppl})
    session.restore_dense()
    best = min(curve, key=lambda c: (c["tune_ppl"], abs(c[label])))
    return best[label], curve


def beyond_the_grid(curve: Sequence[dict], label: str, chosen: float, limit: float) -> list[float]:
    """Larger values worth trying when ``chosen`` is the largest one tried (and not 0): up to
    three evenly spaced steps beyond it, kept below ``limit``. Empty when the choice is inside
    the grid (or at its end with no room left)."""
    tried = sorted(float(c[label]) for c in curve)
    if len(tried) < 2 or chosen <= 0 or chosen < tried[-1]:
        return []
    step = tried[-1] - tried[-2]
    return [round(chosen + k * step, 6) for k in (1, 2, 3) if chosen + k * step < limit - 1e-9]

