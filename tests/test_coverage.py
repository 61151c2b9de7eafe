"""Block weights outside the pruned layers: measured, and refused beyond a small share."""

import pytest
import torch
from tiny_models import tiny_model
from torch import nn

from sparsealloc.blockwise import measured_sparsity
from sparsealloc.errors import UserError
from sparsealloc.models.arch import MAX_UNPRUNED_SHARE, discover


class _Block(nn.Module):
    def __init__(self, extra: int) -> None:
        super().__init__()
        self.proj = nn.Linear(16, 16, bias=False)
        self.norm = nn.LayerNorm(16)
        self.table = nn.Parameter(torch.randn(extra, 16, 16)) if extra else None


class _Toy(nn.Module):
    def __init__(self, extra: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList([_Block(extra) for _ in range(2)])


def test_block_with_large_share_outside_linears_is_refused_in_one_line():
    with pytest.raises(UserError, match=r"block 0's weights \(table\)") as info:
        discover(_Toy(extra=4))
    assert "\n" not in str(info.value)
    assert "not supported" in str(info.value)


def test_small_share_outside_linears_is_accepted():
    # 16*16 linear; a (1,16,16) extra table would be 50%: none is within the limit
    a = discover(_Toy(extra=0))
    assert a.unpruned_share(0) == 0.0
    assert MAX_UNPRUNED_SHARE == pytest.approx(0.05)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3", "opt"])
def test_dense_architectures_prune_all_their_block_weights(arch):
    a = discover(tiny_model(arch))
    assert all(a.unpruned_share(i) == 0.0 for i in range(a.num_blocks))


def test_block_weight_sparsity_counts_weights_outside_the_pruned_layers():
    model = tiny_model("llama")
    a = discover(model)
    for i in range(a.num_blocks):
        for m in a.linears(i).values():
            m.weight.data[: m.weight.shape[0] // 2] = 0  # exactly half of every pruned layer
    m = measured_sparsity(a)
    assert m["overall"] == pytest.approx(0.5)
    assert m["block_weights"] == pytest.approx(0.5)
    # drop one layer from the pruned list: it is dense again in the all-weights count only
    dense_layer = a.linears(0)["mlp.down_proj"]
    dense_layer.weight.data.normal_()
    a.linear_names[0].remove("mlp.down_proj")
    m = measured_sparsity(a)
    assert m["overall"] == pytest.approx(0.5)
    n_all = sum(w.numel() for i in range(a.num_blocks) for w in a.block_weights(i).values())
    assert m["block_weights"] == pytest.approx(0.5 - 0.5 * dense_layer.weight.numel() / n_all)
