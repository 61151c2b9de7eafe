"""ATP-style linear schedule: sparsity grows (or shrinks) linearly with depth (``linear``), with
the slope chosen on the tuning slice (``linear:auto``).

``s_l = S - beta * (L - 1) / 2 + beta * l`` for ``l = 0..L-1``; its plain mean
is ``S`` by construction.  Values outside ``[lo, hi]`` are clipped and the
budget is restored by a shift (see :mod:`.budget`), so the mean stays exact
also for large ``beta`` or with ``weights`` (parameter-weighted mean).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import UserError
from ..tuning import beyond_the_grid, check_rule, choose, score_candidates, tune_corpus
from .budget import check_target, restore_budget
from .registry import AllocationContext, Allocator, Base, option, register


def linear_allocation(
    num_blocks: int,
    target: float,
    beta: float,
    weights: Tensor | Sequence[float] | None = None,
    lo: float = 0.0,
    hi: float = 0.99,
) -> Tensor:
    """Linear schedule with slope ``beta`` per block (``beta > 0``: deeper blocks sparser)."""
    n = int(num_blocks)
    if n < 1:
        raise UserError(f"need at least one decoder block, got {num_blocks}")
    target = check_target(target)
    beta = float(beta)
    idx = torch.arange(n, dtype=torch.float64)
    raw = target - beta * (n - 1) / 2.0 + beta * idx
    return restore_budget(raw, target, weights=weights, lo=lo, hi=hi, method="shift")


LINEAR_AUTO_SPANS = (0.0, 0.04, 0.08, 0.12, 0.16, 0.24, 0.32)
"""``linear:auto`` candidates: total spans ``beta * (L - 1)`` (0 is uniform, 0.16 OWL's span)."""


@dataclass(frozen=True)
class LinearOptions:
    beta: float | None = option(None, "linear schedule slope per block (default: 0.16 / (L-1), "
                                "OWL's span)")
    spans: tuple[float, ...] = option(LINEAR_AUTO_SPANS, "linear:auto: total spans beta x (L-1) "
                                      "to try on the tuning slice (0 always added)")
    select: str = option("min", "linear:auto: min keeps the span of lowest tuning perplexity; "
                         "1se the smallest span within one paired standard error of it (a gain "
                         "the tuning slice cannot tell from noise keeps the schedule flatter)",
                         when_set=True)
    extend: int = option(0, "linear:auto: when the chosen span is the largest tried, try up to "
                         "three larger ones (below ATP's limit) and choose again, at most this "
                         "many times", when_set=True)

    def __post_init__(self) -> None:
        if any(not 0 <= x < 1 for x in self.spans):
            raise UserError(f"--linear-spans must be in [0, 1), e.g. 0.08,0.16 (got "
                            f"{','.join(map(str, self.spans))})")
        check_rule(self.select, "--linear-select")
        if not 0 <= self.extend <= 10:
            raise UserError(f"--linear-extend must be between 0 and 10 rounds (got {self.extend})")


def span_limit(target: float) -> float:
    """ATP's largest total span: no block's sparsity below 0 or above 1 before clipping."""
    return 2.0 * min(target, 1.0 - target)


def linear_auto_betas(num_blocks: int, target: float, spans: Sequence[float]) -> list[float]:
    """Slopes ``linear:auto`` tries: ``span / (L-1)`` for 0 and each span within ATP's limit."""
    limit = span_limit(target)
    kept = sorted({0.0} | {float(x) for x in spans if 0.0 <= float(x) <= limit + 1e-12})
    return [x / max(num_blocks - 1, 1) for x in kept]


@register
class Linear(Allocator):
    """ATP's arithmetic progression over depth; ``linear:auto`` chooses the slope on the tuning
    slice of the calibration corpus (never the evaluation corpus)."""

    name = "linear"
    Options = LinearOptions
    arg = "optional"
    arg_help = "auto"

    def tuned(self, arg: str | None) -> bool:
        return arg == "auto"

    def check_arg(self, arg: str | None) -> None:
        if arg not in (None, "auto"):
            raise UserError(f"allocation 'linear:{arg}': write linear (fixed slope, "
                            "--linear-beta) or linear:auto (slope chosen on the tuning slice)")

    def allocate(self, ctx: AllocationContext, target: float, opts: LinearOptions,
                 arg: str | None) -> Base:
        L, w = ctx.num_blocks, ctx.weights
        if arg != "auto":
            beta = opts.beta if opts.beta is not None else 0.16 / max(L - 1, 1)
            return Base(linear_allocation(L, target, beta, weights=w).tolist())
        limit = span_limit(target)

        def scored(betas: Sequence[float]) -> list[dict]:
            cands = [(b, linear_allocation(L, target, b, weights=w).tolist()) for b in betas]
            points = score_candidates(ctx.session, "beta", cands, ctx.pruner, ctx.pattern)
            for point in points:
                point["span"] = point["beta"] * (L - 1)
            return points

        try:
            curve = scored(linear_auto_betas(L, target, opts.spans))
            beta = choose(curve, "beta", opts.select)
            for _ in range(opts.extend):
                wider = beyond_the_grid(curve, "span", beta * (L - 1), limit)
                if not wider:
                    break
                curve += scored([x / max(L - 1, 1) for x in wider])
                beta = choose(curve, "beta", opts.select)
        finally:
            ctx.session.restore_dense()
        record = {"linear_beta_used": beta, "linear_span_used": beta * (L - 1),
                  "beta_curve": curve,
                  "beta_tuned_on": "/".join(tune_corpus(ctx.session.protocol.calib))}
        wider = beyond_the_grid(curve, "span", beta * (L - 1), limit)
        if wider:
            record["advice"] = [
                f"linear:auto chose the largest span it tried ({beta * (L - 1):g}); a larger one "
                f"may be better: try --linear-spans {','.join(f'{x:g}' for x in wider)}"
                + ("" if opts.extend else " or --linear-extend 1")]
        return Base(linear_allocation(L, target, beta, weights=w).tolist(), record=record)
