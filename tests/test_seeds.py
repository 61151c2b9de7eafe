"""Rows over calibration seeds: mean ± sd, and paired changes with standard errors."""

from __future__ import annotations

import json
import math

import pytest
from tiny_models import save_tiny
from typer.testing import CliRunner

from sparsealloc.cli import app
from sparsealloc.report.seeds import collect_seeds, paired, render_seeds, summarise
from sparsealloc.report.tables import table


def _rec(seed, rows):
    proto = {"nsamples": 4, "seqlen": 8, "calib": "c4", "eval_seqlen": 8, "eval_tokens": 64,
             "bos_per_window": False, "seed": seed}
    return ("f", {"model": "m", "protocol": proto, "rows": [
        {"allocation": a, "pruner": {"name": "wanda"}, "target_sparsity": 0.7,
         "ppl": {"wikitext2": v}, "allocation_details": {"options": o}} for a, v, o in rows]})


def test_paired_change_hand_computed():
    c = paired({0: 110.0, 1: 90.0, 2: 105.0}, {0: 100.0, 1: 100.0, 2: 100.0})
    assert c["changes"] == pytest.approx([0.10, -0.10, 0.05])
    assert c["mean"] == pytest.approx(0.05 / 3)
    sd = math.sqrt(((0.1 - 0.05 / 3) ** 2 + (-0.1 - 0.05 / 3) ** 2 + (0.05 - 0.05 / 3) ** 2) / 2)
    assert c["se"] == pytest.approx(sd / math.sqrt(3)) and c["n"] == 3
    assert paired({0: 1.0}, {1: 1.0}) is None


def test_summary_pairs_rows_per_seed():
    owl = {"owl_m": 5.0}
    records = [_rec(s, [("uniform", u, {}), ("owl", o, owl), ("owl+absorb", a, owl | {"g": 1})])
               for s, u, o, a in ((0, 200.0, 150.0, 120.0), (1, 220.0, 165.0, 132.0),
                                  (2, 180.0, 135.0, 108.0))]
    entries = {e["allocation"]: e for e in summarise(collect_seeds(records))}
    assert entries["uniform"]["ppl_mean"] == pytest.approx(200.0)
    assert entries["uniform"]["ppl_sd"] == pytest.approx(20.0)
    # every seed: owl is 25% below uniform, +absorb 20% below owl: no spread at all
    assert entries["owl"]["vs_uniform"]["mean"] == pytest.approx(-0.25)
    assert entries["owl"]["vs_uniform"]["se"] == pytest.approx(0.0, abs=1e-12)
    assert entries["owl+absorb"]["vs_base"]["mean"] == pytest.approx(-0.20)
    text = render_seeds(list(entries.values()))
    assert "| owl+absorb | 3 | 120.0 ± 12.0 | -40.0% ± 0.0% | -20.0% ± 0.0% |" in text


def test_compare_with_seeds(tmp_path):
    folder, text = save_tiny(tmp_path)
    out = tmp_path / "seeds"
    res = CliRunner().invoke(app, [
        "compare", "--model", str(folder), "--calib", str(text), "--ppl", str(text),
        "--nsamples", "2", "--seqlen", "16", "--sparsity", "0.5", "--no-dense", "--quiet",
        "--allocations", "uniform,owl", "--seeds", "0,1", "--out", str(out)])
    assert res.exit_code == 0, res.output
    rec = json.loads((out / "compare.json").read_text())
    assert rec["seeds"] == [0, 1] and [r["seed"] for r in rec["rows"]] == [0, 0, 1, 1]
    assert rec["shared_work"]["dense_stats_passes"] == 2  # both seeds' work is counted
    owl = next(e for e in rec["seed_summary"] if e["allocation"] == "owl")
    assert owl["seeds"] == [0, 1] and owl["vs_uniform"]["n"] == 2
    by_seed = {r["seed"]: r["ppl_main"] for r in rec["rows"] if r["allocation"] == "owl"}
    assert owl["ppl_by_seed"] == {str(k): v for k, v in by_seed.items()}
    assert "Over calibration seeds 0, 1" in (out / "compare.md").read_text()


def test_bad_seeds_are_one_line():
    res = CliRunner().invoke(app, ["compare", "--seeds", "0,x"])
    assert res.exit_code != 0 and "--seeds must be whole numbers" in str(res.exception)


def test_a_row_seen_twice_with_one_seed_and_two_values_is_flagged(tmp_path):
    def rec(ppl):
        return {"model": "m", "protocol": {"nsamples": 4, "seqlen": 16, "calib": "c4", "seed": 0,
                                           "eval_seqlen": 16, "eval_tokens": 64},
                "rows": [{"label": "uniform", "allocation": "uniform",
                          "pruner": {"name": "wanda"}, "target_sparsity": 0.7,
                          "ppl": {"w": ppl}, "block_sparsity": [0.7, 0.7]}]}

    paths = []
    for name, ppl in (("a", 339.9), ("b", 312.3), ("c", 339.9)):
        (tmp_path / f"{name}.json").write_text(json.dumps(rec(ppl)))
        paths.append(str(tmp_path / f"{name}.json"))
    text = table(paths, style="seeds")
    warnings = [line for line in text.splitlines() if line.startswith("<!-- warning")]
    assert len(warnings) == 1  # b differs from the kept a; c agrees
    assert "339.9000 kept" in warnings[0] and "312.3000 in" in warnings[0]
    assert "| 339.9 ± 0.0 |" in text  # the first is kept


def test_a_seed_is_taken_from_the_run_with_most_of_its_rows(tmp_path):
    """An older file with two of the rows, given first, does not split a newer run's pairs: each
    setting and seed comes from the file holding most of its rows (rows only in the older file
    still count)."""
    def rec(rows):
        return {"model": "m", "protocol": {"nsamples": 4, "seqlen": 16, "calib": "c4", "seed": 0,
                                           "eval_seqlen": 16, "eval_tokens": 64},
                "rows": [{"label": a, "allocation": a, "pruner": {"name": "wanda"},
                          "target_sparsity": 0.7, "ppl": {"w": ppl}, "block_sparsity": [0.7] * 2}
                         for a, ppl in rows]}

    old = rec([("uniform", 100.0), ("owl", 80.0), ("dlp", 50.0)])
    new = rec([("uniform", 110.0), ("owl", 99.0), ("lsa", 88.0), ("alpha", 77.0)])
    records = [("old.json", old), ("new.json", new)]
    found: list[str] = []
    groups = collect_seeds(records, found)
    by_alloc = {k[4]: v[0] for k, v in groups.items()}
    assert by_alloc == {"uniform": 110.0, "owl": 99.0, "lsa": 88.0, "alpha": 77.0, "dlp": 50.0}
    owl = next(e for e in summarise(groups) if e["allocation"] == "owl")
    assert owl["vs_uniform"]["mean"] == pytest.approx(99.0 / 110.0 - 1)  # not 80/110 or 99/100
    assert len(found) == 2 and all("kept (new.json)" in w for w in found)
