"""Sweep allocation hyperparameters on one model with one shared Session.

Each ``--row`` is ``LABEL|ALLOCATION|key=value,key=value`` where the keys are fields of
``sparsealloc.allocate.AllocationOptions`` (owl_m, owl_lambda, alpha_eps, absorb_gamma, ...).
Dense statistics, calibration activations and probes are computed once; every row prunes
from the dense weights and is evaluated on the same windows. Writes one JSON (atomically).

Example (RESULTS.md, OWL hyperparameters on Gemma-3-270m at 60%):
    python bench/sweep.py --model gemma3-270m --sparsity 0.6 \
        --row "uniform|uniform|" --row "owl M5 l.08|owl|" --row "owl M3 l.08|owl|owl_m=3" \
        --row "owl M5 l.02|owl|owl_lambda=0.02" --out runs/sweep-gemma-owl60.json
"""

from __future__ import annotations

import argparse
import time

from sparsealloc.allocate import AllocationOptions, compute_allocation
from sparsealloc.io import write_json
from sparsealloc.pipeline import evaluate, peak_rss_mb, prune_with
from sparsealloc.protocol import EvalRequest, Protocol
from sparsealloc.session import Session


def parse_row(text: str) -> tuple[str, str, dict]:
    label, spec, opts = (text.split("|") + ["", ""])[:3]
    kw: dict = {}
    for item in filter(None, (p.strip() for p in opts.split(","))):
        key, _, value = item.partition("=")
        try:
            kw[key] = float(value) if key not in ("absorb_final", "absorb_mode", "absorb_budget",
                                                  "absorb_positions") else value
        except ValueError:
            kw[key] = value
        if key in ("absorb_nsamples", "absorb_draws"):
            kw[key] = int(float(value))
    return label.strip(), spec.strip(), kw


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--sparsity", type=float, default=0.7)
    ap.add_argument("--pruner", default="wanda")
    ap.add_argument("--row", action="append", required=True)
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--eval-seqlen", type=int, default=1024)
    ap.add_argument("--eval-tokens", type=int, default=16384)
    ap.add_argument("--ppl", default="wikitext2")
    ap.add_argument("--dense", action="store_true", help="also evaluate the dense model")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--bos-per-window", action="store_true",
                    help="every calibration and perplexity window starts with BOS")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    proto = Protocol(nsamples=args.nsamples, seqlen=args.seqlen, eval_seqlen=args.eval_seqlen,
                     eval_tokens=args.eval_tokens, data_dir=args.data_dir,
                     bos_per_window=args.bos_per_window)
    session = Session(args.model, proto, progress=False)
    request = EvalRequest(ppl=args.ppl.split(","))
    rows = []
    if args.dense:
        rows.append({"label": "dense", **evaluate(session, request)})
        print(f"{'dense':>32}: ppl {rows[-1]['ppl']}", flush=True)
    for text in args.row:
        label, spec, kw = parse_row(text)
        t0 = time.perf_counter()
        alloc = compute_allocation(session, spec, args.sparsity, AllocationOptions(**kw),
                                   args.pruner)
        rec = prune_with(session, args.pruner, "unstructured", alloc)
        rec.update(evaluate(session, request))
        rec.update(label=label, options_given=kw, seconds=time.perf_counter() - t0)
        rows.append(rec)
        save(args, proto, session, rows, complete=False)
        ppl = " ".join(f"{k} {v:.2f}" for k, v in rec["ppl"].items())
        print(f"{label:>32}: {ppl}  blocks {min(alloc.block_sparsity):.3f}-"
              f"{max(alloc.block_sparsity):.3f}", flush=True)
    save(args, proto, session, rows, complete=True)


def save(args, proto, session, rows, complete: bool) -> None:
    """Write every finished row (atomically); ``complete`` is false until the last one."""
    write_json(args.out, {
        "model": args.model, "sparsity": args.sparsity, "pruner": args.pruner,
        "protocol": proto.record() | {"data_sources": session.data_sources},
        "rows": rows, "complete": complete, "timings": session.timings,
        "peak_rss_mb": peak_rss_mb(),
    })


if __name__ == "__main__":
    main()
