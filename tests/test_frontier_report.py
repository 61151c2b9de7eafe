"""The frontier table: L1 from the searched allocation, Spearman of the correction's shift."""

import json

import pytest

from sparsealloc.errors import UserError
from sparsealloc.report.coverage import coverage, render_coverage
from sparsealloc.report.frontier import frontier, l1, legend_labels, render_frontier, spearman
from sparsealloc.report.recommend import SEARCH_LABEL, render_summary, summary
from sparsealloc.report.seeds import row_labels
from sparsealloc.report.shift import render_shift, shift_summary
from sparsealloc.report.tables import table

PROTO = {"nsamples": 4, "seqlen": 16, "calib": "c4", "eval_seqlen": 16, "eval_tokens": 64,
         "bos_per_window": False}


def _row(allocation, ppl, alloc, seed, **options):
    return {"label": allocation, "allocation": allocation, "pruner": {"name": "wanda"},
            "target_sparsity": 0.5, "pattern": "unstructured", "seed": seed,
            "allocation_details": {"options": options}, "ppl": {"wikitext2": ppl},
            "block_sparsity": alloc}


def _record(rows, seed=0):
    return {"model": "m", "protocol": PROTO | {"seed": seed}, "rows": rows}


RECORDS = [
    ("a", _record([_row("uniform", 100.0, [0.5, 0.5, 0.5, 0.5], 0),
                   _row("owl", 80.0, [0.4, 0.5, 0.6, 0.5], 0, owl_m=5),
                   _row("owl+absorb", 60.0, [0.3, 0.5, 0.6, 0.6], 0, owl_m=5, absorb_gamma=0.1),
                   _row("search", 50.0, [0.2, 0.6, 0.5, 0.7], 0, search_generations=3)])),
    ("b", _record([_row("uniform", 120.0, [0.5, 0.5, 0.5, 0.5], 1),
                   _row("owl", 90.0, [0.4, 0.5, 0.6, 0.5], 1, owl_m=5),
                   _row("owl+absorb", 72.0, [0.3, 0.5, 0.6, 0.6], 1, owl_m=5,
                        absorb_gamma=0.1)], seed=1)),
]


def test_spearman_and_l1_by_hand():
    assert spearman([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    # ties take average ranks: x ranks (1.5, 1.5, 3), y ranks (1, 2, 3) -> r = 0.866
    assert spearman([0, 0, 1], [1, 2, 3]) == pytest.approx(3 ** 0.5 / 2)
    assert spearman([0, 0, 0], [1, 2, 3]) is None  # the correction moved nothing
    assert l1([0.5, 0.2], [0.1, 0.4]) == pytest.approx(0.6)


def test_frontier_rows_against_search():
    (setting,) = frontier(RECORDS)
    assert setting["search"] == "search"
    rows = {e["allocation"]: e for e in setting["rows"]}
    assert rows["search"]["searched_reference"] and rows["search"]["l1_from_search"] == 0
    # uniform: |.5-.2| + |.5-.6| + 0 + |.5-.7| = 0.6
    assert rows["uniform"]["l1_from_search"] == pytest.approx(0.6)
    assert rows["owl"]["l1_from_search"] == pytest.approx(0.2 + 0.1 + 0.1 + 0.2)
    # shift of the correction: (-.1, 0, 0, .1); search - owl: (-.2, .1, -.1, .2)
    # ranks (1, 2.5, 2.5, 4) vs (1, 3, 2, 4): r = 4.5 / sqrt(4.5 * 5) = 0.9487
    assert rows["owl+absorb"]["spearman_to_search"] == pytest.approx(4.5 / (4.5 * 5) ** 0.5)
    assert "spearman_to_search" not in rows["owl"]
    # paired over two seeds: 60/80 - 1 = -25%, 72/90 - 1 = -20%
    assert rows["owl+absorb"]["vs_base"]["mean"] == pytest.approx(-0.225)
    assert rows["owl+absorb"]["seeds"] == [0, 1] and rows["search"]["seeds"] == [0]
    text = render_frontier([setting])
    assert text.splitlines()[4].startswith("| search | 1 | 50.0 ± 0.0 | -50.0% |")
    assert "| owl+absorb | 2 | 66.0 ± 8.5 |" in text and "| +0.95 |" in text


def test_table_frontier_writes_plot(tmp_path):
    paths = []
    for name, rec in RECORDS:
        paths.append(str(tmp_path / f"{name}.json"))
        (tmp_path / f"{name}.json").write_text(json.dumps(rec))
    text = table(paths, style="frontier", plot=tmp_path / "f.png")
    assert "reference: `search`" in text and (tmp_path / "f.png").stat().st_size > 1000
    with pytest.raises(UserError, match="--plot draws the frontier figure"):
        table(paths, style="grid", plot=tmp_path / "g.png")


def test_legend_labels_tell_variants_of_one_allocation_apart():
    (setting,) = frontier([("a", _record([
        _row("uniform", 100.0, [0.5, 0.5], 0),
        _row("linear:auto", 90.0, [0.4, 0.6], 0),
        _row("linear:auto", 95.0, [0.5, 0.5], 0, linear_select="1se"),
        _row("owl+absorb", 80.0, [0.45, 0.55], 0, absorb_final="damage", absorb_gamma=0.1),
        _row("owl+absorb", 85.0, [0.3, 0.7], 0, absorb_gamma=0.1),
        _row("alpha", 120.0, [0.4, 0.6], 0, alpha_eps=0.3, tokens=[2, 1]),
        _row("alpha", 130.0, [0.6, 0.4], 0, alpha_eps=0.2, tokens=[3, 1]),
        _row("dlp", 140.0, [0.6, 0.4], 0, dlp_alpha=0.1, tokens=[3, 1]),
        _row("dlp", 150.0, [0.6, 0.4], 0)]))])
    rows = sorted(setting["rows"], key=lambda e: e["ppl_mean"])
    # rows alone in their allocation keep its name; the two pairs name what differs (not the
    # options they share), so no two legend entries read the same
    assert legend_labels(rows) == [
        "owl+absorb (absorb_final=damage)", "owl+absorb", "linear:auto",
        "linear:auto (linear_select=1se)", "uniform", "alpha (alpha_eps=0.3, tokens=[2, 1])",
        "alpha (alpha_eps=0.2, tokens=[3, 1])", "dlp (dlp_alpha=0.1, tokens=[3, 1])", "dlp"]


def test_setting_without_search_has_no_distances():
    (setting,) = frontier(RECORDS[1:])
    assert setting["search"] is None
    assert all("l1_from_search" not in e for e in setting["rows"])
    assert "no search row" in render_frontier([setting])


def test_table_filters_rows_by_model_pruner_and_sparsity(tmp_path):
    rec = _record([_row("uniform", 100.0, [0.5] * 4, 0),
                   _row("uniform", 30.0, [0.3] * 4, 0) | {"target_sparsity": 0.3},
                   _row("uniform", 90.0, [0.5] * 4, 0) | {"pruner": {"name": "sparsegpt"}}])
    path = tmp_path / "r.json"
    path.write_text(json.dumps(rec))
    text = table([str(path)], style="frontier", sparsity=0.5, pruner="wanda")
    assert text.count("**m, ") == 1 and "| uniform | 1 | 100.0 ± 0.0 |" in text
    assert table([str(path)], style="frontier", model="other") == ""


def _two_settings():
    """Two models x two seeds: uniform, 'a' (wins on m1, loses on m2), 'b' (small wins on
    both) and owl+absorb probed with 4 sequences (1 seed) and 8 (2 seeds) on m1."""
    ppl = {"m1": {"uniform": (100.0, 110.0), "a": (50.0, 55.0), "b": (90.0, 99.0)},
           "m2": {"uniform": (200.0, 200.0), "a": (260.0, 240.0), "b": (190.0, 188.0)}}
    recs = []
    for model, rows in ppl.items():
        for seed in (0, 1):
            rs = [_row(name, vals[seed], [0.5, 0.5, 0.5, 0.5], seed)
                  for name, vals in rows.items()]
            if model == "m1":
                rs.append(_row("owl+absorb", 80.0 + seed * 8.0, [0.5] * 4, seed,
                               absorb_nsamples=8))
                if seed == 0:
                    rs.append(_row("owl+absorb", 10.0, [0.5] * 4, seed, absorb_nsamples=4))
            rec = _record(rs, seed)
            rec["model"] = model
            recs.append((f"{model}-{seed}", rec))
    return recs


def test_summary_across_settings_by_hand():
    result = summary(frontier(_two_settings()), defaults={"absorb_nsamples": 16})
    assert result["settings"] == ["m1 wanda 50%", "m2 wanda 50%"]
    rows = {r["label"]: r for r in result["rows"]}
    # a: m1 -50% both seeds (se 0: not 'beyond 2 se' -- zero spread is not evidence),
    # m2 +30% and +20% -> mean +25%
    assert rows["a"]["changes"][0]["mean"] == pytest.approx(-0.5)
    assert rows["a"]["changes"][1]["mean"] == pytest.approx(0.25)
    assert rows["a"]["worst"] == pytest.approx(0.25) and rows["a"]["complete"]
    # b: m1 -10%, -10%; m2 -5%, -6% (mean -5.5%, se 0.5%: beyond twice its se)
    assert rows["b"]["changes"][1]["mean"] == pytest.approx(-0.055)
    assert rows["b"]["changes"][1]["se"] == pytest.approx(0.005)
    assert rows["b"]["beaten"] == 1 and rows["b"]["worst"] == pytest.approx(-0.1 + 0.045)
    # the probe's sample size does not split a row: the 2-seed variant (-20%) counts
    assert rows["owl+absorb"]["changes"][0]["n"] == 2
    assert rows["owl+absorb"]["changes"][0]["mean"] == pytest.approx(-0.2)
    assert not rows["owl+absorb"]["complete"] and rows["owl+absorb"]["changes"][1] is None
    assert rows["uniform"]["worst"] == 0.0
    assert result["least_worst"] == "b"  # minimax: b's worst (-5.5%) beats uniform's 0, a's +25%
    # regret against each setting's best row: m1 best a (-50%), m2 best b (-5.5%)
    # uniform: 1/0.5 - 1 = +100%; a: 1.25/0.945 - 1 = +32.3%; b: 0.9/0.5 - 1 = +80%;
    # owl+absorb (m1 only): 0.8/0.5 - 1 = +60%
    assert rows["uniform"]["worst_regret"] == pytest.approx(1.0)
    assert rows["a"]["worst_regret"] == pytest.approx(1.25 / 0.945 - 1)
    assert rows["b"]["worst_regret"] == pytest.approx(0.8)
    assert rows["owl+absorb"]["worst_regret"] == pytest.approx(0.6)
    assert result["least_regret"] == "a"  # of the complete rows; owl+absorb is not
    text = render_summary(result)
    assert "Lowest worst-case change against uniform over every setting: `b`." in text
    assert "Lowest worst-case regret over every setting: `a`." in text
    assert "Beats uniform in every setting: none." in text
    assert "| b | -10.0% ± 0.0% | -5.5% ± 0.5% * | 1/2 | -5.5% | +80.0% |" in text


def test_table_frontier_adds_the_summary_with_several_settings(tmp_path):
    paths = []
    for name, rec in _two_settings():
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(rec))
        paths.append(str(path))
    assert "Across settings" in table(paths, style="frontier")
    assert "Across settings" not in table(paths, style="frontier", model="m1")
    only = table(paths, style="recommend")
    assert only.startswith("**Across settings**") and "m1 wanda 50%" in only
    assert only == render_summary(summary(frontier([(p, json.loads(open(p).read()))
                                                    for p in paths])))


def test_the_reference_is_the_best_of_several_searches():
    second = _row("search:owl", 45.0, [0.3, 0.6, 0.5, 0.6], 0, owl_m=5, search_generations=3)
    records = [("a", _record(RECORDS[0][1]["rows"] + [second])), RECORDS[1]]
    (setting,) = frontier(records)
    assert setting["search"] == "search:owl"  # 45 beats the plain search's 50
    rows = {e["allocation"]: e for e in setting["rows"]}
    assert rows["search:owl"]["searched_reference"] and not rows["search"]["searched_reference"]
    # uniform against (.3, .6, .5, .6): .2 + .1 + 0 + .1
    assert rows["uniform"]["l1_from_search"] == pytest.approx(0.4)


def test_spearman_is_marked_when_the_search_started_from_the_same_coefficients():
    searched = _row("search:owl+absorb", 40.0, [0.2, 0.5, 0.6, 0.7], 0, owl_m=5,
                    absorb_gamma=0.1, search_generations=3)
    other_base = _row("alpha+absorb", 70.0, [0.4, 0.4, 0.6, 0.6], 0, absorb_gamma=0.1)
    other_coef = _row("alpha+absorb", 75.0, [0.4, 0.4, 0.6, 0.6], 0, absorb_gamma=0.1,
                      absorb_final="damage")
    alpha = _row("alpha", 90.0, [0.5, 0.4, 0.6, 0.5], 0)
    records = [("a", _record(RECORDS[0][1]["rows"][:3] + [searched, other_base, other_coef,
                                                         alpha])), RECORDS[1]]
    (setting,) = frontier(records)
    marked = {(e["allocation"], e["options"].get("absorb_final")): e.get("shares_search_shift")
              for e in setting["rows"] if "spearman_to_search" in e}
    # the start itself and any base corrected with the same coefficients; not another final
    assert marked == {("owl+absorb", None): True, ("alpha+absorb", None): True,
                      ("alpha+absorb", "damage"): False}
    text = render_frontier([setting])
    assert "† |" in text and "not an independent test" in text
    (plain,) = frontier(RECORDS)  # a search from uniform: no mark, no footnote
    assert not {e["allocation"]: e for e in plain["rows"]}["owl+absorb"]["shares_search_shift"]
    assert "†" not in render_frontier([plain])


def test_rows_that_would_read_the_same_show_how_they_differ():
    defaults = {"search_generations": 400, "search_holdout": 8192}
    old = {"allocation": "search", "options": {"search_generations": 3}}
    new = {"allocation": "search", "options": {"search_generations": 3, "search_holdout": 8192}}
    other = {"allocation": "owl", "options": {"owl_m": 5}}
    assert row_labels([old, new, other], defaults) == [
        "search (search_generations=3; search_holdout=absent)",
        "search (search_generations=3; search_holdout=8192)",
        "owl",
    ]
    # an option without a default tells two rows apart too
    a = {"allocation": "owl", "options": {"note": 1}}
    b = {"allocation": "owl", "options": {"note": 2}}
    assert row_labels([a, b], defaults) == ["owl (note=1)", "owl (note=2)"]


def test_searches_are_one_reference_row_never_recommended():
    """Each setting's best search is the one 'search' row; it is not the default even where its
    worst case is the lowest (a search is not a prune's cost)."""
    recs = _two_settings()
    extra = {"m1": [("search", 45.0), ("search:owl", 40.0)], "m2": [("search:dlp", 180.0)]}
    for _, rec in recs:
        if rec["protocol"]["seed"] == 0:
            rec["rows"] += [_row(alloc, ppl, [0.5] * 4, 0, search_generations=3)
                            for alloc, ppl in extra[rec["model"]]]
    result = summary(frontier(recs), defaults={"absorb_nsamples": 16})
    labels = [r["label"] for r in result["rows"]]
    assert SEARCH_LABEL in labels and not any(x.startswith("search:") for x in labels)
    assert len(labels) == len(set(labels))
    row = {r["label"]: r for r in result["rows"]}[SEARCH_LABEL]
    # m1: search:owl (40) beats search (45) -> -60% against uniform's 100; m2: 180 vs 200 -> -10%
    assert row["changes"][0]["mean"] == pytest.approx(-0.6)
    assert row["changes"][1]["mean"] == pytest.approx(-0.1)
    assert row["complete"] and row["worst"] == pytest.approx(-0.1)
    assert result["least_worst"] == "b"  # not the search, though its worst case is lower
    # nor does the search set the regret's best (m1: a's -50%, not the search's -60%; m2: b's
    # -5.5%): its regrets are negative, 0.4 / 0.5 - 1 and 0.9 / 0.945 - 1, the worst the latter
    assert row["worst_regret"] == pytest.approx(0.9 / 0.945 - 1)
    assert result["least_regret"] == "a"
    text = render_summary(result)
    assert "against uniform over every setting: `b`." in text and "not a candidate" in text


def test_min_settings_leaves_out_allocations_measured_in_fewer_settings(tmp_path):
    """owl+absorb is measured on m1 only: --min-settings 2 leaves it out and says so; uniform
    stays, and the recommendation does not change (it needs every setting anyway)."""
    settings = frontier(_two_settings())
    full = summary(settings, defaults={"absorb_nsamples": 16})
    kept = summary(settings, defaults={"absorb_nsamples": 16}, min_settings=2)
    assert [r["label"] for r in kept["rows"]] == [r["label"] for r in full["rows"]
                                                 if r["label"] != "owl+absorb"]
    assert kept["left_out"] == 1 and full["left_out"] == 0
    assert kept["least_worst"] == full["least_worst"] == "b"
    assert "1 allocation(s) measured in fewer than 2 settings are left out" in render_summary(kept)
    assert "left out" not in render_summary(full)
    paths = []
    for name, rec in _two_settings():
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(rec))
        paths.append(str(path))
    assert "| owl+absorb |" not in table(paths, style="recommend", min_settings=2)
    with pytest.raises(UserError, match="--min-settings filters"):
        table(paths, style="grid", min_settings=2)
    for style in ("grid", "recommend"):
        with pytest.raises(UserError, match="--min-seeds filters"):
            table(paths, style=style, min_seeds=2)
    assert "fewer than 2 seeds" in table(paths, style="frontier", min_seeds=2)
    with pytest.raises(UserError, match="at least 1"):
        summary(settings, min_settings=0)


def test_min_seeds_leaves_out_rows_with_fewer_seeds_but_keeps_uniform_and_searches():
    recs = _two_settings()
    for _, rec in recs:
        if rec["protocol"]["seed"] == 0 and rec["model"] == "m1":
            rec["rows"].append(_row("search", 45.0, [0.5] * 4, 0, search_generations=3))
    settings = [s for s in frontier(recs) if s["model"] == "m1"]
    defaults = {"absorb_nsamples": 16}
    full = render_frontier(settings, defaults)
    kept = render_frontier(settings, defaults, min_seeds=2)
    assert "| owl+absorb (absorb_nsamples=4) | 1 |" in full
    assert "absorb_nsamples=4" not in kept and "| owl+absorb (absorb_nsamples=8) | 2 |" in kept
    assert "| search | 1 |" in kept and "| uniform | 2 |" in kept
    assert "1 row(s) with fewer than 2 seeds left out (`--min-seeds`)." in kept
    assert "left out" not in full
    with pytest.raises(UserError, match="at least 1"):
        render_frontier(settings, defaults, min_seeds=0)


def _shift_settings():
    """m (RECORDS): rho +0.95 over 4 blocks, independent; m2: the search started from the same
    correction (not independent), rho -0.5; m3: rho +1 over 6 blocks (beyond 1.96/sqrt(5))."""
    m2 = [_row("uniform", 100.0, [0.5] * 4, 0), _row("owl", 90.0, [0.4, 0.5, 0.6, 0.5], 0, owl_m=5),
          _row("owl+absorb", 80.0, [0.3, 0.5, 0.6, 0.6], 0, owl_m=5, absorb_gamma=0.1),
          _row("search:owl+absorb", 70.0, [0.6, 0.5, 0.4, 0.5], 0, owl_m=5, absorb_gamma=0.1)]
    m3 = [_row("uniform", 100.0, [0.5] * 6, 0), _row("owl", 90.0, [0.5] * 6, 0, owl_m=5),
          _row("owl+absorb", 80.0, [0.3, 0.4, 0.45, 0.55, 0.6, 0.7], 0, owl_m=5,
               absorb_gamma=0.1),
          _row("search", 70.0, [0.2, 0.4, 0.45, 0.55, 0.6, 0.8], 0, search_generations=3)]
    return [*RECORDS, ("m2", _record(m2) | {"model": "m2"}), ("m3", _record(m3) | {"model": "m3"})]


def test_shift_summary_counts_independent_tests_by_hand(tmp_path):
    defaults = {"owl_m": 5, "absorb_gamma": 0.1}
    result = shift_summary(frontier(_shift_settings()), defaults)
    assert result["settings"] == ["m wanda 50%", "m2 wanda 50%", "m3 wanda 50%"]
    (row,) = result["rows"]
    assert row["label"] == "owl+absorb"
    m, m2, m3 = row["cells"]
    assert m["rho"] == pytest.approx(4.5 / (4.5 * 5) ** 0.5) and m["independent"]
    assert m["critical"] == pytest.approx(1.96 / 3 ** 0.5) and not m["beyond"]
    # shift (-.1, 0, 0, .1) against search - owl (.2, 0, -.2, 0): ranks give -2.25 / 4.5
    assert m2["rho"] == pytest.approx(-0.5) and not m2["independent"]
    assert m3["rho"] == pytest.approx(1.0) and m3["beyond"]  # 1 > 1.96 / sqrt(5) = 0.877
    assert (row["tests"], row["positive"], row["beyond"]) == (2, 2, 1)
    text = render_shift(result)
    assert "| owl+absorb | +0.95 | -0.50 † | +1.00 * | 2/2 | 1/2 |" in text
    assert "All corrections: 2 of 2 independent tests positive, 1 beyond" in text
    paths = []
    for name, rec in _shift_settings():
        (tmp_path / f"{name}.json").write_text(json.dumps(rec))
        paths.append(str(tmp_path / f"{name}.json"))
    assert table(paths, style="shift", defaults=defaults) == text
    assert shift_summary(frontier(_shift_settings()), defaults, min_settings=4)["left_out"] == 1



def test_coverage_shows_the_seeds_each_table_uses():
    """owl+absorb on m1: the 8-sequence variant (seeds 0, 1) counts, not the 4-sequence one
    (seed 0); it is not measured on m2; a search is one seed and never counted short."""
    recs = _two_settings()
    recs[0][1]["rows"].append(_row("search", 45.0, [0.5] * 4, 0, search_generations=3))
    result = coverage(frontier(recs), defaults={"absorb_nsamples": 16}, seeds=3)
    rows = {r["label"]: r["seeds"] for r in result["rows"]}
    assert rows["owl+absorb"] == [[0, 1], None]
    assert rows["uniform"] == rows["a"] == rows["b"] == [[0, 1], [0, 1]]
    assert rows[SEARCH_LABEL] == [[0], None]
    assert (result["short"], result["missing"]) == (7, 1)
    text = render_coverage(result)
    assert "| owl+absorb | 0,1 < | - |" in text and "| search (best of the setting's searches) " \
        "| 0 | - |" in text
    assert "7 measured cells have fewer than 3 seeds; 1 cells are not measured" in text
    assert coverage(frontier(recs), seeds=2)["short"] == 0
    kept = coverage(frontier(recs), min_settings=2)
    assert "owl+absorb" not in {r["label"] for r in kept["rows"]} and kept["left_out"] == 1
