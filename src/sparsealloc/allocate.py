"""From an ``--allocation`` spec to one sparsity per block, using a Session's shared statistics.

The pure formulas live in :mod:`sparsealloc.allocation`; this module gathers their inputs
(OWL's outlier ratios from one dense calibration pass, AlphaPruning's spectra, absorption
coefficients) from the Session, where each is computed once and reused.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

import torch

from . import allocation as A
from .allocation.search import SearchConfig
from .errors import check
from .frontier import search_allocation
from .models.arch import in_features
from .pruners.wanda import InputNormStats, wanda_scores
from .runner import collect_inputs
from .session import Session


@dataclass
class AllocationOptions:
    """Hyperparameters of the allocators and of the absorption correction.

    Attributes:
        owl_m: OWL outlier threshold M (score > M * mean); paper runs at 70% use 5.
        owl_lambda: OWL lambda (sparsities span 2*lambda).
        alpha_eps: AlphaPruning epsilon (ratios in [1-eps, 1+eps]).
        linear_beta: slope per block of the linear schedule (None: 0.16 / (L-1), OWL's span).
        absorb_eta: relative noise magnitude for the absorption coefficients.
        absorb_gamma: largest sparsity shift of the correction (a number, or "auto").
        absorb_clip: bound on |ln r|.
        absorb_final: where the final drift is measured: "last" (relative drift at the last
            block output), "norm" (after the final norm), "kl" (KL of the output
            distribution), "abs" (absolute gain: leaves out the dilution of an early error
            by a residual stream that grows with depth) or "damage" (sqrt KL when block l is
            perturbed over its geometric mean across blocks, not divided by the injected
            drift: total damage, a reference point
            rather than the seed's coefficient).
        absorb_mode: "prune" (default: block l pruned alone at the target sparsity with the
            chosen pruner, everything else dense -- the perturbation has the size and
            structure of real pruning error) or "noise" (the seed paper's Gaussian noise of
            relative size eta; see FINDINGS.md for why it misleads on these models).
        absorb_budget: budget restoration after the shift: "shift" or "rescale".
        absorb_positions: token positions the perturbation is applied to: "all" or
            "skip-first" (leave position 0, the massive-activation sink, unperturbed).
        absorb_scale: noise size relative to the hidden state ("state", the seed paper) or
            to what block l wrote into the residual stream ("update", the scale of its
            pruning error).
        absorb_nsamples: calibration sequences used by the probe (the first ones).
        absorb_draws: noise draws per sequence.
        search_generations, search_offspring: the evolutionary search (``search`` specs):
            generations and offspring per generation (EvoPress: 400, 64).
        search_survivors, search_tokens: survivors and calibration tokens of each selection
            stage (EvoPress: 8,2,1 and 2048,16384,65536).
        search_step: sparsity of one level in an average-size block; search_levels: levels
            on each side of the start; search_seed: mutations and token draws;
            search_stride: KL on every N-th token.
    """

    owl_m: float = 5.0
    owl_lambda: float = 0.08
    alpha_eps: float = 0.3
    linear_beta: float | None = None
    absorb_eta: float = 1e-2
    absorb_gamma: float | str = 0.04
    absorb_clip: float = 1.0986122886681098
    absorb_final: str = "last"
    absorb_mode: str = "prune"
    absorb_budget: str = "shift"
    absorb_positions: str = "all"
    absorb_scale: str = "state"
    absorb_nsamples: int = 16
    absorb_draws: int = 1
    search_generations: int = 400
    search_offspring: int = 64
    search_survivors: tuple[int, ...] = (8, 2, 1)
    search_tokens: tuple[int, ...] = (2048, 16384, 65536)
    search_step: float = 0.025
    search_levels: int = 4
    search_seed: int = 0
    search_stride: int = 1

    def record(self) -> dict:
        return asdict(self)


@dataclass
class Allocation:
    """One allocation: sparsity per block and what produced it."""

    spec: str
    target_sparsity: float
    block_sparsity: list[float]
    scores: list[float] | None = None
    score_name: str | None = None
    absorption: list[float] | None = None
    base_block_sparsity: list[float] | None = None
    options: dict = field(default_factory=dict)

    def record(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------- dense statistics
def owl_input_norms(session: Session) -> list[dict[str, torch.Tensor]]:
    """Wanda's per-column input norms of every linear on the *dense* model (one pass, cached)."""
    if "owl_norms" in session.cache:
        return session.cache["owl_norms"]
    session.restore_dense()
    session.counters["dense_stats_passes"] = session.counters.get("dense_stats_passes", 0) + 1
    acts = session.capture()
    norms: list[dict[str, torch.Tensor]] = []
    with session.timed("dense_stats"):
        for index in session.runner.sequential(acts, desc="dense statistics"):
            linears = session.arch.linears(index)
            stats = {n: InputNormStats(in_features(m)) for n, m in linears.items()}
            with collect_inputs(linears, stats):
                session.runner.run_block(index, acts)
            norms.append({n: s.scaler_row.clone() for n, s in stats.items()})
    session.cache["owl_norms"] = norms
    return norms


def owl_ratios(session: Session, m: float) -> list[float]:
    norms = owl_input_norms(session)
    ratios = []
    for index, block_norms in enumerate(norms):
        weights = session.dense_weights(index)
        scores = [wanda_scores(weights[n], block_norms[n]) for n in weights]
        ratios.append(A.outlier_ratio(scores, m))
    return ratios


def alphas(session: Session) -> list[float]:
    key = "alphas"
    if key not in session.cache:
        blocks = [list(session.dense_weights(i).values()) for i in range(session.arch.num_blocks)]
        with session.timed("spectra"):
            session.cache[key] = A.block_alphas(blocks, cache_path=session.cache_dir("spectra"))[0]
    return session.cache[key]


# ---------------------------------------------------------------- allocations
def base_allocation(session: Session, spec: A.AllocationSpec, target: float,
                    opts: AllocationOptions) -> tuple[torch.Tensor, list[float] | None, str | None]:
    L = session.arch.num_blocks
    w = session.params_per_block
    if spec.base == "uniform":
        return A.uniform_allocation(L, target), None, None
    if spec.base == "owl":
        ratios = owl_ratios(session, opts.owl_m)
        return A.owl_allocation(ratios, target, opts.owl_lambda, weights=w), ratios, "outlier_ratio"
    if spec.base == "alpha":
        a = alphas(session)
        return A.alpha_allocation(a, target, opts.alpha_eps, weights=w), a, "mean_alpha"
    if spec.base == "linear":
        beta = opts.linear_beta if opts.linear_beta is not None else 0.16 / max(L - 1, 1)
        return A.linear_allocation(L, target, beta, weights=w), None, None
    if spec.base == "file":
        return A.file_allocation(spec.path, L), None, None
    raise AssertionError(spec.base)


def compute_allocation(session: Session, text: str, target: float,
                       opts: AllocationOptions | None = None, pruner: str = "wanda",
                       pattern: str = "unstructured") -> Allocation:
    """Compute the allocation ``text`` (e.g. ``owl``, ``alpha+absorb``, ``file:s.json``)."""
    opts = opts or AllocationOptions()
    spec = A.parse_allocation_spec(text)
    with session.timed("allocation"):
        base, scores, score_name = base_allocation(session, spec, target, opts)
    alloc = Allocation(
        spec=text, target_sparsity=target, block_sparsity=[float(x) for x in base],
        scores=scores, score_name=score_name, options=_relevant_options(spec, opts),
    )
    if spec.absorb:
        from .correction import apply_correction

        alloc = apply_correction(session, alloc, opts, pruner, pattern)
    if spec.search:
        alloc = searched(session, alloc, opts, pruner, pattern)
    check(len(alloc.block_sparsity) == session.arch.num_blocks, "allocation length mismatch")
    return alloc


def searched(session: Session, alloc: Allocation, opts: AllocationOptions, pruner: str,
             pattern: str) -> Allocation:
    """``alloc`` improved by the evolutionary search (its own allocation is the start)."""
    config = SearchConfig(generations=opts.search_generations, offspring=opts.search_offspring,
                          survivors=tuple(opts.search_survivors),
                          tokens=tuple(opts.search_tokens), step=opts.search_step,
                          levels=opts.search_levels, seed=opts.search_seed)
    outcome = search_allocation(session, alloc.block_sparsity, alloc.target_sparsity, config,
                                pruner, pattern, stride=opts.search_stride)
    return replace(alloc, block_sparsity=outcome.block_sparsity,
                   options=dict(alloc.options, search=outcome.record))


def _relevant_options(spec: A.AllocationSpec, opts: AllocationOptions) -> dict:
    rec = opts.record()
    keep = {"owl": ("owl_m", "owl_lambda"), "alpha": ("alpha_eps",), "linear": ("linear_beta",)}
    out = {k: rec[k] for k in keep.get(spec.base, ())}
    if spec.base == "file":
        out["path"] = str(spec.path)
    if spec.absorb:
        out.update({k: v for k, v in rec.items() if k.startswith("absorb_")})
    if spec.search:
        out.update({k: v for k, v in rec.items() if k.startswith("search_")})
    return out
