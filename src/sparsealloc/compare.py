"""``compare``: the paper's table in one run. Shared dense work is computed once per Session
(calibration activations, OWL statistics, spectra, absorption coefficients); every row prunes
from the dense weights."""

from __future__ import annotations

from pathlib import Path

from .allocate import AllocationOptions, compute_allocation
from .allocation import parse_allocation_spec
from .evaluation.paired import paired_change
from .io import write_json, write_text
from .pipeline import EvalRequest, base_record, evaluate, peak_rss_mb, prepare_run_dir, prune_with
from .protocol import Protocol, check_sparsity
from .pruners import get_pruner
from .pruners.masks import parse_pattern
from .report.plots import plot_compare
from .session import Session

PARTIAL = "compare.partial.json"
"""Rows finished so far (``"complete": false``); replaced by compare.json when the run ends."""


def _label(rec: dict) -> str:
    return f"{rec['pruner']['name']} {rec['target_sparsity']:.0%} {rec['allocation']}"


def run_compare(model: str, protocol: Protocol, *, sparsities: list[float], pruners: list[str],
                allocations: list[str], pattern: str = "unstructured",
                options: AllocationOptions | None = None, request: EvalRequest | None = None,
                out: str | Path | None = None, include_dense: bool = True,
                progress: bool = True) -> dict:
    """Run every (sparsity, pruner, allocation) row; write compare.json/.md/.png last."""
    for s in sparsities:
        check_sparsity(s)
    for p in pruners:
        get_pruner(p)
    for a in allocations:
        parse_allocation_spec(a)
    parse_pattern(pattern)
    request = request or EvalRequest()
    run_dir = prepare_run_dir(out)
    session = Session(model, protocol, progress=progress)
    rows: list[dict] = []
    dense = None
    if include_dense:
        dense = {"label": "dense", "allocation": "dense", **evaluate(session, request)}
    for s in sparsities:
        for p in pruners:
            for a in allocations:
                alloc = compute_allocation(session, a, s, options, p, pattern)
                rec = prune_with(session, p, pattern, alloc)
                rec.update(evaluate(session, request))
                rec["label"] = _label(rec)
                rows.append(rec)
                if run_dir is not None:  # finished rows survive a crash, marked incomplete
                    write_json(run_dir / PARTIAL, _record(session, dense, rows, pattern,
                                                          options, request) | {"complete": False})
    session.restore_dense()
    record = _record(session, dense, rows, pattern, options, request) | {"complete": True}
    main = request.ppl[0] if request.ppl else None
    if run_dir is not None:
        write_text(run_dir / "compare.md", render_markdown(record))
        plot_compare(([dense] if dense else []) + rows, run_dir / "compare.png",
                     title=f"{model}, {main} perplexity")
        write_json(run_dir / "compare.json", record)
        (run_dir / PARTIAL).unlink(missing_ok=True)
    return record


def _record(session: Session, dense: dict | None, rows: list[dict], pattern: str,
            options: AllocationOptions | None, request: EvalRequest) -> dict:
    """The compare record of the rows finished so far (self-describing, like the final one)."""
    main = request.ppl[0] if request.ppl else None
    for r in rows + ([dense] if dense else []):
        r["ppl_main"] = r.get("ppl", {}).get(main) if main else None
    _relative_changes(rows)
    record = base_record(session)
    record.update({
        "dense": dense, "rows": rows, "pattern": pattern,
        "allocation_options": (options or AllocationOptions()).record(),
        "protocol": session.protocol.record() | {"data_sources": session.data_sources},
        "shared_work": dict(session.counters),
        "timings": dict(session.timings), "peak_rss_mb": peak_rss_mb(),
    })
    record["summary"] = _summary(rows)
    return record


def _relative_changes(rows: list[dict]) -> None:
    """Each +absorb row gets its relative change in perplexity (and zero-shot) vs its base row."""
    index = {(r["pruner"]["name"], r["target_sparsity"], r["allocation"]): r for r in rows}
    for r in rows:
        spec = parse_allocation_spec(r["allocation"])
        if not spec.absorb or spec.search:
            continue
        base_name = r["allocation"][: -len("+absorb")]
        base = index.get((r["pruner"]["name"], r["target_sparsity"], base_name))
        if base is None:
            continue
        r["base_row"] = base["label"]
        if r.get("ppl_main") and base.get("ppl_main"):
            r["ppl_change"] = r["ppl_main"] / base["ppl_main"] - 1.0
        if "zeroshot_mean" in r and "zeroshot_mean" in base:
            r["zeroshot_change_points"] = 100 * (r["zeroshot_mean"] - base["zeroshot_mean"])
            paired = paired_change(r["zeroshot"], base["zeroshot"],
                                   r.get("zeroshot_protocol", {}).get("mean_over"))
            if paired is not None:  # same documents: the paired standard error of the change
                r["zeroshot_change_se_points"] = paired["se_points"]


def _summary(rows: list[dict]) -> dict:
    def means(subset: list[dict]) -> dict:
        ppl = [r["ppl_change"] for r in subset if "ppl_change" in r]
        zs = [r["zeroshot_change_points"] for r in subset if "zeroshot_change_points" in r]
        return {
            "mean_ppl_change_absorb_vs_base": sum(ppl) / len(ppl) if ppl else None,
            "mean_zeroshot_change_points_absorb_vs_base": sum(zs) / len(zs) if zs else None,
            "pairs": max(len(ppl), len(zs)),
        }

    out = means(rows)
    settings = sorted({(r["pruner"]["name"], r["target_sparsity"]) for r in rows})
    if len(settings) > 1:  # a grid: the same means per pruner and sparsity
        out["by_setting"] = {
            f"{p} {s:.0%}": means([r for r in rows if (r["pruner"]["name"],
                                                        r["target_sparsity"]) == (p, s)])
            for p, s in settings}
    return out


def _summary_lines(s: dict, where: str) -> list[str]:
    lines = []
    ppl, zs = s["mean_ppl_change_absorb_vs_base"], s["mean_zeroshot_change_points_absorb_vs_base"]
    if ppl is not None:
        lines += ["", f"Mean relative perplexity change of +absorb against its base{where} over "
                      f"{s['pairs']} pair(s): {ppl:+.2%}."]
    if zs is not None:
        lines += ["", f"Mean zero-shot change of +absorb against its base{where}: "
                      f"{zs:+.2f} points."]
    return lines


def _points(r: dict) -> str:
    if "zeroshot_change_points" not in r:
        return ""
    se = r.get("zeroshot_change_se_points")
    return f"{r['zeroshot_change_points']:+.2f}" + (f" ± {se:.2f}" if se is not None else "")


def _fmt(v, spec: str = ".2f") -> str:
    return "-" if v is None else format(v, spec)


def render_markdown(record: dict) -> str:
    p = record["protocol"]
    rows = ([record["dense"]] if record.get("dense") else []) + record["rows"]
    corpora = list(rows[0].get("ppl", {})) if rows else []
    has_zs = any("zeroshot_mean" in r for r in rows)
    evaluated = []
    if corpora:
        evaluated.append(f"perplexity windows of {p['eval_seqlen']} tokens"
                         + (f", first {p['eval_tokens']} tokens" if p.get("eval_tokens")
                            else ", full split"))
    if has_zs:
        zs = next(r for r in rows if "zeroshot_mean" in r)
        proto = zs.get("zeroshot_protocol", {})
        limit = proto.get("limit")
        evaluated.append("zero-shot (lm-eval) on " + ", ".join(zs.get("zeroshot", {}))
                         + (f", first {limit} documents per task" if limit else ""))
    lines = [
        f"# {record['model']}: allocation comparison",
        "",
        f"Protocol: calibration {p['nsamples']} x {p['seqlen']} tokens of {p['calib']} "
        f"(seed {p['seed']}); " + "; ".join(evaluated) + f"; pattern {record['pattern']}.",
        "",
    ]
    head = ["row"] + [f"ppl {c}" for c in corpora]
    if corpora:
        head.append("vs base (ppl)")
    if has_zs:
        head += ["zero-shot mean", "vs base (points ± paired s.e.)"]
    head.append("sparsity per block (min-max)")
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["label"]] + [_fmt(r.get("ppl", {}).get(c)) for c in corpora]
        if corpora:
            cells.append(f"{r['ppl_change']:+.2%}" if "ppl_change" in r else "")
        if has_zs:
            cells.append(_fmt(r.get("zeroshot_mean"), ".4f"))
            cells.append(_points(r))
        bs = r.get("block_sparsity")
        cells.append(f"{min(bs):.3f}-{max(bs):.3f}" if bs else "")
        lines.append("| " + " | ".join(cells) + " |")
    s = record["summary"]
    lines += _summary_lines(s, "")
    for name, sub in (s.get("by_setting") or {}).items():
        lines += _summary_lines(sub, f" ({name})")
    return "\n".join(lines) + "\n"
