"""One table over many comparison runs: the paper's five rows per (model, pruner, sparsity).

    python bench/grid_table.py runs/cmp-*/compare.json runs/sweep-smollm2-70.json [...]

Reads ``compare.json`` files (``sparsealloc compare``) and ``bench/sweep.py`` outputs. In a
sweep, the rows used are those labelled exactly ``uniform``, ``owl``, ``alpha`` and the
``+absorb`` rows whose label is given with ``--absorb-label`` (default: the prune-mode rows of
RESULTS.md). Prints the markdown table (perplexity of the first corpus, relative change of
each +absorb row against its base) and the mean change over all pairs.
"""

from __future__ import annotations

import argparse
import json

BASES = ("uniform", "owl", "alpha")


def _rows_of(path: str, absorb_labels: dict[str, str]) -> list[dict]:
    """(model, pruner, sparsity, protocol) -> {allocation: ppl} entries of one file."""
    rec = json.load(open(path))
    proto = rec["protocol"]
    dense = None
    if rec.get("dense"):
        dense = next(iter(rec["dense"]["ppl"].values()))
    groups: dict[tuple, dict] = {}
    rows = rec["rows"]
    for r in rows:
        if r.get("label") == "dense":
            dense = next(iter(r["ppl"].values()))
    for r in rows:
        if r.get("label") == "dense" or not r.get("ppl"):
            continue
        alloc = r["allocation"]
        if "sweep" in path or "options_given" in r:  # sweep: pick the rows by label
            label = r["label"]
            if label in BASES:
                name = label
            elif absorb_labels.get(label):
                name = absorb_labels[label]
            else:
                continue
        else:
            name = alloc
        key = (rec["model"], r["pruner"]["name"], r["target_sparsity"], proto["nsamples"],
               proto["seqlen"], proto.get("eval_tokens"))
        groups.setdefault(key, {"dense": dense, "source": path})[name] = \
            next(iter(r["ppl"].values()))
    return [{"key": k, **v} for k, v in groups.items()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="+")
    ap.add_argument("--absorb-label", action="append", default=[],
                    help="LABEL=owl+absorb: a sweep row to use as that +absorb row")
    args = ap.parse_args()
    absorb_labels = {"owl+absorb prune g=.04": "owl+absorb",
                     "alpha+absorb prune g=.04": "alpha+absorb"}
    for item in args.absorb_label:
        label, _, name = item.partition("=")
        absorb_labels[label] = name
    entries = [e for f in args.files for e in _rows_of(f, absorb_labels)]
    entries.sort(key=lambda e: (e["key"][0], e["key"][1], e["key"][2]))
    print("| model | pruner | sparsity | calib x len / eval tokens | dense | uniform | owl | "
          "owl+absorb | alpha | alpha+absorb |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    changes = []

    def cell(e, name):
        v = e.get(name)
        if v is None:
            return "-"
        base = name.removesuffix("+absorb")
        if name.endswith("+absorb") and e.get(base):
            c = v / e[base] - 1
            changes.append(c)
            return f"{v:.1f} ({c:+.1%})"
        return f"{v:.1f}"

    for e in entries:
        model, pruner, s, n, L, tok = e["key"]
        dense = f"{e['dense']:.2f}" if e.get("dense") else "-"
        cells = [cell(e, name) for name in
                 ("uniform", "owl", "owl+absorb", "alpha", "alpha+absorb")]
        print(f"| {model} | {pruner} | {s:.0%} | {n} x {L} / {tok} | {dense} | "
              + " | ".join(cells) + " |")
    if changes:
        print(f"\nMean change of +absorb against its base over {len(changes)} pairs: "
              f"{sum(changes) / len(changes):+.1%} (improved in "
              f"{sum(c < 0 for c in changes)} of {len(changes)}).")


if __name__ == "__main__":
    main()
