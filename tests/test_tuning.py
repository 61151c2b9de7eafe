"""Choosing a tuned value (linear:auto's span, --absorb-gamma auto): the rules min and 1se against
hand-computed curves, linear:auto's grid extension, and options added after rows were recorded."""

import math

import pytest
import torch
from fake_session import TuningSessionBase

import sparsealloc.tuning as tuning
from sparsealloc.allocation import AllocationContext, AllocationOptions
from sparsealloc.allocation.linear import LINEAR_AUTO_SPANS, Linear
from sparsealloc.errors import UserError
from sparsealloc.evaluation.paired import paired_se
from sparsealloc.evaluation.perplexity import perplexity_record
from sparsealloc.jobs.resume import differences
from sparsealloc.report.seeds import row_key
from sparsealloc.report.tuned import render_tuned, tuned_choices
from sparsealloc.rows import RowSpec


def _point(value, nll):
    return {"gamma": value, "tune_ppl": math.exp(sum(nll) / len(nll)),
            "tune_nll": sum(nll) / len(nll), "tune_window_nll": list(nll)}


def test_paired_standard_error_hand_computed():
    # d = (-0.05, 0.1, -0.05, 0.1): mean 0.025, sample variance 4 * 0.075^2 / 3 = 0.0075
    se = paired_se([1.85, 2.2, 2.25, 2.6], [1.9, 2.1, 2.3, 2.5])
    assert se == pytest.approx(math.sqrt(0.0075 / 4))
    assert paired_se([1.0], [0.5]) == 0.0
    with pytest.raises(ValueError):
        paired_se([1.0, 2.0], [1.0])


def test_min_keeps_the_lowest_and_1se_the_smallest_value_within_one_standard_error():
    curve = [_point(0.0, [2.0, 2.2, 2.4, 2.6]),  # 0.1 worse on every window: se 0, not near
             _point(0.1, [1.85, 2.2, 2.25, 2.6]),  # 0.025 worse, se 0.0433: near
             _point(0.2, [1.9, 2.1, 2.3, 2.5])]  # the lowest
    assert tuning.choose([dict(c) for c in curve], "gamma", "min") == 0.2
    scored = [dict(c) for c in curve]
    assert tuning.choose(scored, "gamma", "1se") == 0.1
    assert [c["tune_se"] for c in scored] == pytest.approx([0.0, math.sqrt(0.0075 / 4), 0.0])
    # a noisy uniform within its standard error is chosen over both
    noisy = [_point(0.0, [2.2, 2.0, 2.6, 2.2])] + [dict(c) for c in curve[1:]]
    assert tuning.choose(noisy, "gamma", "1se") == 0.0


def test_1se_needs_window_nlls_and_rules_are_checked():
    curve = [{"gamma": 0.0, "tune_ppl": 10.0}, {"gamma": 0.1, "tune_ppl": 9.0}]
    assert tuning.choose(curve, "gamma", "min") == 0.1
    with pytest.raises(UserError, match="window NLLs"):
        tuning.choose(curve, "gamma", "1se")
    with pytest.raises(UserError, match="--linear-select must be one of min, 1se"):
        AllocationOptions(linear_select="lowest")
    with pytest.raises(UserError, match="--absorb-select"):
        AllocationOptions(absorb_select="2se")
    with pytest.raises(UserError, match="--linear-extend"):
        AllocationOptions(linear_extend=-1)


def test_a_perplexity_record_keeps_each_windows_nll():
    nll = torch.tensor([2.0, 3.0], dtype=torch.float64)
    rec = perplexity_record(nll, torch.zeros(2, 8, dtype=torch.long))
    assert rec["window_nll"] == [2.0, 3.0] and rec["ppl"] == pytest.approx(math.exp(2.5))


class FakeSession(TuningSessionBase):
    """Tuning perplexity as a function of the schedule's span (last block minus first)."""

    params_per_block = [1, 1, 1, 1, 1]
    arch = type("Arch", (), {"num_blocks": 5})()

    def __init__(self, nll_of_span):
        self.nll_of_span, self.log = nll_of_span, []

    def restore_dense(self):
        self.log.append("restored")

    def prune(self, pruner, pattern, block_sparsity, target=None, spec=""):
        self.log.append(list(block_sparsity))

    def perplexity(self, corpora, split, stage):
        assert (corpora, split) == (["c4"], "tune")  # never the evaluation corpus
        s = self.log[-1]
        nll = self.nll_of_span(round(s[-1] - s[0], 6))
        rec = perplexity_record(torch.tensor(nll, dtype=torch.float64), torch.zeros(len(nll), 4))
        return {"c4": rec}


def _auto(session, **opts):
    ctx = AllocationContext(session, "wanda", "unstructured")
    return Linear().allocate(ctx, 0.7, AllocationOptions(**opts).of("linear"), "auto")


def test_linear_auto_extends_its_grid_when_asked():
    best = 0.45  # beyond the default grid (largest 0.32); ATP's limit at 70% is 0.6
    session = FakeSession(lambda span: [2.0 + abs(span - best), 2.1 + abs(span - best)])
    base = _auto(session)
    assert base.record["linear_span_used"] == pytest.approx(0.32)
    assert base.record["advice"][0].endswith("try --linear-spans 0.4,0.48,0.56 or "
                                             "--linear-extend 1")
    session = FakeSession(session.nll_of_span)
    base = _auto(session, linear_extend=2)
    spans = [c["span"] for c in base.record["beta_curve"]]
    assert spans == pytest.approx([*LINEAR_AUTO_SPANS, 0.4, 0.48, 0.56])  # one round sufficed
    assert base.record["linear_span_used"] == pytest.approx(0.48)
    assert "advice" not in base.record
    assert session.log[-1] == "restored" and session.log.count("restored") == 1
    s = torch.tensor(base.block_sparsity)
    assert float(s[-1] - s[0]) == pytest.approx(0.48)


def test_linear_auto_1se_keeps_uniform_when_the_gain_is_noise():
    # span 0.08 is 0.0075 better on average but worse on one window of four: se 0.0125
    def nll(span):
        if abs(span - 0.08) < 1e-9:
            return [1.98, 1.98, 1.98, 2.03]
        return [2.0, 2.0, 2.0, 2.0] if span == 0 else [2.2, 2.2, 2.2, 2.2]
    assert _auto(FakeSession(nll)).record["linear_span_used"] == pytest.approx(0.08)
    base = _auto(FakeSession(nll), linear_select="1se")
    assert base.record["linear_span_used"] == 0.0
    point = next(c for c in base.record["beta_curve"] if c["span"] == 0)
    assert point["tune_se"] == pytest.approx(0.0125)  # d = (0.02, 0.02, 0.02, -0.03)


def test_options_added_later_are_recorded_only_when_set():
    """linear_select / linear_extend / absorb_select at their defaults are how earlier rows ran:
    they are not recorded, so earlier rows resume and pool with new ones; set, they separate."""
    assert "linear_select" not in AllocationOptions().recorded("linear")
    assert "linear_extend" not in AllocationOptions().recorded("linear")
    assert AllocationOptions(linear_select="1se").recorded("linear")["linear_select"] == "1se"
    old = {"linear_beta": None, "linear_spans": list(LINEAR_AUTO_SPANS),
           "linear_span_used": 0.08}
    rec = {"pruner": {"name": "wanda"}, "pattern": "unstructured", "target_sparsity": 0.6,
           "allocation": "linear:auto", "ppl": {"wikitext2": 150.0},
           "allocation_details": {"options": old}}
    row = RowSpec.parse("wanda", "unstructured", 0.6, "linear:auto", AllocationOptions())
    assert differences(rec, row) == []
    row = RowSpec.parse("wanda", "unstructured", 0.6, "linear:auto",
                        AllocationOptions(linear_select="1se"))
    assert differences(rec, row) == ["linear_select=min there, 1se now"]
    new = dict(rec, allocation_details={"options": old | AllocationOptions().recorded("linear")})
    assert row_key("m", {}, new) == row_key("m", {}, rec)
    chosen = dict(rec, allocation_details={
        "options": old | AllocationOptions(linear_select="1se").recorded("linear")})
    assert row_key("m", {}, chosen) != row_key("m", {}, rec)


def _curve(label, values, windows, extra=None):
    out = []
    for v, w in zip(values, windows, strict=True):
        point = {label: v, "tune_ppl": math.exp(sum(w) / len(w))}
        if w is not None:
            point |= {"tune_nll": sum(w) / len(w), "tune_window_nll": list(w)}
        out.append(point | (extra(v) if extra else {}))
    return out


def _row(allocation, seed, ppl, options=None):
    return {"pruner": {"name": "wanda"}, "target_sparsity": 0.6, "allocation": allocation,
            "seed": seed, "ppl": {"wikitext2": ppl}, "label": allocation,
            "allocation_details": {"options": options or {}}}


def test_the_tuned_table_sets_each_rules_choice_side_by_side():
    windows = [[2.0] * 4, [1.98, 1.98, 1.98, 2.03], [2.2] * 4]
    linear = _curve("beta", [0.0, 0.02, 0.04], windows, lambda b: {"span": 4 * b})
    # seed 1: 0.04 lowest (1.975); 0.02 is 0.0025 worse, d = (0.02, -0.02, 0.02, -0.01),
    # se sqrt(0.000425 / 4): within it, so 1se keeps 0.02; 0 is 0.125 worse, se 0.032
    seed1 = _curve("beta", [0.0, 0.02, 0.04], [[2.1] * 4, [1.92, 1.93, 2.02, 2.04],
                                               [1.9, 1.95, 2.0, 2.05]], lambda b: {"span": 4 * b})
    old = [{k: v for k, v in c.items() if not k.startswith("tune_") or k == "tune_ppl"}
           for c in seed1]
    gamma = _curve("gamma", [0.0, 0.04, 0.08], [[3.0, 3.1], [2.9, 3.15], [3.2, 3.3]])
    rows = [_row("uniform", 0, 100.0), _row("owl", 0, 120.0, {"owl_m": 5}),
            _row("linear:auto", 0, 97.0, {"linear_beta_used": 0.02, "beta_curve": linear}),
            _row("owl+absorb", 0, 125.0, {"owl_m": 5, "absorb_gamma_used": 0.04,
                                          "gamma_curve": gamma}),
            _row("uniform", 1, 101.0),
            _row("linear:auto", 1, 99.0, {"linear_beta_used": 0.04, "beta_curve": old})]
    rerun = [_row("linear:auto", 1, 98.0, {"linear_beta_used": 0.02, "beta_curve": seed1,
                                           "linear_select": "1se"})]
    recs = [("a.json", {"model": "m", "protocol": {"nsamples": 4}, "rows": rows}),
            ("b.json", {"model": "m", "protocol": {"nsamples": 4}, "rows": rerun})]
    entries = {(e.allocation, e.seed, e.rule): e for e in tuned_choices(recs)}
    lin = entries[("linear:auto", 0, "min")]
    assert (lin.what, lin.chosen, lin.ppl) == ("span", {"min": 0.08, "1se": 0.0},
                                               {"min": 97.0, "1se": 100.0})  # 0: uniform's
    assert lin.margin == pytest.approx(0.0075) and lin.se == pytest.approx(0.0125)
    # gamma: 0.04 lowest (3.025), 0 is 0.025 worse with d = (0.1, -0.05): se 0.075, so 0 is
    # within it and 1se picks the bare base, whose ppl is the owl row's
    g = entries[("owl+absorb", 0, "min")]
    assert (g.what, g.chosen, g.ppl) == ("gamma", {"min": 0.04, "1se": 0.0},
                                         {"min": 125.0, "1se": 120.0})
    assert g.margin == pytest.approx(0.025) and g.se == pytest.approx(0.075)
    older = entries[("linear:auto", 1, "min")]  # no window NLLs: min from its perplexities
    assert older.chosen == {"min": 0.16, "1se": None} and older.ppl == {"min": 99.0, "1se": None}
    # the 1se rerun of seed 1: its min choice was evaluated by the older row
    new = entries[("linear:auto", 1, "1se")]
    assert new.chosen == pytest.approx({"min": 0.16, "1se": 0.08})
    assert new.ppl == {"min": 99.0, "1se": 98.0}
    assert new.margin == pytest.approx(0.0025) and new.se == pytest.approx(math.sqrt(0.000425 / 4))
    text = render_tuned(tuned_choices(recs))
    assert "| m wanda 60% | linear:auto | 0 | min | span 0.08 | 0 | +0.0075 ± 0.0125 | 97.0 | " \
        "100.0 |" in text
    assert ("3 of 4 tuned rows recorded window NLLs; the 1se rule chooses differently in 3 of "
            "them, and where both choices were evaluated (3) changes the perplexity by ") in text
    assert "+3.1%" in text and "-4.0%" in text and "-1.0%" in text
