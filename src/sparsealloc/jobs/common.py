"""What every job shares: checks before any work, the base of a record, its status, the end.

A job validates everything that does not need the model (``check_inputs`` and ``RowSpec``),
loads the session, runs the checks that need its structure (``check_against_model``), clears
its own stale outputs (:func:`sparsealloc.outputs.start_run_dir`), works, and writes its
result last (``finish``).
"""

from __future__ import annotations

import math
import platform
import resource
import sys
from pathlib import Path

import torch
import transformers

from .. import __version__
from ..allocation import file_allocation
from ..blockwise import check_patterns
from ..data.corpora import check_corpus
from ..errors import UserError
from ..io import write_json
from ..outputs import check_out_dir
from ..protocol import EvalRequest, Protocol
from ..rows import RowSpec
from ..session import Session


class DivergedError(UserError):
    """The pruned model produced non-finite weights or perplexity (the result is still written,
    with ``"status": "diverged"``)."""

    exit_code = 3


DIVERGED_HINT = ("try a lower --sparsity, more --nsamples, or another --pruner (sparsegpt) or "
                 "--allocation")


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def check_inputs(protocol: Protocol, request: EvalRequest | None = None,
                 out: str | Path | None = None) -> None:
    """Checks every job runs before loading anything: corpora and the output folder."""
    check_corpus(protocol.calib, "--calib", protocol.data_dir)
    for name in (request.ppl if request else []):
        check_corpus(name, "--eval", protocol.data_dir)
    check_out_dir(out)


def check_against_model(session: Session, rows: list[RowSpec]) -> None:
    """Checks that need the model's structure (not its pruning): run before outputs are cleared.
    An N:M pattern must divide every layer; an explicit list must have one value per block and,
    under N:M, be one the levels can honour."""
    for pattern in {row.pattern for row in rows}:
        check_patterns(session.arch, pattern)
    for row in rows:
        if row.spec.name != "file":
            continue
        s = file_allocation(row.spec.path, session.arch.num_blocks).tolist()
        if row.pattern.is_nm and not row.spec.absorb:  # the levels the prune would use
            session.block_patterns(row.pattern, s, row.pattern.nm_sparsity, row.allocation)


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


def environment() -> dict:
    """What can change float results between runs of the same protocol: library versions and
    the CPU thread count (float summation order; at 70% sparsity it can move perplexity by ~15%)."""
    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "torch_threads": torch.get_num_threads()}


def base_record(session: Session) -> dict:
    return {
        "sparsealloc_version": __version__,
        "environment": environment(),
        "model": session.spec,
        "model_source": session.source,
        "architecture": session.arch.describe(),
        "params_per_block": session.params_per_block,
    }


def finish(session: Session, record: dict, run_dir: Path | None) -> dict:
    """Add the protocol, timings and memory; write ``result.json`` (atomically) when asked."""
    record["protocol"] = session.protocol.record() | {"data_sources": session.data_sources}
    record["timings"] = dict(session.timings)
    record["peak_rss_mb"] = peak_rss_mb()
    if run_dir is not None:
        write_json(run_dir / "result.json", record)
    return record
