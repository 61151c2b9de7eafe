"""Block-sequential pruning: the shared runner + any pruner + one sparsity per block."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .models.arch import Architecture, weight_out_in
from .pruners.base import Pruner
from .pruners.masks import Pattern, check_pattern_fits
from .runner import Activations, BlockRunner, collect_inputs


def _as_linear(module: nn.Module) -> nn.Linear:
    """An ``nn.Linear`` view of a prunable layer (GPT-2's Conv1D gets a transposed proxy)."""
    if isinstance(module, nn.Linear):
        return module
    w = weight_out_in(module)
    proxy = nn.Linear(w.shape[1], w.shape[0], bias=False, device=w.device, dtype=w.dtype)
    proxy.weight.data = w.contiguous().clone()
    return proxy


def check_patterns(arch: Architecture, pattern: Pattern) -> None:
    """Fail early, before any work, if an N:M pattern does not divide a layer."""
    for name, module in arch.linears(0).items():
        try:
            check_pattern_fits(tuple(weight_out_in(module).shape), pattern)
        except Exception as exc:  # re-raise with the layer's name
            raise type(exc)(f"layer '{name}': {exc}") from None


@torch.no_grad()
def prune_block(
    runner: BlockRunner, index: int, acts: Activations, pruner: Pruner, sparsity: float,
    pattern: Pattern,
) -> None:
    """Prune every prunable layer of block ``index`` (statistics from one pass over ``acts``)."""
    linears = runner.arch.linears(index)
    proxies = {name: _as_linear(m) for name, m in linears.items()}
    stats = {name: pruner.make_stats(p) for name, p in proxies.items()}
    if any(s is not None for s in stats.values()):
        with collect_inputs(linears, stats):
            runner.run_block(index, acts)
    for name, module in linears.items():
        pruner.prune_layer(proxies[name], stats[name], sparsity, pattern)
        stats[name] = None  # free Hessians early
        if proxies[name] is not module:
            weight_out_in(module).copy_(proxies[name].weight.data)


def prune_sequential(
    runner: BlockRunner, acts: Activations, pruner: Pruner, block_sparsity: Sequence[float],
    pattern: Pattern,
) -> None:
    """Prune all blocks in order; block l sees the outputs of the pruned blocks before it."""
    if len(block_sparsity) != runner.num_blocks:
        raise ValueError(f"{len(block_sparsity)} sparsities for {runner.num_blocks} blocks")
    first = next(iter(runner.arch.linears(0).values()))
    if pruner.make_stats(_as_linear(first)) is None:  # data-free (magnitude): no block passes
        for index in range(runner.num_blocks):
            prune_block(runner, index, acts, pruner, float(block_sparsity[index]), pattern)
        return
    for index in runner.sequential(acts, desc=f"pruning ({pruner.name})"):
        prune_block(runner, index, acts, pruner, float(block_sparsity[index]), pattern)


def measured_sparsity(arch: Architecture) -> dict:
    """Share of zero weights over the pruned layers (overall and per block), and over all
    >=2-D weights of the decoder blocks (``block_weights``: what the pruned layers leave out
    counts as dense)."""
    per_block, zeros_total, total = [], 0, 0
    for i in range(arch.num_blocks):
        z = n = 0
        for module in arch.linears(i).values():
            w = weight_out_in(module)
            z += int((w == 0).sum())
            n += w.numel()
        per_block.append(z / n)
        zeros_total += z
        total += n
    all_zeros = all_total = 0
    for i in range(arch.num_blocks):
        for w in arch.block_weights(i).values():
            all_zeros += int((w == 0).sum())
            all_total += w.numel()
    return {"overall": zeros_total / total, "per_block": per_block,
            "block_weights": all_zeros / all_total}
