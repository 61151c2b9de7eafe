"""How each tuned row chose (``linear:auto``'s span, ``--absorb-gamma auto``'s gamma): the choice
of each rule (``min``, ``1se``) from the curve the row recorded, whichever rule it ran with.

A curve recorded with the tuning slice's window NLLs (from session 11 on) gives the paired
standard error of every point against the lowest (:func:`sparsealloc.tuning.choose`); older
curves have only perplexities and show ``-``. The evaluation perplexity of the 1se choice is
known when a row of the same seed measured it: the row itself, a row of the same allocation run
with the other rule, or for 0 the seed's uniform row (a span) or bare base row (a gamma).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable
from dataclasses import dataclass

from ..tuning import choose
from .seeds import base_of, rows_by_run, setting_of, sibling

CURVES = (("beta_curve", "span", "beta", "linear_beta_used", "linear_select"),
          ("gamma_curve", "gamma", "gamma", "absorb_gamma_used", "absorb_select"))
"""(recorded curve, value shown, value chosen on, recorded choice, rule option) of each tuned
option."""

@dataclass
class TunedChoice:
    setting: str
    allocation: str
    seed: int
    what: str  # "span" or "gamma"
    rule: str  # the rule the row ran with
    chosen: dict[str, float | None]  # rule -> value shown (1se: None without window NLLs)
    ppl: dict[str, float | None]  # rule -> evaluation perplexity of its choice, when measured
    margin: float | None = None  # tuning NLL of the 1se choice minus the lowest
    se: float | None = None  # its paired standard error against the lowest


def _main_ppl(row: dict) -> float:
    return float(next(iter(row["ppl"].values())))


def _options(key: tuple, drop: str) -> dict:
    return {k: v for k, v in json.loads(key[5]).items() if k != drop}


def tuned_choices(records: Iterable[tuple[str, dict]]) -> list[TunedChoice]:
    """One entry per tuned row and seed, in the order of the settings and seeds."""
    first: dict[tuple, dict] = {}
    for _, key, seed, row in rows_by_run(records):
        first.setdefault((key, seed), row)
    out = []
    for (key, seed), row in sorted(first.items(), key=lambda kv: (kv[0][0][:5], kv[0][1],
                                                                  kv[0][0][4], kv[0][0][5])):
        opts = (row.get("allocation_details") or {}).get("options") or {}
        for curve_key, shown, on, used, rule_key in CURVES:
            if not opts.get(curve_key):
                continue
            curve = copy.deepcopy(opts[curve_key])
            shown_of = {c[on]: c[shown] for c in curve}
            values: dict[str, float | None] = {"min": choose(curve, on, "min"), "1se": None}
            entry = TunedChoice(setting=f"{key[0]} {key[1]} {key[2]:.0%}", allocation=key[4],
                                seed=seed, what=shown, rule=opts.get(rule_key, "min"),
                                chosen={}, ppl={})
            if all("tune_window_nll" in c for c in curve):
                values["1se"] = choose(curve, on, "1se")
                point = next(c for c in curve if c[on] == values["1se"])
                entry.margin = point["tune_nll"] - min(c["tune_nll"] for c in curve)
                entry.se = point["tune_se"]
            for rule, value in values.items():
                entry.chosen[rule] = None if value is None else shown_of[value]
                entry.ppl[rule] = None if value is None else _known_ppl(
                    first, key, seed, value, on, used, rule_key)
            out.append(entry)
    return out


def _known_ppl(first: dict, key: tuple, seed: int, value: float, on: str, used: str,
               rule_key: str) -> float | None:
    """The evaluation perplexity of the tuned value ``value`` in this setting and seed, when a
    row measured it: a row of the same allocation and options (whatever its rule) that chose
    it, or for 0 the row without the tuned shift (uniform for a span, the bare base for a
    gamma) with the row's options."""
    mine = _options(key, rule_key)
    same = [(k, r) for (k, s), r in first.items()
            if s == seed and setting_of(k) == setting_of(key)]
    for k, r in same:
        theirs = (r.get("allocation_details") or {}).get("options") or {}
        if k[4] == key[4] and _options(k, rule_key) == mine and theirs.get(used) == value:
            return _main_ppl(r)
    if value != 0:
        return None
    target = "uniform" if on == "beta" and base_of(key[4]) is None else base_of(key[4])
    found = sibling(dict(same), key, target)  # the row without the shift, with the row's options
    return None if found is None else _main_ppl(found)


def _num(x: float | None, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def render_tuned(entries: list[TunedChoice]) -> str:
    """The markdown table of :func:`tuned_choices`."""
    if not entries:
        return "(no tuned rows: linear:auto or --absorb-gamma auto)"
    lines = ["| setting | row | seed | rule run | by min | by 1se | tuning NLL of the 1se choice "
             "(vs lowest ± s.e.) | ppl by min | ppl by 1se |",
             "|---|---|---|---|---|---|---|---|---|"]
    for e in entries:
        margin = "-" if e.margin is None else f"{e.margin:+.4f} ± {e.se:.4f}"
        lines.append(f"| {e.setting} | {e.allocation} | {e.seed} | {e.rule} | "
                     f"{e.what} {e.chosen['min']:.3g} | {_num(e.chosen['1se'], '.3g')} | "
                     f"{margin} | {_num(e.ppl['min'], '.1f')} | {_num(e.ppl['1se'], '.1f')} |")
    known = [e for e in entries if e.chosen["1se"] is not None]
    moved = [e for e in known if e.chosen["1se"] != e.chosen["min"]]
    both = [e for e in moved if e.ppl["min"] is not None and e.ppl["1se"] is not None]
    lines += ["", f"{len(known)} of {len(entries)} tuned rows recorded window NLLs; the 1se rule "
              f"chooses differently in {len(moved)} of them"
              + (f", and where both choices were evaluated ({len(both)}) changes the "
                 "perplexity by " + ", ".join(f"{e.ppl['1se'] / e.ppl['min'] - 1:+.1%}"
                                             for e in both) if both else "") + "."]
    return "\n".join(lines)
