"""Summarise one or more probe.json files as markdown (the numbers quoted in FINDINGS.md).

    python bench/probe_summary.py runs/probe-smollm2-noise/probe.json [...]
"""

from __future__ import annotations

import json
import math
import sys


def _fmt(xs, spec=".2f"):
    return " ".join("nan" if x is None or (isinstance(x, float) and math.isnan(x))
                    else format(x, spec) for x in xs)


def summarise(path: str) -> str:
    rec = json.load(open(path))
    L = rec["num_blocks"]
    keys = rec["keys"]
    out = [f"### {rec['model']} ({path})", ""]
    cfg = rec["config"]
    out.append(f"mode {cfg['mode']}, positions {cfg['positions']}, scale {cfg['scale']}, "
               f"{rec['protocol']['sequences']} x {rec['protocol']['seqlen']} tokens, "
               f"draws {cfg['draws']}; cost {rec['cost']['seconds']:.0f} s, "
               f"{rec['cost']['ratio_to_default_calibration_pass']:.2f}x a default "
               "calibration pass")
    out.append("")
    for final, by_key in rec["absorption"].items():
        for k in keys:
            r = by_key[k]
            amp = [i for i, x in enumerate(r) if x > 1]
            out.append(f"- r_l ({final}, {k}): {_fmt(r)}  | amplifying blocks: "
                       f"{len(amp)}/{L} {amp if len(amp) < L else 'all'}")
    out.append("")
    for k in keys:
        inj = rec["injected_drift"][k]
        out.append(f"- injected drift R_l ({k}): {_fmt(inj, '.3g')}")
        d = rec["drift"][k]
        out.append(f"- drift from block 0 across depth ({k}): {_fmt(d[0], '.3g')}")
        dm = rec["drift"][k][L // 2]
        out.append(f"- drift from block {L // 2} ({k}): {_fmt(dm[L // 2:], '.3g')}")
        c = rec["cosine"][k]
        out.append(f"- cosine at the last block by injection block ({k}): "
                   f"{_fmt([c[l][L - 1] for l in range(L)], '.4f')}")
        s = rec["drift_skip_first"][k]
        f = rec["drift_first_token"][k]
        out.append(f"- final drift without position 0 ({k}): "
                   f"{_fmt([s[l][L - 1] for l in range(L)], '.3g')}")
        out.append(f"- final drift of position 0 only ({k}): "
                   f"{_fmt([f[l][L - 1] for l in range(L)], '.3g')}")
    out.append(f"- hidden-state norm, position 0: {_fmt(rec['hidden_norm_first_token'], '.0f')}")
    out.append(f"- hidden-state norm, median of the others: "
               f"{_fmt(rec['hidden_norm_others_median'], '.0f')}")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    for p in sys.argv[1:]:
        print(summarise(p))
