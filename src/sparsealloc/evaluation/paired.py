"""Paired comparisons: two zero-shot results on the same documents, two perplexities on the same
windows.

Two pruned models evaluated on the same first-n documents of each task differ document by
document; the standard error of their difference is far smaller than that of either accuracy
(the documents' difficulty cancels). Each task row keeps ``correct``, one character per
document in doc_id order ("1" right, "0" wrong); for the mean over T tasks

    diff = (1/T) sum_t mean_i(a_ti - b_ti),   se = sqrt(sum_t var_i(a_ti - b_ti) / n_t) / T

with the sample variance (ddof 1). Both are returned in accuracy points (x100).
"""

from __future__ import annotations

import math


def paired_diff(a: list[float], b: list[float]) -> tuple[float, float, int]:
    """(mean of ``a_i - b_i``, the variance of that mean, n): sample variance (ddof 1), 0 for
    one pair."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired values need the same items ({len(a)} vs {len(b)})")
    d = [x - y for x, y in zip(a, b, strict=True)]
    n = len(d)
    mean = sum(d) / n
    var = sum((x - mean) ** 2 for x in d) / (n - 1) if n > 1 else 0.0
    return mean, var / n, n


def paired_task(a: str, b: str) -> tuple[float, float, int]:
    """(mean difference, its variance, n) of two ``correct`` strings of one task."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired rows need the same documents ({len(a)} vs {len(b)})")
    return paired_diff([int(x) for x in a], [int(y) for y in b])


def paired_change(a: dict, b: dict, tasks: list[str] | None = None) -> dict | None:
    """Zero-shot change of ``a`` against ``b`` (``{task: row}``) with its paired standard error.

    None when a task lacks the per-document record (results written before it existed).
    """
    tasks = tasks or [t for t in a if t in b]
    if not tasks or any("correct" not in a.get(t, {}) or "correct" not in b.get(t, {})
                        for t in tasks):
        return None
    parts = [paired_task(a[t]["correct"], b[t]["correct"]) for t in tasks]
    diff = sum(m for m, _, _ in parts) / len(parts)
    se = math.sqrt(sum(v for _, v, _ in parts)) / len(parts)
    return {"points": 100 * diff, "se_points": 100 * se, "tasks": len(parts),
            "documents": sum(n for _, _, n in parts)}


def paired_se(a: list[float], b: list[float]) -> float:
    """Standard error of the mean of ``a_i - b_i`` (0 for one pair): two models' NLLs on the
    same perplexity windows."""
    return math.sqrt(paired_diff(a, b)[1])


def mean_stderr(rows: dict, tasks: list[str] | None = None) -> float | None:
    """Standard error of the unweighted mean accuracy over tasks (independent tasks)."""
    tasks = tasks or list(rows)
    ses = [rows[t].get("acc_stderr") for t in tasks]
    if not ses or any(s is None for s in ses):
        return None
    return math.sqrt(sum(s * s for s in ses)) / len(ses)
