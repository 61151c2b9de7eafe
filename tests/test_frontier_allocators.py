"""DLP, LSA and linear:auto: hand-computed cases, exact budgets, ordering, end to end."""

import json

import pytest
import torch
from fake_session import TuningSessionBase
from tiny_models import save_tiny
from typer.testing import CliRunner

import sparsealloc.allocation.linear as linear_mod
import sparsealloc.session as session_mod
import sparsealloc.tuning as tuning
from sparsealloc import allocation as A
from sparsealloc.allocation import AllocationContext, AllocationOptions
from sparsealloc.allocation.dlp import block_dlp_scores
from sparsealloc.allocation.linear import LINEAR_AUTO_SPANS, Linear, linear_auto_betas
from sparsealloc.allocation.lsa import block_reconstruction_errors
from sparsealloc.cli import app
from sparsealloc.errors import UserError
from sparsealloc.models.arch import weight_out_in
from sparsealloc.plan import compute_allocation
from sparsealloc.protocol import Protocol
from sparsealloc.session import Session

runner = CliRunner()
TARGETS = (0.0, 0.05, 0.5, 0.7, 0.9, 0.95)


def _wmean(s, w=None):
    s = torch.as_tensor(s, dtype=torch.float64)
    w = torch.ones_like(s) if w is None else torch.as_tensor(w, dtype=torch.float64)
    return float((s * w).sum() / w.sum())


# ---------------------------------------------------------------- the shared mapping
def test_importance_mapping_hand_computed():
    # I = 1 - m/6 = (5/6, 4/6, 3/6); scaled to [0, 0.2]: (0.2, 0.1, 0); s = 0.5 + 0.1 - scaled
    s = A.importance_allocation([1.0, 2.0, 3.0], 0.5, alpha=0.1)
    assert s.tolist() == pytest.approx([0.4, 0.5, 0.6], abs=1e-12)
    # s = S + 2 alpha (m - mean m) / (max m - min m): (0.6, 0.6, 0.9)
    s = A.importance_allocation([1.0, 1.0, 4.0], 0.7, alpha=0.15)
    assert s.tolist() == pytest.approx([0.6, 0.6, 0.9], abs=1e-12)
    assert A.layer_importance([1.0, 2.0, 3.0]).tolist() == pytest.approx([5 / 6, 4 / 6, 3 / 6])


def test_importance_mapping_weighted_centre_hand_computed():
    # scaled (0.2, 0.1, 0), weighted centre (0.2 + 0.1 + 2 * 0) / 4 = 0.075
    s = A.importance_allocation([1.0, 2.0, 3.0], 0.5, alpha=0.1, weights=[1, 1, 2])
    assert s.tolist() == pytest.approx([0.375, 0.475, 0.575], abs=1e-12)
    assert _wmean(s, [1, 1, 2]) == pytest.approx(0.5, abs=1e-12)


def test_importance_mapping_matches_the_reference_formula():
    g = torch.Generator().manual_seed(0)
    m = torch.rand(12, generator=g, dtype=torch.float64) + 0.1
    # literal transcription of the references' last lines (no clipping at these settings)
    imp = 1 - m / m.sum()
    imp = (imp - imp.min()) / (imp.max() - imp.min()) * 0.15 * 2
    ref = 0.7 + imp.mean() - imp
    assert torch.allclose(A.importance_allocation(m, 0.7, 0.15), ref, atol=1e-12)


def test_importance_mapping_edge_cases():
    assert A.importance_allocation([2.0, 2.0, 2.0], 0.6, 0.15).tolist() == [0.6] * 3
    assert A.importance_allocation([1.0, 3.0], 0.6, 0.0).tolist() == [0.6, 0.6]
    with pytest.raises(UserError, match="non-negative"):
        A.importance_allocation([1.0, -1.0], 0.5, 0.1)
    with pytest.raises(UserError, match="alpha"):
        A.importance_allocation([1.0, 2.0], 0.5, -0.1)
    with pytest.raises(UserError, match="NaN"):
        A.importance_allocation([1.0, float("nan")], 0.5, 0.1)


# ---------------------------------------------------------------- DLP
def test_dlp_block_score_median_of_all_entries():
    scores = [torch.tensor([[1.0, 5.0], [3.0, 2.0]]), torch.tensor([4.0, 0.5, 6.0])]
    assert A.dlp_block_score(scores) == 3.0  # sorted 0.5 1 2 3 4 5 6
    assert A.dlp_block_score(torch.tensor([1.0, 2.0, 3.0, 4.0])) == 2.0  # torch's lower middle
    assert A.dlp_block_score(torch.tensor([1.0, 2.0, 3.0, 4.0]), "mean") == 2.5
    with pytest.raises(UserError, match="statistic"):
        A.dlp_block_score(scores, "max")
    with pytest.raises(UserError, match="empty"):
        A.dlp_block_score([])


def test_dlp_allocation_defaults_and_ordering():
    m = [0.02, 0.05, 0.03, 0.08, 0.04]
    s = A.dlp_allocation(m, 0.7)  # alpha 0.15 -> span 0.3
    assert float(s.max() - s.min()) == pytest.approx(0.3, abs=1e-12)
    assert _wmean(s) == pytest.approx(0.7, abs=1e-12)
    # a larger median score -> less important -> more sparsity
    order_m = sorted(range(5), key=lambda i: m[i])
    assert sorted(range(5), key=lambda i: float(s[i])) == order_m
    imp = A.layer_importance(m)
    assert int(torch.argmax(imp)) == int(torch.argmin(s))  # most important: least sparse


@pytest.mark.parametrize("fn", [A.dlp_allocation, A.lsa_allocation])
@pytest.mark.parametrize("weights", [None, [1.0, 3.0, 2.0, 5.0, 1.0, 4.0]])
@pytest.mark.parametrize("target", TARGETS)
def test_budget_exact_at_extreme_targets(fn, weights, target):
    m = [0.9, 0.1, 0.5, 2.0, 0.3, 1.1]
    s = fn(m, target, weights=weights)
    assert _wmean(s, weights) == pytest.approx(target, abs=1e-9)
    assert float(s.min()) >= 0.0 and float(s.max()) <= 0.99
    if target == 0.0:
        assert s.tolist() == [0.0] * 6
    elif 0.05 < target < 0.9:  # no clipping: the order of the statistic is kept strictly
        assert sorted(range(6), key=lambda i: float(s[i])) == sorted(range(6), key=lambda i: m[i])


# ---------------------------------------------------------------- LSA
def test_lsa_error_hand_computed_greedy_with_cross_terms():
    # one row, whole row as a group, drop int(3 * 2/3) = 2 weights
    W = torch.tensor([[1.0, 1.0, 1.2]])
    H = torch.tensor([[1.0, -0.9, 0.0], [-0.9, 1.0, 0.0], [0.0, 0.0, 1.0]])
    # step 1: scores w^2 H_jj = (1, 1, 1.44) -> drop column 0, cost 1
    # step 2: column 1 becomes 1 + 2 * 1 * 1 * (-0.9) = -0.8 -> drop it; total 0.2
    assert A.lsa_reconstruction_error(W, H, block_size=0, ratio=2 / 3) == pytest.approx(0.2)
    e = torch.tensor([1.0, 1.0, 0.0])  # = e^T H e of the dropped weights
    assert float(e @ H @ e) == pytest.approx(0.2)


def test_lsa_error_hand_computed_across_groups():
    # groups of 2 columns, drop 1 per group; the second group sees the first group's drop
    W = torch.tensor([[1.0, 2.0, 1.0, 3.0]])
    H = torch.eye(4)
    H[0, 2] = H[2, 0] = -0.5
    # group 1: scores (1, 4) -> drop column 0 (cost 1); group 2: (1 + 2*1*1*(-0.5), 9) = (0, 9)
    assert A.lsa_reconstruction_error(W, H, block_size=2, ratio=0.5) == pytest.approx(1.0)
    # without the cross term the greedy error would be 2: the update matters
    assert A.lsa_reconstruction_error(W, torch.eye(4), block_size=2, ratio=0.5) == 2.0


def test_lsa_error_dropping_everything_is_the_full_quadratic_form():
    g = torch.Generator().manual_seed(1)
    W = torch.randn(5, 8, generator=g)
    X = torch.randn(20, 8, generator=g)
    H = 2 * X.T @ X / 20
    full = float(torch.einsum("ri,ij,rj->", W, H, W))
    for block_size in (0, 3, 8):
        assert A.lsa_reconstruction_error(W, H, block_size, ratio=1.0) == pytest.approx(
            full, rel=1e-5)
    assert A.lsa_reconstruction_error(W, H, 3, ratio=0.0) == 0.0
    part = A.lsa_reconstruction_error(W, H, 4, ratio=0.5)
    assert 0.0 < part < full


def test_lsa_error_bad_inputs():
    with pytest.raises(ValueError):
        A.lsa_reconstruction_error(torch.ones(2, 3), torch.eye(2))
    with pytest.raises(UserError, match="ratio"):
        A.lsa_reconstruction_error(torch.ones(2, 3), torch.eye(3), ratio=1.5)


def test_lsa_block_error_and_default_alpha():
    assert A.lsa_block_error([1.0, 2.0, 6.0]) == 3.0
    with pytest.raises(UserError):
        A.lsa_block_error([])
    table = {0.05: 0.06, 0.5: 0.04, 0.6: 0.1, 0.7: 0.15, 0.8: 0.12, 0.95: 0.12}
    for target, alpha in table.items():
        assert A.lsa_default_alpha(target) == alpha
    m = [1.0, 2.0, 4.0]
    assert torch.equal(A.lsa_allocation(m, 0.7), A.importance_allocation(m, 0.7, 0.15))
    assert torch.equal(A.lsa_allocation(m, 0.6), A.importance_allocation(m, 0.6, 0.1))


# ---------------------------------------------------------------- specs and options
def test_specs_parse():
    assert A.parse_allocation_spec("dlp") == ("dlp", None, False, False)
    assert A.parse_allocation_spec("LSA+absorb") == ("lsa", None, True, False)
    assert A.parse_allocation_spec("linear:auto").base == "linear:auto"
    with pytest.raises(UserError, match="dlp, lsa, file:PATH"):
        A.parse_allocation_spec("dlpx")


def test_linear_auto_betas_respect_atp_limit():
    assert linear_auto_betas(5, 0.7, LINEAR_AUTO_SPANS) == pytest.approx(
        [x / 4 for x in LINEAR_AUTO_SPANS])
    # ATP: beta * (L-1) <= 2 min(S, 1-S) = 0.1 at S = 0.95; 0 (uniform) always tried
    assert linear_auto_betas(5, 0.95, (0.04, 0.08, 0.16)) == pytest.approx([0.0, 0.01, 0.02])
    assert linear_auto_betas(1, 0.5, (0.1,)) == [0.0, 0.1]


def _common(folder, text):
    return ["--model", str(folder), "--calib", str(text), "--nsamples", "4", "--seqlen", "32",
            "--quiet"]


@pytest.mark.parametrize("args, needle", [
    (["--dlp-statistic", "max"], "--dlp-statistic"),
    (["--linear-spans", "a,b"], "--linear-spans"),
    (["--linear-spans", "1.5"], "--linear-spans"),
    (["--lsa-ratio", "0"], "--lsa-ratio"),
])
def test_bad_cli_options(tmp_path, args, needle):
    folder, text = save_tiny(tmp_path)
    res = runner.invoke(app, ["allocate", *_common(folder, text), "--allocation", "dlp",
                              "--out", str(tmp_path / "a"), *args])
    assert res.exit_code != 0 and isinstance(res.exception, UserError)
    assert needle in str(res.exception)


# ---------------------------------------------------------------- end to end (tiny model)
def test_allocate_dlp_and_lsa_end_to_end(tmp_path):
    folder, text = save_tiny(tmp_path)
    out = tmp_path / "alloc"
    res = runner.invoke(app, ["allocate", *_common(folder, text), "--allocation",
                              "dlp,lsa,dlp+absorb", "--absorb-gamma", "0.05",
                              "--sparsity", "0.7", "--out", str(out)])
    assert res.exit_code == 0, res.output
    rec = json.loads((out / "allocation.json").read_text())
    w = torch.tensor(rec["params_per_block"], dtype=torch.float64)
    for name in ("dlp", "lsa", "dlp+absorb"):
        a = rec["allocations"][name]
        s = torch.tensor(a["block_sparsity"], dtype=torch.float64)
        assert float((s * w).sum() / w.sum()) == pytest.approx(0.7, abs=1e-9)
    dlp, lsa = rec["allocations"]["dlp"], rec["allocations"]["lsa"]
    assert dlp["score_name"] == "median_wanda_score" and len(dlp["scores"]) == 3
    assert dlp["options"] == {"dlp_alpha": 0.15, "dlp_statistic": "median"}
    assert lsa["score_name"] == "reconstruction_error" and all(e > 0 for e in lsa["scores"])
    assert lsa["options"]["lsa_alpha_used"] == 0.15 and lsa["options"]["lsa_block_size"] == 128
    # the allocation is the pure function of the recorded statistics
    for a, fn in ((dlp, A.dlp_allocation), (lsa, A.lsa_allocation)):
        expect = fn(a["scores"], 0.7, weights=rec["params_per_block"]).tolist()
        assert a["block_sparsity"] == pytest.approx(expect, abs=1e-12)
        s = a["block_sparsity"]
        assert max(s) - min(s) == pytest.approx(0.3, abs=1e-9)  # span 2 * alpha, no clipping
    assert rec["allocations"]["dlp+absorb"]["base_block_sparsity"] == dlp["block_sparsity"]


def test_session_statistics_match_direct_computation(tmp_path):
    """DLP's scores and LSA's errors from the Session equal a direct dense computation."""
    folder, text = save_tiny(tmp_path, arch="qwen2")
    session = Session(str(folder), Protocol(nsamples=3, seqlen=16, calib=str(text)),
                      progress=False)
    # inputs of every block from a plain forward of the dense model, via hooks
    captured: dict[tuple[int, str], list[torch.Tensor]] = {}
    handles = []
    for i in range(session.arch.num_blocks):
        for n, m in session.arch.linears(i).items():
            def hook(_m, inp, key=(i, n)):
                captured.setdefault(key, []).append(inp[0].detach().reshape(-1, inp[0].shape[-1]))
            handles.append(m.register_forward_pre_hook(hook))
    with torch.no_grad():
        session.model(input_ids=session.calibration_ids, use_cache=False)
    for h in handles:
        h.remove()
    dlp, errs = [], []
    for i in range(session.arch.num_blocks):
        scores, per_linear = [], []
        for n, m in session.arch.linears(i).items():
            X = torch.cat(captured[(i, n)]).double()
            W = weight_out_in(m).detach()
            scores.append(W.abs().double() * X.square().mean(0).sqrt())
            H = (2 * X.T @ X / X.shape[0]).float()
            per_linear.append(A.lsa_reconstruction_error(W, H, 128, 0.5))
        dlp.append(float(torch.cat([s.reshape(-1) for s in scores]).float().median()))
        errs.append(sum(per_linear) / len(per_linear))
    assert block_dlp_scores(session, "median") == pytest.approx(dlp, rel=1e-4)
    assert block_reconstruction_errors(session, 128, 0.5) == pytest.approx(errs, rel=1e-3)
    block_reconstruction_errors(session, 128, 0.5)
    assert session.counters["lsa_stats_passes"] == 1  # cached


def test_linear_auto_end_to_end(tmp_path, monkeypatch):
    folder, text = save_tiny(tmp_path)
    held_out = (str(text), "eval")  # the tiny text stands in for the tuning slice
    monkeypatch.setattr(tuning, "tune_corpus", lambda calib: held_out)
    monkeypatch.setattr(linear_mod, "tune_corpus", lambda calib: held_out)
    session = Session(str(folder), Protocol(nsamples=4, seqlen=32, calib="c4", eval_tokens=256),
                      progress=False)
    dense = {k: weight_out_in(m).clone() for k, m in session.arch.linears(0).items()}
    opts = AllocationOptions(linear_spans=(0.1, 0.3, 0.9))  # 0.9 > 2 min(S, 1-S): dropped
    alloc = compute_allocation(session, "linear:auto", 0.6, opts)
    curve = alloc.options["beta_curve"]
    assert [c["span"] for c in curve] == pytest.approx([0.0, 0.1, 0.3])
    assert alloc.options["beta_tuned_on"] == f"{text}/eval"
    best = min(curve, key=lambda c: c["tune_ppl"])
    assert alloc.options["linear_beta_used"] == best["beta"]
    expect = A.linear_allocation(3, 0.6, best["beta"], weights=session.params_per_block)
    assert alloc.block_sparsity == pytest.approx(expect.tolist(), abs=1e-12)
    assert _wmean(alloc.block_sparsity, session.params_per_block) == pytest.approx(0.6, abs=1e-9)
    assert len({c["tune_ppl"] for c in curve}) == 3  # each slope really pruned differently
    for k, m in session.arch.linears(0).items():  # dense again afterwards
        assert torch.equal(weight_out_in(m), dense[k])


def test_linear_auto_picks_the_lowest_tuning_perplexity(monkeypatch):
    pruned = []

    class FakeSession(TuningSessionBase):
        params_per_block = [1, 1, 1, 1, 1]
        arch = type("Arch", (), {"num_blocks": 5})()

        def restore_dense(self):
            pruned.append("restored")

        def prune(self, pruner, pattern, block_sparsity, target=None, spec=""):
            pruned.append(list(block_sparsity))

        def perplexity(self, corpora, split, stage):
            assert (corpora, split) == (["c4"], "tune")  # never the evaluation corpus
            span = pruned[-1][-1] - pruned[-1][0]
            return {"c4": {"ppl": 10.0 + abs(span - 0.12)}}  # best at span 0.12

    ctx = AllocationContext(FakeSession(), "wanda", "unstructured")
    base = Linear().allocate(ctx, 0.7, AllocationOptions().of("linear"), "auto")
    s, rec = torch.tensor(base.block_sparsity), base.record
    assert rec["linear_span_used"] == pytest.approx(0.12)
    assert len(rec["beta_curve"]) == len(LINEAR_AUTO_SPANS) and pruned[-1] == "restored"
    assert float(s[-1] - s[0]) == pytest.approx(0.12)


def test_prune_with_lsa_through_the_cli(tmp_path):
    folder, text = save_tiny(tmp_path)
    out = tmp_path / "run"
    res = runner.invoke(app, ["prune", *_common(folder, text), "--allocation", "lsa",
                              "--sparsity", "0.6", "--ppl", str(text), "--eval-tokens", "256",
                              "--out", str(out)])
    assert res.exit_code == 0, res.output
    rec = json.loads((out / "result.json").read_text())
    assert rec["allocation"] == "lsa"
    assert rec["measured_sparsity"] == pytest.approx(0.6, abs=0.03)  # rows of 32: rounding
    assert rec["allocation_details"]["options"]["lsa_alpha_used"] == 0.1


@pytest.mark.parametrize(("tried", "chosen", "limit", "expect"), [
    ([0.0, 0.08, 0.16, 0.24, 0.32], 0.32, 0.6, [0.4, 0.48, 0.56]),  # at the end: three steps on
    ([0.0, 0.08, 0.16, 0.24, 0.32], 0.32, 0.45, [0.4]),  # only what stays below the limit
    ([0.0, 0.08, 0.16, 0.24, 0.32], 0.24, 0.6, []),  # inside the grid: nothing to add
    ([0.0, 0.1], 0.0, 0.6, []),  # uniform chosen: no advice
    ([0.2], 0.2, 0.6, []),  # one value: no step to extend by
])
def test_beyond_the_grid(tried, chosen, limit, expect):
    curve = [{"span": x} for x in tried]
    assert tuning.beyond_the_grid(curve, "span", chosen, limit) == pytest.approx(expect)


def test_linear_auto_at_the_end_of_its_grid_says_how_to_widen_it(tmp_path, monkeypatch):
    folder, text = save_tiny(tmp_path)
    held_out = (str(text), "eval")
    monkeypatch.setattr(tuning, "tune_corpus", lambda calib: held_out)
    monkeypatch.setattr(linear_mod, "tune_corpus", lambda calib: held_out)
    # the steepest slope scores best, so the choice lies at the grid's end
    monkeypatch.setattr(linear_mod, "score_candidates", lambda session, label, cands, *a: [
        {label: value, "tune_ppl": 10.0 - i} for i, (value, _) in enumerate(cands)])
    out = tmp_path / "run"
    res = runner.invoke(app, ["prune", *_common(folder, text), "--allocation", "linear:auto",
                              "--linear-spans", "0.1,0.2", "--sparsity", "0.6", "--ppl", str(text),
                              "--eval-tokens", "256", "--out", str(out)])
    assert res.exit_code == 0, res.output
    advice = ("linear:auto chose the largest span it tried (0.2); a larger one may be better: "
              "try --linear-spans 0.3,0.4,0.5 or --linear-extend 1")
    assert advice in res.output.replace("\n", " ")
    rec = json.loads((out / "result.json").read_text())
    assert rec["allocation_details"]["options"]["advice"] == [advice]


def test_a_tuning_cut_short_goes_on_from_its_scored_candidates(tmp_path, monkeypatch):
    """Each tuning score is cached as soon as it is measured: after a crash on the third
    candidate, the same row runs again pruning only that one, and gets the curve and choice
    an uninterrupted tuning gets."""
    folder, text = save_tiny(tmp_path)
    held_out = (str(text), "eval")
    monkeypatch.setattr(tuning, "tune_corpus", lambda calib: held_out)
    monkeypatch.setattr(linear_mod, "tune_corpus", lambda calib: held_out)
    proto = Protocol(nsamples=4, seqlen=32, calib="c4", eval_tokens=256)
    opts = AllocationOptions(linear_spans=(0.1, 0.3))

    def session_counting(fail_at=None):
        session = Session(str(folder), proto, progress=False)
        pruned, score = [], session.perplexity

        def perplexity(corpora, split, stage="eval_ppl"):
            if len(pruned) == fail_at:
                raise RuntimeError("the session ended")
            return score(corpora, split, stage)
        monkeypatch.setattr(session, "perplexity", perplexity)
        prune = session.prune
        monkeypatch.setattr(session, "prune", lambda *a, **k: (pruned.append(1), prune(*a, **k))[1])
        return session, pruned

    session, pruned = session_counting(fail_at=3)
    with pytest.raises(RuntimeError, match="session ended"):
        compute_allocation(session, "linear:auto", 0.6, opts)
    assert len(pruned) == 3  # spans 0 and 0.1 scored, 0.3 pruned when the run stopped
    session, pruned = session_counting()
    alloc = compute_allocation(session, "linear:auto", 0.6, opts)
    assert len(pruned) == 1  # only span 0.3
    curve = alloc.options["beta_curve"]
    assert [c.get("cached", False) for c in curve] == [True, True, False]
    monkeypatch.setattr(session_mod, "cache_root", lambda: tmp_path / "empty-cache")
    again = compute_allocation(Session(str(folder), proto, progress=False), "linear:auto", 0.6,
                               opts)  # uninterrupted, nothing cached
    assert not any(c.get("cached") for c in again.options["beta_curve"])
    for a, b in zip(again.options["beta_curve"], curve, strict=True):
        assert a["tune_window_nll"] == pytest.approx(b["tune_window_nll"], rel=1e-6)
    assert again.block_sparsity == alloc.block_sparsity
