"""``probe``: the perturbation experiments on the dense model; probe.json and figures."""

from __future__ import annotations

from pathlib import Path

from ..blockwise import check_patterns
from ..io import write_json
from ..outputs import start_run_dir
from ..probe import ProbeConfig, run_probe
from ..protocol import Protocol
from ..pruners import get_pruner
from ..pruners.masks import check_pattern_target, parse_pattern
from ..report.plots import plot_probe
from ..session import Session
from .common import base_record, check_inputs


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
