"""Across settings: which allocation to recommend.

Each frontier setting (model, pruner, sparsity, protocol) gives every row a change against
uniform, paired per seed (:mod:`.seeds`). Here the rows are matched across settings by their
allocation spec and the options that change the method; options that only set a budget or a
sample size (:data:`COST_OPTIONS`: probe sequences, search generations and tokens) do not
split a row, so ``owl+absorb`` probed with 4 or 8 sequences is one allocation. Where a setting
has both, the one with more seeds counts.

An allocation *beats uniform* in a setting when its paired change is negative by more than
twice its standard error (two seeds at least). The recommendation is the allocation measured
in every setting whose worst change against uniform is the lowest (minimax: a default must not
lose badly anywhere); uniform itself is a candidate with change 0.

Searched rows (``search``, ``search:owl``, ...) are one row, :data:`SEARCH_LABEL`: in each
setting the searched reference of the frontier table (the best of the setting's searches).
It shows how far the heuristics are from a searched allocation; it is not a candidate for
the default, which must cost no more than a prune (a search costs a database and many
candidate evaluations: BENCHMARKS.md).
"""

from __future__ import annotations

from collections.abc import Sequence

from ..errors import check
from .seeds import format_change, options_text, significant

COST_OPTIONS = frozenset({
    "absorb_nsamples", "absorb_draws", "search_generations", "search_offspring",
    "search_survivors", "search_tokens", "search_stride", "search_holdout",
    "search_checkpoints", "search_seed",
})


SEARCH_LABEL = "search (best of the setting's searches)"


def setting_name(s: dict) -> str:
    return f"{s['model']} {s['pruner']} {s['target_sparsity']:.0%}" + (
        f" {s['pattern']}" if s["pattern"] != "unstructured" else "")


def allocation_label(entry: dict, defaults: dict | None) -> str:
    """The label of a row across settings: its spec and method options (no cost options)."""
    method = {k: v for k, v in entry["options"].items() if k not in COST_OPTIONS}
    return entry["allocation"] + options_text(dict(entry, options=method), defaults)


def beats_uniform(change: dict | None) -> bool:
    """Negative paired change beyond twice its standard error."""
    return significant(change) and change["mean"] < 0


def summary(settings: Sequence[dict], defaults: dict | None = None,
            min_settings: int = 1) -> dict:
    """``{"settings": [names], "rows": [...], "recommended": label or None, "left_out": n}``;
    each row has its ``label``, per setting the paired change against uniform (``changes``,
    None where not measured), ``beaten`` (settings where it beats uniform), ``worst`` (its
    largest change, over the settings where it was measured) and ``complete`` (measured in
    every setting). Rows measured in fewer than ``min_settings`` settings are left out (an
    ablation variant run once) and counted in ``left_out``; uniform and the search never are."""
    check(min_settings >= 1, f"--min-settings must be at least 1 (got {min_settings})")
    names = [setting_name(s) for s in settings]
    table: dict[str, list[dict | None]] = {}
    for i, s in enumerate(settings):
        chosen: dict[str, dict] = {}
        for e in s["rows"]:
            if e["allocation"].startswith("search"):
                if not e.get("searched_reference"):
                    continue
                label = SEARCH_LABEL
            else:
                label = allocation_label(e, defaults)
            if e["allocation"] == "uniform":
                change = {"mean": 0.0, "se": None, "n": len(e["seeds"])}
            else:
                change = e.get("vs_uniform")
            if change is None:
                continue
            if label not in chosen or change["n"] > chosen[label]["n"]:
                chosen[label] = change
        for label, change in chosen.items():
            table.setdefault(label, [None] * len(settings))[i] = change
    rows, left_out = [], 0
    for label, changes in table.items():
        measured = [c for c in changes if c is not None]
        if len(measured) < min_settings and label not in ("uniform", SEARCH_LABEL):
            left_out += 1
            continue
        rows.append({"label": label, "changes": changes,
                     "beaten": sum(beats_uniform(c) for c in changes),
                     "worst": max(c["mean"] for c in measured),
                     "complete": len(measured) == len(settings)})
    rows.sort(key=lambda r: (not r["complete"], r["worst"], r["label"]))
    complete = [r for r in rows if r["complete"] and r["label"] != SEARCH_LABEL]
    return {"settings": names, "rows": rows, "left_out": left_out, "min_settings": min_settings,
            "recommended": complete[0]["label"] if complete else None}


def render_summary(result: dict) -> str:
    """Markdown: one row per allocation, one column per setting, and the recommendation (the
    searched row is a reference, never recommended)."""
    names = result["settings"]
    lines = ["**Across settings** (change against uniform, paired per seed; `*`: beyond twice "
             "its standard error)", "",
             "| allocation | " + " | ".join(names) + " | beats uniform | worst |",
             "|---|" + "---|" * len(names) + "---|---|"]
    for r in result["rows"]:
        cells = ["-" if c is None else ("0" if r["label"] == "uniform" else format_change(c))
                 for c in r["changes"]]
        lines.append(f"| {r['label']} | " + " | ".join(cells)
                     + f" | {r['beaten']}/{len(names)} | {r['worst']:+.1%} |")
    everywhere = [r["label"] for r in result["rows"]
                  if r["beaten"] == len(names) and r["label"] != SEARCH_LABEL]
    lines += ["", "Beats uniform in every setting: "
              + (", ".join(f"`{x}`" for x in everywhere) if everywhere else "none") + ".",
              "Lowest worst-case change over every setting (the default to recommend): "
              + (f"`{result['recommended']}`." if result["recommended"] else
                 "no allocation was measured in every setting.")]
    if result.get("left_out"):
        lines.append(f"{result['left_out']} allocation(s) measured in fewer than "
                     f"{result['min_settings']} settings are left out (`--min-settings`).")
    if any(r["label"] == SEARCH_LABEL for r in result["rows"]):
        lines.append(f"`{SEARCH_LABEL}` is the reference each heuristic is measured against "
                     "(usually one seed), not a candidate for the default.")
    return "\n".join(lines)
