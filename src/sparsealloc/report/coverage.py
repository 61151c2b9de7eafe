"""Across settings: which calibration seeds each allocation was measured with (what a frontier
grid still lacks). Rows are matched across settings as in :mod:`.recommend` (spec and method
options; probe and search budgets do not split a row; of two variants of one setting the one
with more seeds counts), so a cell shows exactly the seeds the recommendation tables use."""

from __future__ import annotations

from collections.abc import Sequence

from .recommend import (
    SEARCH_LABEL,
    across_label,
    across_settings,
    left_out_line,
    measured_in,
    setting_name,
)


def coverage(settings: Sequence[dict], defaults: dict | None = None, min_settings: int = 1,
             seeds: int = 3) -> dict:
    """``{"settings": [names], "rows": [{"label", "seeds": [seed list or None per setting]}],
    "short": cells with fewer than ``seeds`` seeds, "missing": settings without the row,
    "left_out": n}``; searched rows are one row (one seed is their protocol) and are not
    counted short."""
    def cell(e: dict) -> tuple[str, int, list[int]] | None:
        label = across_label(e, defaults)
        return None if label is None else (label, len(e["seeds"]), list(e["seeds"]))

    table, left_out = measured_in(across_settings(settings, cell), min_settings,
                                  keep=("uniform", SEARCH_LABEL))
    rows = [{"label": label, "seeds": cells} for label, cells in table.items()]
    rows.sort(key=lambda r: (r["label"] == SEARCH_LABEL, -sum(c is not None for c in r["seeds"]),
                             r["label"]))
    counted = [r for r in rows if r["label"] != SEARCH_LABEL]
    return {"settings": [setting_name(s) for s in settings], "rows": rows, "wanted": seeds,
            "short": sum(c is not None and len(c) < seeds for r in counted for c in r["seeds"]),
            "missing": sum(c is None for r in counted for c in r["seeds"]),
            "left_out": left_out, "min_settings": min_settings}


def render_coverage(result: dict) -> str:
    """Markdown: one row per allocation, one column per setting, the seeds of each cell."""
    names = result["settings"]
    lines = [f"**Calibration seeds measured** (`-`: not measured; a cell with fewer than "
             f"{result['wanted']} seeds is marked `<`)", "",
             "| allocation | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for r in result["rows"]:
        cells = []
        for c in r["seeds"]:
            if c is None:
                cells.append("-")
                continue
            short = len(c) < result["wanted"] and r["label"] != SEARCH_LABEL
            cells.append(",".join(str(s) for s in c) + (" <" if short else ""))
        lines.append(f"| {r['label']} | " + " | ".join(cells) + " |")
    lines += ["", f"{result['short']} measured cells have fewer than {result['wanted']} seeds; "
              f"{result['missing']} cells are not measured (searches aside: one seed each)."]
    lines += left_out_line(result, "allocation(s)")
    return "\n".join(lines)
