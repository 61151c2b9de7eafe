"""Render sweep JSON files (bench/sweep.py) as markdown tables, with each +absorb row's change
against its base row (the row labelled with the bare base allocation).

    python bench/sweep_table.py runs/sweep-smollm2-70.json [...]
"""

from __future__ import annotations

import json
import sys


def table(path: str) -> str:
    rec = json.load(open(path))
    p = rec["protocol"]
    lines = [f"### {rec['model']}, {rec['pruner']} {rec['sparsity']:.0%} ({path})", "",
             f"calibration {p['nsamples']} x {p['seqlen']} ({p['calib']}), perplexity on the first "
             f"{p['eval_tokens']} tokens in windows of {p['eval_seqlen']}", "",
             "| row | " + " | ".join(f"ppl {c}" for c in rec["rows"][0]["ppl"]) +
             " | vs base | block sparsity min-max |", "|---|---|---|---|"]
    base = {r["label"]: r for r in rec["rows"]}
    for r in rec["rows"]:
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


if __name__ == "__main__":
    for p in sys.argv[1:]:
        print(table(p))
