"""``compare``: the paper's table in one run. Shared dense work is computed once per Session
(calibration activations, OWL statistics, spectra, absorption coefficients); every row prunes
from the dense weights."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ..allocation import AllocationOptions
from ..errors import check
from ..evaluation.registry import evaluate
from ..io import write_json, write_text
from ..outputs import start_run_dir
from ..protocol import EvalRequest, Protocol
from ..report.compare import relative_changes, render_markdown, summary
from ..report.plots import plot_compare
from ..report.search import write_search_outputs
from ..report.seeds import collect_seeds, summarise
from ..rows import RowSpec, RowTemplate
from ..session import Session
from .common import base_record, check_against_model, check_inputs, mark_status, peak_rss_mb, warn
from .prune import allocate_row, prune_row

PARTIAL = "compare.partial.json"
"""Rows finished so far (``"complete": false``); replaced by compare.json when the run ends."""


def grid(sparsities: list[float], pruners: list[str], rows: list[RowTemplate], pattern: str,
         options: AllocationOptions | None = None) -> list[RowSpec]:
    """Every (sparsity, pruner, row) combination as a validated RowSpec (sparsity outermost)."""
    check(bool(sparsities), "--sparsity is empty: give at least one value, e.g. --sparsity 0.7")
    check(bool(pruners), "--pruner is empty: give at least one, e.g. --pruner wanda")
    check(bool(rows), "--allocations is empty: give at least one row, e.g. "
          "--allocations uniform,owl")
    base = options or AllocationOptions()
    return [RowSpec.parse(p, pattern, s, t.allocation, t.options(base), t.label)
            for s in sparsities for p in pruners for t in rows]


def run_compare(model: str, protocol: Protocol, rows: list[RowSpec],
                request: EvalRequest | None = None, out: str | Path | None = None,
                include_dense: bool = True, progress: bool = True,
                seeds: list[int] | None = None) -> dict:
    """Run every row (with each calibration seed of ``seeds``, default the protocol's); write
    compare.json/.md/.png last.

    With several seeds the dense statistics are computed once per seed, every row record says
    its ``seed``, and ``seed_summary`` gives each row's mean and spread and its paired changes.
    A row whose pruned model has non-finite weights or perplexity is kept with
    ``"status": "diverged"`` (and a warning line); the other rows go on.
    """
    check(bool(rows), "no rows to compare")
    seeds = list(dict.fromkeys(seeds)) if seeds else [protocol.seed]
    request = request or EvalRequest()
    check_inputs(protocol, request, out)
    session = Session(model, dataclasses.replace(protocol, seed=seeds[0]), progress=progress)
    check_against_model(session, rows)
    run_dir = start_run_dir(out, "compare")
    done: list[dict] = []
    dense = None
    if include_dense:  # the dense model does not depend on the calibration seed
        dense = {"label": "dense", "allocation": "dense", **evaluate(session, request)}
    for seed in seeds:
        if seed != session.protocol.seed:
            session = Session(model, dataclasses.replace(protocol, seed=seed), progress=progress)
        for row in rows:
            alloc = allocate_row(session, row)
            rec = prune_row(session, row, alloc)
            rec.update(evaluate(session, request))
            rec["label"] = row.title() + (f" (seed {seed})" if len(seeds) > 1 else "")
            rec["seed"] = seed
            why = mark_status(rec)
            if why is not None:
                warn(f"row '{rec['label']}' diverged ({why}); kept with status diverged")
            done.append(rec)
            if run_dir is not None:  # finished rows survive a crash, marked incomplete
                write_json(run_dir / PARTIAL, _record(session, dense, done, rows, request, seeds)
                           | {"complete": False})
        session.restore_dense()
    record = _record(session, dense, done, rows, request, seeds) | {"complete": True}
    main = request.ppl[0] if request.ppl else None
    if run_dir is not None:
        write_text(run_dir / "compare.md", render_markdown(record))
        plot_compare(([dense] if dense else []) + done, run_dir / "compare.png",
                     title=f"{model}, {main} perplexity")
        write_search_outputs(run_dir, [r.get("allocation_details") or {} for r in done],
                             title=f"{model}, search fitness")
        write_json(run_dir / "compare.json", record)
        (run_dir / PARTIAL).unlink(missing_ok=True)
    return record


def _record(session: Session, dense: dict | None, done: list[dict], rows: list[RowSpec],
            request: EvalRequest, seeds: list[int]) -> dict:
    """The compare record of the rows finished so far (self-describing, like the final one)."""
    main = request.ppl[0] if request.ppl else None
    for r in done + ([dense] if dense else []):
        r["ppl_main"] = r.get("ppl", {}).get(main) if main else None
    relative_changes(done)
    record = base_record(session)
    record.update({
        "dense": dense, "rows": done, "pattern": rows[0].pattern_text,
        "allocation_options": rows[0].options.record(),
        "protocol": session.protocol.record() | {"data_sources": session.data_sources},
        "shared_work": dict(session.counters),
        "timings": dict(session.timings), "peak_rss_mb": peak_rss_mb(),
    })
    record["summary"] = summary(done)
    if len(seeds) > 1:
        record["seeds"] = seeds
        record["seed_summary"] = summarise(collect_seeds([("", record)]))
    return record
