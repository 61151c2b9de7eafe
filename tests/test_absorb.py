"""Absorption-aware correction and the allocation spec parser."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from sparsealloc.allocation import (
    absorption_correction,
    absorption_delta,
    alpha_allocation,
    owl_allocation,
    parse_allocation_spec,
    uniform_allocation,
    weighted_mean,
)
from sparsealloc.errors import UserError

EXACT = 1e-9
R = [3.5, 1.8, 1.1, 0.9, 0.6, 0.4]  # early blocks amplify, late blocks absorb
W = [2.0, 1.0, 1.0, 3.0, 0.5, 1.5]
OUTLIERS = [0.02, 0.05, 0.03, 0.04, 0.01, 0.06]
ALPHAS = [2.5, 3.0, 3.2, 4.1, 3.8, 4.5]


def _base(kind: str, target: float, weights):
    if kind == "uniform":
        return uniform_allocation(len(R), target)
    if kind == "owl":
        return owl_allocation(OUTLIERS, target, weights=weights)
    return alpha_allocation(ALPHAS, target, weights=weights)


@pytest.mark.parametrize("kind", ["uniform", "owl", "alpha"])
@pytest.mark.parametrize("weights", [None, W])
@pytest.mark.parametrize("target", [0.5, 0.7, 0.9])
@pytest.mark.parametrize("budget", ["shift", "rescale"])
def test_budget_exact_for_every_base(kind, weights, target, budget):
    base = _base(kind, target, weights)
    for gamma in (0.0, 0.03, 0.1, 0.5):
        s = absorption_correction(base, R, gamma, target, weights=weights, budget=budget)
        assert s.dtype == torch.float64 and s.shape == (len(R),)
        assert abs(weighted_mean(s, weights) - target) <= EXACT
        assert float(s.min()) >= 0.0 and float(s.max()) <= 0.99 + 1e-15


def test_equal_r_gives_zero_correction():
    base = owl_allocation(OUTLIERS, 0.7)
    s = absorption_correction(base, [1.3] * len(R), 0.2, 0.7)
    assert torch.allclose(s, base, atol=1e-15)
    assert torch.count_nonzero(absorption_delta([0.7] * 5)) == 0


def test_sign_amplifying_block_loses_sparsity():
    base = uniform_allocation(len(R), 0.7)
    s = absorption_correction(base, R, 0.05, 0.7)
    assert s[0] < 0.7 and s[1] < 0.7  # r > 1: amplifies -> protected
    assert s[-1] > 0.7 and s[-2] > 0.7  # r < 1: absorbs -> pruned harder
    assert bool((s[1:] >= s[:-1]).all())  # r decreasing with depth -> s increasing


@pytest.mark.parametrize("weights", [None, W])
def test_max_shift_equals_gamma(weights):
    base = uniform_allocation(len(R), 0.6)
    gamma = 0.04
    s = absorption_correction(base, R, gamma, 0.6, weights=weights)
    assert float((s - base).abs().max()) == pytest.approx(gamma, abs=1e-12)
    d = absorption_delta(R, weights)
    assert float(d.abs().max()) == pytest.approx(1.0)
    assert torch.allclose(s - base, gamma * d, atol=1e-12)  # nothing clipped: no budget shift


def test_log_clip_bound_honoured():
    base = uniform_allocation(4, 0.7)
    a = absorption_correction(base, [100.0, 2.0, 1.0, 1.0], 0.05, 0.7)
    b = absorption_correction(base, [3.0, 2.0, 1.0, 1.0], 0.05, 0.7)
    assert torch.allclose(a, b, atol=1e-15)  # |ln r| beyond ln 3 is clipped
    # u = [ln3, ln2, 0, 0], m = mean(u) = ln6/4, delta = m - u, scaled by max |delta| = ln3 - m
    m = math.log(6) / 4
    expected = [(m - math.log(3)) / (math.log(3) - m), (m - math.log(2)) / (math.log(3) - m)]
    expected += [m / (math.log(3) - m)] * 2
    assert absorption_delta([100.0, 2.0, 1.0, 1.0]).tolist() == pytest.approx(expected, abs=1e-12)
    assert expected[0] == -1.0 and expected[2] == pytest.approx(0.688, abs=1e-3)


def test_high_target_respects_hi():
    base = uniform_allocation(len(R), 0.9)
    s = absorption_correction(base, R, 0.3, 0.9, hi=0.95)
    assert float(s.max()) <= 0.95 + 1e-15 and float(s.max()) == pytest.approx(0.95)
    assert abs(float(s.mean()) - 0.9) <= EXACT


def test_bad_inputs():
    base = uniform_allocation(3, 0.7)
    with pytest.raises(UserError):
        absorption_correction(base, [1.0, 0.0, 2.0], 0.1, 0.7)
    with pytest.raises(UserError):
        absorption_correction(base, [1.0, 2.0], 0.1, 0.7)
    with pytest.raises(UserError):
        absorption_correction(base, [1.0, 2.0, 3.0], float("nan"), 0.7)
    with pytest.raises(UserError):
        absorption_correction(base, [1.0, 2.0, 3.0], 0.1, 0.995)


def test_parse_allocation_spec():
    assert parse_allocation_spec("owl") == ("owl", False, None, False)
    assert parse_allocation_spec("Alpha+absorb") == ("alpha", True, None, False)
    assert parse_allocation_spec("uniform+absorb") == ("uniform", True, None, False)
    spec = parse_allocation_spec("file:my+list.json+absorb")
    assert spec.base == "file" and spec.absorb and spec.path == Path("my+list.json")
    assert parse_allocation_spec("file:/tmp/s.json").path == Path("/tmp/s.json")
    for bad in ("", "owl+", "magic", "file:", "file+absorb"):
        with pytest.raises(UserError):
            parse_allocation_spec(bad)


def test_damage_is_made_relative_before_the_clip():
    """Raw damage (sqrt KL ~0.1-0.3) would sit below -ln 3 everywhere and clip flat."""
    import math

    from sparsealloc.allocation import absorption_correction
    from sparsealloc.probe.absorption import relative_damage

    raw = [0.3, 0.1, 0.12, 0.2]
    rel = relative_damage(raw)
    assert math.isclose(math.prod(rel), 1.0)
    assert [round(a / b, 12) for a, b in zip(rel, rel[1:], strict=False)] == \
        [round(a / b, 12) for a, b in zip(raw, raw[1:], strict=False)]
    base = [0.7] * 4
    flat = absorption_correction(base, raw, 0.04, 0.7)
    assert max(flat) - min(flat) < 1e-9  # the bug this guards against: all clipped alike
    fixed = absorption_correction(base, rel, 0.04, 0.7)
    assert fixed[0] < 0.7 < fixed[1]  # the most damaging block is protected
