"""search.json and the fitness-curve figure of the ``search`` allocations of a run."""

from __future__ import annotations

import re
from pathlib import Path

from ..io import write_json
from .plots import plot_search


def search_records(allocations: list[dict]) -> list[dict]:
    """The allocation records (``Allocation.record()``) that carry a search."""
    return [a for a in allocations if "search" in (a.get("options") or {})]


def write_search_outputs(run_dir: Path, allocations: list[dict], title: str = "") -> list[Path]:
    """Write ``search.json`` and ``search.png`` (``search-<spec>.*`` when several searched).

    Each file holds the fitness curve, the start and final allocations and fitness, and the
    cost of the database and of the search. Returns the paths written (none without a search).
    """
    records = search_records(allocations)
    paths: list[Path] = []
    seen: dict[str, int] = {}
    for rec in records:
        stem = "search" if len(records) == 1 else "search-" + re.sub(r"[^A-Za-z0-9.+-]+", "_",
                                                                     rec["spec"])
        seen[stem] = seen.get(stem, 0) + 1
        if seen[stem] > 1:  # the same spec again (another seed or sparsity of a compare)
            stem += f"-{seen[stem]}"
        search = rec["options"]["search"]
        body = {"allocation": rec["spec"], "target_sparsity": rec["target_sparsity"],
                "block_sparsity": rec["block_sparsity"]} | search
        paths.append(write_json(run_dir / f"{stem}.json", body))
        paths.append(plot_search({rec["spec"]: search["fitness_curve"]}, run_dir / f"{stem}.png",
                                 title=title, checks={rec["spec"]: search.get("holdout")}))
    return paths
