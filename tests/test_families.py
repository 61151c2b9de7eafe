"""Current dense families: SparseGPT prune + save + reload keeps the logits."""

import pytest
import torch
from tiny_models import random_ids, tiny_model, tiny_tokenizer

from sparsealloc.blockwise import measured_sparsity, prune_sequential
from sparsealloc.models.load import load_model, save_model
from sparsealloc.pruners import get_pruner
from sparsealloc.pruners.masks import parse_pattern
from sparsealloc.runner import BlockRunner

DENSE_FAMILIES = ["llama3", "gemma2", "phi3", "qwen3", "mistral_sw", "cohere", "olmo2"]


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


@pytest.mark.parametrize("arch", DENSE_FAMILIES)
def test_prune_save_reload_gives_the_same_logits(tmp_path, arch):
    model = tiny_model(arch)
    ids = random_ids(2, 16, seed=1)
    dense = _logits(model, ids)
    runner = BlockRunner(model, progress=False)
    acts = runner.capture(random_ids(4, 16), batch_size=2)
    prune_sequential(runner, acts, get_pruner("sparsegpt"), [0.5] * runner.num_blocks,
                     parse_pattern("unstructured"))
    m = measured_sparsity(runner.arch)
    assert m["overall"] == pytest.approx(0.5, abs=0.02)
    assert m["block_weights"] == pytest.approx(m["overall"])
    pruned = _logits(model, ids)
    assert not torch.allclose(pruned, dense)
    out = save_model(model, tiny_tokenizer(), tmp_path / "pruned")
    reloaded = load_model(str(out)).model
    reloaded.set_attn_implementation("eager")  # the tiny models run eager attention
    assert torch.equal(_logits(reloaded, ids), pruned)


@pytest.mark.parametrize("arch", DENSE_FAMILIES)
def test_compare_with_owl_alpha_and_absorb(tmp_path, arch):
    """OWL statistics, spectra, the probe, the correction, Wanda and perplexity on each family."""
    import json

    from tiny_models import save_tiny
    from typer.testing import CliRunner

    from sparsealloc.cli import app

    folder, text = save_tiny(tmp_path, arch)
    out = tmp_path / "cmp"
    res = CliRunner().invoke(app, [
        "compare", "--model", str(folder), "--calib", str(text), "--nsamples", "4",
        "--seqlen", "32", "--quiet", "--ppl", str(text), "--sparsity", "0.5",
        "--allocations", "owl,alpha+absorb", "--absorb-gamma", "0.05",
        "--absorb-nsamples", "2", "--no-dense", "--out", str(out)])
    assert res.exit_code == 0, res.output
    rows = json.loads((out / "compare.json").read_text())["rows"]
    assert len(rows) == 2
    for row in rows:
        assert row["measured_sparsity"] == pytest.approx(0.5, abs=1 / 32)
        assert row["block_weight_sparsity"] == pytest.approx(row["measured_sparsity"])
        assert all(v > 1 for v in row["ppl"].values())
