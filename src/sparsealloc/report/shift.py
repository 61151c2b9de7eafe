"""Across settings: does the correction move its base toward the searched allocation?

For every ``+absorb`` row of every frontier setting with a search row, :mod:`.frontier` gives
the Spearman rank correlation over blocks between the correction's shift (``+absorb`` minus its
base) and the searched allocation minus the same base. Here those values are laid out one row
per correction (matched across settings as in :mod:`.recommend`) and counted: how many of the
*independent* tests are positive, and how many exceed the two-sided 5% critical value
``1.96 / sqrt(L - 1)`` for L blocks (the large-sample approximation; 0.48 for 18 blocks, 0.42
for 24, 0.36 for 30). A test is not independent when the search started from an allocation
corrected with the same coefficients (``shares_search_shift``): search minus base then holds
about the row's own shift.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from ..errors import check
from .recommend import (
    across_settings,
    allocation_label,
    left_out_line,
    measured_in,
    setting_name,
)


def critical_rho(blocks: int) -> float:
    """Two-sided 5% critical value of Spearman's rho for ``blocks`` pairs (normal approx.)."""
    check(blocks > 1, f"a Spearman test needs two blocks at least (got {blocks})")
    return 1.96 / math.sqrt(blocks - 1)


def shift_summary(settings: Sequence[dict], defaults: dict | None = None,
                  min_settings: int = 1) -> dict:
    """``{"settings": [names], "rows": [...], "left_out": n, "min_settings": k}``; each row has
    its ``label``, per setting a cell (None where not measured) with ``rho``, ``critical``,
    ``beyond`` and ``independent``, and its counts over the independent cells: ``tests``,
    ``positive`` and ``beyond`` (positive and beyond the critical value)."""
    def cell(e: dict) -> tuple[str, int, dict] | None:
        rho = e.get("spearman_to_search")
        if rho is None:
            return None
        crit = critical_rho(len(e["allocation_mean"]))
        return (allocation_label(e, defaults), len(e["seeds"]),
                {"rho": rho, "critical": crit, "beyond": abs(rho) > crit,
                 "independent": not e.get("shares_search_shift")})

    table, left_out = measured_in(across_settings(settings, cell), min_settings)
    rows = []
    for label, cells in table.items():
        tests = [c for c in cells if c is not None and c["independent"]]
        rows.append({"label": label, "cells": cells, "tests": len(tests),
                     "positive": sum(c["rho"] > 0 for c in tests),
                     "beyond": sum(c["rho"] > 0 and c["beyond"] for c in tests)})
    rows.sort(key=lambda r: (-r["tests"], -(r["positive"] / r["tests"]) if r["tests"] else 0,
                             r["label"]))
    return {"settings": [setting_name(s) for s in settings], "rows": rows,
            "left_out": left_out, "min_settings": min_settings}


def _cell(c: dict | None) -> str:
    if c is None:
        return "-"
    return f"{c['rho']:+.2f}" + (" *" if c["beyond"] else "") + ("" if c["independent"] else " †")


def render_shift(result: dict) -> str:
    """Markdown: one row per correction, one column per setting, the counts, the totals."""
    names = result["settings"]
    lines = ["**The correction's shift against the search** (Spearman over blocks of +absorb "
             "minus base against search minus base; `*`: beyond the 5% critical value "
             "1.96/sqrt(L-1) for L blocks; †: the search started from an allocation corrected "
             "with the same coefficients, not an independent test and not counted)", "",
             "| +absorb row | " + " | ".join(names) + " | positive (of independent tests) |"
             " beyond the critical value |",
             "|---|" + "---|" * len(names) + "---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['label']} | " + " | ".join(_cell(c) for c in r["cells"])
                     + f" | {r['positive']}/{r['tests']} | {r['beyond']}/{r['tests']} |")
    tests = sum(r["tests"] for r in result["rows"])
    lines += ["", f"All corrections: {sum(r['positive'] for r in result['rows'])} of {tests} "
              f"independent tests positive, {sum(r['beyond'] for r in result['rows'])} beyond "
              "the critical value."]
    if not result["rows"]:
        lines.append("No +absorb row has a search row in its setting to compare with.")
    lines += left_out_line(result, "correction(s)")
    return "\n".join(lines)
