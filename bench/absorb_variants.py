"""Ablation of the absorption correction's open choices on one model, one shared Session.

For each variant (how r_l is measured) and each gamma, correct a base allocation, prune from
the dense weights and measure perplexity. Dense statistics, calibration activations and every
probe are computed once. Writes one JSON with every row (atomically).

Example (the reduced protocol of RESULTS.md):
    python bench/absorb_variants.py --model smollm2-135m --sparsity 0.7 --base owl \
        --variants noise-last,noise-norm,noise-kl,noise-skip,prune-last,prune-kl \
        --gammas -0.04,0.02,0.04,0.08 --out runs/variants-smollm2-70.json
"""

from __future__ import annotations

import argparse
import time

from sparsealloc.allocate import AllocationOptions, compute_allocation
from sparsealloc.io import write_json
from sparsealloc.pipeline import evaluate, peak_rss_mb, prune_with
from sparsealloc.protocol import EvalRequest, Protocol
from sparsealloc.session import Session

VARIANTS = {
    "noise-last": dict(absorb_mode="noise", absorb_final="last"),
    "noise-norm": dict(absorb_mode="noise", absorb_final="norm"),
    "noise-kl": dict(absorb_mode="noise", absorb_final="kl"),
    "noise-skip": dict(absorb_mode="noise", absorb_final="last", absorb_positions="skip-first"),
    "noise-skip-norm": dict(absorb_mode="noise", absorb_final="norm",
                            absorb_positions="skip-first"),
    "prune-last": dict(absorb_mode="prune", absorb_final="last"),
    "prune-norm": dict(absorb_mode="prune", absorb_final="norm"),
    "prune-kl": dict(absorb_mode="prune", absorb_final="kl"),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--sparsity", type=float, default=0.7)
    ap.add_argument("--pruner", default="wanda")
    ap.add_argument("--base", default="owl")
    ap.add_argument("--variants", default="noise-last,prune-kl")
    ap.add_argument("--gammas", default="0.04")
    ap.add_argument("--eta", type=float, default=1e-2)
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--eval-seqlen", type=int, default=1024)
    ap.add_argument("--eval-tokens", type=int, default=16384)
    ap.add_argument("--absorb-nsamples", type=int, default=4)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    proto = Protocol(nsamples=args.nsamples, seqlen=args.seqlen, eval_seqlen=args.eval_seqlen,
                     eval_tokens=args.eval_tokens, data_dir=args.data_dir)
    session = Session(args.model, proto, progress=False)
    request = EvalRequest(ppl=["wikitext2"])
    rows = []

    def run(label: str, spec: str, opts: AllocationOptions) -> None:
        t0 = time.perf_counter()
        alloc = compute_allocation(session, spec, args.sparsity, opts, args.pruner)
        rec = prune_with(session, args.pruner, "unstructured", alloc)
        rec.update(evaluate(session, request))
        rec["label"] = label
        rec["seconds"] = time.perf_counter() - t0
        rows.append(rec)
        print(f"{label:>32}: ppl {rec['ppl']['wikitext2']:.2f}  "
              f"blocks {min(alloc.block_sparsity):.3f}-{max(alloc.block_sparsity):.3f}",
              flush=True)

    run(args.base, args.base, AllocationOptions())
    for variant in args.variants.split(","):
        for gamma in [float(g) for g in args.gammas.split(",")]:
            opts = AllocationOptions(absorb_eta=args.eta, absorb_gamma=gamma,
                                     absorb_nsamples=args.absorb_nsamples, **VARIANTS[variant])
            run(f"{args.base}+absorb {variant} g={gamma:g}", f"{args.base}+absorb", opts)
    write_json(args.out, {
        "model": args.model, "sparsity": args.sparsity, "pruner": args.pruner,
        "base": args.base, "eta": args.eta, "protocol": proto.record() | {
            "data_sources": session.data_sources, "absorb_nsamples": args.absorb_nsamples},
        "rows": rows, "timings": session.timings, "peak_rss_mb": peak_rss_mb(),
    })


if __name__ == "__main__":
    main()
