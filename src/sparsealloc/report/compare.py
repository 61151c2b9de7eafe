"""The comparison record's derived numbers and its markdown table.

``relative_changes`` gives each ``+absorb`` row its change against its base row (perplexity,
and zero-shot points with the paired standard error when both were scored on the same
documents); ``summary`` the means per pruner and sparsity; ``render_markdown`` the table that
``compare`` prints and writes as compare.md.
"""

from __future__ import annotations

from ..allocation import parse_allocation_spec
from ..evaluation.paired import paired_change
from .seeds import render_seeds


def relative_changes(rows: list[dict]) -> None:
    """Each +absorb row gets its relative change in perplexity (and zero-shot) vs its base row."""
    index = {(r["pruner"]["name"], r["target_sparsity"], r["allocation"], r.get("seed")): r
             for r in rows}
    for r in rows:
        spec = parse_allocation_spec(r["allocation"])
        if not spec.absorb or spec.search:
            continue
        base_name = r["allocation"][: -len("+absorb")]
        base = index.get((r["pruner"]["name"], r["target_sparsity"], base_name, r.get("seed")))
        if base is None:
            continue
        r["base_row"] = base["label"]
        if "diverged" in (r.get("status"), base.get("status")):
            continue  # no relative change against or of a non-finite result
        if r.get("ppl_main") and base.get("ppl_main"):
            r["ppl_change"] = r["ppl_main"] / base["ppl_main"] - 1.0
        if "zeroshot_mean" in r and "zeroshot_mean" in base:
            r["zeroshot_change_points"] = 100 * (r["zeroshot_mean"] - base["zeroshot_mean"])
            paired = paired_change(r["zeroshot"], base["zeroshot"],
                                   r.get("zeroshot_protocol", {}).get("mean_over"))
            if paired is not None:  # same documents: the paired standard error of the change
                r["zeroshot_change_se_points"] = paired["se_points"]


def summary(rows: list[dict]) -> dict:
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
        label = r["label"] + (" (diverged)" if r.get("status") == "diverged" else "")
        cells = [label] + [_fmt(r.get("ppl", {}).get(c)) for c in corpora]
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
    if record.get("seed_summary"):
        lines += ["", f"Over calibration seeds {', '.join(map(str, record['seeds']))} (mean ± sd; "
                  "changes paired per seed, mean ± s.e., * beyond 2 s.e.):", "",
                  render_seeds(record["seed_summary"])]
    return "\n".join(lines) + "\n"
