import math

import pytest
import torch
from tiny_models import random_ids, tiny_model
from torch import nn

from sparsealloc.probe.engine import Probe, ProbeConfig
from sparsealloc.runner import BlockRunner


class ToyBlock(nn.Module):
    """h -> h + W h + b: W = 0 and b = 0 is the identity."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.lin = nn.Linear(d, d)
        nn.init.zeros_(self.lin.weight)
        nn.init.zeros_(self.lin.bias)

    def forward(self, h, scale=None):
        assert scale is not None  # keyword arguments reach every block
        return h + self.lin(h)


class ToyLM(nn.Module):
    def __init__(self, d: int = 16, L: int = 5, vocab: int = 128) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(ToyBlock(d) for _ in range(L))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)

    def get_output_embeddings(self):
        return self.head

    def forward(self, input_ids, use_cache=False):
        h = self.embed(input_ids)
        for layer in self.layers:
            h = layer(h, scale=1.0)
        return self.head(self.norm(h))


def _probe(model, cfg, n=3, T=12):
    runner = BlockRunner(model, progress=False)
    acts = runner.capture(random_ids(n, T))
    return Probe(runner, cfg, lm_head=model.get_output_embeddings(), progress=False).run(acts), \
        runner, acts


def test_identity_blocks_keep_drift_equal_to_eta():
    torch.manual_seed(0)
    model = ToyLM()
    res, _, _ = _probe(model, ProbeConfig(etas=[1e-3, 0.1], nsamples=3, draws=2, kl=True))
    L = 5
    for key, eta in (("0.001", 1e-3), ("0.1", 0.1)):
        drift = torch.tensor(res["drift"][key])
        for l in range(L):
            for k in range(L):
                if k < l:
                    assert math.isnan(drift[l, k])
                else:
                    assert drift[l, k] == pytest.approx(eta, rel=1e-4)
        assert res["absorption"]["last"][key] == pytest.approx([1.0] * L, rel=1e-4)
        cos = torch.tensor(res["cosine"][key])
        assert float(cos[0, L - 1]) == pytest.approx(1 / math.sqrt(1 + eta**2), abs=eta**2 / 4)
        assert float(cos[0, L - 1]) == pytest.approx(float(cos[L - 1, L - 1]), rel=1e-3)
    assert "kl" in res["absorption"]
    for key in ("0.001", "0.1"):  # damage: sqrt(KL) per sequence, not divided by the drift
        for d, kl in zip(res["absorption"]["damage"][key], res["final_kl"][key], strict=True):
            assert 0.5 * math.sqrt(kl) < d <= math.sqrt(kl) * (1 + 1e-9)  # Jensen: E sqrt <= sqrt E


def test_constant_offset_block_dilutes_drift_as_expected():
    torch.manual_seed(0)
    model = ToyLM()
    with torch.no_grad():
        model.layers[2].lin.bias.fill_(3.0)  # block 2 adds a constant vector: drift shrinks
    res, runner, acts = _probe(model, ProbeConfig(etas=[0.05], nsamples=3))
    drift = torch.tensor(res["drift"]["0.05"])
    h1 = torch.cat(acts.hidden)  # block outputs of identity blocks 0, 1 equal the embeddings
    delta = 0.05 * h1.norm(dim=-1)
    expected = (delta / (h1 + 3.0).norm(dim=-1)).mean()
    assert drift[0, 2] == pytest.approx(float(expected), rel=1e-4)
    assert drift[0, 1] == pytest.approx(0.05, rel=1e-4)
    r = res["absorption"]["last"]["0.05"]
    assert r[0] < 1 and r[1] < 1 and r[3] == pytest.approx(1.0, rel=1e-4)
    # the error itself passes through unchanged: pure dilution, absolute gain exactly 1
    assert res["absorption"]["abs"]["0.05"] == pytest.approx([1.0] * 5, rel=1e-4)


def test_same_seed_same_result_and_shapes():
    model = tiny_model("llama")
    cfg = ProbeConfig(etas=[1e-2], nsamples=2, draws=2)
    a, _, _ = _probe(model, cfg, n=2)
    b, _, _ = _probe(model, cfg, n=2)
    assert torch.equal(torch.tensor(a["drift"]["0.01"]).nan_to_num(),
                       torch.tensor(b["drift"]["0.01"]).nan_to_num())
    L = model.config.num_hidden_layers
    assert torch.tensor(a["drift"]["0.01"]).shape == (L, L)
    assert len(a["absorption"]["last"]["0.01"]) == L
    c, _, _ = _probe(model, ProbeConfig(etas=[1e-2], nsamples=2, draws=2, seed=1), n=2)
    assert c["drift"] != a["drift"]


def test_prune_mode_runs_and_restores_dense_weights():
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res, _, _ = _probe(model, ProbeConfig(mode="prune", sparsity=0.7, nsamples=2), n=2)
    key = res["keys"][0]
    inj = res["injected_drift"][key]
    assert all(x > 0 for x in inj)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_prune_mode_with_sparsegpt_restores_weights_and_differs_from_wanda():
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = dict(mode="prune", sparsity=0.7, nsamples=2)
    sg, _, _ = _probe(model, ProbeConfig(pruner="sparsegpt", **cfg), n=2)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    wa, _, _ = _probe(model, ProbeConfig(pruner="wanda", **cfg), n=2)
    assert sg["keys"] == ["prune:sparsegpt@0.7:unstructured"]
    # SparseGPT updates the kept weights, so its pruning error differs from Wanda's
    assert sg["injected_drift"][sg["keys"][0]] != wa["injected_drift"][wa["keys"][0]]


def test_block_forward_count_matches_formula():
    model = tiny_model("llama")
    L, E, D, N = model.config.num_hidden_layers, 2, 2, 2
    res, _, _ = _probe(model, ProbeConfig(etas=[1e-3, 1e-2], nsamples=N, draws=D), n=N)
    assert res["cost"]["block_forwards_sequences"] == N * (L + E * D * L * (L - 1) // 2)
