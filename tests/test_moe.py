"""Mixture of experts: discovery, routed-token statistics, fallbacks, save/reload, compare."""

import json

import pytest
import torch
from tiny_models import MOE_ARCHS, random_ids, save_tiny_moe, tiny_model, tiny_moe, tiny_tokenizer
from typer.testing import CliRunner

from sparsealloc.blockwise import measured_sparsity, prune_sequential
from sparsealloc.cli import app
from sparsealloc.models.arch import MAX_UNPRUNED_SHARE, discover, is_linear
from sparsealloc.models.experts import ExpertLinears, fused_experts, unfuse_experts
from sparsealloc.models.load import load_model, save_model
from sparsealloc.pruners import InputNormStats, MagnitudePruner, get_pruner
from sparsealloc.pruners.masks import parse_pattern
from sparsealloc.runner import BlockRunner, collect_inputs

UNSTRUCTURED = parse_pattern("unstructured")

# (decoder blocks, experts per MoE block, linears in an MoE block, routers per MoE block)
EXPECTED = {
    "mixtral": (2, 4, 4 + 4 * 3, ["mlp.gate"]),
    "qwen2_moe": (2, 4, 4 + 4 * 3 + 3, ["mlp.gate", "mlp.shared_expert_gate"]),
    "qwen3_moe": (2, 4, 4 + 4 * 3, ["mlp.gate"]),
    "olmoe": (2, 4, 4 + 4 * 3, ["mlp.gate"]),
    "deepseek_v2": (2, 4, 5 + 4 * 3 + 3, ["mlp.gate"]),
    "deepseek_v3": (3, 4, 5 + 4 * 3 + 3, ["mlp.gate"]),
}


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_discovery_finds_blocks_experts_and_routers(arch):
    model = tiny_moe(arch)
    ids = random_ids(2, 16)
    fused = _logits(model, ids)
    a = discover(model)
    blocks, experts, n_linears, routers = EXPECTED[arch]
    last = a.num_blocks - 1  # DeepSeek-V3's first block is dense
    assert a.num_blocks == blocks
    assert a.expert_lists[last] == {"mlp.experts": experts}
    assert len(a.linears(last)) == n_linears
    assert a.router_names[last] == routers
    assert not set(routers) & set(a.linear_names[last])  # routers are never pruned
    assert all(is_linear(m) for m in a.linears(last).values())
    assert a.expert_of(last, "mlp.experts.3.down_proj") == ("mlp.experts", 3)
    assert a.expert_of(last, "self_attn.o_proj") is None
    assert all(a.unpruned_share(i) <= MAX_UNPRUNED_SHARE for i in range(a.num_blocks))
    d = a.describe()
    assert "mlp.experts.*.gate_proj" in d["pruned_layers"]
    assert d["routers_not_pruned"] == sorted(routers)
    # the per-expert module computes what the fused one did (here: bit for bit)
    assert torch.allclose(_logits(model, ids), fused, rtol=1e-5, atol=1e-6)
    assert unfuse_experts(model) == 0  # idempotent


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_runner_reproduces_moe_hidden_states(arch):
    model = tiny_moe(arch)
    ids = random_ids()
    runner = BlockRunner(model, progress=False)
    acts = runner.capture(ids, batch_size=2)
    for _ in runner.sequential(acts):
        pass
    with torch.no_grad():
        ref = model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states[-1]
        got = runner.arch.final_norm(torch.cat(acts.hidden))
    assert torch.allclose(got, ref, atol=1e-5)


def _route_by_sign(model, block: int) -> torch.Tensor:
    """Top-1 routing in ``block`` by the sign of u.x: expert 0 or 1; experts 2, 3 get nothing."""
    router = model.model.layers[block].mlp.gate
    router.top_k = 1
    u = torch.randn(router.weight.shape[1], generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        router.weight.zero_()
        router.weight[0] = u
        router.weight[1] = -u
    return u


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_expert_statistics_come_only_from_routed_tokens(arch):
    model = tiny_moe(arch)
    u = _route_by_sign(model, 0)
    runner = BlockRunner(model, progress=False)
    acts = runner.capture(random_ids(3, 16), batch_size=3)
    moe_inputs = []
    mlp = runner.arch.blocks[0].mlp
    handle = mlp.register_forward_pre_hook(lambda _m, inp: moe_inputs.append(inp[0].detach()))
    linears = runner.arch.linears(0)
    stats = {n: InputNormStats(m.in_features) for n, m in linears.items()}
    with collect_inputs(linears, stats):
        runner.run_block(0, acts)
    handle.remove()
    x = moe_inputs[0].reshape(-1, u.numel())
    chose = {0: x[x @ u > 0], 1: x[x @ u < 0]}
    assert len(chose[0]) and len(chose[1]) and len(chose[0]) + len(chose[1]) == 48
    for e, xs in chose.items():
        s = stats[f"mlp.experts.{e}.gate_proj"]
        assert s.nsamples == len(xs)
        torch.testing.assert_close(s.scaler_row, xs.square().mean(0), rtol=1e-5, atol=1e-7)
        assert stats[f"mlp.experts.{e}.down_proj"].nsamples == len(xs)
    for e in (2, 3):
        assert stats[f"mlp.experts.{e}.gate_proj"].nsamples == 0
    assert stats["self_attn.q_proj"].nsamples == 48


def test_experts_without_tokens_fall_back_to_magnitude_and_are_recorded():
    model = tiny_moe("mixtral")
    _route_by_sign(model, 0)
    runner = BlockRunner(model, progress=False)
    acts = runner.capture(random_ids(3, 16), batch_size=3)
    idle = {n: m.weight.detach().clone() for n, m in runner.arch.linears(0).items()
            if n.startswith(("mlp.experts.2.", "mlp.experts.3."))}
    report = prune_sequential(runner, acts, get_pruner("wanda"), [0.5, 0.5], UNSTRUCTURED)
    assert sorted(report.no_token_layers[0]) == sorted(idle)
    assert 1 not in report.no_token_layers
    assert report.no_token_experts(runner.arch) == ["0.mlp.experts.2", "0.mlp.experts.3"]
    rec = report.record(runner.arch)
    assert rec["experts_without_tokens"] == 2 and rec["experts_without_tokens_fallback"]
    for name, dense in idle.items():
        ref = torch.nn.Linear(dense.shape[1], dense.shape[0], bias=False)
        ref.weight.data = dense.clone()
        MagnitudePruner().prune_layer(ref, None, 0.5, UNSTRUCTURED)
        assert torch.equal(runner.arch.linears(0)[name].weight, ref.weight)


def test_sparsegpt_one_expert_at_a_time_is_identical_and_holds_less():
    results, peaks, passes = [], [], []
    for budget in (2**40, 0):
        model = tiny_moe("mixtral")
        runner = BlockRunner(model, progress=False)
        acts = runner.capture(random_ids(4, 16), batch_size=2)
        report = prune_sequential(runner, acts, get_pruner("sparsegpt"), [0.5, 0.5],
                                  UNSTRUCTURED, stats_budget=budget)
        results.append({k: v.clone() for k, v in model.state_dict().items()})
        peaks.append(report.peak_stats_bytes)
        passes.append(report.passes)
    assert all(torch.equal(results[0][k], results[1][k]) for k in results[0])
    assert passes == [2, 2 * 5]  # per block: one pass, or 4 experts + the rest
    assert peaks[1] < peaks[0]
    # all layers at once: 4 attention (32x32) + 4 experts x (2 x 32 + 32) columns
    assert peaks[0] == 4 * (4 * 32 * 32 + 4 * (2 * 32 * 32 + 32 * 32))
    assert peaks[1] == 4 * 4 * 32 * 32  # the attention group; one expert is 3 x 32 x 32


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_moe_prune_save_reload_gives_the_same_logits(tmp_path, arch):
    model = tiny_moe(arch)
    ids = random_ids(2, 16, seed=1)
    runner = BlockRunner(model, progress=False)
    acts = runner.capture(random_ids(4, 16), batch_size=2)
    prune_sequential(runner, acts, get_pruner("sparsegpt"), [0.5] * runner.num_blocks,
                     UNSTRUCTURED)
    m = measured_sparsity(runner.arch)
    assert m["overall"] == pytest.approx(0.5, abs=0.02)
    # routers (< 1% of the block weights here) stay dense
    assert 0.5 * (1 - MAX_UNPRUNED_SHARE) < m["block_weights"] < m["overall"]
    pruned = _logits(model, ids)
    out = save_model(model, tiny_tokenizer(), tmp_path / "pruned")
    assert isinstance(runner.arch.blocks[-1].mlp.experts, ExpertLinears)  # unfused again
    torch.testing.assert_close(_logits(model, ids), pruned, rtol=0, atol=0)
    loaded = load_model(str(out)).model
    loaded.set_attn_implementation("eager")
    reloaded = _logits(loaded, ids)
    torch.testing.assert_close(reloaded, pruned, rtol=1e-5, atol=1e-6)
    # the reloaded model's experts carry the pruned zeros
    assert measured_sparsity(discover(loaded))["overall"] == pytest.approx(m["overall"])


def test_saved_checkpoint_has_the_class_own_layout(tmp_path):
    """A pruned MoE saves as transformers saves its class (fused modules back during the save)."""
    from safetensors import safe_open

    def keys_of(folder):
        with safe_open(folder / "model.safetensors", "pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}

    plain = tiny_moe("mixtral")
    plain.save_pretrained(tmp_path / "plain")
    model = tiny_moe("mixtral")
    discover(model)
    out = save_model(model, tiny_tokenizer(), tmp_path / "m")
    assert keys_of(out) == keys_of(tmp_path / "plain")
    with fused_experts(model) as n:
        assert n == 2
        assert model.model.layers[0].mlp.experts.gate_up_proj.shape == (4, 64, 32)
    assert isinstance(model.model.layers[0].mlp.experts, ExpertLinears)


def test_memory_against_the_dense_counterpart():
    """Peak SparseGPT statistics of the tiny MoE (one expert at a time) vs the dense model."""
    dense = tiny_model("mistral")
    moe = tiny_moe("mixtral")
    peaks = {}
    for name, model, budget in (("dense", dense, 2**40), ("moe_all", moe, 2**40),
                                ("moe_per_expert", tiny_moe("mixtral"), 0)):
        runner = BlockRunner(model, progress=False)
        acts = runner.capture(random_ids(2, 16), batch_size=2)
        peaks[name] = prune_sequential(runner, acts, get_pruner("sparsegpt"),
                                       [0.5] * runner.num_blocks, UNSTRUCTURED,
                                       stats_budget=budget).peak_stats_bytes
    assert peaks["moe_per_expert"] <= peaks["dense"] < peaks["moe_all"]


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_compare_runs_on_moe(tmp_path, arch):
    folder, text = save_tiny_moe(tmp_path, arch)
    out = tmp_path / "cmp"
    res = CliRunner().invoke(app, [
        "compare", "--model", str(folder), "--calib", str(text), "--nsamples", "4",
        "--seqlen", "32", "--quiet", "--ppl", str(text), "--sparsity", "0.5",
        "--allocations", "uniform,owl,alpha,owl+absorb,alpha+absorb", "--absorb-gamma", "0.05",
        "--absorb-nsamples", "2", "--out", str(out)])
    assert res.exit_code == 0, res.output
    rec = json.loads((out / "compare.json").read_text())
    assert len(rec["rows"]) == 5
    for row in rec["rows"]:
        assert row["measured_sparsity"] == pytest.approx(0.5, abs=1 / 32)
        assert row["block_weight_sparsity"] > 0.45
        assert all(r > 1 for r in row["ppl"].values())


def test_prune_command_on_moe_records_experts(tmp_path):
    folder, text = save_tiny_moe(tmp_path, "qwen2_moe")
    out = tmp_path / "run"
    res = CliRunner().invoke(app, [
        "prune", "--model", str(folder), "--calib", str(text), "--nsamples", "4",
        "--seqlen", "32", "--quiet", "--ppl", str(text), "--pruner", "wanda", "--sparsity", "0.5",
        "--out", str(out), "--save", str(tmp_path / "saved")])
    assert res.exit_code == 0, res.output
    rec = json.loads((out / "result.json").read_text())
    assert "mlp.experts.*.down_proj" in rec["architecture"]["pruned_layers"]
    assert rec["architecture"]["routers_not_pruned"] == ["mlp.gate", "mlp.shared_expert_gate"]
    assert rec["measured_sparsity"] == pytest.approx(0.5, abs=1 / 32)
    assert rec["block_weight_sparsity"] > 0.45
    assert rec["experts_without_tokens"] == 0


def test_expert_split_meets_the_block_budget_exactly():
    from sparsealloc.allocation.experts import expert_split

    params = [3.0, 3.0, 3.0, 6.0]
    split = expert_split(0.6, [0.01, 0.05, 0.02, 0.0], params, lam=0.08)
    mean = sum(s * w for s, w in zip(split, params, strict=True)) / sum(params)
    assert mean == pytest.approx(0.6, abs=1e-9)
    assert split[1] == min(split) and split[3] == max(split)  # more outliers, less sparsity
    assert max(split) - min(split) == pytest.approx(0.16, abs=1e-9)


def test_expert_allocation_owl_prunes_each_expert_to_its_share(tmp_path):
    folder, text = save_tiny_moe(tmp_path, "mixtral")
    out = tmp_path / "run"
    res = CliRunner().invoke(app, [
        "prune", "--model", str(folder), "--calib", str(text), "--nsamples", "4",
        "--seqlen", "32", "--quiet", "--ppl", str(text), "--pruner", "wanda",
        "--sparsity", "0.5", "--allocation", "owl", "--expert-allocation", "owl",
        "--out", str(out)])
    assert res.exit_code == 0, res.output
    rec = json.loads((out / "result.json").read_text())
    details = rec["allocation_details"]
    assert details["options"]["expert_allocation"] == "owl"
    per_expert = details["expert_sparsity"]
    assert len(per_expert) == 2 and all(len(b) == 4 for b in per_expert)
    assert all(max(b.values()) - min(b.values()) > 0.05 for b in per_expert)
    # each block's budget holds: experts are equal in size, so their plain mean is the block's
    for block, s in zip(per_expert, details["block_sparsity"], strict=True):
        assert sum(block.values()) / 4 == pytest.approx(s, abs=1e-9)
    # the measured per-block sparsity follows (per-row rounding: rows of 32 weights)
    for got, want in zip(rec["measured_block_sparsity"], details["block_sparsity"], strict=True):
        assert got == pytest.approx(want, abs=1 / 32)


def test_expert_allocation_is_checked():
    from sparsealloc.errors import UserError

    res = CliRunner().invoke(app, ["prune", "--model", "x", "--expert-allocation", "alpha"])
    assert isinstance(res.exception, UserError)
    assert str(res.exception) == "--expert-allocation must be one of uniform, owl (got 'alpha')"


def test_zero_shot_runs_on_a_pruned_moe():
    from sparsealloc.evaluation.zeroshot import evaluate_zeroshot

    model = tiny_moe("qwen3_moe")
    runner = BlockRunner(model, progress=False)
    acts = runner.capture(random_ids(2, 16), batch_size=2)
    prune_sequential(runner, acts, get_pruner("wanda"), [0.5, 0.5], UNSTRUCTURED)
    out = evaluate_zeroshot(model, tiny_tokenizer(), ["arc_easy"], limit=4, batch_size=4,
                            progress=False)
    assert out["zeroshot"]["arc_easy"]["n"] == 4
    assert 0.0 <= out["zeroshot"]["arc_easy"]["acc"] <= 1.0


def test_per_expert_linear_layout_is_discovered_with_its_router():
    """The layout of transformers 4 (and of custom MoE code): experts as a list of MLPs with
    nn.Linear layers, the router an nn.Linear(hidden, experts)."""
    from torch import nn

    class Mlp(nn.Module):
        def __init__(self):
            super().__init__()
            self.w1, self.w2, self.w3 = nn.Linear(8, 16), nn.Linear(16, 8), nn.Linear(8, 16)

    class Moe(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate = nn.Linear(8, 6, bias=False)
            self.experts = nn.ModuleList([Mlp() for _ in range(6)])

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.Linear(8, 8)
            self.moe = Moe()

    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([Block() for _ in range(3)])  # fewer than the experts

    a = discover(Toy())
    assert a.blocks_attr == "layers" and a.num_blocks == 3
    assert a.expert_lists[0] == {"moe.experts": 6} and a.router_names[0] == ["moe.gate"]
    assert "moe.gate" not in a.linear_names[0] and len(a.linear_names[0]) == 1 + 6 * 3
    assert len(a.experts(0)) == 6 and a.experts(0)["moe.experts.5"][0] == "moe.experts.5.w1"


def test_unconverted_expert_layout_is_refused_in_one_line():
    """GPT-OSS keeps transposed fused experts with biases: left fused, so the model is refused."""
    import transformers as tf

    from sparsealloc.errors import UserError

    cfg = tf.GptOssConfig(hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                          num_local_experts=4, num_experts_per_tok=2, vocab_size=128,
                          layer_types=["sliding_attention", "full_attention"])
    model = tf.AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(UserError, match=r"GptOssForCausalLM: \d+% of block 0's weights") as info:
        discover(model)
    assert "\n" not in str(info.value) and "mlp.experts.gate_up_proj" in str(info.value)
