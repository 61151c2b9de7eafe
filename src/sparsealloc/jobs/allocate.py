"""``allocate``: allocations without pruning; allocation.json and allocation.png."""

from __future__ import annotations

from pathlib import Path

from ..allocation import Allocation
from ..errors import check
from ..io import write_json
from ..outputs import start_run_dir
from ..protocol import Protocol
from ..report.plots import plot_allocations
from ..report.search import write_search_outputs
from ..rows import RowSpec
from ..session import Session
from .common import base_record, check_against_model, check_inputs
from .prune import allocate_row, needs_dense_copy


def run_allocate(model: str, protocol: Protocol, rows: list[RowSpec], out: str | Path,
                 progress: bool = True) -> list[Allocation]:
    """Compute every row's allocation; write allocation.json and allocation.png."""
    check(bool(rows), "--allocation is empty: give at least one, e.g. --allocation owl")
    check_inputs(protocol, None, out)
    session = Session(model, protocol, progress=progress,
                      keep_dense=any(needs_dense_copy(r) for r in rows))
    check_against_model(session, rows)
    run_dir = start_run_dir(out, "allocate")
    allocs = [allocate_row(session, row) for row in rows]
    first, sparsity = allocs[0], rows[0].target
    record = base_record(session) | {
        "allocation": first.spec, "target_sparsity": sparsity,
        "block_sparsity": first.block_sparsity, "scores": first.scores,
        "score_name": first.score_name,
        "allocations": {a.spec: a.record() for a in allocs},
        "protocol": protocol.record() | {"data_sources": session.data_sources},
        "timings": dict(session.timings),
    }
    title = f"{model}, target sparsity {sparsity:g}"
    plot_allocations({a.spec: a.block_sparsity for a in allocs}, run_dir / "allocation.png",
                     title=title)
    write_search_outputs(run_dir, [a.record() for a in allocs], title=title)
    write_json(run_dir / "allocation.json", record)
    return allocs
