"""compare --resume: finished rows are taken over, only the others run, mismatches are refused."""

import json

import pytest
from tiny_models import save_tiny
from typer.testing import CliRunner

import sparsealloc.jobs.compare as compare_mod
from sparsealloc.allocation import AllocationOptions
from sparsealloc.cli import app
from sparsealloc.errors import UserError
from sparsealloc.jobs.resume import differences
from sparsealloc.report.seeds import row_key
from sparsealloc.rows import RowSpec

runner = CliRunner()


def _compare(folder, text, out, *extra):
    return runner.invoke(app, ["compare", "--model", str(folder), "--calib", str(text),
                               "--ppl", str(text), "--nsamples", "4", "--seqlen", "32",
                               "--sparsity", "0.5", "--quiet", "--out", str(out), *extra])


@pytest.fixture
def tiny(tmp_path):
    return save_tiny(tmp_path)


def _crash_on_row(monkeypatch, n):
    """Make the n-th pruned row's evaluation (after the dense row's) raise."""
    real, calls = compare_mod.evaluate, []

    def evaluate(session, request):
        calls.append(1)
        if len(calls) == n + 1:
            raise RuntimeError("simulated crash")
        return real(session, request)

    monkeypatch.setattr(compare_mod, "evaluate", evaluate)


def test_resume_runs_only_the_missing_rows_and_matches_a_fresh_run(tiny, tmp_path, monkeypatch):
    folder, text = tiny
    fresh = tmp_path / "fresh"
    assert _compare(folder, text, fresh, "--allocations", "uniform,owl").exit_code == 0
    out = tmp_path / "cmp"
    with monkeypatch.context() as m:
        _crash_on_row(m, 2)
        assert _compare(folder, text, out, "--allocations", "uniform,owl").exit_code != 0
    partial = json.loads((out / "compare.partial.json").read_text())
    assert [r["allocation"] for r in partial["rows"]] == ["uniform"]

    pruned = []
    real_prune = compare_mod.prune_row
    monkeypatch.setattr(compare_mod, "prune_row",
                        lambda s, row, a: pruned.append(row.allocation) or real_prune(s, row, a))
    res = _compare(folder, text, out, "--allocations", "uniform,owl", "--resume")
    assert res.exit_code == 0, res.output
    assert pruned == ["owl"]  # uniform was taken over
    rec = json.loads((out / "compare.json").read_text())
    assert rec["complete"] is True and not (out / "compare.partial.json").exists()
    assert rec["rows"][0] == partial["rows"][0]  # taken over as it was
    assert rec["dense"]["ppl"] == partial["dense"]["ppl"]
    assert rec["resumed"][0]["rows_reused"] == 1
    assert rec["resumed"][0]["from"].endswith("compare.partial.json")
    # deterministic: the resumed comparison is the uninterrupted one
    want = json.loads((fresh / "compare.json").read_text())
    assert [r["ppl"] for r in rec["rows"]] == [r["ppl"] for r in want["rows"]]
    assert (out / "compare.md").is_file() and (out / "compare.png").is_file()

    # a complete run resumed with one more row runs that row only
    pruned.clear()
    res = _compare(folder, text, out, "--allocations", "uniform,owl,alpha", "--resume")
    assert res.exit_code == 0, res.output
    assert pruned == ["alpha"]
    rec2 = json.loads((out / "compare.json").read_text())
    assert [r["allocation"] for r in rec2["rows"]] == ["uniform", "owl", "alpha"]
    assert [e["rows_reused"] for e in rec2["resumed"]] == [1, 2]


def test_resume_refuses_what_it_cannot_reuse_and_touches_nothing(tiny, tmp_path):
    folder, text = tiny
    out = tmp_path / "cmp"
    assert _compare(folder, text, out, "--allocations", "uniform,owl").exit_code == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    cases = [
        (["--allocations", "uniform,owl", "--nsamples", "2"], "another protocol (nsamples 4"),
        (["--allocations", "uniform"],
         "rows this command does not ask for ('wanda 50% owl' (seed 0))"),
        (["--row", "wanda 50% uniform|uniform|", "--row", "wanda 50% owl|owl|owl_m=3"],
         "row 'wanda 50% owl' (seed 0) made with other settings (owl_m=5.0 there, 3.0 now)"),
        (["--row", "wanda 50% uniform|uniform|", "--row", "wanda 50% owl|owl|", "--pruner",
          "magnitude"], "made with other settings (pruner {'name': 'wanda'"),
        (["--allocations", "uniform,owl", "--ppl", "wikitext2"], "evaluated other things"),
    ]
    for extra, says in cases:
        res = _compare(folder, text, out, *extra, "--resume")
        assert isinstance(res.exception, UserError), (extra, res.output)
        msg = str(res.exception)
        assert says in msg and "drop --resume" in msg, (extra, msg)
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_resume_into_more_seeds_and_without_an_earlier_run(tiny, tmp_path, monkeypatch):
    folder, text = tiny
    out = tmp_path / "cmp"
    res = _compare(folder, text, out, "--allocations", "uniform,owl", "--no-dense", "--resume")
    assert res.exit_code == 0 and "no earlier compare record" in res.output
    older = json.loads((out / "compare.json").read_text())  # as an older version wrote it
    del older["evaluation"], older["environment"]
    (out / "compare.json").write_text(json.dumps(older))
    pruned = []
    real_prune = compare_mod.prune_row
    monkeypatch.setattr(compare_mod, "prune_row",
                        lambda s, row, a: pruned.append(row.allocation) or real_prune(s, row, a))
    res = _compare(folder, text, out, "--allocations", "uniform,owl", "--no-dense",
                   "--seeds", "0,1", "--resume")
    assert res.exit_code == 0, res.output
    assert "predates the environment field" in res.output
    assert pruned == ["uniform", "owl"]  # seed 1 only
    rec = json.loads((out / "compare.json").read_text())
    assert [(r["label"], r["seed"]) for r in rec["rows"]] == [
        ("wanda 50% uniform (seed 0)", 0), ("wanda 50% owl (seed 0)", 0),
        ("wanda 50% uniform (seed 1)", 1), ("wanda 50% owl (seed 1)", 1)]
    owl = next(e for e in rec["seed_summary"] if e["allocation"] == "owl")
    assert owl["vs_uniform"]["n"] == 2


def test_a_row_that_predates_an_option_of_its_group_is_not_the_same_row():
    row = RowSpec.parse("wanda", "unstructured", 0.7, "linear:auto", AllocationOptions())
    rec = {"pruner": {"name": "wanda"}, "pattern": "unstructured", "target_sparsity": 0.7,
           "allocation": "linear:auto",
           "allocation_details": {"options": {"linear_spans": [0.0, 0.04, 0.08, 0.12, 0.16,
                                                               0.24, 0.32],
                                              "linear_span_used": 0.24}}}
    assert differences(rec, row) == ["linear_beta not recorded there (made before it existed)"]
    rec["allocation_details"]["options"]["linear_beta"] = None
    assert differences(rec, row) == []
    rec["allocation_details"]["options"]["linear_spans"] = [0.0, 0.5]
    assert differences(rec, row) == [
        "linear_spans=[0.0, 0.5] there, (0.0, 0.04, 0.08, 0.12, 0.16, 0.24, 0.32) now"]


def test_what_an_allocation_records_about_its_run_is_not_an_option():
    """linear:auto at the edge of its grid records `advice`, the search its result: a resumed
    row with them is the same row (it was refused as `an option this version does not have`),
    and the tables do not split it from the same row of a run that gave no advice."""
    row = RowSpec.parse("wanda", "unstructured", 0.6, "linear:auto", AllocationOptions())
    options = {"linear_beta": None, "linear_spans": [0.0, 0.04, 0.08, 0.12, 0.16, 0.24, 0.32],
               "linear_beta_used": 0.0188, "linear_span_used": 0.32, "beta_curve": [],
               "beta_tuned_on": "c4/tune",
               "advice": ["linear:auto chose the largest span it tried (0.32); ..."]}
    rec = {"pruner": {"name": "wanda"}, "pattern": "unstructured", "target_sparsity": 0.6,
           "allocation": "linear:auto", "ppl": {"wikitext2": 150.0},
           "allocation_details": {"options": options}}
    assert differences(rec, row) == []
    quiet = dict(rec, allocation_details={"options": {k: v for k, v in options.items()
                                                      if k != "advice"}})
    proto = {"nsamples": 4, "seqlen": 16}
    assert row_key("m", proto, rec) == row_key("m", proto, quiet)
