"""Tables over result files: the paper's grid across many runs, and one table per run.

``grid``: merges every row of many ``compare.json`` (and older sweep) files that shares a model,
pruner, sparsity and protocol. Rows are picked by the options recorded with them, never by
label: base rows (uniform, OWL, AlphaPruning) only at the default allocator hyperparameters,
``+absorb`` rows only when their correction settings match the variant asked for (mode, final,
gamma, optionally the probe's sequences). A row found in several files must agree (runs are
deterministic); the first one is used and a disagreement is reported in an HTML comment.

``rows``: one table per file, every row by its label, each ``+absorb`` row with its change
against the row of its bare base allocation.

``seeds`` (:mod:`.seeds`): every row's mean and spread over calibration seeds, paired changes.
``frontier`` (:mod:`.frontier`): ``seeds`` plus each row's distance from the searched allocation.
``coverage`` (:mod:`.coverage`): the seeds each allocation was measured with, every setting.
``tuned`` (:mod:`.tuned`): each tuned row's choice beside the one-standard-error rule's.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Iterable
from pathlib import Path

from ..errors import UserError, check
from ..io import read_json
from .coverage import coverage, render_coverage
from .frontier import frontier, legend_labels, render_frontier
from .plots import plot_frontier
from .recommend import render_summary, summary
from .seeds import collect_seeds, render_seeds, same_value, seed_conflicts, summarise
from .shift import render_shift, shift_summary
from .tuned import render_tuned, tuned_choices

BASES = ("uniform", "owl", "alpha")
COLUMNS = ("uniform", "uniform+absorb", "owl", "owl+absorb", "alpha", "alpha+absorb")
BASE_KEYS = {"owl": ("owl_m", "owl_lambda"), "alpha": ("alpha_eps",), "uniform": ()}
# correction settings that must be at their defaults for a row to count as the named variant
FIXED = ("absorb_clip", "absorb_budget", "absorb_positions", "absorb_scale")


def row_name(row: dict, variant: dict, defaults: dict) -> str | None:
    """The grid column a row belongs to, or None when its options are not the ones asked for."""
    details = row.get("allocation_details") or {}
    spec = details.get("spec", row.get("allocation", ""))
    opts = details.get("options") or {}
    base, _, absorb = spec.partition("+")
    if base not in BASES or absorb not in ("", "absorb"):
        return None
    if any(k in opts and not same_value(opts[k], defaults[k]) for k in BASE_KEYS[base]):
        return None
    if not absorb:
        return base
    if any(k in opts and not same_value(opts[k], defaults[k]) for k in FIXED):
        return None
    if any(not same_value(opts.get(k, defaults[k]), v) for k, v in variant.items()):
        return None
    return spec


def collect(records: Iterable[tuple[str, dict]], variant: dict, defaults: dict,
            warnings: list[str] | None = None) -> dict[tuple, dict]:
    """Group the rows of ``(path, record)`` pairs by model, pruner, sparsity and protocol."""
    groups: dict[tuple, dict] = {}
    dense_of: dict[tuple, float] = {}  # dense perplexity depends on the evaluation windows only
    for path, rec in records:
        proto = rec["protocol"]
        dense = next(iter(rec["dense"]["ppl"].values())) if rec.get("dense") else None
        for r in rec["rows"]:
            if r.get("label") == "dense" and r.get("ppl"):
                dense = next(iter(r["ppl"].values()))
        eval_key = (rec["model"], proto.get("eval_seqlen"), proto.get("eval_tokens"),
                    bool(proto.get("bos_per_window")))
        if dense is not None:
            dense_of.setdefault(eval_key, dense)
        for r in rec["rows"]:
            name = (row_name(r, variant, defaults)
                    if r.get("label") != "dense" and r.get("ppl") else None)
            if name is None or r.get("status") == "diverged":
                continue
            key = (rec["model"], r["pruner"]["name"], r["target_sparsity"], proto["nsamples"],
                   proto["seqlen"], proto.get("eval_tokens"), bool(proto.get("bos_per_window")))
            g = groups.setdefault(key, {"dense": None, "eval_key": eval_key, "sources": []})
            if path not in g["sources"]:
                g["sources"].append(path)
            ppl = next(iter(r["ppl"].values()))
            if name in g and not math.isclose(g[name], ppl, rel_tol=1e-6) and warnings is not None:
                warnings.append(f"<!-- warning: {key} {name}: {g[name]:.4f} kept, {ppl:.4f} in "
                                f"{path} differs (a setting not filtered on, e.g. "
                                "absorb_nsamples) -->")
            g.setdefault(name, ppl)
    for g in groups.values():
        g["dense"] = dense_of.get(g.pop("eval_key"))
    return groups


def render_grid(groups: dict[tuple, dict], all_groups: bool = False) -> str:
    """The grid as markdown, with the mean change of +absorb against its base."""
    if not all_groups:  # only settings with at least one corrected row
        groups = {k: g for k, g in groups.items() if any(c.endswith("+absorb") for c in g)}
    cols = [c for c in COLUMNS if any(c in g for g in groups.values())]
    lines = ["| model | pruner | sparsity | calib x len / eval tokens | dense | " + " | ".join(cols)
             + " |", "|---" * (5 + len(cols)) + "|"]
    changes: dict[tuple, list[float]] = {}
    for key in sorted(groups):
        g = groups[key]
        model, pruner, s, n, seqlen, tok, bos = key
        cells = []
        for c in cols:
            v, base = g.get(c), g.get(c.removesuffix("+absorb"))
            if v is None:
                cells.append("-")
            elif c.endswith("+absorb") and base:
                changes.setdefault((pruner, s), []).append(v / base - 1)
                cells.append(f"{v:.1f} ({v / base - 1:+.1%})")
            else:
                cells.append(f"{v:.1f}")
        dense = f"{g['dense']:.2f}" if g["dense"] else "-"
        proto = f"{n} x {seqlen} / {tok}" + (" (BOS)" if bos else "")
        lines.append(f"| {model} | {pruner} | {s:.0%} | {proto} | {dense} | "
                     + " | ".join(cells) + " |")
    if changes:
        lines.append("")
        lines.append(_mean_line("all settings", [c for v in changes.values() for c in v]))
        if len(changes) > 1:
            lines += [_mean_line(f"{p} {s:.0%}", v) for (p, s), v in sorted(changes.items())]
    return "\n".join(lines)


def _mean_line(where: str, changes: list[float]) -> str:
    k = len(changes)
    median = statistics.median(changes)
    return (f"- Mean change of +absorb against its base, {where}, over {k} pairs: "
            f"{sum(changes) / k:+.1%} (median {median:+.1%}; improved in "
            f"{sum(c < 0 for c in changes)} of {k}).")


def render_rows(path: str, rec: dict) -> str:
    """One file's rows by label, each +absorb row against the row labelled with its base."""
    p = rec["protocol"]
    rows = ([rec["dense"] | {"label": "dense"}] if rec.get("dense") else []) + rec["rows"]
    pruner = rec.get("pruner") or rows[-1]["pruner"]
    pruner = pruner["name"] if isinstance(pruner, dict) else pruner
    sparsity = rec.get("sparsity", rows[-1].get("target_sparsity"))
    lines = [f"### {rec['model']}, {pruner} {sparsity:.0%} ({path})", "",
             f"calibration {p['nsamples']} x {p['seqlen']} ({p['calib']}), perplexity on the "
             f"first {p['eval_tokens']} tokens in windows of {p['eval_seqlen']}", "",
             "| row | " + " | ".join(f"ppl {c}" for c in rows[0]["ppl"]) +
             " | vs base | block sparsity min-max |", "|---|---|---|---|"]
    base = {r["label"]: r for r in rows}
    for r in rows:
        corpus, ppl = next(iter(r["ppl"].items()))
        spec = r.get("allocation", "")
        change = ""
        if spec.endswith("+absorb") and spec[: -len("+absorb")] in base:
            b = base[spec[: -len("+absorb")]]["ppl"][corpus]
            change = f"{ppl / b - 1:+.1%}"
        bs = r.get("block_sparsity")
        rng = f"{min(bs):.3f}-{max(bs):.3f}" if bs else ""
        lines.append(f"| {r['label']} | {ppl:.2f} | {change} | {rng} |")
    return "\n".join(lines) + "\n"


def read_records(paths: Iterable[str]) -> list[tuple[str, dict]]:
    """``(path, record)`` for each result file; UserError for a missing or non-JSON file."""
    out = []
    for path in paths:
        try:
            rec = read_json(path)
        except FileNotFoundError:
            raise UserError(f"no such result file: {path}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise UserError(f"{path} is not a result file (not JSON: {exc})") from None
        if not isinstance(rec, dict) or "rows" not in rec or "protocol" not in rec:
            raise UserError(f"{path} is not a compare/sweep result file (no rows and protocol); "
                            "give compare.json files")
        out.append((path, rec))
    return out


def only(records: list[tuple[str, dict]], model: str | None = None, pruner: str | None = None,
         sparsity: float | None = None) -> list[tuple[str, dict]]:
    """The records with only the rows of this model, pruner and target sparsity (each
    optional; the dense row stays with its model)."""
    out = []
    for path, rec in records:
        if model is not None and rec.get("model") != model:
            continue
        rows = [r for r in rec["rows"] if r.get("label") == "dense" or (
            (pruner is None or (r.get("pruner") or {}).get("name") == pruner)
            and (sparsity is None or math.isclose(float(r.get("target_sparsity", -1)),
                                                  sparsity, abs_tol=1e-9)))]
        out.append((path, rec | {"rows": rows}))
    return out


def table(paths: list[str], *, style: str = "grid", variant: dict | None = None,
          defaults: dict | None = None, all_groups: bool = False,
          plot: str | Path | None = None, model: str | None = None, pruner: str | None = None,
          sparsity: float | None = None, min_settings: int = 1, min_seeds: int = 1) -> str:
    """The markdown of ``sparsealloc table``: the grid over all files, one table per file, the
    seeds summary, the frontier (with ``plot``: its allocations figure too), the across-settings
    recommendation or the correction's shift against the search, over the rows
    of ``model``, ``pruner`` and ``sparsity`` when given; the frontier tables keep the rows
    measured with ``min_seeds`` seeds at least, the across-settings summary the allocations
    measured in ``min_settings`` settings at least."""
    records = only(read_records(paths), model, pruner, sparsity)
    check(min_seeds == 1 or style == "frontier", "--min-seeds filters the frontier tables: use "
          "it with --style frontier")
    if style in ("frontier", "recommend", "shift", "coverage"):
        conflicts = "".join(f"{w}\n" for w in seed_conflicts(records))
        settings = frontier(records)
        if plot is not None:
            plot_frontier(settings, plot, labels=legend_labels)
        if style == "recommend":
            return conflicts + render_summary(summary(settings, defaults, min_settings))
        if style == "shift":
            return conflicts + render_shift(shift_summary(settings, defaults, min_settings))
        if style == "coverage":
            return conflicts + render_coverage(coverage(settings, defaults, min_settings))
        text = render_frontier(settings, defaults, min_seeds)
        if len(settings) > 1:
            text += "\n\n" + render_summary(summary(settings, defaults, min_settings))
        return conflicts + text
    check(min_settings == 1, "--min-settings filters the across-settings summaries: use it with "
          "--style frontier, recommend, shift or coverage")
    check(plot is None, "--plot draws the frontier figure: use it with --style frontier, "
          "recommend, shift or coverage")
    if style == "rows":
        return "\n".join(render_rows(path, rec) for path, rec in records)
    if style == "tuned":
        return render_tuned(tuned_choices(records))
    if style == "seeds":
        found: list[str] = []
        groups = collect_seeds(records, found)
        return "".join(f"{w}\n" for w in found) + render_seeds(summarise(groups), defaults)
    if style != "grid":
        raise UserError(f"--style must be grid, rows, seeds, frontier, recommend, shift, "
                        f"coverage or tuned (got {style!r})")
    warnings: list[str] = []
    groups = collect(records, variant or {}, defaults or {}, warnings)
    return "\n".join([*warnings, render_grid(groups, all_groups)])
