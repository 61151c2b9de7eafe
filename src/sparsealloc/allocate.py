"""From an ``--allocation`` spec to one sparsity per block, using a Session's shared statistics.

The pure formulas live in :mod:`sparsealloc.allocation`; this module gathers their inputs
(OWL's outlier ratios and DLP's median scores from one dense calibration pass, LSA's
reconstruction errors, AlphaPruning's spectra, absorption coefficients) from the Session,
where each is computed once and reused. ``linear:auto`` chooses ATP's slope on the tuning
slice (:mod:`sparsealloc.tuning`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from . import allocation as A
from .allocation.experts import expert_split
from .errors import check
from .models.arch import in_features, weight_out_in
from .pruners.sparsegpt import HessianStats
from .pruners.wanda import InputNormStats, wanda_scores
from .runner import collect_inputs
from .session import Session
from .tuning import choose_on_tuning_slice, tune_corpus

LINEAR_AUTO_SPANS = (0.0, 0.04, 0.08, 0.12, 0.16, 0.24, 0.32)
"""``linear:auto`` candidates: total spans ``beta * (L - 1)`` (0 is uniform, 0.16 OWL's span)."""


@dataclass
class AllocationOptions:
    """Hyperparameters of the allocators and of the absorption correction.

    Attributes:
        owl_m: OWL outlier threshold M (score > M * mean); paper runs at 70% use 5.
        owl_lambda: OWL lambda (sparsities span 2*lambda).
        alpha_eps: AlphaPruning epsilon (ratios in [1-eps, 1+eps]).
        linear_beta: slope per block of the linear schedule (None: 0.16 / (L-1), OWL's span).
        linear_spans: total spans ``beta * (L-1)`` that ``linear:auto`` tries (0 always
            added; spans over ATP's limit ``2 * min(S, 1 - S)`` dropped).
        dlp_alpha: DLP alpha (sparsities span 2*alpha); the reference's 0.15.
        dlp_statistic: DLP block statistic of the Wanda scores: "median" (the paper) or
            "mean" (what the reference's unstructured code path computes).
        lsa_alpha: LSA alpha (span 2*alpha); None: the reference's per-sparsity table
            (0.15 at 70%).
        lsa_block_size: LSA input-column group size (0: whole rows); the reference's 128.
        lsa_ratio: share of each group LSA drops when measuring the error (``--resp``, 0.5).
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
        expert_allocation: a block's sparsity over its experts: "uniform" or "owl" (OWL's rule
            over the experts' outlier ratios, the block's budget met exactly).
    """

    owl_m: float = 5.0
    owl_lambda: float = 0.08
    alpha_eps: float = 0.3
    linear_beta: float | None = None
    linear_spans: tuple[float, ...] = LINEAR_AUTO_SPANS
    dlp_alpha: float = 0.15
    dlp_statistic: str = "median"
    lsa_alpha: float | None = None
    lsa_block_size: int = 128
    lsa_ratio: float = 0.5
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
    expert_allocation: str = "uniform"

    def __post_init__(self) -> None:
        check(self.owl_m > 0, f"--owl-m must be positive (got {self.owl_m})")
        check(0 <= self.owl_lambda < 0.5, f"--owl-lambda must be in [0, 0.5) (got "
              f"{self.owl_lambda})")
        check(0 <= self.alpha_eps < 1, f"--alpha-eps must be in [0, 1) (got {self.alpha_eps})")
        check(self.absorb_eta > 0, f"--absorb-eta must be positive (got {self.absorb_eta})")
        check(self.absorb_clip > 0, f"--absorb-clip must be positive (got {self.absorb_clip})")
        check(self.absorb_nsamples >= 1,
              f"--absorb-nsamples must be at least 1 (got {self.absorb_nsamples})")
        check(self.absorb_draws >= 1,
              f"--absorb-draws must be at least 1 (got {self.absorb_draws})")

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
    expert_sparsity: list[dict[str, float]] | None = None  # per block: "path.number" -> s

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


def dlp_scores(session: Session, statistic: str) -> list[float]:
    """DLP's per-block |median| (or |mean|) Wanda score on the dense model (cached)."""
    key = f"dlp_scores:{statistic}"
    if key not in session.cache:
        norms = owl_input_norms(session)
        scores = []
        for index, block_norms in enumerate(norms):
            weights = session.dense_weights(index)
            block = [wanda_scores(weights[n], block_norms[n]) for n in weights]
            scores.append(A.dlp_block_score(block, statistic))
        session.cache[key] = scores
    return session.cache[key]


def lsa_errors(session: Session, block_size: int, ratio: float) -> list[float]:
    """LSA's per-block mean reconstruction error on the dense model (one pass, cached)."""
    key = f"lsa_errors:{block_size}:{ratio}"
    if key in session.cache:
        return session.cache[key]
    session.restore_dense()
    session.counters["lsa_stats_passes"] = session.counters.get("lsa_stats_passes", 0) + 1
    acts = session.capture()
    errors: list[float] = []
    with session.timed("lsa_stats"):
        for index in session.runner.sequential(acts, desc="LSA reconstruction errors"):
            linears = session.arch.linears(index)
            stats = {n: HessianStats(in_features(m), weight_out_in(m).device)
                     for n, m in linears.items()}
            with collect_inputs(linears, stats):
                session.runner.run_block(index, acts)
            per_linear = []
            for n, m in linears.items():
                per_linear.append(A.lsa_reconstruction_error(weight_out_in(m), stats[n].H,
                                                             block_size, ratio))
                stats[n].free()
            errors.append(A.lsa_block_error(per_linear))
    session.cache[key] = errors
    return errors


def alphas(session: Session) -> list[float]:
    key = "alphas"
    if key not in session.cache:
        blocks = [list(session.dense_weights(i).values()) for i in range(session.arch.num_blocks)]
        with session.timed("spectra"):
            session.cache[key] = A.block_alphas(blocks, cache_path=session.cache_dir("spectra"))[0]
    return session.cache[key]


def expert_owl_split(session: Session, block_sparsity: list[float],
                     opts: AllocationOptions) -> list[dict[str, float]]:
    """Each block's sparsity split over its experts by their outlier ratios (budget exact)."""
    norms = owl_input_norms(session)
    out: list[dict[str, float]] = []
    for index, s in enumerate(block_sparsity):
        experts = session.arch.experts(index)
        weights = session.dense_weights(index)
        ratios = [A.outlier_ratio([wanda_scores(weights[n], norms[index][n]) for n in names],
                                  opts.owl_m) for names in experts.values()]
        params = [sum(weights[n].numel() for n in names) for names in experts.values()]
        split = expert_split(s, ratios, params, opts.owl_lambda) if experts else []
        out.append(dict(zip(experts, split, strict=True)))
    return out


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
    if spec.base == "dlp":
        m = dlp_scores(session, opts.dlp_statistic)
        return A.dlp_allocation(m, target, opts.dlp_alpha, weights=w), m, \
            f"{opts.dlp_statistic}_wanda_score"
    if spec.base == "lsa":
        e = lsa_errors(session, opts.lsa_block_size, opts.lsa_ratio)
        return A.lsa_allocation(e, target, opts.lsa_alpha, weights=w), e, "reconstruction_error"
    if spec.base == "file":
        return A.file_allocation(spec.path, L), None, None
    raise AssertionError(spec.base)


def linear_auto_betas(num_blocks: int, target: float, spans: tuple[float, ...]) -> list[float]:
    """Slopes ``linear:auto`` tries: ``span / (L-1)`` for 0 and each span within ATP's limit."""
    limit = 2.0 * min(target, 1.0 - target)
    kept = sorted({0.0} | {float(x) for x in spans if 0.0 <= float(x) <= limit + 1e-12})
    return [x / max(num_blocks - 1, 1) for x in kept]


def linear_auto(session: Session, target: float, opts: AllocationOptions, pruner: str,
                pattern: str) -> tuple[torch.Tensor, dict]:
    """ATP's linear schedule with the slope of lowest perplexity on the tuning slice."""
    L, w = session.arch.num_blocks, session.params_per_block
    candidates = [(beta, A.linear_allocation(L, target, beta, weights=w).tolist())
                  for beta in linear_auto_betas(L, target, opts.linear_spans)]
    beta, curve = choose_on_tuning_slice(session, "beta", candidates, pruner, pattern)
    for point in curve:
        point["span"] = point["beta"] * (L - 1)
    record = {"linear_beta_used": beta, "linear_span_used": beta * (L - 1), "beta_curve": curve,
              "beta_tuned_on": "/".join(tune_corpus(session.protocol.calib))}
    return A.linear_allocation(L, target, beta, weights=w), record


def compute_allocation(session: Session, text: str, target: float,
                       opts: AllocationOptions | None = None, pruner: str = "wanda",
                       pattern: str = "unstructured") -> Allocation:
    """Compute the allocation ``text`` (e.g. ``owl``, ``alpha+absorb``, ``file:s.json``)."""
    opts = opts or AllocationOptions()
    spec = A.parse_allocation_spec(text)
    tuned: dict = {}
    with session.timed("allocation"):
        if spec.base == "linear:auto":
            base, tuned = linear_auto(session, target, opts, pruner, pattern)
            scores, score_name = None, None
        else:
            base, scores, score_name = base_allocation(session, spec, target, opts)
    alloc = Allocation(
        spec=text, target_sparsity=target, block_sparsity=[float(x) for x in base],
        scores=scores, score_name=score_name, options=_relevant_options(spec, opts, target) | tuned,
    )
    if spec.absorb:
        from .correction import apply_correction

        alloc = apply_correction(session, alloc, opts, pruner, pattern)
    if opts.expert_allocation == "owl":
        alloc.expert_sparsity = expert_owl_split(session, alloc.block_sparsity, opts)
        alloc.options["expert_allocation"] = "owl"
    check(len(alloc.block_sparsity) == session.arch.num_blocks, "allocation length mismatch")
    return alloc


def _relevant_options(spec: A.AllocationSpec, opts: AllocationOptions, target: float) -> dict:
    rec = opts.record()
    keep = {"owl": ("owl_m", "owl_lambda"), "alpha": ("alpha_eps",), "linear": ("linear_beta",),
            "linear:auto": ("linear_spans",), "dlp": ("dlp_alpha", "dlp_statistic"),
            "lsa": ("lsa_alpha", "lsa_block_size", "lsa_ratio")}
    out = {k: rec[k] for k in keep.get(spec.base, ())}
    if spec.base == "lsa" and opts.lsa_alpha is None:
        out["lsa_alpha_used"] = A.lsa_default_alpha(target)
    if spec.base == "file":
        out["path"] = str(spec.path)
    if spec.absorb:
        out.update({k: v for k, v in rec.items() if k.startswith("absorb_")})
    return out
