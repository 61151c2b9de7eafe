"""``sparsealloc table`` picks rows by their recorded options, never by label."""

import json

import pytest

from sparsealloc.allocation import AllocationOptions
from sparsealloc.report import tables

DEFAULTS = AllocationOptions().record()


def _collect(paths, variant):
    return tables.collect(tables.read_records(paths), variant, DEFAULTS)


def _row(spec, ppl, label=None, **opts):
    return {"label": label or spec, "allocation": spec, "pruner": {"name": "wanda"},
            "target_sparsity": 0.7, "ppl": {"wikitext2": ppl},
            "allocation_details": {"spec": spec, "options": opts}}


def _file(tmp_path, name, rows, dense=None):
    rec = {"model": "m", "protocol": {"nsamples": 4, "seqlen": 8, "eval_tokens": 64},
           "rows": rows, "dense": {"ppl": {"wikitext2": dense}} if dense else None}
    path = tmp_path / name
    path.write_text(json.dumps(rec))
    return str(path)


def test_rows_are_chosen_by_options_and_merged_across_files(tmp_path):
    a = _file(tmp_path, "a.json", [
        _row("owl", 100.0, owl_m=5.0, owl_lambda=0.08),
        _row("owl", 90.0, label="owl M3", owl_m=3.0, owl_lambda=0.08),  # not the default OWL
        _row("owl+absorb", 80.0, owl_m=5.0, owl_lambda=0.08, absorb_mode="prune",
             absorb_final="last", absorb_gamma=0.04),
        _row("owl+absorb", 60.0, label="x", owl_m=5.0, owl_lambda=0.08, absorb_mode="prune",
             absorb_final="damage", absorb_gamma=0.04),
        _row("owl+absorb", 70.0, label="y", owl_m=5.0, owl_lambda=0.08, absorb_mode="noise",
             absorb_final="last", absorb_gamma=0.04),
    ], dense=10.0)
    b = _file(tmp_path, "b.json", [_row("uniform", 120.0),
                                   _row("uniform+absorb", 132.0, absorb_gamma=0.04)])
    default = {"absorb_mode": "prune", "absorb_final": "last", "absorb_gamma": 0.04}
    groups = _collect([a, b], default)
    (g,) = groups.values()
    assert g["owl"] == 100.0 and g["owl+absorb"] == 80.0 and g["uniform"] == 120.0
    assert g["dense"] == 10.0 and g["sources"] == [a, b]
    text = tables.render_grid(groups)
    assert "80.0 (-20.0%)" in text and "132.0 (+10.0%)" in text
    assert "all settings, over 2 pairs: -5.0%" in text
    damage = _collect([a], dict(default, absorb_final="damage"))
    assert next(iter(damage.values()))["owl+absorb"] == 60.0


@pytest.mark.parametrize("all_groups, lines", [(False, 0), (True, 1)])
def test_settings_without_a_corrected_row_are_hidden_by_default(tmp_path, all_groups, lines):
    a = _file(tmp_path, "a.json", [_row("uniform", 120.0)])
    text = tables.render_grid(_collect([a], {}), all_groups)
    assert sum(line.startswith("| m |") for line in text.splitlines()) == lines


def test_table_refuses_a_file_that_is_not_a_result(tmp_path):
    from sparsealloc.errors import UserError

    bad = tmp_path / "x.json"
    bad.write_text("[1, 2]")
    with pytest.raises(UserError, match="not a compare/sweep result file"):
        tables.table([str(bad)])
    with pytest.raises(UserError, match="no such result file"):
        tables.table([str(tmp_path / "missing.json")])
