"""Across settings: which allocation to recommend.

Each frontier setting (model, pruner, sparsity, protocol) gives every row a change against
uniform, paired per seed (:mod:`.seeds`). Here the rows are matched across settings by their
allocation spec and the options that change the method; options that only set a budget or a
sample size (:data:`COST_OPTIONS`: probe sequences, search generations and tokens) do not
split a row, so ``owl+absorb`` probed with 4 or 8 sequences is one allocation. Where a setting
has both, the one with more seeds counts.

An allocation *beats uniform* in a setting when its paired change is negative by more than
twice its standard error (two seeds at least). Two minimax criteria pick a default among the
allocations measured in every setting: the lowest *worst change against uniform* (a default
must not lose to uniform anywhere; uniform itself is a candidate with change 0, so a candidate
whose worst change is +0.1% by noise loses to it) and the lowest *worst regret*, its
perplexity against the best allocation of the table in each setting, ``(1 + c) / (1 + c_best)
- 1`` (a default must not be far from the best choice anywhere; uniform's regret is how much
the best allocation gains). The table shows both; which to follow is a judgment the docs make
with the standard errors in view.

Searched rows (``search``, ``search:owl``, ...) are one row, :data:`SEARCH_LABEL`: in each
setting the searched reference of the frontier table (the best of the setting's searches).
It shows how far the heuristics are from a searched allocation; it is not a candidate for
the default, which must cost no more than a prune (a search costs a database and many
candidate evaluations: BENCHMARKS.md).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import TypeVar

from ..errors import check
from .seeds import format_change, options_text, significant

COST_OPTIONS = frozenset({
    "absorb_nsamples", "absorb_draws", "search_generations", "search_offspring",
    "search_survivors", "search_tokens", "search_stride", "search_holdout",
    "search_checkpoints", "search_seed",
})


SEARCH_LABEL = "search (best of the setting's searches)"

T = TypeVar("T")


def setting_name(s: dict) -> str:
    return f"{s['model']} {s['pruner']} {s['target_sparsity']:.0%}" + (
        f" {s['pattern']}" if s["pattern"] != "unstructured" else "")


def allocation_label(entry: dict, defaults: dict | None) -> str:
    """The label of a row across settings: its spec and method options (no cost options)."""
    method = {k: v for k, v in entry["options"].items() if k not in COST_OPTIONS}
    return entry["allocation"] + options_text(dict(entry, options=method), defaults)


def across_label(entry: dict, defaults: dict | None) -> str | None:
    """A frontier row's label across settings: :data:`SEARCH_LABEL` for the setting's searched
    reference, None for its other searches, else :func:`allocation_label`."""
    if entry["allocation"].startswith("search"):
        return SEARCH_LABEL if entry.get("searched_reference") else None
    return allocation_label(entry, defaults)


def beats_uniform(change: dict | None) -> bool:
    """Negative paired change beyond twice its standard error."""
    return significant(change) and change["mean"] < 0


def across_settings(settings: Sequence[dict],
                    cell: Callable[[dict], tuple[str, int, T] | None]) -> dict[str, list[T | None]]:
    """``{label: [value per setting, None where not measured]}``: ``cell(row)`` gives a row's
    ``(label, rank, value)`` (None: skip the row); of two rows of one setting with the same
    label (e.g. probed with 4 and with 8 sequences) the one of higher rank (more seeds) counts."""
    table: dict[str, list[T | None]] = {}
    for i, s in enumerate(settings):
        chosen: dict[str, tuple[int, T]] = {}
        for e in s["rows"]:
            found = cell(e)
            if found is None:
                continue
            label, rank, value = found
            if label not in chosen or rank > chosen[label][0]:
                chosen[label] = (rank, value)
        for label, (_, value) in chosen.items():
            table.setdefault(label, [None] * len(settings))[i] = value
    return table


def measured_in(table: dict[str, list[T | None]], min_settings: int,
                keep: Iterable[str] = ()) -> tuple[dict[str, list[T | None]], int]:
    """The labels of ``table`` measured in ``min_settings`` settings at least (and ``keep``),
    and how many were left out."""
    check(min_settings >= 1, f"--min-settings must be at least 1 (got {min_settings})")
    kept = {label: values for label, values in table.items()
            if label in keep or sum(v is not None for v in values) >= min_settings}
    return kept, len(table) - len(kept)


def left_out_line(result: dict, what: str) -> list[str]:
    """The line saying how many ``what`` ``--min-settings`` left out (none when it left none)."""
    if not result.get("left_out"):
        return []
    return [f"{result['left_out']} {what} measured in fewer than {result['min_settings']} "
            "settings are left out (`--min-settings`)."]


def summary(settings: Sequence[dict], defaults: dict | None = None,
            min_settings: int = 1) -> dict:
    """``{"settings": [names], "rows": [...], "least_worst": label, "least_regret": label,
    "left_out": n}`` (a label is None when no allocation was measured in every setting); each
    row has its ``label``, per setting the paired change against uniform (``changes``, None
    where not measured), ``beaten`` (settings where it beats uniform), ``worst`` (its largest
    change, over the settings where it was measured), ``worst_regret`` (its largest regret,
    likewise) and ``complete`` (measured in every setting). Rows measured in fewer than
    ``min_settings`` settings are left out (an ablation variant run once) and counted in
    ``left_out``; uniform and the search never are."""
    def cell(e: dict) -> tuple[str, int, dict] | None:
        label = across_label(e, defaults)
        if label is None:
            return None
        if e["allocation"] == "uniform":
            change = {"mean": 0.0, "se": None, "n": len(e["seeds"])}
        else:
            change = e.get("vs_uniform")
        return None if change is None else (label, change["n"], change)

    table, left_out = measured_in(across_settings(settings, cell), min_settings,
                                  keep=("uniform", SEARCH_LABEL))
    best = [min((changes[i]["mean"] for label, changes in table.items()
                 if label != SEARCH_LABEL and changes[i] is not None), default=0.0)
            for i in range(len(settings))]
    rows = []
    for label, changes in table.items():
        measured = [c for c in changes if c is not None]
        regrets = [(1 + c["mean"]) / (1 + b) - 1 for c, b in zip(changes, best, strict=True)
                   if c is not None]
        rows.append({"label": label, "changes": changes,
                     "beaten": sum(beats_uniform(c) for c in changes),
                     "worst": max(c["mean"] for c in measured),
                     "worst_regret": max(regrets),
                     "complete": len(measured) == len(settings)})
    rows.sort(key=lambda r: (not r["complete"], r["worst"], r["label"]))
    complete = [r for r in rows if r["complete"] and r["label"] != SEARCH_LABEL]
    least_regret = min(complete, key=lambda r: (r["worst_regret"], r["label"]), default=None)
    return {"settings": [setting_name(s) for s in settings], "rows": rows, "left_out": left_out,
            "min_settings": min_settings,
            "least_worst": complete[0]["label"] if complete else None,
            "least_regret": least_regret["label"] if least_regret else None}


def render_summary(result: dict) -> str:
    """Markdown: one row per allocation, one column per setting, and the two minimax choices
    (the searched row is a reference, never a candidate)."""
    names = result["settings"]
    lines = ["**Across settings** (change against uniform, paired per seed; `*`: beyond twice "
             "its standard error; regret: perplexity against the best allocation of the table "
             "in that setting, search aside)", "",
             "| allocation | " + " | ".join(names) + " | beats uniform | worst | worst regret |",
             "|---|" + "---|" * len(names) + "---|---|---|"]
    for r in result["rows"]:
        cells = ["-" if c is None else ("0" if r["label"] == "uniform" else format_change(c))
                 for c in r["changes"]]
        lines.append(f"| {r['label']} | " + " | ".join(cells)
                     + f" | {r['beaten']}/{len(names)} | {r['worst']:+.1%} | "
                       f"{r['worst_regret']:+.1%} |")
    everywhere = [r["label"] for r in result["rows"]
                  if r["beaten"] == len(names) and r["label"] != SEARCH_LABEL]
    none = "no allocation was measured in every setting."
    lines += ["", "Beats uniform in every setting: "
              + (", ".join(f"`{x}`" for x in everywhere) if everywhere else "none") + ".",
              "Lowest worst-case change against uniform over every setting: "
              + (f"`{result['least_worst']}`." if result["least_worst"] else none),
              "Lowest worst-case regret over every setting: "
              + (f"`{result['least_regret']}`." if result.get("least_regret") else none)]
    lines += left_out_line(result, "allocation(s)")
    if any(r["label"] == SEARCH_LABEL for r in result["rows"]):
        lines.append(f"`{SEARCH_LABEL}` is the reference each heuristic is measured against "
                     "(usually one seed), not a candidate for the default.")
    return "\n".join(lines)
