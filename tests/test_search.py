"""The ``search`` allocator: level grid, mutation, selection, database, KL fitness, CLI."""

from __future__ import annotations

import json
import random

import pytest
import torch
from tiny_models import SAMPLE_TEXT, save_tiny, tiny_model, tiny_tokenizer
from typer.testing import CliRunner

from sparsealloc.allocation import AllocationOptions, parse_allocation_spec, weighted_mean
from sparsealloc.allocation.search import (
    EvolveState,
    SearchConfig,
    SearchOptions,
    SearchResult,
    check_budget,
    checkpoints,
    evolve,
    level_grid,
    mutate,
    offspring,
)
from sparsealloc.blockwise import prune_block
from sparsealloc.cli import app
from sparsealloc.errors import UserError
from sparsealloc.frontier import (
    KLFitness,
    LevelDatabase,
    build_database,
    database,
    pack_mask,
    unpack_mask,
)
from sparsealloc.frontier import run as search_run
from sparsealloc.frontier.fitness import logit_softcap
from sparsealloc.frontier.run import held_out_choice
from sparsealloc.models.arch import weight_out_in
from sparsealloc.plan import compute_allocation
from sparsealloc.protocol import Protocol
from sparsealloc.pruners import get_pruner, parse_pattern
from sparsealloc.session import Session

QUICK = dict(search_generations=6, search_offspring=6, search_survivors=(3, 1),
             search_tokens=(32, 96), search_step=0.1, search_levels=2, search_holdout=0)


def _session(tmp_path, folder=None, text=None, nsamples=6) -> Session:
    if folder is None:
        folder, text = save_tiny(tmp_path)
    proto = Protocol(nsamples=nsamples, seqlen=32, calib=str(text))
    return Session(str(folder), proto, progress=False)


# ---------------------------------------------------------------- pure parts
@pytest.mark.parametrize("shape", [(3, 5), (8, 8), (1, 13), (7, 129)])
def test_bit_packed_mask_round_trip(shape):
    keep = torch.rand(shape, generator=torch.Generator().manual_seed(1)) > 0.4
    bits = pack_mask(keep)
    assert bits.dtype == torch.uint8 and bits.numel() == -(-keep.numel() // 8)
    assert torch.equal(unpack_mask(bits, shape), keep)


def test_mutations_keep_the_weighted_budget_exact():
    weights = [1000, 3000, 2000, 500, 1500]
    start = [0.6, 0.75, 0.7, 0.5, 0.8]
    target = weighted_mean(start, weights)
    grid = level_grid(start, weights, 0.025, 4)
    rng = random.Random(0)
    parent = (0,) * 5
    for _ in range(300):
        parent = mutate(parent, grid, rng)
        assert sum(parent) == 0
        assert all(lo <= k <= hi for k, lo, hi in zip(parent, grid.kmin, grid.kmax, strict=True))
        s = check_budget(grid, parent, target, weights)
        assert abs(weighted_mean(s, weights) - target) < 1e-12
        assert all(0.0 <= x <= 0.99 for x in s)
    # one level is the same number of weights in every block
    removed = [d * w for d, w in zip(grid.delta, weights, strict=True)]
    assert max(removed) - min(removed) < 1e-6


def test_grid_stops_at_the_bounds():
    grid = level_grid([0.05, 0.95], None, 0.025, 4, lo=0.0, hi=0.99)
    assert grid.kmin == (-2, -4) and grid.kmax == (4, 1)


def test_offspring_are_distinct_even_when_the_grid_is_small():
    grid = level_grid([0.5, 0.5], None, 0.1, 1)
    kids = offspring((0, 0), grid, 16, random.Random(0))
    assert len(kids) == len(set(kids)) <= 3


def _quadratic(optimum):
    def fitness(cands, stage):
        return [sum((k - o) ** 2 for k, o in zip(c, optimum, strict=True)) + 0.1 * stage
                for c in cands]
    return fitness


def test_evolve_finds_a_planted_optimum_and_never_gets_worse():
    optimum = (-3, 2, 0, 1, 0, 0)
    grid = level_grid([0.5] * 6, None, 0.025, 4)
    cfg = SearchConfig(generations=60, offspring=8, survivors=(4, 1), tokens=(1, 2))
    res = evolve(grid, _quadratic(optimum), cfg)
    assert res.levels == optimum
    assert res.curve[0] == res.start_fitness and res.fitness <= res.start_fitness
    assert all(b <= a for a, b in zip(res.curve, res.curve[1:], strict=False))
    again = evolve(grid, _quadratic(optimum), cfg)
    assert again.curve == res.curve and again.levels == res.levels
    # the trajectory: the start, then the parent after each improvement, with its fitness
    assert [g for g, _, _ in res.trajectory] == [0, *res.improved_generations]
    assert res.trajectory[0] == (0, (0,) * 6, res.start_fitness)
    assert res.trajectory[-1][1:] == (res.levels, res.fitness)
    assert all(res.curve[g] == f for g, _, f in res.trajectory)
    assert all(f == sum((k - o) ** 2 for k, o in zip(lv, optimum, strict=True)) + 0.1
               for _, lv, f in res.trajectory)


@pytest.mark.parametrize(("count", "wanted", "expect"), [
    (1, 8, [0]), (5, 8, [0, 1, 2, 3, 4]), (10, 8, [0, 1, 3, 4, 5, 6, 8, 9]),
    (100, 2, [0, 99]), (7, 3, [0, 3, 6]),
])
def test_checkpoints_are_evenly_spaced_with_both_ends(count, wanted, expect):
    assert checkpoints(count, wanted) == expect


class _FakeHeld:
    """A held-out fitness with given values per level vector."""

    tokens_per_stage = [64]
    final_batches = [0, 1]

    def __init__(self, values):
        self.values = values
        self.asked = []

    def kl_shared(self, cands, batches):
        self.asked.append(list(cands))
        return [self.values[c] for c in cands]


def test_held_out_choice_keeps_the_best_checkpoint_and_the_earlier_on_ties():
    traj = [(g, (g,), 10.0 - g) for g in range(5)]  # calibration fitness falls every time
    res = SearchResult(levels=(4,), fitness=6.0, start_fitness=10.0, trajectory=traj)
    held = _FakeHeld({(0,): 5.0, (1,): 4.0, (2,): 3.0, (3,): 3.0, (4,): 3.5})
    index, rec = held_out_choice(res, held, 8)
    assert index == 2  # generation 3 ties with 2: the earlier; the last (4) overfits
    assert rec["start_holdout_kl"] == 5.0 and rec["chosen_holdout_kl"] == 3.0
    assert rec["last_holdout_kl"] == 3.5 and rec["tokens"] == 64
    assert [c["generation"] for c in rec["checkpoints"]] == [0, 1, 2, 3, 4]
    index, rec = held_out_choice(res, _FakeHeld({(0,): 1.0, (2,): 3.0, (4,): 2.0}), 3)
    assert index == 0 and [c["generation"] for c in rec["checkpoints"]] == [0, 2, 4]


def test_search_options_reject_bad_holdout():
    with pytest.raises(UserError, match="--search-holdout must be >= 0"):
        SearchOptions(holdout=-1)
    with pytest.raises(UserError, match="--search-checkpoints must be at least 2"):
        SearchOptions(checkpoints=1)


def test_search_config_rejects_bad_stages():
    with pytest.raises(UserError, match="end with 1"):
        SearchConfig(survivors=(8, 2), tokens=(10, 20))
    with pytest.raises(UserError, match="one value per selection stage"):
        SearchConfig(survivors=(8, 1), tokens=(10,))


def test_spec_parsing():
    assert parse_allocation_spec("search") == ("uniform", None, False, True)
    spec = parse_allocation_spec("search:owl+absorb")
    assert spec.base == "owl" and spec.absorb and spec.search
    assert not parse_allocation_spec("owl+absorb").search
    for bad in ("search:", "search:search:owl"):
        with pytest.raises(UserError, match="search:SPEC"):
            parse_allocation_spec(bad)


# ---------------------------------------------------------------- model side
@pytest.mark.parametrize("pruner, kind", [("wanda", "mask"), ("magnitude", "mask"),
                                          ("sparsegpt", "weight")])
def test_database_entries_are_the_dense_input_prunes(tmp_path, pruner, kind):
    s = _session(tmp_path)
    s.restore_dense()
    db = LevelDatabase(tmp_path / "db", s.dense_weights)
    p, pat = get_pruner(pruner), parse_pattern("unstructured")
    wanted = [[0.3, 0.5]] * s.arch.num_blocks
    build_database(db, s.runner, s.capture, p, pat, wanted)
    assert db.built == 2 * s.arch.num_blocks
    assert {e["kind"] for e in db.entry(0, 0.5).values()} == {kind}
    # block 0 sees the embeddings, dense or not: a plain prune of block 0 must match
    prune_block(s.runner, 0, s.capture(), p, 0.5, pat)
    for name, module in s.arch.linears(0).items():
        assert torch.allclose(db.weights(0, 0.5)[name], weight_out_in(module), atol=1e-6)
    s.restore_dense()
    again = LevelDatabase(tmp_path / "db", s.dense_weights)  # read back from disk
    build_database(again, s.runner, s.capture, p, pat, wanted)
    assert again.built == 0 and again.reused == 2 * s.arch.num_blocks
    for name, w in db.weights(2, 0.3).items():
        assert torch.equal(again.weights(2, 0.3)[name], w)


def test_fitness_of_the_dense_levels_is_zero_and_grows_with_sparsity(tmp_path):
    s = _session(tmp_path)
    s.restore_dense()
    grid = level_grid([0.4] * s.arch.num_blocks, None, 0.4, 1, lo=0.0, hi=0.9)
    db = LevelDatabase(None, s.dense_weights)
    wanted = [[grid.sparsity(i, k) for k in grid.block_levels(i)] for i in range(3)]
    build_database(db, s.runner, s.capture, get_pruner("wanda"), parse_pattern("unstructured"),
                   wanted)
    fit = KLFitness(s.runner, s.capture(), s.model.get_output_embeddings(),
                    logit_softcap(s.model), db, grid, [64], stride=2)
    batches = list(range(6))
    dense, mid, high = fit.kl((-1, -1, -1), batches), fit.kl((0, 0, 0), batches), \
        fit.kl((1, 1, 1), batches)
    assert dense == pytest.approx(0.0, abs=1e-6)
    assert 0 < mid < high
    # sharing block outputs between candidates changes nothing but the cost
    cands = [(0, 0, 0), (1, -1, 0), (1, 0, -1), (-1, 1, 0), (0, 1, -1), (-1, -1, -1)]
    plain = [fit.kl(c, batches) for c in cands]
    before = fit.token_block_forwards
    assert fit.kl_shared(cands, batches) == plain
    assert fit.token_block_forwards - before < len(cands) * 6 * 32 * 3
    s.restore_dense()


def _search(session, spec="search", target=0.5, **overrides):
    opts = AllocationOptions(**(QUICK | overrides))
    return compute_allocation(session, spec, target, opts, pruner="wanda")


def test_search_meets_the_budget_and_never_loses_to_its_start(tmp_path):
    s = _session(tmp_path)
    dense = [w.clone() for i in range(3) for w in s.dense_weights(i).values()]
    for spec in ("search", "search:linear"):
        alloc = _search(s, spec)
        rec = alloc.options["search"]
        assert abs(weighted_mean(alloc.block_sparsity, s.params_per_block) - 0.5) < 1e-9
        assert rec["final_fitness"] <= rec["start_fitness"]
        assert rec["fitness_curve"][0] == rec["start_fitness"]
        assert rec["fitness_curve"][-1] == rec["final_fitness"]
        assert all(b <= a for a, b in zip(rec["fitness_curve"], rec["fitness_curve"][1:],
                                          strict=False))
        assert len(rec["fitness_curve"]) == QUICK["search_generations"] + 1
    assert rec["start_block_sparsity"] == pytest.approx(
        compute_allocation(s, "linear", 0.5).block_sparsity)
    after = [weight_out_in(m) for i in range(3) for m in s.arch.linears(i).values()]
    assert all(torch.equal(a, b) for a, b in zip(dense, after, strict=True))  # dense again


@pytest.mark.parametrize("arch", ["gpt2", "gemma3"])
def test_search_on_other_architectures(tmp_path, arch):
    s = _session(tmp_path, *save_tiny(tmp_path, arch))
    dense = [w.clone() for i in range(s.arch.num_blocks) for w in s.dense_weights(i).values()]
    alloc = _search(s, "search:linear", search_generations=3)
    assert abs(weighted_mean(alloc.block_sparsity, s.params_per_block) - 0.5) < 1e-9
    rec = alloc.options["search"]
    assert 0 < rec["final_fitness"] <= rec["start_fitness"]
    after = [weight_out_in(m) for i in range(s.arch.num_blocks)
             for m in s.arch.linears(i).values()]
    assert all(torch.equal(a, b) for a, b in zip(dense, after, strict=True))


def test_start_must_meet_the_budget(tmp_path):
    s = _session(tmp_path)
    path = tmp_path / "s.json"
    path.write_text("[0.2, 0.3, 0.4]")
    with pytest.raises(UserError, match="start allocation misses the sparsity budget"):
        _search(s, f"search:file:{path}")


def test_search_is_deterministic_for_a_seed(tmp_path):
    s = _session(tmp_path)
    a = _search(s, search_seed=3)
    b = _search(s, search_seed=3)
    assert a.block_sparsity == b.block_sparsity
    assert a.options["search"]["fitness_curve"] == b.options["search"]["fitness_curve"]
    assert b.options["search"]["cost"]["database_entries_reused"] > 0  # second run: from disk


def _planted(tmp_path, fragile: int):
    """A tiny model in which only block ``fragile`` matters: the others write 1/20 of their
    update into the residual stream, so pruning them barely moves the output."""
    model = tiny_model("llama", seed=0)
    with torch.no_grad():
        for index, block in enumerate(model.model.layers):
            if index != fragile:
                block.mlp.down_proj.weight.mul_(0.05)
                block.self_attn.o_proj.weight.mul_(0.05)
    folder = tmp_path / "planted"
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    text = tmp_path / "text.txt"
    text.write_text(SAMPLE_TEXT)
    return folder, text


@pytest.mark.parametrize("fragile", [0, 1, 2])
def test_search_finds_the_planted_optimum(tmp_path, fragile):
    s = _session(tmp_path, *_planted(tmp_path, fragile))
    alloc = _search(s, search_generations=12)
    sp = alloc.block_sparsity
    assert min(range(3), key=lambda i: sp[i]) == fragile
    assert sp[fragile] == pytest.approx(0.5 - 2 * 0.1)  # the lowest level of the grid
    assert alloc.options["search"]["final_fitness"] < alloc.options["search"]["start_fitness"]


def test_search_scores_checkpoints_on_held_out_text(tmp_path, monkeypatch):
    folder, text = save_tiny(tmp_path)
    monkeypatch.setattr(search_run, "tune_corpus", lambda calib, what, fix: (str(text), "eval"))
    s = _session(tmp_path, folder, text)
    alloc = _search(s, search_holdout=64, search_checkpoints=3, search_generations=10)
    rec = alloc.options["search"]
    check = rec["holdout"]
    assert check["corpus"] == f"{text}:eval" and check["tokens"] == 64
    gens = [c["generation"] for c in check["checkpoints"]]
    assert gens[0] == 0 and gens[-1] == ([0, *rec["improved_generations"]])[-1]
    assert len(gens) == min(3, len(rec["improved_generations"]) + 1)
    best = min(check["checkpoints"], key=lambda c: c["holdout_kl"])
    assert check["chosen_holdout_kl"] == best["holdout_kl"] <= check["start_holdout_kl"]
    assert rec["chosen_generation"] == check["chosen_generation"] == best["generation"]
    assert rec["final_fitness"] == rec["fitness_curve"][rec["chosen_generation"]]
    assert rec["final_fitness"] <= rec["start_fitness"]
    assert rec["last_fitness"] == rec["fitness_curve"][-1]
    assert abs(weighted_mean(alloc.block_sparsity, s.params_per_block) - 0.5) < 1e-9
    # the held-out KL is a real measurement: dense levels score 0, the start does not
    assert all(c["holdout_kl"] > 0 for c in check["checkpoints"])
    # with the check off, the last point is returned
    last = _search(s, search_generations=10)
    assert last.options["search"]["holdout"] is None
    assert last.options["search"]["chosen_generation"] == ([0, *last.options["search"]
                                                            ["improved_generations"]])[-1]


def test_search_holdout_needs_a_held_out_slice(tmp_path):
    s = _session(tmp_path)
    with pytest.raises(UserError, match="held-out check .*--search-holdout 0"):
        _search(s, search_holdout=64)


def test_search_rejects_nm_and_too_many_tokens(tmp_path):
    s = _session(tmp_path)
    with pytest.raises(UserError, match="unstructured"):
        compute_allocation(s, "search", 0.5, AllocationOptions(**QUICK), "wanda", "2:4")
    with pytest.raises(UserError, match="exceeds the 192 calibration tokens"):
        _search(s, search_tokens=(32, 1000))


def test_allocate_writes_search_json_and_plot(tmp_path, monkeypatch):
    folder, text = save_tiny(tmp_path)
    monkeypatch.setattr(search_run, "tune_corpus", lambda calib, what, fix: (str(text), "eval"))
    out = tmp_path / "alloc"
    args = ["allocate", "--model", str(folder), "--calib", str(text), "--nsamples", "6",
            "--seqlen", "32", "--sparsity", "0.5", "--allocation", "owl,search:owl",
            "--search-generations", "3", "--search-offspring", "4", "--search-survivors", "2,1",
            "--search-tokens", "32,64", "--search-step", "0.05", "--search-holdout", "64",
            "--out", str(out), "--quiet"]
    res = CliRunner().invoke(app, args, catch_exceptions=True)
    assert res.exit_code == 0, res.output
    rec = json.loads((out / "search.json").read_text())
    assert rec["holdout"]["tokens"] == 64 and rec["cost"]["holdout_seconds"] > 0
    assert rec["holdout"]["checkpoints"][0]["generation"] == 0
    assert (out / "search.png").is_file()
    assert rec["allocation"] == "search:owl" and len(rec["fitness_curve"]) == 4
    full = json.loads((out / "allocation.json").read_text())
    assert rec["start_block_sparsity"] == pytest.approx(full["allocations"]["owl"]
                                                         ["block_sparsity"])
    assert rec["final_fitness"] <= rec["start_fitness"]
    for key in ("database_seconds", "search_seconds", "candidate_evaluations_per_stage"):
        assert key in rec["cost"]


def test_compare_with_search_rows_writes_each_search(tmp_path):
    folder, text = save_tiny(tmp_path)
    out = tmp_path / "cmp"
    args = ["compare", "--model", str(folder), "--calib", str(text), "--ppl", str(text),
            "--nsamples", "6", "--seqlen", "32", "--sparsity", "0.5", "--no-dense",
            "--allocations", "uniform,search", "--seeds", "0,1", "--search-generations", "2",
            "--search-offspring", "4", "--search-survivors", "2,1", "--search-tokens", "32,64",
            "--search-step", "0.05", "--search-holdout", "0", "--out", str(out), "--quiet"]
    res = CliRunner().invoke(app, args, catch_exceptions=True)
    assert res.exit_code == 0, res.output
    record = json.loads((out / "compare.json").read_text())
    searched = [r for r in record["rows"] if r["allocation"] == "search"]
    assert [r["seed"] for r in searched] == [0, 1]
    for name, row in zip(("search-search", "search-search-2"), searched, strict=True):
        rec = json.loads((out / f"{name}.json").read_text())
        assert rec["block_sparsity"] == row["block_sparsity"] and (out / f"{name}.png").is_file()


def test_database_refuses_to_fill_the_disk(tmp_path, monkeypatch):
    s = _session(tmp_path)
    s.restore_dense()
    free = {"bytes": 10 << 30}
    monkeypatch.setattr(database.shutil, "disk_usage",
                        lambda path: type("U", (), {"free": free["bytes"]})())
    p, pat = get_pruner("sparsegpt"), parse_pattern("unstructured")
    wanted = [[0.3, 0.5]] * s.arch.num_blocks
    free["bytes"] = database.SPACE_MARGIN + 1000  # less than the five entries still to build
    with pytest.raises(UserError, match=r"database needs about .* KiB more .*--search-levels 2"):
        build_database(LevelDatabase(tmp_path / "db", s.dense_weights), s.runner, s.capture, p,
                       pat, wanted)
    assert len(list((tmp_path / "db").glob("*.pt"))) == 1  # the measured entry, complete
    free["bytes"] = 10 << 30  # room again: the next run reuses that entry and builds the rest
    db = LevelDatabase(tmp_path / "db", s.dense_weights)
    build_database(db, s.runner, s.capture, p, pat, wanted)
    assert (db.reused, db.built) == (1, 2 * s.arch.num_blocks - 1)


# ---------------------------------------------------------------- a search stopped half-way
def test_evolve_goes_on_from_a_saved_state_exactly():
    grid = level_grid([0.5] * 6, None, 0.025, 4)
    cfg = SearchConfig(generations=20, offspring=6, survivors=(3, 1), tokens=(1, 2))
    whole = evolve(grid, _quadratic((-2, 1, 0, 1, 0, 0)), cfg)
    saved = []

    def stop_at_7(state):
        saved.append(json.loads(json.dumps(state.to_json())))  # as a file would hold it
        if state.generation == 7:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        evolve(grid, _quadratic((-2, 1, 0, 1, 0, 0)), cfg, on_state=stop_at_7)
    state = EvolveState.from_json(saved[-1])
    assert state.generation == 7
    rest = evolve(grid, _quadratic((-2, 1, 0, 1, 0, 0)), cfg, resume=state)
    assert rest.curve == whole.curve and rest.levels == whole.levels
    assert rest.trajectory == whole.trajectory and rest.evaluations == whole.evaluations


def test_a_crashed_search_goes_on_where_it_stopped(tmp_path, monkeypatch):
    s = _session(tmp_path)
    whole = _search(s, search_seed=5, search_generations=12, search_survivors=(2, 1))
    folder = s.cache_dir("search_progress")
    assert not list(folder.glob("*.json"))  # removed when the search ends
    real_save = search_run.SearchProgress.save

    def crash_after_3(self, state, fitness):
        real_save(self, state, fitness)
        if state.generation == 4:
            raise RuntimeError("simulated crash")

    monkeypatch.setattr(search_run.SearchProgress, "save", crash_after_3)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _search(s, search_seed=5, search_generations=12, search_survivors=(2, 1))
    assert len(list(folder.glob("*.json"))) == 1
    monkeypatch.setattr(search_run.SearchProgress, "save", real_save)
    saved = json.loads(next(folder.glob("*.json")).read_text())
    restored = []
    real_set = KLFitness.set_rng_state
    monkeypatch.setattr(KLFitness, "set_rng_state",
                        lambda self, st: restored.append(st) or real_set(self, st))
    # another search (another seed) starts afresh
    other = _search(s, search_seed=6, search_generations=12, search_survivors=(2, 1))
    assert other.options["search"]["resumed_at_generation"] is None
    again = _search(s, search_seed=5, search_generations=12, search_survivors=(2, 1))
    rec = again.options["search"]
    assert rec["resumed_at_generation"] == 4
    assert restored == [saved["fitness_rng"]]  # the batch draws go on where they stopped
    assert again.block_sparsity == whole.block_sparsity
    assert rec["fitness_curve"] == whole.options["search"]["fitness_curve"]
    assert not list(folder.glob("*.json"))
