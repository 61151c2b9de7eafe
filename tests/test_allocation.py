"""Allocators as pure functions: budget, uniform, OWL, AlphaPruning, linear, file, spectra."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch

from sparsealloc.allocation import (
    alpha_allocation,
    block_alphas,
    esd_eigenvalues,
    file_allocation,
    hill_alpha,
    linear_allocation,
    outlier_ratio,
    owl_allocation,
    restore_budget,
    uniform_allocation,
    weighted_mean,
)
from sparsealloc.errors import UserError
from sparsealloc.stats import spectra as spectra_mod

EXACT = 1e-9
WEIGHTS5 = [1.0, 3.0, 0.5, 7.0, 2.0]


def assert_budget(s, target, weights=None, lo=0.0, hi=0.99):
    s = torch.as_tensor(s)
    assert s.dtype == torch.float64 and s.dim() == 1
    assert abs(weighted_mean(s, weights) - target) <= EXACT
    assert float(s.min()) >= lo - 1e-15 and float(s.max()) <= hi + 1e-15


def _full(n, value):
    return torch.full((n,), value, dtype=torch.float64)


# --------------------------------------------------------------------------- budget
@pytest.mark.parametrize("method", ["shift", "rescale"])
@pytest.mark.parametrize("weights", [None, WEIGHTS5])
@pytest.mark.parametrize("target", [0.05, 0.5, 0.9, 0.95])
def test_restore_budget_exact_and_bounded(method, weights, target):
    raw = torch.tensor([-0.3, 0.2, 0.9, 1.4, 0.6], dtype=torch.float64)
    out = restore_budget(raw, target, weights, method=method)
    assert_budget(out, target, weights)


def test_restore_budget_keeps_order_and_unchanged_when_met():
    s = torch.tensor([0.6, 0.7, 0.8], dtype=torch.float64)
    assert torch.equal(restore_budget(s, 0.7), s)
    # 1.5 is clipped to 0.99; the deficit is water-filled: 0.98 hits 0.99, 0.5 takes the rest
    out = restore_budget([0.5, 0.98, 1.5], 0.85)
    assert_budget(out, 0.85)
    assert out.tolist() == pytest.approx([0.57, 0.99, 0.99], abs=1e-12)


def test_restore_budget_shift_is_a_constant_on_free_entries():
    out = restore_budget([0.2, 0.4, 1.5], 0.6, hi=0.9)  # 1.5 -> 0.9 (pinned), others shift
    assert out[2] == pytest.approx(0.9)
    assert float(out[1] - out[0]) == pytest.approx(0.2, abs=1e-12)
    assert_budget(out, 0.6, hi=0.9)


def test_restore_budget_rescale_keeps_ratios():
    out = restore_budget([0.2, 0.4, 0.6], 0.6, method="rescale")
    assert float(out[1] / out[0]) == pytest.approx(2.0, abs=1e-12)
    assert float(out[2] / out[0]) == pytest.approx(3.0, abs=1e-12)
    assert_budget(out, 0.6)


@pytest.mark.parametrize("target,lo,hi", [(0.995, 0.0, 0.99), (0.1, 0.2, 0.9), (1.2, 0.0, 0.99)])
def test_restore_budget_infeasible(target, lo, hi):
    with pytest.raises(UserError):
        restore_budget([0.5, 0.5], target, lo=lo, hi=hi)


def test_budget_bad_inputs():
    with pytest.raises(UserError):
        restore_budget([0.5, 0.5], 0.5, weights=[1.0])
    with pytest.raises(UserError):
        restore_budget([0.5, 0.5], 0.5, weights=[1.0, 0.0])
    with pytest.raises(UserError):
        restore_budget([0.5, float("nan")], 0.5)
    with pytest.raises(UserError):
        restore_budget([0.5, 0.5], 0.5, method="magic")
    with pytest.raises(UserError):
        restore_budget([], 0.5)


def test_weighted_mean():
    assert weighted_mean([0.2, 0.8]) == pytest.approx(0.5)
    assert weighted_mean([0.2, 0.8], [3, 1]) == pytest.approx(0.35)


# --------------------------------------------------------------------------- uniform
def test_uniform():
    s = uniform_allocation(4, 0.7)
    assert s.tolist() == [0.7] * 4 and s.dtype == torch.float64
    with pytest.raises(UserError):
        uniform_allocation(4, 1.0)
    with pytest.raises(UserError):
        uniform_allocation(0, 0.5)


# --------------------------------------------------------------------------- OWL
def test_outlier_ratio_hand_built():
    # mean of all 10 entries = 30/10 = 3, threshold 5*3 = 15: one entry (21) above
    flat = torch.tensor([1.0] * 9 + [21.0])
    assert outlier_ratio(flat, 5) == pytest.approx(0.1)
    # the same entries split over two "linear layers": the mean is over the concatenation
    # (per-layer means would give 4.33*5 = 21.7 for the second -> no outlier at all)
    split = [torch.ones(4), torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 21.0]])]
    assert outlier_ratio(split, 5) == pytest.approx(0.1)
    # strictly greater: mean 2, M=3 -> threshold 6; the 6 is not an outlier
    assert outlier_ratio(torch.tensor([1.0, 1.0, 1.0, 1.0, 6.0]), 3) == 0.0
    assert outlier_ratio(torch.tensor([1.0, 1.0, 1.0, 1.0, 6.0]), 2.9) == pytest.approx(0.2)


def test_owl_three_blocks_hand_computed():
    blocks = [
        [torch.ones(10), torch.tensor([1.0] * 9 + [41.0])],  # mean 3, thr 15 -> 1/20
        [torch.tensor([1.0] * 17 + [50.0] * 3)],  # mean 8.35, thr 41.75 -> 3/20
        [torch.ones(4, 5)],  # no outliers -> 0
    ]
    ratios = [outlier_ratio(b, 5.0) for b in blocks]
    assert ratios == pytest.approx([0.05, 0.15, 0.0])
    s = owl_allocation(ratios, 0.7, lam=0.08)
    # D~ = [0.0533333, 0.16, 0], mean 0.0711111, s = S + mean(D~) - D~
    assert s.tolist() == pytest.approx([0.7177777778, 0.6111111111, 0.7711111111], abs=1e-9)
    assert_budget(s, 0.7)
    assert int(torch.argmin(s)) == 1  # most outliers -> least sparsity


def test_owl_reference_formula_and_extremes():
    d = [0.1, 0.3, 0.2]
    s = owl_allocation(d, 0.7)
    assert s.tolist() == pytest.approx([0.78, 0.62, 0.70], abs=1e-12)
    assert float(s.max() - s.min()) == pytest.approx(0.16)  # span 2*lambda
    assert torch.allclose(owl_allocation(d, 0.7, lam=0.0), _full(3, 0.7))
    assert torch.allclose(owl_allocation([0.2] * 4, 0.6), _full(4, 0.6))
    # wide lambda at 0.9: clipped at hi and still on budget
    s = owl_allocation([0.0, 0.01, 0.5, 1.0, 0.3], 0.9, lam=0.3)
    assert_budget(s, 0.9)
    assert float(s.max()) == pytest.approx(0.99)
    assert int(torch.argmin(s)) == 3


def test_owl_weighted_budget():
    d = [0.01, 0.05, 0.02, 0.08, 0.03]
    s = owl_allocation(d, 0.7, weights=WEIGHTS5)
    assert_budget(s, 0.7, WEIGHTS5)
    assert torch.equal(torch.argsort(s), torch.argsort(-torch.tensor(d)))


# --------------------------------------------------------------------------- Hill / ESD
def _pareto(shape: float, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(n, generator=g, dtype=torch.float64)
    return 0.3 * (1.0 - u).pow(-1.0 / shape)  # density ~ x^-(shape+1), xmin 0.3


@pytest.mark.parametrize("shape", [1.0, 1.5, 2.0, 3.0, 4.0])
@pytest.mark.parametrize("method", ["alpha_peak", "alpha_full", "alpha_mid"])
def test_hill_recovers_pareto_exponent(shape, method):
    for seed in (0, 1):
        fit = hill_alpha(_pareto(shape, 3000, seed), method)
        assert fit["alpha"] == pytest.approx(shape + 1.0, rel=0.10), (seed, fit)
        assert 0 < fit["ks"] < 0.1 and fit["n_tail"] >= 2


def test_hill_ignores_bulk_below_a_tail():
    # uniform bulk on [0.05, 1) plus a Pareto tail from 1 (shape 2 -> alpha 3)
    g = torch.Generator().manual_seed(3)
    bulk = 0.05 + 0.95 * torch.rand(3000, generator=g, dtype=torch.float64)
    tail = (1.0 - torch.rand(1500, generator=g, dtype=torch.float64)).pow(-0.5)
    fit = hill_alpha(torch.cat([bulk, tail]), "alpha_full")
    assert fit["alpha"] == pytest.approx(3.0, rel=0.10)
    assert fit["xmin"] == pytest.approx(1.0, rel=0.1)


def _reference_xmin_peak(eigs: torch.Tensor, bins: int = 100) -> float:
    """Straight loop in the style of AlphaPruning's net_esd_estimator(fix_fingers='xmin_peak')."""
    x = torch.sort(eigs.double()).values
    logx = torch.log(x)
    n_all = len(x)
    alphas = torch.zeros(n_all - 1, dtype=torch.float64)
    ds = torch.ones(n_all - 1, dtype=torch.float64)
    lx = torch.log10(x)
    counts = torch.histc(lx, bins, min=float(lx.min()), max=float(lx.max()))
    edges = torch.linspace(float(lx.min()), float(lx.max()), bins + 1, dtype=torch.float64)
    peak = 10 ** edges[torch.argmax(counts)]
    lower, upper = torch.log10(0.95 * peak), 1.5 * peak  # the reference's lower bound, as written
    for i, xmin in enumerate(x[:-1]):
        if xmin < lower:
            continue
        if xmin > upper:
            break
        n = float(n_all - i)
        a = 1 + n / (torch.sum(logx[i:]) - n * logx[i])
        alphas[i] = a
        if a > 1:
            seq = torch.arange(n, dtype=torch.float64)
            ds[i] = torch.max(torch.abs(1 - (x[i:] / xmin) ** (-a + 1) - seq / n))
    return float(alphas[torch.argmin(ds)])


def _student_eigs(df: float, seed: int = 4) -> torch.Tensor:
    torch.manual_seed(seed)
    W = torch.distributions.StudentT(df).sample((300, 200)).double()  # heavy-tailed entries
    e = esd_eigenvalues(W, torch.float64)
    return e / e.median()


@pytest.mark.parametrize("seed", [0, 4, 6])
@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e4])
@pytest.mark.parametrize("df", [1.5, 3.0, 1000.0])
def test_alpha_peak_matches_reference_loop(scale, df, seed):
    eigs = _student_eigs(df, seed) * scale
    assert hill_alpha(eigs)["alpha"] == pytest.approx(_reference_xmin_peak(eigs), rel=1e-9)


def test_reference_window_quirk_matters():
    # on this spectrum the reference's log10 lower bound admits an xmin below 0.95 * peak
    eigs = _student_eigs(2.0, seed=6) * 1e4
    ref, lit = hill_alpha(eigs), hill_alpha(eigs, window_mode="literal")
    assert ref["alpha"] == pytest.approx(_reference_xmin_peak(eigs), rel=1e-9)
    assert lit["alpha"] != pytest.approx(ref["alpha"], rel=1e-3)
    assert ref["xmin"] < lit["xmin"]


def test_literal_window_keeps_xmin_near_peak():
    eigs = esd_eigenvalues(torch.randn(400, 300, generator=torch.Generator().manual_seed(2))) * 30
    fit = hill_alpha(eigs, window_mode="literal")
    lx = torch.log10(eigs)
    counts = torch.histc(lx, 100, min=float(lx.min()), max=float(lx.max()))
    edges = torch.linspace(float(lx.min()), float(lx.max()), 101, dtype=torch.float64)
    peak = 10 ** float(edges[torch.argmax(counts)])
    assert 0.95 * peak <= fit["xmin"] <= 1.5 * peak


def test_esd_eigenvalues_are_squared_singular_values_sorted():
    W = torch.tensor([[3.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    assert esd_eigenvalues(W).tolist() == pytest.approx([1.0, 9.0])
    with pytest.raises(UserError):
        esd_eigenvalues(torch.ones(3))
    A = torch.randn(30, 50, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for M in (A, A.T):
        svd, gram = esd_eigenvalues(M, torch.float64), esd_eigenvalues(M, method="gram")
        assert svd.shape == gram.shape == (30,)
        assert torch.allclose(svd, gram, rtol=1e-9)
    with pytest.raises(UserError):
        hill_alpha(torch.ones(10))  # degenerate spectrum


# --------------------------------------------------------------------------- AlphaPruning
def test_alpha_allocation_hand_computed():
    s = alpha_allocation([2.0, 3.0, 4.0], 0.5, eps=0.3)
    assert s.tolist() == pytest.approx([0.35, 0.50, 0.65], abs=1e-12)


def test_alpha_allocation_reference_mapping_weighted():
    a = torch.tensor([2.6, 3.1, 2.2, 4.0, 3.5], dtype=torch.float64)
    w = torch.tensor(WEIGHTS5, dtype=torch.float64)
    s = alpha_allocation(a, 0.7, eps=0.2, weights=w)
    assert_budget(s, 0.7, w)
    # the reference: ratios in [0.8, 1.2], times sum(w)*S/sum(w*ratios)
    r = (a - a.min()) / (a.max() - a.min()) * 0.4 + 0.8
    assert torch.allclose(s, r * 0.7 * w.sum() / (w * r).sum(), atol=1e-12)
    assert abs(float(s.mean()) - 0.7) > 1e-3  # the weighting really matters here
    assert torch.equal(torch.argsort(s), torch.argsort(a))  # larger alpha -> more sparsity


@pytest.mark.parametrize("weights", [None, WEIGHTS5])
def test_alpha_allocation_extreme_target_clips_and_restores(weights):
    a = [1.5, 2.0, 6.0, 9.0, 3.0]
    s = alpha_allocation(a, 0.9, eps=0.3, weights=weights)
    assert_budget(s, 0.9, weights)
    assert float(s.max()) == pytest.approx(0.99)
    assert s[0] < s[1] < s[4] < s[2] <= s[3]


def test_alpha_allocation_equal_alphas_and_bad_eps():
    assert torch.allclose(alpha_allocation([3.0] * 3, 0.6), _full(3, 0.6))
    with pytest.raises(UserError):
        alpha_allocation([2.0, 3.0], 0.6, eps=-0.1)
    with pytest.raises(UserError):
        alpha_allocation([2.0, 3.0], 0.995)


# --------------------------------------------------------------------------- linear
@pytest.mark.parametrize("weights", [None, [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]])
def test_linear_increases_and_meets_budget(weights):
    s = linear_allocation(6, 0.7, 0.02, weights=weights)
    assert_budget(s, 0.7, weights)
    assert bool((s[1:] > s[:-1]).all())
    if weights is None:
        assert s.tolist() == pytest.approx([0.65, 0.67, 0.69, 0.71, 0.73, 0.75])


def test_linear_large_beta_clips():
    s = linear_allocation(8, 0.9, 0.05)
    assert_budget(s, 0.9)
    assert bool((s[1:] >= s[:-1]).all()) and float(s.max()) == pytest.approx(0.99)


# --------------------------------------------------------------------------- file
def test_file_allocation_ok(tmp_path, caplog):
    p = tmp_path / "s.json"
    p.write_text(json.dumps([0.6, 0.7, 0.8, 0.5]))
    with caplog.at_level(logging.INFO, logger="sparsealloc.allocation.listfile"):
        s = file_allocation(p, 4, target=0.7)
    assert s.tolist() == [0.6, 0.7, 0.8, 0.5] and s.dtype == torch.float64
    assert "0.650000" in caplog.text  # the mean is reported, the budget not enforced
    q = tmp_path / "d.json"
    q.write_text(json.dumps({"block_sparsity": [0.1, 0.2]}))
    assert file_allocation(q, 2).tolist() == [0.1, 0.2]


@pytest.mark.parametrize(
    "content,needle",
    [
        ("[0.5, 0.5]", "3 decoder blocks"),
        ("[0.5, 1.0, 0.5]", "outside [0, 1)"),
        ("[0.5, -0.1, 0.5]", "outside [0, 1)"),
        ("[0.5, 0.5", "not valid JSON"),
        ('{"other": [0.5, 0.5, 0.5]}', "block_sparsity"),
        ('"0.5"', "not a list"),
        ('[0.5, "a", 0.5]', "non-numeric"),
        ("[0.5, true, 0.5]", "non-numeric"),
    ],
)
def test_file_allocation_errors(tmp_path, content, needle):
    p = tmp_path / "s.json"
    p.write_text(content)
    with pytest.raises(UserError) as err:
        file_allocation(p, 3)
    msg = str(err.value)
    assert needle in msg and "\n" not in msg


def test_file_allocation_missing(tmp_path):
    with pytest.raises(UserError, match="not found"):
        file_allocation(tmp_path / "nope.json", 3)


# --------------------------------------------------------------------------- spectra cache
def _toy_blocks(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(40, 30, generator=g), torch.randn(30, 40, generator=g)] for _ in range(3)]


def test_block_alphas_mean_and_cache(tmp_path, monkeypatch):
    blocks = _toy_blocks()
    alphas, details = block_alphas(blocks, tmp_path)
    assert len(alphas) == 3 and len(details[0]) == 2
    assert alphas[1] == pytest.approx((details[1][0]["alpha"] + details[1][1]["alpha"]) / 2)
    assert len(list(tmp_path.glob("alphas-*.json"))) == 1

    def boom(*a, **k):
        raise AssertionError("cache miss")

    monkeypatch.setattr(spectra_mod, "hill_alpha", boom)
    again, _ = block_alphas(blocks, tmp_path)  # served from the cache
    assert again == pytest.approx(alphas)
    blocks[2][1][5, 7] += 1e-3  # any change of any weight -> new key -> recompute
    with pytest.raises(AssertionError, match="cache miss"):
        block_alphas(blocks, tmp_path)


def test_fingerprint_changes_with_weights_and_dtype():
    blocks = _toy_blocks()
    k0 = spectra_mod.weights_fingerprint(blocks)
    assert spectra_mod.weights_fingerprint(_toy_blocks()) == k0
    assert spectra_mod.weights_fingerprint([[W.half() for W in b] for b in blocks]) != k0
    blocks[0][0][0, 0] = blocks[0][0][0, 0] * (1 + 1e-6)
    assert spectra_mod.weights_fingerprint(blocks) != k0
    assert math.isfinite(block_alphas(_toy_blocks(1), None)[0][0])
