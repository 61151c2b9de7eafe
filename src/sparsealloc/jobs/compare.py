"""``compare``: the paper's table in one run. Shared dense work is computed once per Session
(calibration activations, OWL statistics, spectra, absorption coefficients); every row prunes
from the dense weights."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from .. import __version__
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
from .common import (
    base_record,
    check_against_model,
    check_inputs,
    environment,
    mark_status,
    peak_rss_mb,
    warn,
)
from .prune import allocate_row, prune_row
from .resume import Prior, evaluation_record, load_prior, version_warnings

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
                seeds: list[int] | None = None, resume: bool = False) -> dict:
    """Run every row (with each calibration seed of ``seeds``, default the protocol's); write
    compare.json/.md/.png last.

    With several seeds the dense statistics are computed once per seed, every row record says
    its ``seed``, and ``seed_summary`` gives each row's mean and spread and its paired changes.
    A row whose pruned model has non-finite weights or perplexity is kept with
    ``"status": "diverged"`` (and a warning line); the other rows go on. With ``resume``, the
    rows an earlier run in ``out`` finished are taken over (:mod:`.resume`) and only the others
    run; a seed whose rows are all taken over is not calibrated at all.
    """
    check(bool(rows), "no rows to compare")
    check(not resume or out is not None, "--resume needs --out: the folder of the run to resume")
    seeds = list(dict.fromkeys(seeds)) if seeds else [protocol.seed]
    request = request or EvalRequest()
    check_inputs(protocol, request, out)
    session = Session(model, dataclasses.replace(protocol, seed=seeds[0]), progress=progress)
    check_against_model(session, rows)
    reused: dict[tuple[int, int], dict] = {}
    prior = None
    if resume:
        prior = load_prior(Path(out).expanduser(), session.spec, session.arch.describe(),
                           session.protocol.record(), request)
        if prior is None:
            warn(f"--resume: no earlier compare record in {out}; every row runs")
        else:
            for seed in seeds:
                for i, row in enumerate(rows):
                    rec = prior.take(row, seed)
                    if rec is not None:  # labelled as this run labels its rows
                        reused[seed, i] = rec | {"label": _label(row, seed, len(seeds)),
                                                 "seed": seed}
            prior.check_all_taken()
            for line in version_warnings(prior, __version__, environment()):
                warn(line)
    run = _Run(session, rows, request, seeds, prior, len(reused))
    dense = prior.dense if prior is not None and include_dense else None
    if prior is not None and out is not None:  # the taken-over rows first, then clear the rest
        run.write_partial(Path(out).expanduser(), dense, [
            reused[k] for k in sorted(reused, key=lambda k: (seeds.index(k[0]), k[1]))])
    run_dir = start_run_dir(out, "compare", keep=(PARTIAL,) if prior is not None else ())
    if include_dense and dense is None:  # the dense model does not depend on the seed
        dense = {"label": "dense", "allocation": "dense", **evaluate(session, request)}
    done: list[dict] = []
    for seed in seeds:
        todo = [i for i in range(len(rows)) if (seed, i) not in reused]
        if todo and seed != run.session.protocol.seed:
            run.next_session(Session(model, dataclasses.replace(protocol, seed=seed),
                                     progress=progress))
        for i, row in enumerate(rows):
            if (seed, i) in reused:
                done.append(reused[seed, i])
                continue
            done.append(_run_row(run.session, row, request, seed, len(seeds)))
            if run_dir is not None:  # finished rows survive a crash, marked incomplete
                run.write_partial(run_dir, dense, done)
        run.session.restore_dense()
    record = run.record(dense, done) | {"complete": True}
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


def _run_row(session: Session, row: RowSpec, request: EvalRequest, seed: int,
             nseeds: int) -> dict:
    """Allocate, prune and evaluate one row on the session (from its dense weights)."""
    alloc = allocate_row(session, row)
    rec = prune_row(session, row, alloc)
    rec.update(evaluate(session, request))
    rec["label"] = _label(row, seed, nseeds)
    rec["seed"] = seed
    why = mark_status(rec)
    if why is not None:
        warn(f"row '{rec['label']}' diverged ({why}); kept with status diverged")
    return rec


def _label(row: RowSpec, seed: int, nseeds: int) -> str:
    return row.title() + (f" (seed {seed})" if nseeds > 1 else "")


class _Run:
    """The sessions of one compare (one per calibration seed that has rows to run): their
    timings and shared-work counters add up in the record."""

    def __init__(self, session: Session, rows: list[RowSpec], request: EvalRequest,
                 seeds: list[int], prior: Prior | None, reused: int) -> None:
        self.session, self.rows, self.request, self.seeds = session, rows, request, seeds
        self.prior, self.reused = prior, reused
        self.timings: dict[str, float] = {}
        self.counters: dict[str, int] = {}

    def next_session(self, session: Session) -> None:
        _add(self.timings, self.session.timings)
        _add(self.counters, self.session.counters)
        self.session = session

    def record(self, dense: dict | None, done: list[dict]) -> dict:
        rec = _record(self.session, dense, done, self.rows, self.request, self.seeds)
        rec["timings"] = _add(dict(self.timings), self.session.timings)
        rec["shared_work"] = _add(dict(self.counters), self.session.counters)
        if self.prior is not None:
            rec["resumed"] = self.prior.provenance(self.reused)
        return rec

    def write_partial(self, run_dir: Path, dense: dict | None, done: list[dict]) -> None:
        write_json(run_dir / PARTIAL, self.record(dense, done) | {"complete": False})


def _add(total: dict, more: dict) -> dict:
    for k, v in more.items():
        total[k] = total.get(k, 0) + v
    return total


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
        "evaluation": evaluation_record(request),
        "allocation_options": rows[0].options.record(),
        "protocol": session.protocol.record() | {"data_sources": session.data_sources},
        "peak_rss_mb": peak_rss_mb(),
    })
    record["summary"] = summary(done)
    if len(seeds) > 1:
        record["seeds"] = seeds
        record["seed_summary"] = summarise(collect_seeds([("", record)]))
    return record
