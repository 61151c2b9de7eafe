"""Rows over calibration seeds: mean and spread of each row, paired changes with standard errors.

A row is identified by its model, pruner, target sparsity, pattern, allocation spec and the
options it depended on, and by the protocol apart from the seed (calibration and evaluation
windows). For each such row and each seed it was run with, the main perplexity is kept;
a change (an ``+absorb`` row against its base, any row against uniform) is computed per seed
on the same seed's pair and summarised by its mean and standard error over seeds
(``sd / sqrt(n)``): the calibration sample moves both rows of a pair together, so the paired
change is far steadier than either row.
"""

from __future__ import annotations

import json
import math
import statistics
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import TypeVar

from ..allocation.options import set_options

T = TypeVar("T")

PROTOCOL_KEYS = ("nsamples", "seqlen", "calib", "eval_seqlen", "eval_tokens", "bos_per_window")


def row_key(model: str, proto: dict, row: dict) -> tuple:
    details = row.get("allocation_details") or {}
    opts = set_options(details.get("options") or {})
    return (model, row["pruner"]["name"], row["target_sparsity"], row.get("pattern",
            "unstructured"), row["allocation"], json.dumps(opts, sort_keys=True),
            tuple(bool(proto.get(k)) if k == "bos_per_window" else proto.get(k)
                  for k in PROTOCOL_KEYS))


def seeded_rows(records: Iterable[tuple[str, dict]]) -> Iterator[tuple[tuple, int, dict]]:
    """``(row key, seed, row)`` of every evaluated, non-diverged pruned row of the records."""
    for _, rec in records:
        proto = rec["protocol"]
        for r in rec["rows"]:
            if r.get("label") == "dense" or not r.get("ppl") or r.get("status") == "diverged":
                continue
            seed = int(r.get("seed", proto.get("seed", 0)))
            yield row_key(rec["model"], proto, r), seed, r


def setting_of(key: tuple) -> tuple:
    """The setting of a row key: model, pruner, sparsity, pattern and protocol."""
    return key[:4] + (key[6],)


def rows_by_run(records: Iterable[tuple[str, dict]]) -> list[tuple[str, tuple, int, dict]]:
    """``(path, row key, seed, row)`` of every :func:`seeded_rows` row, ordered so that, for each
    setting and seed, the rows of the file holding the most rows of that setting and seed come
    first (ties: the order given). Taking the first value of each row and seed then keeps a
    seed's rows from one run wherever that run has them, so a paired change compares two rows
    of the same run rather than a row of one run with the base of an older one."""
    items = [(path, key, seed, r) for path, rec in records
             for key, seed, r in seeded_rows([(path, rec)])]
    count = Counter((setting_of(key), seed, path) for path, key, seed, _ in items)
    return sorted(items, key=lambda it: -count[(setting_of(it[1]), it[2], it[0])])


def collect_seeds(records: Iterable[tuple[str, dict]],
                  conflicts: list[str] | None = None) -> dict[tuple, dict[int, float]]:
    """``{row key: {seed: main perplexity}}`` over compare records. A row seen twice with the
    same seed should agree; the value kept is the one of the run (file) holding the most rows of
    that setting and seed (:func:`rows_by_run`), and ``conflicts`` (when given) gets one
    markdown comment per other value that differs (another thread count, code version or a
    setting not recorded)."""
    out: dict[tuple, dict[int, float]] = {}
    source: dict[tuple, str] = {}
    for path, key, seed, r in rows_by_run(records):
        ppl = next(iter(r["ppl"].values()))
        kept = out.setdefault(key, {}).setdefault(seed, ppl)
        first = source.setdefault((key, seed), path)
        if conflicts is not None and not math.isclose(kept, ppl, rel_tol=1e-6):
            conflicts.append(f"<!-- warning: {key[0]} {key[1]} {key[2]:.0%} {key[4]} seed "
                             f"{seed}: {kept:.4f} kept ({first}), {ppl:.4f} in {path} "
                             "differs -->")
    return out


def seed_conflicts(records: Iterable[tuple[str, dict]]) -> list[str]:
    """The :func:`collect_seeds` conflicts of ``records``."""
    found: list[str] = []
    collect_seeds(records, found)
    return found


def spread(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    mean = sum(values) / len(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return mean, sd


def paired(row: dict[int, float], base: dict[int, float]) -> dict | None:
    """Per-seed relative change ``row / base - 1`` on the seeds both have: mean, s.e., n."""
    seeds = sorted(set(row) & set(base))
    if not seeds:
        return None
    changes = [row[s] / base[s] - 1.0 for s in seeds]
    mean, sd = spread(changes)
    return {"mean": mean, "se": sd / math.sqrt(len(changes)) if len(changes) > 1 else None,
            "n": len(changes), "seeds": seeds, "changes": changes}


def sibling(groups: dict[tuple, T], key: tuple, allocation: str) -> T | None:
    """The row ``allocation`` of the same setting whose options the row shares (its base)."""
    mine = json.loads(key[5])
    for k, v in groups.items():
        if setting_of(k) == setting_of(key) and k[4] == allocation:
            theirs = json.loads(k[5])
            if all(mine.get(o) == theirs[o] for o in theirs):
                return v
    return None


def summarise(groups: dict[tuple, dict[int, float]]) -> list[dict]:
    """One entry per row: its mean and sd over seeds, its change against uniform and, for a
    ``+absorb`` row, against its base (both paired per seed)."""
    return [summarise_one(groups, key) for key in sorted(groups, key=lambda k: k[:5])]


def base_of(allocation: str) -> str | None:
    """The base allocation of an ``+absorb`` row (None for any other row)."""
    return allocation[: -len("+absorb")] if allocation.endswith("+absorb") else None


def summarise_one(groups: dict[tuple, dict[int, float]], key: tuple) -> dict:
    """The :func:`summarise` entry of the row ``key``."""
    by_seed = groups[key]
    model, pruner, target, pattern, allocation, opts, proto = key
    mean, sd = spread(list(by_seed.values()))
    entry = {"model": model, "pruner": pruner, "target_sparsity": target,
             "pattern": pattern, "allocation": allocation, "options": json.loads(opts),
             "seeds": sorted(by_seed), "ppl_mean": mean, "ppl_sd": sd,
             "ppl_by_seed": {str(s): v for s, v in sorted(by_seed.items())}}
    uniform = sibling(groups, key, "uniform")
    if allocation != "uniform" and uniform is not None:
        entry["vs_uniform"] = paired(by_seed, uniform)
    base = base_of(allocation)
    if base is not None:
        found = sibling(groups, key, base)
        if found is not None:
            entry["vs_base"] = paired(by_seed, found)
    return entry


def significant(c: dict | None) -> bool:
    """A paired change larger than twice its (nonzero) standard error."""
    return bool(c and c.get("se") and abs(c["mean"]) > 2 * c["se"])


def format_change(c: dict | None) -> str:
    """``+x.x% ± y.y%`` (``*``: beyond twice its standard error), ``-`` when absent."""
    if not c:
        return "-"
    se = f" ± {c['se']:.1%}" if c.get("se") is not None else ""
    flag = " *" if significant(c) else ""
    return f"{c['mean']:+.1%}{se}{flag}"


def options_text(entry: dict, defaults: dict | None) -> str:
    """The options of a row that differ from the defaults (how variants of a spec differ)."""
    if not defaults:
        return ""
    diff = [f"{k}={v}" for k, v in sorted(entry["options"].items())
            if k in defaults and not same_value(v, defaults[k])]
    return f" ({', '.join(diff)})" if diff else ""


def differing_options(options: list[dict]) -> list[str]:
    """The keys, sorted, in which the option dicts differ: a value, or present in one and
    absent from another."""
    keys = sorted({k for opts in options for k in opts})
    first = options[0]
    return [k for k in keys if any(k not in opts or k not in first
                                   or not same_value(opts[k], first[k]) for opts in options)]


def group_differences(names: list[str], options: list[dict]) -> list[list[str]]:
    """For each row, the option keys (:func:`differing_options`) in which the rows sharing its
    name differ; ``[]`` for a row whose name no other row has."""
    groups: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        groups.setdefault(name, []).append(i)
    out: list[list[str]] = [[] for _ in names]
    for members in groups.values():
        if len(members) > 1:
            differ = differing_options([options[i] for i in members])
            for i in members:
                out[i] = differ
    return out


def row_labels(entries: list[dict], defaults: dict | None) -> list[str]:
    """Each entry's allocation and :func:`options_text`; rows that would read the same (one
    recorded an option the other predates, or differs only in an option without a default) also
    show the options in which they differ (``key=absent`` where a row lacks one)."""
    labels = [e["allocation"] + options_text(e, defaults) for e in entries]
    differs = group_differences(labels, [e["options"] for e in entries])
    out = []
    for label, e, differ in zip(labels, entries, differs, strict=True):
        opts = e["options"]
        extra = ", ".join(f"{k}={opts[k] if k in opts else 'absent'}" for k in differ)
        if not extra:
            out.append(label)
        elif label.endswith(")"):
            out.append(label[:-1] + f"; {extra})")
        else:
            out.append(f"{label} ({extra})")
    return out


def same_value(a, b) -> bool:
    """Equal option values as recorded (numbers to 1e-9 relative, lists item by item, a JSON
    list equal to the tuple it was written from)."""
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(float(a), float(b), rel_tol=1e-9)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(same_value(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def render_seeds(entries: list[dict], defaults: dict | None = None) -> str:
    """Markdown: each row's mean ± sd over seeds and its paired changes (mean ± s.e.; ``*``:
    larger than twice its standard error). With ``defaults``, a row's options that differ
    from them are shown next to its allocation."""
    lines = ["| model | pruner | sparsity | allocation | seeds | ppl mean ± sd | vs uniform "
             "(paired) | +absorb vs base (paired) |", "|---|---|---|---|---|---|---|---|"]
    for e, label in zip(entries, row_labels(entries, defaults), strict=True):
        lines.append(
            f"| {e['model']} | {e['pruner']} | {e['target_sparsity']:.0%}"
            + (f" {e['pattern']}" if e["pattern"] != "unstructured" else "")
            + f" | {label} | {len(e['seeds'])} | "
              f"{e['ppl_mean']:.1f} ± "
              f"{e['ppl_sd']:.1f} | {format_change(e.get('vs_uniform'))} | "
              f"{format_change(e.get('vs_base'))} |")
    return "\n".join(lines)
