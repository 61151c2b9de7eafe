"""Do the allocators protect the blocks whose pruning hurts the output most?

The prune-mode probe (``sparsealloc probe --mode prune --kl``) measures, for every block l,
the KL divergence of the next-token distribution when block l alone is pruned at the target
sparsity (``final_kl``): a direct, data-driven measure of how much that block's pruning
damages the model. A good allocator gives *less* sparsity to blocks with *more* damage, so
the Spearman correlation between its per-block sparsity and the damage should be negative.

    python bench/allocation_vs_damage.py --probe results/probe-gemma-prune70/probe.json \
        --alloc runs/sweep-gemma-60.json [--alloc ...]

``--alloc`` takes an ``allocation.json`` (``sparsealloc allocate``), a ``compare.json`` or a
``bench/sweep.py`` output; every allocation in it that is not uniform is reported.
"""

from __future__ import annotations

import argparse
import json

from sparsealloc.report.frontier import spearman as rank_correlation


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rank correlation (NaN when either side is constant)."""
    rho = rank_correlation(a, b)
    return float("nan") if rho is None else rho


def allocations(path: str) -> dict[str, list[float]]:
    rec = json.load(open(path))
    if "allocations" in rec:  # allocation.json
        found = {k: v["block_sparsity"] for k, v in rec["allocations"].items()}
    else:  # compare.json / sweep output
        found = {r.get("label", r.get("allocation")): r["block_sparsity"]
                 for r in rec["rows"] if r.get("block_sparsity")}
    return {k: v for k, v in found.items() if max(v) - min(v) > 1e-9}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--probe", required=True, help="probe.json of a prune-mode probe with --kl")
    ap.add_argument("--alloc", action="append", required=True)
    args = ap.parse_args()
    probe = json.load(open(args.probe))
    key = probe["keys"][0]
    damage = probe["final_kl"][key]
    r_last = probe["absorption"]["last"][key]
    print(f"{probe['model']}: damage = KL when one block is pruned alone ({key})")
    print("damage per block: " + " ".join(f"{x:.3f}" for x in damage))
    print(f"spearman(r_l at last block, damage) = {spearman(r_last, damage):+.2f}")
    print()
    print("| allocation | blocks | spearman(sparsity, damage) | sparsity on the 3 most damaging"
          " blocks | mean sparsity |")
    print("|---|---|---|---|---|")
    top = sorted(range(len(damage)), key=lambda i: -damage[i])[:3]
    for path in args.alloc:
        for name, s in allocations(path).items():
            if len(s) != len(damage):
                continue
            on_top = " ".join(f"{s[i]:.2f} (b{i})" for i in top)
            print(f"| {name} | {len(s)} | {spearman(s, damage):+.2f} | {on_top} | "
                  f"{sum(s) / len(s):.3f} |")


if __name__ == "__main__":
    main()
