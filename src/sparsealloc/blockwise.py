"""Block-sequential pruning: the shared runner + any pruner + one sparsity per block.

Mixture of experts: every expert's linears are hooked like any other, so their statistics
come only from the tokens routed to them. A layer that received no calibration token at all
(an expert no token chose) is pruned by magnitude instead of from empty statistics, and
reported. When the statistics of all of a block's layers would exceed ``stats_budget`` bytes
(SparseGPT's Hessians of many experts), they are collected and used one expert at a time:
expert 0, expert 1, ..., then the rest of the block, one block pass each. Pruning an expert
changes no other expert's inputs, nor those of the layers before the experts, so each group
sees exactly the inputs one pass over the dense block would give it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .models.arch import Architecture, in_features, weight_out_in
from .pruners.base import LayerStats, Pruner
from .pruners.magnitude import MagnitudePruner
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
    """Fail early, before any work, if an N:M pattern does not divide a layer (of any block:
    blocks may differ, e.g. a dense first block before MoE blocks)."""
    seen: set[tuple[int, ...]] = set()
    for index in range(arch.num_blocks):
        for name, module in arch.linears(index).items():
            shape = tuple(weight_out_in(module).shape)
            if shape in seen:
                continue
            seen.add(shape)
            try:
                check_pattern_fits(shape, pattern)
            except Exception as exc:  # re-raise with the layer's name
                raise type(exc)(f"layer '{name}': {exc}") from None


# Statistics of one block's layers held at once, at most (bytes); beyond it, one expert at a time.
STATS_BUDGET_BYTES = 4 * 1024**3

FALLBACK = MagnitudePruner()


class _Counted:
    """A statistics sink that also counts the tokens it was fed."""

    def __init__(self, stats: LayerStats) -> None:
        self.stats = stats
        self.tokens = 0

    def add_batch(self, inp: Tensor) -> None:
        self.tokens += inp.reshape(-1, inp.shape[-1]).shape[0]
        self.stats.add_batch(inp)


def stats_nbytes(stats: object) -> int:
    """Bytes of the tensors a statistics object holds."""
    return sum(v.nbytes for v in vars(stats).values() if isinstance(v, Tensor))


@dataclass
class BlockReport:
    """What pruning one block did beyond pruning: fallbacks, passes, statistics memory."""

    no_token_layers: list[str] = field(default_factory=list)
    passes: int = 0
    peak_stats_bytes: int = 0


def stat_groups(arch: Architecture, index: int, names: Sequence[str]) -> list[list[str]]:
    """Layers of block ``index`` grouped one expert per group (in order), the rest last."""
    experts: dict[tuple[str, int], list[str]] = {}
    rest: list[str] = []
    for name in names:
        hit = arch.expert_of(index, name)
        (experts.setdefault(hit, []) if hit is not None else rest).append(name)
    groups = [experts[key] for key in sorted(experts)]
    return groups + [rest] if rest else groups


def _stats_bytes_by_width(pruner: Pruner, proxies: dict[str, nn.Linear]) -> dict[int, int]:
    """Statistics bytes per input width, measured on one fresh collector per width."""
    out: dict[int, int] = {}
    for proxy in proxies.values():
        width = in_features(proxy)
        if width not in out:
            stats = pruner.make_stats(proxy)
            out[width] = 0 if stats is None else stats_nbytes(stats)
            del stats
    return out


def layer_sparsity(arch: Architecture, index: int, sparsity: float,
                   expert_sparsity: Mapping[str, float] | None) -> dict[str, float]:
    """Each layer's sparsity: its expert's (``"path.number"`` keys), else the block's."""
    out = {name: sparsity for name in arch.linear_names[index]}
    for expert, names in arch.experts(index).items() if expert_sparsity else ():
        for name in names:
            out[name] = float(expert_sparsity[expert])
    return out


@torch.no_grad()
def prune_block(
    runner: BlockRunner, index: int, acts: Activations, pruner: Pruner, sparsity: float,
    pattern: Pattern, stats_budget: int = STATS_BUDGET_BYTES,
    expert_sparsity: Mapping[str, float] | None = None,
) -> BlockReport:
    """Prune every prunable layer of block ``index`` (statistics from passes over ``acts``);
    experts listed in ``expert_sparsity`` get their own sparsity."""
    report = BlockReport()
    targets = layer_sparsity(runner.arch, index, sparsity, expert_sparsity)
    linears = runner.arch.linears(index)
    proxies = {name: _as_linear(m) for name, m in linears.items()}
    sizes = _stats_bytes_by_width(pruner, proxies)
    need = sum(sizes[in_features(p)] for p in proxies.values())
    groups = (stat_groups(runner.arch, index, list(linears)) if need > stats_budget
              else [list(linears)])
    for group in groups:
        stats = {name: pruner.make_stats(proxies[name]) for name in group}
        counted = {name: _Counted(s) for name, s in stats.items() if s is not None}
        report.peak_stats_bytes = max(report.peak_stats_bytes,
                                      sum(stats_nbytes(c.stats) for c in counted.values()))
        if counted:
            with collect_inputs({n: linears[n] for n in counted}, counted):
                runner.pass_block(index, acts)
            report.passes += 1
        for name in group:
            if name in counted and counted[name].tokens == 0:  # an expert no token chose
                report.no_token_layers.append(name)
                FALLBACK.prune_layer(proxies[name], None, targets[name], pattern)
            else:
                pruner.prune_layer(proxies[name], stats[name], targets[name], pattern)
            stats[name] = None  # free Hessians early
            counted.pop(name, None)
            if proxies[name] is not linears[name]:
                weight_out_in(linears[name]).copy_(proxies[name].weight.data)
    return report


Hold = Callable[[int], AbstractContextManager]


def _no_hold(_index: int) -> AbstractContextManager:
    return nullcontext()


@dataclass(frozen=True)
class BlockCensus:
    """Zeros and finiteness of one block's weights, counted while the block is held."""

    zeros: int
    """zero weights in the prunable layers"""
    total: int
    """weights in the prunable layers"""
    all_zeros: int
    """zero weights over all >=2-D weights of the block"""
    all_total: int
    finite: bool
    """no NaN or infinite weight in a prunable layer"""


def block_census(arch: Architecture, index: int) -> BlockCensus:
    """Count block ``index``'s zeros (its weights must be real: held when streaming)."""
    zeros = total = 0
    finite = True
    for module in arch.linears(index).values():
        w = weight_out_in(module)
        zeros += int((w == 0).sum())
        total += w.numel()
        finite = finite and bool(torch.isfinite(w).all())
    all_zeros = all_total = 0
    for w in arch.block_weights(index).values():
        all_zeros += int((w == 0).sum())
        all_total += w.numel()
    return BlockCensus(zeros, total, all_zeros, all_total, finite)


def census(arch: Architecture, hold: Hold = _no_hold) -> list[BlockCensus]:
    """Every block's census; ``hold(i)`` makes block i's weights real (``BlockRunner.holding``;
    a streamed model reads each block from disk again: prefer the census the prune took)."""
    out = []
    for i in range(arch.num_blocks):
        with hold(i):
            out.append(block_census(arch, i))
    return out


def sparsity_record(counts: Sequence[BlockCensus]) -> dict:
    """Share of zero weights over the pruned layers (overall and per block), and over all
    >=2-D weights of the decoder blocks (``block_weights``: what the pruned layers leave out
    counts as dense)."""
    return {"overall": sum(c.zeros for c in counts) / sum(c.total for c in counts),
            "per_block": [c.zeros / c.total for c in counts],
            "block_weights": sum(c.all_zeros for c in counts) / sum(c.all_total for c in counts)}


@dataclass
class PruneReport:
    """Per run: the layers pruned by magnitude for want of tokens, and statistics memory."""

    no_token_layers: dict[int, list[str]] = field(default_factory=dict)
    passes: int = 0
    peak_stats_bytes: int = 0
    census: list[BlockCensus] = field(default_factory=list)
    """every block's census, taken right after it was pruned (while its weights were held)"""

    def add(self, index: int, block: BlockReport) -> None:
        if block.no_token_layers:
            self.no_token_layers[index] = block.no_token_layers
        self.passes += block.passes
        self.peak_stats_bytes = max(self.peak_stats_bytes, block.peak_stats_bytes)

    def no_token_experts(self, arch: Architecture) -> list[str]:
        """``"block.expert-list.number"`` of every expert some layer of which got no token."""
        out = []
        for index, names in self.no_token_layers.items():
            for name in names:
                hit = arch.expert_of(index, name)
                label = f"{index}.{hit[0]}.{hit[1]}" if hit else f"{index}.{name}"
                if label not in out:
                    out.append(label)
        return out

    def record(self, arch: Architecture) -> dict:
        experts = self.no_token_experts(arch)
        return {
            "experts_without_tokens": len(experts),
            "experts_without_tokens_list": experts,
            "experts_without_tokens_fallback": "magnitude",
            "stats_block_passes": self.passes,
            "peak_stats_mb": self.peak_stats_bytes / 2**20,
        }


def prune_sequential(
    runner: BlockRunner, acts: Activations, pruner: Pruner, block_sparsity: Sequence[float],
    pattern: Pattern | Sequence[Pattern], stats_budget: int = STATS_BUDGET_BYTES,
    expert_sparsity: Sequence[Mapping[str, float]] | None = None,
) -> PruneReport:
    """Prune all blocks in order; block l sees the outputs of the pruned blocks before it.

    ``pattern`` is one pattern for every block or one per block (mixed N:M). A block whose
    sparsity is 0 under an unstructured pattern is left as it is (no statistics collected).
    ``expert_sparsity[l]`` (optional) maps block l's experts (``"path.number"``) to their own
    sparsities (``--expert-allocation``); other layers get ``block_sparsity[l]``.
    """
    if len(block_sparsity) != runner.num_blocks:
        raise ValueError(f"{len(block_sparsity)} sparsities for {runner.num_blocks} blocks")
    patterns = [pattern] * runner.num_blocks if isinstance(pattern, Pattern) else list(pattern)
    if len(patterns) != runner.num_blocks:
        raise ValueError(f"{len(patterns)} patterns for {runner.num_blocks} blocks")
    report = PruneReport()

    def one(index: int) -> None:
        s, p = float(block_sparsity[index]), patterns[index]
        experts = expert_sparsity[index] if expert_sparsity else None
        if p.is_nm or s > 0 or experts:
            report.add(index, prune_block(runner, index, acts, pruner, s, p, stats_budget,
                                          experts))
        report.census.append(block_census(runner.arch, index))

    first = next(iter(runner.arch.linears(0).values()))  # a meta tensor when streaming: fine
    if pruner.make_stats(_as_linear(first)) is None:  # data-free (magnitude): no block passes
        for index in range(runner.num_blocks):
            with runner.holding(index):  # streaming: the block's weights exist only here
                one(index)
        return report
    for index in runner.sequential(acts, desc=f"pruning ({pruner.name})"):
        one(index)
    return report


def measured_sparsity(arch: Architecture, hold: Hold = _no_hold) -> dict:
    """:func:`sparsity_record` of the model as it is now."""
    return sparsity_record(census(arch, hold))


def nonfinite_blocks(counts: Sequence[BlockCensus]) -> list[int]:
    """Blocks holding a NaN or infinite weight in a prunable layer (a diverged prune)."""
    return [i for i, c in enumerate(counts) if not c.finite]
