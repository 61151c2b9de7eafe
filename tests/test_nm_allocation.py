"""Mixed N:M: every block its own N (M fixed) from the allocation, budget as close as the levels
allow; the correction's probe prunes with the row's pattern."""

from __future__ import annotations

import json

import pytest
from tiny_models import save_tiny
from typer.testing import CliRunner

from sparsealloc.allocation import Allocation, AllocationOptions
from sparsealloc.cli import app
from sparsealloc.errors import UserError
from sparsealloc.pruners.nm_levels import achieved_budget, check_levels_meet, nm_levels


def test_levels_hand_computed():
    assert nm_levels([0.5, 0.5, 0.5], 4) == [2, 2, 2]
    # x = [3.2, 4, 4.8]: floors [3, 4, 4] reach 11 of 12; the largest remainder (block 2) goes up
    assert nm_levels([0.4, 0.5, 0.6], 8) == [3, 4, 5]
    # weighted: goal 8 units; block 2 (weight 2) would overshoot to 9, block 0 reaches 8 exactly
    levels = nm_levels([0.3, 0.5, 0.6], 4, weights=[1, 1, 2], target=0.5)
    assert levels == [2, 2, 2]
    assert achieved_budget(levels, 4, [1, 1, 2]) == pytest.approx(0.5)


def test_levels_stay_below_m_and_at_least_zero():
    assert nm_levels([0.0, 0.99, 0.5], 4, target=0.5) == [0, 3, 2] or \
        max(nm_levels([0.0, 0.99, 0.5], 4, target=0.5)) <= 3
    assert min(nm_levels([0.0, 0.0, 0.9], 4)) >= 0


def test_an_allocation_the_levels_cannot_honour_is_refused():
    levels = nm_levels([0.9, 0.9, 0.9], 4, target=0.5)
    with pytest.raises(UserError, match="cannot be honoured with N:4 levels"):
        check_levels_meet(levels, 4, 0.5, spec="file:x.json")


runner = CliRunner()


def _prune(folder, text, out, *extra):
    return runner.invoke(app, ["prune", "--model", str(folder), "--calib", str(text), "--ppl",
                               str(text), "--nsamples", "2", "--seqlen", "16", "--out", str(out),
                               "--quiet", *extra])


def test_mixed_nm_follows_the_allocation(tmp_path):
    folder, text = save_tiny(tmp_path)
    alloc = tmp_path / "alloc.json"
    alloc.write_text(json.dumps([0.375, 0.5, 0.625]))
    res = _prune(folder, text, tmp_path / "mixed", "--pattern", "4:8", "--sparsity", "0.5",
                 "--allocation", f"file:{alloc}")
    assert res.exit_code == 0, res.output
    rec = json.loads((tmp_path / "mixed" / "result.json").read_text())
    assert rec["block_pattern"] == ["3:8", "4:8", "5:8"]
    assert rec["measured_block_sparsity"] == pytest.approx([0.375, 0.5, 0.625], abs=1e-9)
    assert rec["nm_budget"] == pytest.approx(0.5)
    res = _prune(folder, text, tmp_path / "uni", "--pattern", "4:8", "--sparsity", "0.5")
    assert res.exit_code == 0, res.output
    uni = json.loads((tmp_path / "uni" / "result.json").read_text())
    assert uni["block_pattern"] == ["4:8"] * 3


def test_nm_that_cannot_honour_a_file_allocation_exits_2(tmp_path):
    folder, text = save_tiny(tmp_path)
    alloc = tmp_path / "alloc.json"
    alloc.write_text(json.dumps([0.9, 0.9, 0.9]))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "result.json").write_text("old")
    res = _prune(folder, text, tmp_path / "run", "--pattern", "2:4", "--sparsity", "0.5",
                 "--allocation", f"file:{alloc}")
    assert isinstance(res.exception, UserError) and "cannot be honoured" in str(res.exception)
    assert (tmp_path / "run" / "result.json").read_text() == "old"  # refused before the work


def test_correction_probes_with_the_rows_pattern():
    seen = {}

    def fake_coefficients(session, **kwargs):
        seen.update(kwargs)
        return [1.0, 1.0, 1.0]

    from sparsealloc.allocation import correction

    class FakeSession:
        params_per_block = [1, 1, 1]

        def absorption(self, **kwargs):
            return fake_coefficients(self, **kwargs)

    alloc = Allocation(spec="uniform+absorb", target_sparsity=0.5, block_sparsity=[0.5] * 3)
    correction.apply_correction(FakeSession(), alloc, AllocationOptions().of("absorb"), "wanda",
                                "2:4")
    assert seen["pattern"] == "2:4" and seen["sparsity"] == 0.5
