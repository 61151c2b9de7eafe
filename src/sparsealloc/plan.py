"""From an ``--allocation`` spec to one sparsity per block (the plan a row is pruned with).

``compute_allocation`` runs the registered allocator on the session's shared statistics, then
the modifiers the spec asks for: the absorption correction (``+absorb``), the per-expert split
(``--expert-allocation owl``) and the evolutionary search (``search:``).
"""

from __future__ import annotations

from dataclasses import replace

from .allocation import AllocationContext, AllocationOptions, parse_allocation_spec
from .allocation.correction import apply_correction
from .allocation.experts import expert_split
from .allocation.options import Allocation
from .allocation.owl import outlier_ratio
from .allocation.registry import get_allocator
from .errors import check
from .frontier import search_allocation
from .pruners.wanda import wanda_scores
from .session import Session


def compute_allocation(session: Session, text: str, target: float,
                       opts: AllocationOptions | None = None, pruner: str = "wanda",
                       pattern: str = "unstructured") -> Allocation:
    """Compute the allocation ``text`` (e.g. ``owl``, ``alpha+absorb``, ``file:s.json``)."""
    opts = opts or AllocationOptions()
    spec = parse_allocation_spec(text)
    allocator = get_allocator(spec.name)
    ctx = AllocationContext(session, pruner, pattern)
    own = opts.of(spec.name)
    with session.timed("allocation"):
        base = allocator.allocate(ctx, target, own, spec.arg)
    record = dict(base.record)
    score_name = record.pop("score_name", allocator.score_name if base.scores else None)
    options = relevant_options(spec.name, opts) | record
    alloc = Allocation(spec=text, target_sparsity=target,
                       block_sparsity=[float(x) for x in base.block_sparsity],
                       scores=base.scores, score_name=score_name, options=options)
    if spec.absorb:
        alloc = apply_correction(session, alloc, opts.of("absorb"), pruner, pattern)
        alloc.options.update(relevant_options("absorb", opts))
    if spec.search:
        alloc = searched(session, alloc, opts, pruner, pattern)
        alloc.options.update(relevant_options("search", opts))
    if opts.of("expert").allocation == "owl":
        alloc.expert_sparsity = expert_owl_split(session, alloc.block_sparsity, opts)
        alloc.options["expert_allocation"] = "owl"
    check(len(alloc.block_sparsity) == session.arch.num_blocks, "allocation length mismatch")
    return alloc


def searched(session: Session, alloc: Allocation, opts: AllocationOptions, pruner: str,
             pattern: str) -> Allocation:
    """``alloc`` improved by the evolutionary search (its own allocation is the start)."""
    search = opts.of("search")
    outcome = search_allocation(session, alloc.block_sparsity, alloc.target_sparsity,
                                search.config(), pruner, pattern, stride=search.stride,
                                holdout=search.holdout, num_checkpoints=search.checkpoints)
    return replace(alloc, block_sparsity=outcome.block_sparsity,
                   options=dict(alloc.options, search=outcome.record))


def relevant_options(prefix: str, opts: AllocationOptions) -> dict:
    """The recorded options of one group (what an allocation row depended on)."""
    return opts.recorded(prefix)


def expert_owl_split(session: Session, block_sparsity: list[float],
                     opts: AllocationOptions) -> list[dict[str, float]]:
    """Each block's sparsity split over its experts by their outlier ratios (budget exact)."""
    owl = opts.of("owl")
    norms = session.owl_norms()
    out: list[dict[str, float]] = []
    for index, s in enumerate(block_sparsity):
        experts = session.arch.experts(index)
        weights = session.dense_weights(index)
        ratios = [outlier_ratio([wanda_scores(weights[n], norms[index][n]) for n in names],
                                owl.m) for names in experts.values()]
        params = [sum(weights[n].numel() for n in names) for names in experts.values()]
        split = expert_split(s, ratios, params, owl.lambda_) if experts else []
        out.append(dict(zip(experts, split, strict=True)))
    return out


__all__ = ["Allocation", "AllocationOptions", "compute_allocation"]
