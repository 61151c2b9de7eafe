"""Choosing a hyperparameter by pruning at each candidate and scoring held-out calibration text.

Used by ``--absorb-gamma auto`` (the correction's gamma) and ``linear:auto`` (the slope of
ATP's linear schedule). The score is the perplexity on the *tuning* slice of the calibration
corpus (never the evaluation corpus); the model is restored to its dense weights afterwards.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import TYPE_CHECKING

from .errors import UserError
from .evaluation.paired import paired_se
from .io import jsonable
from .pruners import get_pruner

if TYPE_CHECKING:  # the type only: the choice rules stay importable without a session
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


TUNE_RULES = ("min", "1se")
"""How a tuned value is chosen from its curve: ``min`` the value of lowest tuning perplexity;
``1se`` the value closest to 0 whose mean tuning NLL is within one paired standard error of the
lowest (the one-standard-error rule: a gain the tuning slice cannot tell from noise does not
move the choice away from the simpler value)."""


def check_rule(rule: str, flag: str) -> str:
    if rule not in TUNE_RULES:
        raise UserError(f"{flag} must be one of {', '.join(TUNE_RULES)} (got {rule!r}): min keeps "
                        "the value of lowest tuning perplexity, 1se the one closest to 0 within "
                        "one standard error of it")
    return rule


TUNE_CACHE_VERSION = 1


def point_key(session: Session, block_sparsity: Sequence[float], pruner: str, pattern: str,
              name: str, split: str) -> str:
    """The on-disk cache key of one scored candidate: the model and its weights, the pruner
    (all its options), the pattern, the allocation to the last bit, the tuning slice and every
    protocol setting the pruned model or its score depends on."""
    p = session.protocol
    blob = json.dumps({"v": TUNE_CACHE_VERSION, "model": session.model_id,
                       "weights": session.weights_fingerprint,
                       "pruner": jsonable(get_pruner(pruner).config()), "pattern": pattern,
                       "block_sparsity": [float(x).hex() for x in block_sparsity],
                       "tune": [name, split], "seqlen": p.seqlen, "calib": p.calib,
                       "seed": p.seed, "nsamples": p.nsamples, "batch": p.batch_size,
                       "bos_per_window": p.bos_per_window, "eval_seqlen": p.eval_seqlen,
                       "eval_tokens": p.eval_tokens, "dtype": p.dtype,
                       "compute_dtype": p.compute_dtype}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def score_candidates(session: Session, label: str,
                     candidates: Sequence[tuple[float, Sequence[float]]],
                     pruner: str, pattern: str) -> list[dict]:
    """Prune with each ``(value, block_sparsity)`` and score it on the tuning slice: one curve
    point ``{label: value, "tune_ppl", "tune_nll", "tune_window_nll"}`` each (the model is left
    pruned with the last one; :func:`choose_on_tuning_slice` restores it).

    Each score is kept in the cache (``$SPARSEALLOC_CACHE/tuning``) as soon as it is measured,
    so a tuning cut short (a crash, the end of a session) goes on from the candidates it had
    finished when the same row runs again; a point taken from the cache says ``"cached": true``.
    """
    name, split = tune_corpus(session.protocol.calib)
    curve = []
    for value, block_sparsity in candidates:
        fresh: list[bool] = []

        def measure(block_sparsity: Sequence[float] = block_sparsity, value: float = value,
                    fresh: list[bool] = fresh) -> dict:
            session.prune(pruner, pattern, block_sparsity, spec=f"{label}={value:g}")
            rec = session.perplexity([name], split, stage=f"{label}_search")[name]
            fresh.append(True)
            out = {"tune_ppl": rec["ppl"]}
            if "window_nll" in rec:
                out |= {"tune_nll": rec["mean_nll"], "tune_window_nll": list(rec["window_nll"])}
            return out

        key = point_key(session, block_sparsity, pruner, pattern, name, split)
        scored = session.disk_cached("tuning", key, measure,
                                     valid=lambda r: "tune_window_nll" in r)
        point = {label: value, **scored}
        if not fresh:
            point["cached"] = True
        curve.append(point)
    return curve


def choose(curve: list[dict], label: str, rule: str = "min") -> float:
    """The chosen value of a scored curve (see :data:`TUNE_RULES`); ties go to the value closest
    to 0. With the window NLLs recorded, each point gains ``tune_se``: the paired standard error
    of its NLL difference to the lowest point (0 there)."""
    check_rule(rule, "the tuning rule")
    best = min(curve, key=lambda c: (c["tune_ppl"], abs(c[label])))
    paired = all("tune_window_nll" in c for c in curve)
    if paired:
        for c in curve:
            c["tune_se"] = paired_se(c["tune_window_nll"], best["tune_window_nll"])
    if rule == "min":
        return best[label]
    if not paired:
        raise UserError("the one-standard-error rule needs the tuning slice's window NLLs; "
                        "choose with the rule min instead")
    near = [c for c in curve if c["tune_nll"] - best["tune_nll"] <= c["tune_se"]]
    return min(near, key=lambda c: (abs(c[label]), c["tune_ppl"]))[label]


def choose_on_tuning_slice(session: Session, label: str,
                           candidates: Sequence[tuple[float, Sequence[float]]],
                           pruner: str, pattern: str, rule: str = "min"
                           ) -> tuple[float, list[dict]]:
    """Prune with each ``(value, block_sparsity)`` and choose by ``rule`` (lowest tuning
    perplexity by default). Returns the value and the curve
    ``[{label: value, "tune_ppl": ...}, ...]``; the model is dense again afterwards."""
    if not candidates:
        raise UserError(f"no {label} values to choose from; give at least one")
    try:
        curve = score_candidates(session, label, candidates, pruner, pattern)
    finally:
        session.restore_dense()
    return choose(curve, label, rule), curve


def beyond_the_grid(curve: Sequence[dict], label: str, chosen: float, limit: float) -> list[float]:
    """Larger values worth trying when ``chosen`` is the largest one tried (and not 0): up to
    three evenly spaced steps beyond it, kept below ``limit``. Empty when the choice is inside
    the grid (or at its end with no room left)."""
    tried = sorted(float(c[label]) for c in curve)
    if len(tried) < 2 or chosen <= 0 or chosen < tried[-1]:
        return []
    step = tried[-1] - tried[-2]
    return [round(chosen + k * step, 6) for k in (1, 2, 3) if chosen + k * step < limit - 1e-9]

