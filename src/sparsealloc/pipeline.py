"""The ``prune`` and ``eval`` jobs: a Session, an allocation, a pruner -> one result record."""

from __future__ import annotations

import resource
import time
from pathlib import Path

from . import __version__
from .allocate import Allocation, AllocationOptions, compute_allocation
from .allocation import parse_allocation_spec
from .correction import is_auto
from .io import write_json
from .protocol import EvalRequest
from .pruners import get_pruner
from .pruners.masks import parse_pattern
from .pruning import check_patterns, measured_sparsity, prune_sequential
from .session import Session


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def prepare_run_dir(out: str | Path | None) -> Path | None:
    """Create ``out`` and remove any previous result so a crash never leaves an old one behind."""
    if out is None:
        return None
    path = Path(out)
    path.mkdir(parents=True, exist_ok=True)
    for name in ("result.json", "compare.json", "compare.partial.json"):
        (path / name).unlink(missing_ok=True)
    return path


def evaluate(session: Session, request: EvalRequest) -> dict:
    """Perplexity on each corpus and, when asked, zero-shot accuracy (lm-eval)."""
    out: dict = {}
    if request.ppl:
        details = session.perplexity(request.ppl)
        out["ppl"] = {k: v["ppl"] for k, v in details.items()}
        out["ppl_details"] = details
    if request.tasks:
        from .evaluation.zeroshot import evaluate_zeroshot

        with session.timed("eval_zeroshot"):
            session.model.to(session.protocol.device)
            try:
                out.update(evaluate_zeroshot(session.model, session.tokenizer, request.tasks,
                                             limit=request.limit, batch_size=request.batch_size,
                                             progress=session.progress))
            finally:
                session.model.to("cpu")
    return out


def base_record(session: Session) -> dict:
    return {
        "sparsealloc_version": __version__,
        "model": session.spec,
        "model_source": session.source,
        "architecture": session.arch.describe(),
        "params_per_block": session.params_per_block,
    }


def prune_with(session: Session, pruner_name: str, pattern_text: str, alloc: Allocation,
               pruner_options: dict | None = None) -> dict:
    """Prune the session's model (from its dense weights) with ``alloc``; return the record."""
    pruner = get_pruner(pruner_name, **(pruner_options or {}))
    pattern = parse_pattern(pattern_text)
    check_patterns(session.arch, pattern)
    session.restore_dense()
    acts = session.capture()
    start = time.perf_counter()
    with session.timed("prune"):
        session.modified = True
        prune_sequential(session.runner, acts, pruner, alloc.block_sparsity, pattern)
    del acts
    measured = measured_sparsity(session.arch)
    return {
        "pruner": pruner.config(),
        "pattern": pattern_text,
        "allocation": alloc.spec,
        "allocation_details": alloc.record(),
        "target_sparsity": alloc.target_sparsity,
        "block_sparsity": alloc.block_sparsity,
        "measured_sparsity": measured["overall"],
        "measured_block_sparsity": measured["per_block"],
        "prune_seconds": time.perf_counter() - start,
    }


def run_prune(
    model: str, protocol, *, pruner: str = "wanda", sparsity: float = 0.5,
    pattern: str = "unstructured", allocation: str = "uniform",
    options: AllocationOptions | None = None, request: EvalRequest | None = None,
    save: str | Path | None = None, out: str | Path | None = None, progress: bool = True,
    session: Session | None = None,
) -> dict:
    """Load, allocate, prune, evaluate, save; write ``out/result.json`` last (atomically)."""
    from .protocol import check_sparsity

    check_sparsity(sparsity)
    parse_pattern(pattern)
    get_pruner(pruner)
    spec = parse_allocation_spec(allocation)
    run_dir = prepare_run_dir(out)
    if session is None:  # one prune: no dense copy unless --absorb-gamma auto prunes repeatedly
        auto = options is not None and is_auto(options.absorb_gamma)
        session = Session(model, protocol, progress=progress,
                          keep_dense=(auto and spec.absorb) or spec.search)
    alloc = compute_allocation(session, allocation, sparsity, options, pruner, pattern)
    record = base_record(session)
    record.update(prune_with(session, pruner, pattern, alloc))
    record.update(evaluate(session, request or EvalRequest()))
    if save is not None:
        from .models.load import save_model

        with session.timed("save"):
            save_model(session.model, session.tokenizer, save)
        record["saved_to"] = str(Path(save).resolve())
    return finish(session, record, run_dir)


def run_eval(model: str, protocol, request: EvalRequest, out: str | Path | None = None,
             progress: bool = True) -> dict:
    run_dir = prepare_run_dir(out)
    session = Session(model, protocol, progress=progress, keep_dense=False)
    record = base_record(session)
    measured = measured_sparsity(session.arch)
    record["measured_sparsity"] = measured["overall"]
    record.update(evaluate(session, request))
    return finish(session, record, run_dir)


def finish(session: Session, record: dict, run_dir: Path | None) -> dict:
    record["protocol"] = session.protocol.record() | {"data_sources": session.data_sources}
    record["timings"] = dict(session.timings)
    record["peak_rss_mb"] = peak_rss_mb()
    if run_dir is not None:
        write_json(run_dir / "result.json", record)
    return record

