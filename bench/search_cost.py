"""What a search row of ``compare`` cost, against one prune of the same model in the same run.

Reads compare.json files and prints one markdown table: for every row whose allocation is a
search, the level database (seconds, entries built or reused from the cache, size), the search
(seconds, of which the held-out check), the prune of the searched allocation in the same run,
and each as a multiple of that prune (the figures quoted in BENCHMARKS.md). A search resumed from
an earlier process's progress, or a database taken from the cache, says so: its seconds then
cover only the part this process did, not what a search costs.

    python bench/search_cost.py results/frontier/*-search*/compare.json
"""

from __future__ import annotations

import json
import sys


def rows(path: str) -> list[str]:
    rec = json.load(open(path))
    out = []
    for row in rec["rows"]:
        search = (row.get("allocation_details") or {}).get("options", {}).get("search")
        if not search:
            continue
        cost, prune = search["cost"], row["prune_seconds"]
        holdout = cost.get("holdout_seconds")  # absent before the held-out check existed
        check = "no held-out check" if holdout is None else f"held-out check {holdout:.0f}"
        built, reused = cost["database_entries_built"], cost["database_entries_reused"]
        db = (f"{cost['database_seconds']:.0f} ({built} built, {reused} cached, "
              f"{cost['database_bytes'] / 2**20:.0f} MiB)")
        gens = search["config"]["generations"]
        resumed = search.get("resumed_at_generation")
        if resumed:  # the generations before it ran in an earlier process: not this cost
            check += f"; resumed at generation {resumed}, earlier generations not timed"
        if reused:
            check += "; database entries from the cache not timed"
        out.append(
            f"| {rec['model']} | {row['allocation']} | {prune:.0f} | {db} | "
            f"{cost['database_seconds'] / prune:.1f} | {cost['search_seconds']:.0f} "
            f"({gens} generations; {check}) | "
            f"{cost['search_seconds'] / prune:.1f} | {path} |")
    return out


def main(paths: list[str]) -> str:
    lines = ["| model | row | prune (s) | level database (s) | in prunes | search (s) | "
             "in prunes | file |", "|---|---|---|---|---|---|---|---|"]
    for path in paths:
        lines += rows(path)
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: python bench/search_cost.py COMPARE_JSON [...]")
    print(main(sys.argv[1:]))
