"""The frontier table: every row against a searched allocation of the same setting.

A setting is a model, pruner, target sparsity, pattern and protocol (seed aside). Its reference
is the row whose allocation spec starts with ``search`` (the EvoPress-style search; one seed is
enough); of several searched rows (other starts, budgets or options), the one of lowest mean
perplexity, the best allocation found. For every row of the setting: its perplexity over seeds
and paired changes (:mod:`.seeds`), the L1 distance of its allocation (mean over its seeds)
from the searched one, ``sum_l |s_l - s*_l|``, and, for an ``+absorb`` row, the Spearman rank
correlation over blocks between the correction's shift (``+absorb`` minus its base) and the
searched allocation minus the same base: positive when the correction moves the base toward the
searched optimum, block by block.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence

from ..errors import check
from .seeds import (
    PROTOCOL_KEYS,
    base_of,
    collect_seeds,
    format_change,
    group_differences,
    row_labels,
    rows_by_run,
    setting_of,
    sibling,
    summarise_one,
)


def collect_allocations(records: Iterable[tuple[str, dict]]) -> dict[tuple, dict[int, list]]:
    """``{row key: {seed: block sparsities}}`` over compare records (as :func:`collect_seeds`)."""
    out: dict[tuple, dict[int, list]] = {}
    for _, key, seed, r in rows_by_run(records):
        if r.get("block_sparsity"):
            out.setdefault(key, {}).setdefault(seed, [float(v) for v in r["block_sparsity"]])
    return out


def mean_allocation(by_seed: dict[int, list]) -> list[float]:
    """Block by block mean over the seeds."""
    rows = list(by_seed.values())
    return [sum(col) / len(rows) for col in zip(*rows, strict=True)]


def l1(a: Sequence[float], b: Sequence[float]) -> float:
    """``sum |a_l - b_l|``."""
    return sum(abs(x - y) for x, y in zip(a, b, strict=True))


def _ranks(values: Sequence[float]) -> list[float]:
    """Ranks from 1, ties given their average rank."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman's rank correlation (Pearson on average ranks); None when either is constant."""
    if len(x) != len(y):
        raise ValueError(f"{len(x)} and {len(y)} values")
    rx, ry = _ranks(x), _ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    sxx = sum((a - mx) ** 2 for a in rx)
    syy = sum((b - my) ** 2 for b in ry)
    return None if sxx == 0 or syy == 0 else sxy / math.sqrt(sxx * syy)


def shares_search_shift(search_key: tuple, key: tuple) -> bool:
    """Did the search ``search_key`` start from an allocation corrected with the same
    coefficients as the ``+absorb`` row ``key`` (``search:X+absorb``, equal ``absorb_*``
    options)? The correction's shift depends on the coefficients, not on the base, so then
    search minus the row's base contains (about) the row's own shift, and the Spearman of that
    row is not an independent test."""
    if not (search_key[4].startswith("search:") and search_key[4].endswith("+absorb")
            and key[4].endswith("+absorb")):
        return False
    mine, theirs = json.loads(key[5]), json.loads(search_key[5])
    names = {k for k in (*mine, *theirs) if k.startswith("absorb_")}
    return all(mine.get(k) == theirs.get(k) for k in names)


def frontier(records: list[tuple[str, dict]]) -> list[dict]:
    """One entry per setting: its rows (:func:`~.seeds.summarise_one` entries with
    ``allocation_mean``, ``l1_from_search`` and, for ``+absorb`` rows, ``spearman_to_search``)
    and the searched reference's key fields (``search``: None when the setting has none)."""
    ppl = collect_seeds(records)
    allocs = collect_allocations(records)
    settings: dict[tuple, list[tuple]] = {}
    for key in sorted(ppl, key=lambda k: (k[:4], str(k[6]))):
        settings.setdefault(setting_of(key), []).append(key)
    out = []
    for setting, keys in settings.items():
        searched = sorted((k for k in keys if k[4].startswith("search")),
                          key=lambda k: (math.fsum(ppl[k].values()) / len(ppl[k]),
                                         k[4] != "search", k[4], str(k[5])))
        reference = mean_allocation(allocs[searched[0]]) if searched and searched[0] in allocs \
            else None
        rows = []
        for key in keys:
            entry = summarise_one(ppl, key)
            alloc = mean_allocation(allocs[key]) if key in allocs else None
            entry["allocation_mean"] = alloc
            entry["searched_reference"] = bool(searched) and key == searched[0]
            if reference is not None and alloc is not None:
                entry["l1_from_search"] = l1(alloc, reference)
                base = base_of(key[4])
                found = sibling(allocs, key, base) if base is not None else None
                if found is not None:
                    base_alloc = mean_allocation(found)
                    entry["spearman_to_search"] = spearman(
                        [a - b for a, b in zip(alloc, base_alloc, strict=True)],
                        [r - b for r, b in zip(reference, base_alloc, strict=True)])
                    entry["shares_search_shift"] = shares_search_shift(searched[0], key)
            rows.append(entry)
        model, pruner, target, pattern, proto = setting
        out.append({"model": model, "pruner": pruner, "target_sparsity": target,
                    "pattern": pattern, "protocol": dict(zip(PROTOCOL_KEYS, proto, strict=True)),
                    "search": searched[0][4] if searched else None, "rows": rows})
    return out


def render_frontier(settings: list[dict], defaults: dict | None = None,
                    min_seeds: int = 1) -> str:
    """Markdown: one table per setting, rows by mean perplexity; rows measured with fewer than
    ``min_seeds`` calibration seeds are left out (and counted), except uniform and searched
    rows (a search is one seed)."""
    check(min_seeds >= 1, f"--min-seeds must be at least 1 (got {min_seeds})")
    blocks = []
    for s in settings:
        p = s["protocol"]
        head = (f"**{s['model']}, {s['pruner']} {s['target_sparsity']:.0%}"
                + (f" {s['pattern']}" if s["pattern"] != "unstructured" else "")
                + f"** ({p['nsamples']} x {p['seqlen']} {p['calib']} calibration, "
                  f"{p['eval_tokens'] or 'all'} evaluation tokens in windows of "
                  f"{p['eval_seqlen']}); reference: `{s['search'] or 'no search row'}`")
        lines = [head, "", "| allocation | seeds | ppl mean ± sd | vs uniform (paired) | "
                 "+absorb vs base (paired) | L1 from search | Spearman(shift, search - base) |",
                 "|---|---|---|---|---|---|---|"]
        shown = [e for e in s["rows"] if len(e["seeds"]) >= min_seeds
                 or e["allocation"] == "uniform" or e["allocation"].startswith("search")]
        ordered = sorted(shown, key=lambda e: e["ppl_mean"])
        for e, label in zip(ordered, row_labels(ordered, defaults), strict=True):
            rho = e.get("spearman_to_search")
            dist = e.get("l1_from_search")
            mark = " †" if e.get("shares_search_shift") else ""
            lines.append(
                f"| {label} | {len(e['seeds'])} | "
                f"{e['ppl_mean']:.1f} ± {e['ppl_sd']:.1f} | {format_change(e.get('vs_uniform'))}"
                f" | {format_change(e.get('vs_base'))} | "
                f"{'-' if dist is None else f'{dist:.2f}'} | "
                f"{'-' if rho is None else f'{rho:+.2f}'}{mark} |")
        if any(e.get("shares_search_shift") for e in shown):
            lines += ["", "† the search started from an allocation corrected with this row's "
                      "coefficients, so search - base contains about the row's own shift: not an "
                      "independent test."]
        if len(shown) < len(s["rows"]):
            lines += ["", f"{len(s['rows']) - len(shown)} row(s) with fewer than {min_seeds} "
                      "seeds left out (`--min-seeds`)."]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def legend_labels(rows: list[dict]) -> list[str]:
    """Short names for a figure's legend: each row's allocation, and where two rows share it
    (``linear:auto`` and its ``linear_select=1se`` variant, OWL+absorb with either coefficient)
    the options in which they differ that the row has; a row with none keeps the bare name."""
    names = [e["allocation"] for e in rows]
    out = []
    for name, e, differ in zip(names, rows, group_differences(names, [e["options"] for e in rows]),
                               strict=True):
        shown = ", ".join(f"{k}={e['options'][k]}" for k in differ if k in e["options"])
        out.append(f"{name} ({shown})" if shown else name)
    return out
