import pytest
import torch
from tiny_models import ARCHS, random_ids, tiny_model
from torch import nn

from sparsealloc.errors import UserError
from sparsealloc.models.arch import discover, is_linear
from sparsealloc.runner import BlockRunner, collect_inputs

EXPECTED_LINEARS = {
    "llama": 7, "qwen2": 7, "mistral": 7, "gemma3": 7, "gpt2": 4, "opt": 6, "gpt_neox": 4,
    "phi": 6, "llama3": 7, "gemma2": 7, "phi3": 4, "qwen3": 7, "mistral_sw": 7, "cohere": 7,
    "olmo2": 7,
}


def _block_outputs(model, ids, runner) -> list[torch.Tensor]:
    """Every block's own output in the model's forward over ``ids`` (forward hooks)."""
    ref: list[torch.Tensor] = []

    def keep(_module, _inputs, output):
        ref.append((output if isinstance(output, torch.Tensor) else output[0]).detach())

    handles = [b.register_forward_hook(keep) for b in runner.arch.blocks]
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    for h in handles:
        h.remove()
    return ref


@pytest.mark.parametrize("arch", ARCHS)
def test_discover_blocks_and_linears(arch):
    model = tiny_model(arch)
    a = discover(model)
    assert a.num_blocks == model.config.num_hidden_layers
    assert len(a.linears(0)) == EXPECTED_LINEARS[arch]
    assert all(is_linear(m) for m in a.linears(0).values())
    # embeddings and lm_head are never among the pruned layers
    head = model.get_output_embeddings()
    assert all(m is not head for i in range(a.num_blocks) for m in a.linears(i).values())
    assert a.final_norm is not None
    assert sum(a.params_per_block()) > 0


@pytest.mark.parametrize("arch", ARCHS)
def test_runner_reproduces_model_hidden_states(arch):
    """Capture + block-by-block forwards equal the model's own forward before the final norm."""
    model = tiny_model(arch)
    ids = random_ids()
    runner = BlockRunner(model, progress=False)
    ref = _block_outputs(model, ids, runner)
    acts = runner.capture(ids, batch_size=2)
    assert len(acts.hidden) == 2 and acts.hidden[0].shape[0] == 2
    for _ in runner.sequential(acts):
        pass
    assert torch.allclose(torch.cat(acts.hidden), ref[-1], atol=1e-5)
    assert runner.block_forwards == ids.shape[0] * runner.num_blocks


def test_runner_matches_every_block_output():
    """Each block's output, not only the last one, equals the model's own (LLaMA and Gemma 3)."""
    for arch in ("llama", "gemma3"):
        model = tiny_model(arch)
        ids = random_ids()
        runner = BlockRunner(model, progress=False)
        ref = _block_outputs(model, ids, runner)
        acts = runner.capture(ids, batch_size=ids.shape[0])
        seen = 0
        for index in runner.sequential(acts):
            if index > 0:  # the input of block index is the model's output of block index - 1
                assert torch.allclose(acts.hidden[0], ref[index - 1], atol=1e-5), (arch, index)
                seen += 1
        assert seen == runner.num_blocks - 1
        assert torch.allclose(acts.hidden[0], ref[-1], atol=1e-5)


def test_gemma3_blocks_get_their_own_masks():
    model = tiny_model("gemma3")
    runner = BlockRunner(model, progress=False)
    acts = runner.capture(random_ids(1, 16))
    masks = [c.kwargs.get("attention_mask") for c in acts.calls[0]]
    # sliding and full attention layers receive different masks
    assert not torch.equal(masks[0], masks[1])


def test_collect_inputs_sees_every_token():
    model = tiny_model("llama")
    runner = BlockRunner(model, progress=False)
    acts = runner.capture(random_ids(3, 16))

    class Count:
        n = 0

        def add_batch(self, x):
            Count.n += x.reshape(-1, x.shape[-1]).shape[0]

    lin = runner.arch.linears(0)
    name = next(iter(lin))
    with collect_inputs({name: lin[name]}, {name: Count()}):
        runner.run_block(0, acts)
    assert Count.n == 3 * 16


def test_unsupported_architecture_is_one_clear_error():
    with pytest.raises(UserError, match="unsupported architecture"):
        discover(nn.Sequential(nn.Embedding(4, 4), nn.ReLU()))
