"""``prune``: load, allocate, prune, evaluate, save; ``result.json`` last."""

from __future__ import annotations

from pathlib import Path

from ..allocation import Allocation
from ..allocation.correction import is_auto
from ..blockwise import nonfinite_blocks, sparsity_record
from ..evaluation.registry import evaluate
from ..outputs import check_save_target, start_run_dir
from ..plan import compute_allocation
from ..protocol import EvalRequest, Protocol
from ..pruners.nm_levels import achieved_budget
from ..rows import RowSpec
from ..session import Session
from .common import (
    DIVERGED_HINT,
    DivergedError,
    base_record,
    check_against_model,
    check_inputs,
    finish,
    mark_status,
    warn,
)


def allocate_row(session: Session, row: RowSpec) -> Allocation:
    """The row's allocation (its allocator, options and modifiers) on this session; prints the
    advice its tuning left (a choice at the end of its grid)."""
    alloc = compute_allocation(session, row.allocation, row.target, row.options, row.pruner,
                               row.pattern_text)
    for line in alloc.options.get("advice", []):
        warn(f"row '{row.label or row.allocation}': {line}")
    return alloc


def prune_row(session: Session, row: RowSpec, alloc: Allocation) -> dict:
    """Prune the session's model (from its dense weights) with ``alloc``; return the record."""
    done = session.prune(row.pruner, row.pattern_text, alloc.block_sparsity,
                         alloc.target_sparsity, alloc.spec, alloc.expert_sparsity)
    measured = sparsity_record(done.report.census)  # counted while each block was held
    experts = done.report.record(session.arch)
    if experts["experts_without_tokens"]:
        warn(f"{experts['experts_without_tokens']} expert(s) received no calibration token and "
             "were pruned by magnitude (listed in result.json)")
    record = experts | {
        "pruner": done.pruner.config(),
        "pattern": row.pattern_text,
        "allocation": alloc.spec,
        "allocation_details": alloc.record(),
        "target_sparsity": alloc.target_sparsity,
        "block_sparsity": alloc.block_sparsity,
        "measured_sparsity": measured["overall"],
        "measured_block_sparsity": measured["per_block"],
        "block_weight_sparsity": measured["block_weights"],
        "nonfinite_blocks": nonfinite_blocks(done.report.census),
        "prune_seconds": done.seconds,
    }
    if row.pattern.is_nm:  # what the levels could honour of the allocation
        record["block_pattern"] = [str(p) if p.is_nm else "dense" for p in done.patterns]
        record["nm_budget"] = achieved_budget([p.n for p in done.patterns], row.pattern.m,
                                              session.params_per_block)
    return record


def needs_dense_copy(row: RowSpec) -> bool:
    """Does computing the row's allocation prune more than once (gamma auto, linear:auto,
    search)? Then the session keeps a dense copy of the weights."""
    return ((row.spec.absorb and is_auto(row.options.absorb_gamma)) or row.spec.tuned()
            or row.spec.search)


def run_prune(model: str, protocol: Protocol, row: RowSpec, request: EvalRequest | None = None,
              save: str | Path | None = None, out: str | Path | None = None,
              progress: bool = True, session: Session | None = None,
              overwrite: bool = False) -> dict:
    """Load, allocate, prune, evaluate, save; write ``out/result.json`` last (atomically).

    Every check that does not need the pruned model runs before loading it; the previous
    result in ``out`` is removed only when the work starts. A pruned model with non-finite
    weights or perplexity is written with ``"status": "diverged"`` and raises
    :class:`DivergedError`.
    """
    request = request or EvalRequest()
    check_inputs(protocol, request, out)
    if save is not None:
        check_save_target(save, overwrite)
    if session is None:  # one prune: no dense copy unless the allocation prunes repeatedly
        session = Session(model, protocol, progress=progress, keep_dense=needs_dense_copy(row),
                          scratch_near=save)
    session.check_tasks(request.tasks)
    check_against_model(session, [row])
    run_dir = start_run_dir(out, "prune")
    alloc = allocate_row(session, row)
    record = base_record(session)
    record.update(prune_row(session, row, alloc))
    record.update(evaluate(session, request))
    why = mark_status(record)
    if save is not None and why is None:
        with session.timed("save"):
            session.save(save, overwrite=overwrite)
        record["saved_to"] = str(Path(save).expanduser().resolve())
    finish(session, record, run_dir)
    if why is not None:
        where = f" (result written to {run_dir / 'result.json'}, status diverged)" if run_dir \
            else ""
        raise DivergedError(f"pruning diverged: {why}{where}; {DIVERGED_HINT}"
                            + ("; the model was not saved" if save is not None else ""))
    return record
