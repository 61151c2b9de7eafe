"""How each tuned row chose (``linear:auto``'s span, ``--absorb-gamma auto``'s gamma): the choice
the row ran with beside the one-standard-error rule's, both from the curve the row recorded.

A curve recorded with the tuning slice's window NLLs (from session 11 on) gives the paired
standard error of every point against the lowest (:func:`sparsealloc.tuning.choose`); older
curves have only perplexities and show ``-``. The evaluation perplexity of the 1se choice is
known without another run when it is the row's own choice or 0: a span of 0 is uniform (the
seed's uniform row), a gamma of 0 the bare base (the seed's base row).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable
from dataclasses import dataclass

from ..tuning import choose
from .seeds import base_of, rows_by_run, setting_of

CURVES = (("beta_curve", "span", "beta", "linear_beta_used"),
          ("gamma_curve", "gamma", "gamma", "absorb_gamma_used"))
"""(recorded curve, value shown, value chosen on, recorded choice) of each tuned option."""


@dataclass
class TunedChoice:
    setting: str
    allocation: str
    seed: int
    what: str  # "span" or "gamma"
    chosen: float
    by_1se: float | None  # None: the curve has no window NLLs
    margin: float | None  # tuning NLL of the 1se choice minus the lowest
    se: float | None  # its paired standard error against the lowest
    ppl: float
    ppl_1se: float | None  # the 1se choice's evaluation perplexity, when the run measured it


def _main_ppl(row: dict) -> float:
    return float(next(iter(row["ppl"].values())))


def tuned_choices(records: Iterable[tuple[str, dict]]) -> list[TunedChoice]:
    """One entry per tuned row and seed, in the order of the settings and seeds."""
    items = rows_by_run(records)
    first: dict[tuple, dict] = {}
    for _, key, seed, row in items:
        first.setdefault((key, seed), row)
    out = []
    for (key, seed), row in sorted(first.items(), key=lambda kv: (kv[0][0][:5], kv[0][1])):
        opts = (row.get("allocation_details") or {}).get("options") or {}
        for curve_key, shown, on, used in CURVES:
            if not opts.get(curve_key):
                continue
            curve = copy.deepcopy(opts[curve_key])
            chosen = float(opts[used])
            shown_of = {c[on]: c[shown] for c in curve}
            entry = TunedChoice(
                setting=f"{key[0]} {key[1]} {key[2]:.0%}", allocation=key[4], seed=seed,
                what=shown, chosen=shown_of.get(chosen, chosen), by_1se=None, margin=None,
                se=None, ppl=_main_ppl(row), ppl_1se=None)
            if all("tune_window_nll" in c for c in curve):
                value = choose(curve, on, "1se")
                point = next(c for c in curve if c[on] == value)
                low = min(c["tune_nll"] for c in curve)
                entry.by_1se, entry.margin, entry.se = (
                    point[shown], point["tune_nll"] - low, point["tune_se"])
                entry.ppl_1se = _known_ppl(first, key, seed, row, value, chosen, on)
            out.append(entry)
    return out


def _known_ppl(first: dict, key: tuple, seed: int, row: dict, value: float, chosen: float,
               on: str) -> float | None:
    """The evaluation perplexity of the value ``value``, when a row of the run measured it."""
    if value == chosen:
        return _main_ppl(row)
    if value != 0:
        return None
    target = "uniform" if on == "beta" and base_of(key[4]) is None else base_of(key[4])
    mine = json.loads(key[5])
    for (k, s), r in first.items():
        if s == seed and setting_of(k) == setting_of(key) and k[4] == target:
            theirs = json.loads(k[5])
            if all(mine.get(o) == theirs[o] for o in theirs):  # the base with the row's options
                return _main_ppl(r)
    return None


def _num(x: float | None, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def render_tuned(entries: list[TunedChoice]) -> str:
    """The markdown table of :func:`tuned_choices`."""
    if not entries:
        return "(no tuned rows: linear:auto or --absorb-gamma auto)"
    head = ("| setting | row | seed | chosen (min) | ppl | by 1se | tuning NLL margin ± s.e. | "
            "ppl of the 1se choice |\n|---|---|---|---|---|---|---|---|")
    lines = [head]
    for e in entries:
        margin = "-" if e.margin is None else f"{e.margin:+.4f} ± {e.se:.4f}"
        lines.append(f"| {e.setting} | {e.allocation} | {e.seed} | {e.what} {e.chosen:.3g} | "
                     f"{e.ppl:.1f} | {_num(e.by_1se, '.3g')} | {margin} | "
                     f"{_num(e.ppl_1se, '.1f')} |")
    known = [e for e in entries if e.by_1se is not None]
    moved = [e for e in known if e.by_1se != e.chosen]
    lines.append("")
    lines.append(f"{len(known)} of {len(entries)} tuned rows recorded window NLLs; the 1se rule "
                 f"chooses differently in {len(moved)} of them.")
    return "\n".join(lines)
