"""One table over many comparison runs: the paper's rows per (model, pruner, sparsity).

    python bench/grid_table.py results/*/compare.json results/sweep-*.json [--final damage]

Reads ``compare.json`` files (``sparsealloc compare``) and ``bench/sweep.py`` outputs and
merges every row that shares a model, pruner, sparsity and protocol. Rows are picked by the
options recorded with them, never by label: base rows (uniform, OWL, AlphaPruning) only at the
default allocator hyperparameters, ``+absorb`` rows only when their correction settings match
the variant asked for (``--mode``, ``--final``, ``--gamma``; defaults: the library's). A row
found in several files must agree (runs are deterministic); the first one is used. Prints the
markdown table (perplexity of the first corpus; each ``+absorb`` row with its relative change
against its base) and the mean change over all pairs.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics

from sparsealloc.allocate import AllocationOptions
from sparsealloc.correction import parse_gamma

BASES = ("uniform", "owl", "alpha")
COLUMNS = ("uniform", "uniform+absorb", "owl", "owl+absorb", "alpha", "alpha+absorb")
_DEFAULTS = AllocationOptions()
_BASE_KEYS = {"owl": ("owl_m", "owl_lambda"), "alpha": ("alpha_eps",), "uniform": ()}
# correction settings that must be at their defaults for a row to count as the named variant
_FIXED = ("absorb_clip", "absorb_budget", "absorb_positions", "absorb_scale")


def _same(a, b) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(float(a), float(b), rel_tol=1e-9)
    return str(a) == str(b)


def row_name(row: dict, variant: dict) -> str | None:
    """The table column a row belongs to, or None when its options are not the ones asked for."""
    details = row.get("allocation_details") or {}
    spec = details.get("spec", row.get("allocation", ""))
    opts = details.get("options") or {}
    base, _, absorb = spec.partition("+")
    if base not in BASES or absorb not in ("", "absorb"):
        return None
    if any(k in opts and not _same(opts[k], getattr(_DEFAULTS, k)) for k in _BASE_KEYS[base]):
        return None
    if not absorb:
        return base
    if any(k in opts and not _same(opts[k], getattr(_DEFAULTS, k)) for k in _FIXED):
        return None
    if any(not _same(opts.get(k, getattr(_DEFAULTS, k)), v) for k, v in variant.items()):
        return None
    return spec


def collect(paths: list[str], variant: dict) -> dict[tuple, dict]:
    groups: dict[tuple, dict] = {}
    dense_of: dict[tuple, float] = {}  # dense perplexity depends on the evaluation windows only
    for path in paths:
        rec = json.load(open(path))
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
            name = row_name(r, variant) if r.get("label") != "dense" and r.get("ppl") else None
            if name is None:
                continue
            key = (rec["model"], r["pruner"]["name"], r["target_sparsity"], proto["nsamples"],
                   proto["seqlen"], proto.get("eval_tokens"), bool(proto.get("bos_per_window")))
            g = groups.setdefault(key, {"dense": None, "eval_key": eval_key, "sources": []})
            if path not in g["sources"]:
                g["sources"].append(path)
            ppl = next(iter(r["ppl"].values()))
            if name in g and not math.isclose(g[name], ppl, rel_tol=1e-6):
                print(f"<!-- warning: {key} {name}: {g[name]:.4f} kept, {ppl:.4f} in {path} "
                      f"differs (a setting not filtered on, e.g. absorb_nsamples) -->")
            g.setdefault(name, ppl)
    for g in groups.values():
        g["dense"] = dense_of.get(g.pop("eval_key"))
    return groups


def render(groups: dict[tuple, dict], all_groups: bool = False) -> str:
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="+")
    ap.add_argument("--mode", default=_DEFAULTS.absorb_mode, help="absorb_mode of +absorb rows")
    ap.add_argument("--final", default=_DEFAULTS.absorb_final, help="absorb_final of +absorb rows")
    ap.add_argument("--gamma", default=str(_DEFAULTS.absorb_gamma),
                    help="absorb_gamma of +absorb rows (a number or auto)")
    ap.add_argument("--absorb-nsamples", type=int, default=None,
                    help="only +absorb rows whose probe used this many sequences")
    ap.add_argument("--all", action="store_true",
                    help="also settings without a +absorb row (baselines only)")
    args = ap.parse_args()
    variant = {"absorb_mode": args.mode, "absorb_final": args.final,
               "absorb_gamma": parse_gamma(args.gamma)}
    if args.absorb_nsamples is not None:
        variant["absorb_nsamples"] = args.absorb_nsamples
    print(render(collect(args.files, variant), args.all))


if __name__ == "__main__":
    main()
