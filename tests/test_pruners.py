"""Tests of the pruners as pure tensor code (masks, scores, statistics, SparseGPT)."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from torch import nn

from sparsealloc.errors import UserError
from sparsealloc.pruners import (
    PRUNERS,
    HessianStats,
    InputNormStats,
    Pattern,
    check_pattern_fits,
    get_pruner,
    magnitude_scores,
    nm_mask,
    parse_pattern,
    prune_count,
    sparsegpt_prune,
    unstructured_layer_mask,
    unstructured_row_mask,
    wanda_scores,
)

T, F = True, False
UNSTRUCTURED = Pattern("unstructured")
NM24 = Pattern("nm", 2, 4)


# ---------------------------------------------------------------- patterns and counts


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("unstructured", Pattern("unstructured")),
        (" UNSTRUCTURED ", Pattern("unstructured")),
        ("2:4", Pattern("nm", 2, 4)),
        (" 4:8 ", Pattern("nm", 4, 8)),
        ("1:4", Pattern("nm", 1, 4)),
    ],
)
def test_parse_pattern_valid(text: str, expected: Pattern) -> None:
    assert parse_pattern(text) == expected


@pytest.mark.parametrize("text", ["", "2-4", "4:2", "0:4", "4:4", "abc", "2:4:8", "-2:4"])
def test_parse_pattern_invalid(text: str) -> None:
    with pytest.raises(UserError) as err:
        parse_pattern(text)
    assert "\n" not in str(err.value)


def test_pattern_str_and_sparsity() -> None:
    assert str(parse_pattern("2:4")) == "2:4"
    assert str(UNSTRUCTURED) == "unstructured"
    assert parse_pattern("4:8").nm_sparsity == 0.5
    assert parse_pattern("1:4").nm_sparsity == 0.25


def test_prune_count_guards_float_round_down() -> None:
    assert prune_count(100, 0.29) == 29  # int(100 * 0.29) would give 28
    assert prune_count(4096, 0.7) == 2867
    assert prune_count(10, 0.0) == 0
    assert prune_count(7, 0.5) == 3


# ---------------------------------------------------------------- magnitude masks (hand computed)

W24 = torch.tensor([[1.0, -3.0, 2.0, 0.5], [4.0, -1.0, -2.0, 3.0]])


def test_magnitude_row_mask_2x4() -> None:
    mask = unstructured_row_mask(magnitude_scores(W24), 0.5)
    assert mask.tolist() == [[T, F, F, T], [F, T, T, F]]
    mask = unstructured_row_mask(magnitude_scores(W24), 0.25)
    assert mask.tolist() == [[F, F, F, T], [F, T, F, F]]


def test_magnitude_layer_mask_2x4() -> None:
    # |W| sorted: .5(0,3) 1(0,0) 1(1,1) 2(0,2) | 2(1,2) 3 3 4; ties -> lower flat index first
    mask = unstructured_layer_mask(magnitude_scores(W24), 0.5)
    assert mask.tolist() == [[T, F, T, T], [F, T, F, F]]


def test_magnitude_pruner_scopes_on_linear() -> None:
    for scope, expected in [
        ("layer", [[0, -3, 0, 0], [4, 0, -2, 3]]),
        ("row", [[0, -3, 2, 0], [4, 0, 0, 3]]),
    ]:
        layer = nn.Linear(4, 2)
        layer.weight.data = W24.clone()
        pruner = get_pruner("magnitude", scope=scope)
        assert pruner.make_stats(layer) is None
        pruner.prune_layer(layer, None, 0.5, UNSTRUCTURED)
        assert layer.weight.tolist() == expected


# ---------------------------------------------------------------- Wanda masks (hand computed)

W36 = torch.tensor(
    [
        [1.0, 1.0, 1.0, 1.0, 1.0, 1.0],
        [2.0, -1.0, 4.0, 0.5, 0.2, 10.0],
        [-3.0, 0.4, -2.0, 2.0, 1.0, 5.0],
    ]
)
NORMS36 = torch.tensor([1.0, 2.0, 0.5, 1.0, 3.0, 0.1])  # ||X_j|| / sqrt(tokens)
# Wanda scores |W| * norm:
#   row0  1   2   .5  1   3   .1   -> prune c5 c2 c0 (c0/c3 tie: lower index)
#   row1  2   2   2   .5  .6  1    -> prune c3 c4 c5
#   row2  3   .8  1   2   3   .5   -> prune c5 c1 c2
WANDA36 = [[T, F, T, F, F, T], [F, F, F, T, T, T], [F, T, T, F, F, T]]
# magnitude per row: row0 all tie -> c0 c1 c2; row1 .2 .5 1; row2 .4 1 2(c2 before c3)
MAGROW36 = [[T, T, T, F, F, F], [F, T, F, T, T, F], [F, T, T, F, T, F]]


def _tokens_with_norms(norms: torch.Tensor) -> torch.Tensor:
    """(1, 2, in) activations whose per-column mean square is norms**2."""
    return torch.stack([norms, -norms]).unsqueeze(0)


def test_wanda_row_mask_3x6() -> None:
    stats = InputNormStats(6)
    stats.add_batch(_tokens_with_norms(NORMS36))
    scores = wanda_scores(W36, stats.scaler_row)
    assert torch.allclose(scores[1], torch.tensor([2.0, 2.0, 2.0, 0.5, 0.6, 1.0]))
    assert unstructured_row_mask(scores, 0.5).tolist() == WANDA36
    assert unstructured_row_mask(magnitude_scores(W36), 0.5).tolist() == MAGROW36


def test_wanda_pruner_differs_from_magnitude() -> None:
    torch.manual_seed(0)
    w = torch.tensor([[1.0, 2.0, 3.0, 4.0]]).repeat(3, 1)
    x = torch.randn(2, 10, 4) * torch.tensor([100.0, 1.0, 1.0, 1.0])
    layers = {}
    for name in ["magnitude", "wanda"]:
        layer = nn.Linear(4, 3, bias=False)
        layer.weight.data = w.clone()
        pruner = get_pruner(name, scope="row") if name == "magnitude" else get_pruner(name)
        stats = pruner.make_stats(layer)
        if stats is not None:
            stats.add_batch(x)
        pruner.prune_layer(layer, stats, 0.5, UNSTRUCTURED)
        layers[name] = layer.weight.detach()
    assert layers["magnitude"].tolist() == [[0.0, 0.0, 3.0, 4.0]] * 3
    assert layers["wanda"].tolist() == [[1.0, 0.0, 0.0, 4.0]] * 3


# ---------------------------------------------------------------- counts


@pytest.mark.parametrize(
    ("sparsity", "per_row"),
    [(0.0, 0), (0.1, 5), (0.25, 12), (0.5, 25), (0.7, 35), (0.9, 45), (0.98, 49)],
)
def test_row_mask_exact_counts_and_lowest(sparsity: float, per_row: int) -> None:
    torch.manual_seed(1)
    scores = torch.rand(7, 50)
    mask = unstructured_row_mask(scores, sparsity)
    assert mask.sum(dim=1).tolist() == [per_row] * 7
    if 0 < per_row < 50:
        pruned_max = torch.where(mask, scores, -math.inf).amax(dim=1)
        kept_min = torch.where(mask, math.inf, scores).amin(dim=1)
        assert bool((pruned_max <= kept_min).all())
    assert int(unstructured_layer_mask(scores, sparsity).sum()) == prune_count(350, sparsity)


def test_row_mask_hundred_columns_029() -> None:
    mask = unstructured_row_mask(torch.rand(3, 100), 0.29)
    assert mask.sum(dim=1).tolist() == [29, 29, 29]


def test_masks_deterministic_ties() -> None:
    scores = torch.ones(2, 8)
    assert unstructured_row_mask(scores, 0.5)[0].tolist() == [T, T, T, T, F, F, F, F]
    assert nm_mask(scores, 2, 4)[1].tolist() == [T, T, F, F, T, T, F, F]


# ---------------------------------------------------------------- N:M


def test_linear_time_masks_equal_the_stable_sort() -> None:
    """kthvalue + lowest-index ties gives the stable sort's mask, NaN rows included."""
    g = torch.Generator().manual_seed(0)
    for trial in range(200):
        rows, cols = torch.randint(1, 9, (2,), generator=g).tolist()
        scores = torch.randint(0, 3, (rows, cols), generator=g).float()  # many ties
        if trial % 3 == 0:
            scores = torch.randn(rows, cols, generator=g)
        if trial % 7 == 0:
            scores[0, 0] = float("nan")
        for sparsity in (0.1, 0.25, 0.5, 0.7, 0.99):
            k = prune_count(cols, sparsity)
            ref = torch.zeros(rows, cols, dtype=torch.bool)
            ref.scatter_(1, torch.sort(scores, dim=1, stable=True).indices[:, :k], True)
            assert torch.equal(unstructured_row_mask(scores, sparsity), ref)
            k = prune_count(scores.numel(), sparsity)
            ref = torch.zeros(scores.numel(), dtype=torch.bool)
            ref[torch.sort(scores.reshape(-1), stable=True).indices[:k]] = True
            assert torch.equal(unstructured_layer_mask(scores, sparsity), ref.view(rows, cols))


def test_nm_mask_hand_computed() -> None:
    scores = torch.tensor([[5.0, 1, 3, 2, 0, 9, 8, 7], [1.0, 1, 1, 1, 4, 3, 2, 1]])
    assert nm_mask(scores, 2, 4).tolist() == [[F, T, F, T, T, F, F, T], [T, T, F, F, F, F, T, T]]


@pytest.mark.parametrize(("n", "m"), [(2, 4), (4, 8), (1, 4), (3, 8)])
def test_nm_mask_exact_per_group(n: int, m: int) -> None:
    torch.manual_seed(2)
    scores = torch.randn(9, 64)
    groups = nm_mask(scores, n, m).reshape(9, 64 // m, m)
    assert bool((groups.sum(dim=2) == n).all())
    g_scores = scores.reshape(9, 64 // m, m)
    pruned_max = torch.where(groups, g_scores, -math.inf).amax(dim=2)
    kept_min = torch.where(groups, math.inf, g_scores).amin(dim=2)
    assert bool((pruned_max <= kept_min).all())


def test_nm_not_dividing_raises() -> None:
    with pytest.raises(UserError, match=r"4:8.*\(3, 6\)"):
        nm_mask(torch.rand(3, 6), 4, 8)
    with pytest.raises(UserError, match=r"2:4.*\(8, 10\)"):
        check_pattern_fits((8, 10), NM24)
    check_pattern_fits((8, 12), NM24)
    check_pattern_fits((8, 10), UNSTRUCTURED)
    for name in PRUNERS:
        pruner = get_pruner(name)
        layer = nn.Linear(10, 4)
        stats = pruner.make_stats(layer)
        if stats is not None:
            stats.add_batch(torch.randn(2, 3, 10))
        with pytest.raises(UserError, match="2:4"):
            pruner.prune_layer(layer, stats, 0.5, NM24)


# ---------------------------------------------------------------- statistics


def test_input_norm_stats_matches_direct_over_all_tokens() -> None:
    torch.manual_seed(3)
    batches = [torch.randn(2, 5, 16), torch.randn(1, 7, 16) * 3, torch.randn(13, 16)]
    stats = InputNormStats(16)
    for b in batches:
        stats.add_batch(b)
    flat = torch.cat([b.reshape(-1, 16) for b in batches])
    assert stats.nsamples == 30
    assert stats.scaler_row.dtype == torch.float32
    assert torch.allclose(stats.scaler_row, flat.square().mean(dim=0), rtol=1e-5)
    assert torch.allclose(stats.scaler_row.sqrt() * math.sqrt(30), flat.norm(dim=0), rtol=1e-5)


def test_input_norm_stats_bf16_inputs_accumulate_in_float32() -> None:
    x = torch.randn(4, 8, 16).to(torch.bfloat16)
    stats = InputNormStats(16)
    stats.add_batch(x)
    assert stats.scaler_row.dtype == torch.float32
    assert torch.allclose(stats.scaler_row, x.float().reshape(-1, 16).square().mean(0), rtol=1e-5)


def test_hessian_stats_matches_direct() -> None:
    torch.manual_seed(4)
    batches = [torch.randn(3, 4, 12), torch.randn(1, 9, 12), torch.randn(5, 12)]
    stats = HessianStats(12)
    for b in batches:
        stats.add_batch(b)
    flat = torch.cat([b.reshape(-1, 12) for b in batches])
    assert stats.nsamples == 26
    assert stats.H is not None and stats.H.dtype == torch.float32
    assert torch.allclose(stats.H, 2.0 / 26 * flat.T @ flat, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- SparseGPT


def _correlated_inputs(tokens: int, cols: int, seed: int) -> torch.Tensor:
    """Strongly correlated activations (rank-32 signal + noise) with unequal column norms."""
    gen = torch.Generator().manual_seed(seed)
    signal = torch.randn(tokens, 32, generator=gen) @ torch.randn(32, cols, generator=gen)
    noise = 0.3 * torch.randn(tokens, cols, generator=gen)
    return (signal + noise) * torch.exp(torch.randn(cols, generator=gen))


def _recon_error(x: torch.Tensor, w_new: torch.Tensor, w: torch.Tensor) -> float:
    return float((x @ w_new.T - x @ w.T).norm())


@pytest.mark.parametrize(
    ("sparsity", "pattern"),
    [(0.5, UNSTRUCTURED), (0.7, UNSTRUCTURED), (0.0, NM24), (0.0, Pattern("nm", 4, 8))],
)
def test_sparsegpt_reconstructs_better_than_magnitude_and_wanda(
    sparsity: float, pattern: Pattern
) -> None:
    rows, cols = 24, 192  # two column blocks (128 + 64)
    x = _correlated_inputs(512, cols, seed=5)
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(6))
    errors = {}
    for name, options in [
        ("magnitude", {"scope": "layer"}),
        ("magnitude", {"scope": "row"}),
        ("wanda", {}),
        ("sparsegpt", {}),
    ]:
        layer = nn.Linear(cols, rows, bias=False)
        layer.weight.data = w.clone()
        pruner = get_pruner(name, **options)
        stats = pruner.make_stats(layer)
        if stats is not None:
            stats.add_batch(x.reshape(4, 128, cols))
        pruner.prune_layer(layer, stats, sparsity, pattern)
        zeros = int((layer.weight == 0).sum())
        target = rows * cols // 2 if pattern.is_nm else prune_count(rows * cols, sparsity)
        assert abs(zeros - target) <= rows, (name, zeros, target)
        errors[f"{name}{options}"] = _recon_error(x, layer.weight.detach(), w)
    best_other = min(v for k, v in errors.items() if not k.startswith("sparsegpt"))
    assert errors["sparsegpt{}"] < 0.8 * best_other, errors


def test_sparsegpt_prune_is_pure_and_deterministic() -> None:
    x = _correlated_inputs(256, 64, seed=7)
    stats = HessianStats(64)
    stats.add_batch(x)
    assert stats.H is not None
    w = torch.randn(8, 64)
    w0, h0 = w.clone(), stats.H.clone()
    a, mask_a = sparsegpt_prune(w, stats.H, 0.6, UNSTRUCTURED, blocksize=32)
    b, mask_b = sparsegpt_prune(w, stats.H, 0.6, UNSTRUCTURED, blocksize=32)
    assert torch.equal(w, w0) and torch.equal(stats.H, h0)
    assert torch.equal(a, b) and torch.equal(mask_a, mask_b)
    assert bool((a[mask_a] == 0).all())
    assert int(mask_a.sum()) == 2 * prune_count(8 * 32, 0.6)
    c, mask_c = sparsegpt_prune(w, stats.H, 0.0, Pattern("nm", 4, 8), blocksize=32)
    assert bool((mask_c.reshape(8, 8, 8).sum(dim=2) == 4).all())
    assert bool((c[mask_c] == 0).all())


def test_sparsegpt_blocksize_must_be_multiple_of_m() -> None:
    h = torch.eye(16)
    with pytest.raises(UserError, match="blocksize"):
        sparsegpt_prune(torch.randn(4, 16), h, 0.0, Pattern("nm", 4, 8), blocksize=12)


@pytest.mark.parametrize("percdamp", [0.01, 0.0])
def test_sparsegpt_singular_hessian_from_rank_deficient_inputs(percdamp: float) -> None:
    torch.manual_seed(8)
    x = torch.randn(2, 8, 64)  # 16 tokens < 64 columns: H has rank <= 16
    x[..., 1] = x[..., 0]  # duplicated column
    x[..., 5] = 0  # dead column
    stats = HessianStats(64)
    stats.add_batch(x)
    assert stats.H is not None
    w = torch.randn(8, 64)
    for pattern in [UNSTRUCTURED, NM24]:
        w_new, mask = sparsegpt_prune(w, stats.H, 0.5, pattern, percdamp=percdamp)
        assert bool(torch.isfinite(w_new).all())
        assert bool((w_new[mask] == 0).all())
        assert bool((w_new[:, 5] == 0).all())  # dead input: weight dropped as in the reference
        expected = 8 * 64 // 2
        assert int(mask.sum()) == expected


def test_sparsegpt_indefinite_hessian_retries_with_more_damping(caplog) -> None:
    h = 2 * torch.ones(16, 16) - torch.eye(16)  # eigenvalues -1 (x15) and 31, mean diag 1
    w = torch.randn(4, 16)
    with caplog.at_level(logging.WARNING, logger="sparsealloc.pruners.sparsegpt"):
        w_new, mask = sparsegpt_prune(w, h, 0.5, UNSTRUCTURED)
    assert "retrying" in caplog.text
    assert "diagonal" not in caplog.text  # 10x steps reached a positive definite H
    assert bool(torch.isfinite(w_new).all()) and int(mask.sum()) == 32
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="sparsealloc.pruners.sparsegpt"):
        w_new, mask = sparsegpt_prune(w, h, 0.5, UNSTRUCTURED, max_damp_retries=0)
    assert "diagonal" in caplog.text
    assert bool(torch.isfinite(w_new).all()) and int(mask.sum()) == 32


def test_sparsegpt_nonfinite_hessian_is_a_user_error() -> None:
    h = torch.eye(8)
    h[2, 2] = math.inf
    with pytest.raises(UserError, match="inf/nan"):
        sparsegpt_prune(torch.randn(2, 8), h, 0.5, UNSTRUCTURED)


def test_sparsegpt_keeps_layer_dtype_and_frees_stats() -> None:
    layer = nn.Linear(32, 8).to(torch.bfloat16)
    pruner = get_pruner("sparsegpt", blocksize=16)
    stats = pruner.make_stats(layer)
    stats.add_batch(torch.randn(2, 10, 32).to(torch.bfloat16))
    pruner.prune_layer(layer, stats, 0.5, UNSTRUCTURED)
    assert layer.weight.dtype == torch.bfloat16
    assert bool(torch.isfinite(layer.weight.float()).all())
    assert int((layer.weight == 0).sum()) >= 128
    assert stats.H is None


# ---------------------------------------------------------------- Pruner classes on nn.Linear


@pytest.mark.parametrize("name", ["magnitude", "wanda", "sparsegpt"])
def test_prune_layer_with_hooked_stats(name: str) -> None:
    torch.manual_seed(9)
    layer = nn.Linear(64, 16)
    bias = layer.bias.detach().clone()
    pruner = get_pruner(name)
    stats = pruner.make_stats(layer)
    if stats is not None:
        handle = layer.register_forward_pre_hook(lambda _m, args: stats.add_batch(args[0]))
        with torch.no_grad():
            for _ in range(3):
                layer(torch.randn(2, 10, 64))  # (batch, seq, in)
        handle.remove()
        assert stats.nsamples == 60
    pruner.prune_layer(layer, stats, 0.5, UNSTRUCTURED)
    zeros = layer.weight == 0
    assert int(zeros.sum()) == 512
    if name == "wanda":
        assert zeros.sum(dim=1).tolist() == [32] * 16
    assert torch.equal(layer.bias, bias)
    assert not layer.weight.requires_grad or layer.weight.grad is None


@pytest.mark.parametrize("name", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("nm", ["2:4", "4:8"])
def test_prune_layer_nm_ignores_sparsity(name: str, nm: str) -> None:
    torch.manual_seed(10)
    pattern = parse_pattern(nm)
    layer = nn.Linear(64, 8)
    pruner = get_pruner(name)
    stats = pruner.make_stats(layer)
    if stats is not None:
        stats.add_batch(torch.randn(4, 16, 64))
    pruner.prune_layer(layer, stats, 0.3, pattern)
    groups = (layer.weight == 0).reshape(8, 64 // pattern.m, pattern.m).sum(dim=2)
    assert bool((groups == pattern.n).all())


@pytest.mark.parametrize("name", ["magnitude", "wanda", "sparsegpt"])
def test_zero_sparsity_is_noop(name: str) -> None:
    layer = nn.Linear(32, 8)
    w = layer.weight.detach().clone()
    pruner = get_pruner(name)
    stats = pruner.make_stats(layer)
    if stats is not None:
        x = torch.randn(2, 5, 32)
        x[..., 3] = 0  # a dead input must not be zeroed at sparsity 0 either
        stats.add_batch(x)
    pruner.prune_layer(layer, stats, 0.0, UNSTRUCTURED)
    assert torch.equal(layer.weight, w)


@pytest.mark.parametrize("name", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, float("nan"), "half"])
def test_out_of_range_sparsity_errors(name: str, bad: object) -> None:
    layer = nn.Linear(8, 4)
    w = layer.weight.detach().clone()
    pruner = get_pruner(name)
    stats = pruner.make_stats(layer)
    if stats is not None:
        stats.add_batch(torch.randn(3, 8))
    with pytest.raises(UserError, match=r"\[0, 1\)"):
        pruner.prune_layer(layer, stats, bad, UNSTRUCTURED)  # type: ignore[arg-type]
    assert torch.equal(layer.weight, w)


def test_mask_functions_reject_bad_sparsity() -> None:
    for bad in [-0.5, 1.0]:
        with pytest.raises(UserError):
            unstructured_row_mask(torch.rand(2, 4), bad)
        with pytest.raises(UserError):
            unstructured_layer_mask(torch.rand(2, 4), bad)
        with pytest.raises(UserError):
            sparsegpt_prune(torch.rand(2, 4), torch.eye(4), bad, UNSTRUCTURED)


def test_pruners_without_stats_data_refuse() -> None:
    for name in ["wanda", "sparsegpt"]:
        pruner = get_pruner(name)
        layer = nn.Linear(8, 4)
        with pytest.raises(ValueError):
            pruner.prune_layer(layer, pruner.make_stats(layer), 0.5, UNSTRUCTURED)


# ---------------------------------------------------------------- registry and config


def test_registry_and_config() -> None:
    assert set(PRUNERS) == {"magnitude", "wanda", "sparsegpt"}
    with pytest.raises(UserError, match="magnitude, sparsegpt, wanda"):
        get_pruner("obs")
    with pytest.raises(UserError, match="blocksze"):
        get_pruner("sparsegpt", blocksze=64)
    with pytest.raises(UserError):
        get_pruner("sparsegpt", percdamp=-1.0)
    with pytest.raises(UserError):
        get_pruner("magnitude", scope="column")
    assert get_pruner("SparseGPT", percdamp=0.05).config() == {
        "name": "sparsegpt",
        "blocksize": 128,
        "percdamp": 0.05,
        "max_damp_retries": 4,
    }
    assert get_pruner("wanda").config() == {"name": "wanda"}
    assert get_pruner("magnitude").config() == {"name": "magnitude", "scope": "layer"}
