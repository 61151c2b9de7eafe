"""Choosing a hyperparameter by pruning at each candidate and scoring held-out calibration text.

Used by ``--absorb-gamma auto`` (the correction's gamma) and ``linear:auto`` (the slope of
ATP's linear schedule). The score is the perplexity on the *tuning* slice of the calibration
corpus (never the evaluation corpus); the model is restored to its dense weights afterwards.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from .allocation.nm import check_levels_meet, nm_levels
from .errors import UserError
from .pruners import Pruner, get_pruner
from .pruners.masks import UNSTRUCTURED, Pattern, parse_pattern
from .pruning import PruneReport, check_patterns, prune_sequential
from .session import Session


def tune_corpus(calib: str) -> tuple[str, str]:
    """The held-out slice of the calibration corpus used to choose a hyperparameter."""
    if calib in ("c4", "wiki"):
        return calib, "tune"
    if calib == "wikitext2":
        return "wikitext2:validation", "eval"
    raise UserError(
        f"choosing a value on held-out text (--absorb-gamma auto, linear:auto) needs a "
        f"calibration corpus with a held-out slice (c4, wiki or wikitext2), not '{calib}'; "
        f"give a number instead, e.g. --absorb-gamma 0.02 or --allocation linear"
    )


def block_patterns(session: Session, pattern: Pattern, block_sparsity: Sequence[float],
                   target: float, spec: str = "") -> list[Pattern]:
    """One pattern per block: the pattern itself, or under N:M one N per block from the
    allocation (mixed N:M, M fixed; see :mod:`sparsealloc.allocation.nm`)."""
    if not pattern.is_nm:
        return [pattern] * session.arch.num_blocks
    w = session.params_per_block
    levels = nm_levels(block_sparsity, pattern.m, w, target=target)
    check_levels_meet(levels, pattern.m, target, w, spec)
    return [Pattern("nm", n, pattern.m) if n > 0 else UNSTRUCTURED for n in levels]


@dataclass
class Pruned:
    """What :func:`prune_from_dense` did: the pruner, its seconds, every block's pattern and the
    runner's report (experts without tokens, statistics passes)."""

    pruner: Pruner
    seconds: float
    patterns: list[Pattern]
    report: PruneReport


def prune_from_dense(session: Session, pruner_name: str, pattern_text: str,
                     block_sparsity: Sequence[float], target: float | None = None,
                     spec: str = "",
                     expert_sparsity: Sequence[Mapping[str, float]] | None = None) -> Pruned:
    """Prune the session's model from its dense weights (under N:M each block gets its own N
    from ``block_sparsity``; ``expert_sparsity`` splits a block's budget over its experts)."""
    pruner = get_pruner(pruner_name)
    pattern = parse_pattern(pattern_text)
    check_patterns(session.arch, pattern)
    target = pattern.nm_sparsity if target is None else target
    patterns = block_patterns(session, pattern, block_sparsity, target, spec)
    sparsities = [p.nm_sparsity for p in patterns] if pattern.is_nm else list(block_sparsity)
    session.restore_dense()
    acts = session.capture()
    start = time.perf_counter()
    with session.timed("prune"):
        session.modified = True
        report = prune_sequential(session.runner, acts, pruner, sparsities, patterns,
                                  expert_sparsity=expert_sparsity)
    return Pruned(pruner, time.perf_counter() - start, patterns, report)


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
    windows = session.eval_ids(name, split)
    curve = []
    for value, block_sparsity in candidates:
        prune_from_dense(session, pruner, pattern, block_sparsity, spec=f"{label}={value:g}")
        with session.timed(f"{label}_search"):
            ppl = session.window_perplexity(windows, desc=f"tune {label}={value:g}")["ppl"]
        curve.append({label: value, "tune_ppl": ppl})
    session.restore_dense()
    best = min(curve, key=lambda c: (c["tune_ppl"], abs(c[label])))
    return best[label], curve
