"""Evolutionary search over per-block sparsity levels (EvoPress, Sieberling et al. 2024).

Pure part: integer level vectors, the level grid, mutation and multi-step selection. The
model-side fitness (KL of the output distribution against the dense model) is a callable
given to :func:`evolve`; see :mod:`sparsealloc.frontier`.

Level grid. Block ``l`` at level ``k`` has sparsity ``s0_l + k * step * mean(w) / w_l``,
where ``s0`` is the starting allocation and ``w_l`` the block's prunable parameters. One
level is the same *number of weights* in every block (EvoPress's ``weights_diff``; with
equal-size blocks it is exactly ``step`` in sparsity), so the parameter-weighted mean
sparsity is ``target + step * mean(w) * sum(k) / sum(w)``: every vector with ``sum(k) == 0``
meets the budget exactly, with no repair. Levels run over ``-levels..levels`` and stop where
a block would leave ``[lo, hi]``.

Mutation (EvoPress ``evo_prune_search.py``): ``min(U{1..3}, U{1..3})`` flips, each moving
one level from a random block that can go down to a random block that can go up
(``sum(k)`` is unchanged). Offspring are distinct.

Selection: the offspring go through stages ``(survivors_i, tokens_i)``; each stage keeps the
``survivors_i`` best by fitness measured on ``tokens_i`` calibration tokens (few tokens for
many candidates, more for the survivors). The parent joins before the last stage (elitism).
Deviation from EvoPress, recorded: the last stage always uses the *same* tokens, so the best
fitness never increases from one generation to the next and the returned allocation is never
worse than the start on those tokens (EvoPress draws fresh tokens at every stage).

Held-out check (ours). A few thousand fixed tokens are a small sample: a search can keep
lowering their KL while the allocation gets worse on other text (measured on SmolLM2 at 70%:
-13% KL, +7% WikiText-2 perplexity). The search therefore records its trajectory (the start and
the parent after every improvement); :func:`checkpoints` picks up to ``n`` of them, evenly
spaced, always the start and the last, and the caller scores them on held-out tokens and keeps
the best (early stopping; see :mod:`sparsealloc.frontier.run`).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from ..errors import UserError
from .budget import TOL, as_vector, check_weights, weighted_mean
from .registry import option, register_options

Levels = tuple[int, ...]
Fitness = Callable[[list[Levels], int], list[float]]
"""``fitness(candidates, stage)``: one value per candidate (lower is better) on the tokens of
selection stage ``stage`` (the last stage always sees the same tokens)."""

_EPS = 1e-9


@dataclass(frozen=True)
class SearchConfig:
    """Hyperparameters of the evolutionary search.

    Attributes:
        generations: number of generations (EvoPress pruning runs: 400).
        offspring: offspring per generation (EvoPress: 64).
        survivors: survivors after each selection stage; the last must be 1 (EvoPress: 8,2,1).
        tokens: calibration tokens per selection stage (EvoPress: 2048,16384,65536).
        step: sparsity of one level in a block of average size (EvoPress levels are a fixed
            number of weights; 0.025 here).
        levels: levels on each side of the start (EvoPress: 8).
        seed: seed of the mutations and of the token draws.
        lo, hi: per-block sparsity bounds.
    """

    generations: int = 400
    offspring: int = 64
    survivors: tuple[int, ...] = (8, 2, 1)
    tokens: tuple[int, ...] = (2048, 16384, 65536)
    step: float = 0.025
    levels: int = 4
    seed: int = 0
    lo: float = 0.0
    hi: float = 0.99

    def __post_init__(self) -> None:
        if self.generations < 0:
            raise UserError(f"--search-generations must be >= 0 (got {self.generations})")
        if self.offspring < 1:
            raise UserError(f"--search-offspring must be at least 1 (got {self.offspring})")
        if len(self.survivors) != len(self.tokens) or not self.tokens:
            raise UserError(
                f"--search-survivors ({len(self.survivors)} values) and --search-tokens "
                f"({len(self.tokens)} values) need one value per selection stage, e.g. "
                "--search-survivors 8,2,1 --search-tokens 2048,16384,65536"
            )
        if any(s < 1 for s in self.survivors) or self.survivors[-1] != 1:
            raise UserError(
                f"--search-survivors must be positive and end with 1 (got {self.survivors})"
            )
        if any(t < 1 for t in self.tokens):
            raise UserError(f"--search-tokens must be positive (got {self.tokens})")
        if not (0 < self.step < 1 and math.isfinite(self.step)):
            raise UserError(f"--search-step must be in (0, 1), e.g. 0.025 (got {self.step})")
        if self.levels < 1:
            raise UserError(f"--search-levels must be at least 1 (got {self.levels})")


@dataclass(frozen=True)
class SearchOptions:
    """The ``search`` modifier's options (recorded as ``search_*``)."""

    generations: int = option(400, "search: generations")
    offspring: int = option(64, "search: offspring per generation")
    survivors: tuple[int, ...] = option((8, 2, 1), "search: survivors of each selection stage, "
                                        "comma separated, ending with 1")
    tokens: tuple[int, ...] = option((2048, 16384, 65536), "search: calibration tokens of each "
                                     "selection stage (whole calibration sequences), comma "
                                     "separated")
    step: float = option(0.025, "search: sparsity of one level (average-size block)")
    levels: int = option(4, "search: levels on each side of the start")
    seed: int = option(0, "search: seed of mutations and token draws")
    stride: int = option(1, "search: KL on every N-th token")
    holdout: int = option(8192, "search: held-out tokens (the calibration corpus's tune slice) "
                          "on which the start and up to --search-checkpoints points of the "
                          "search are scored; the best is returned (0: off, the last)")
    checkpoints: int = option(8, "search: points of the search scored on the held-out tokens "
                              "(the start and the last included)")

    def __post_init__(self) -> None:
        self.config()  # validates
        if self.stride < 1:
            raise UserError(f"--search-stride must be at least 1 (got {self.stride})")
        if self.holdout < 0:
            raise UserError(f"--search-holdout must be >= 0 tokens (got {self.holdout})")
        if self.checkpoints < 2:
            raise UserError(f"--search-checkpoints must be at least 2, the start and the last "
                            f"(got {self.checkpoints})")

    def config(self) -> SearchConfig:
        return SearchConfig(generations=self.generations, offspring=self.offspring,
                            survivors=tuple(self.survivors), tokens=tuple(self.tokens),
                            step=self.step, levels=self.levels, seed=self.seed)


register_options("search", SearchOptions)


# ---------------------------------------------------------------- the level grid
@dataclass(frozen=True)
class LevelGrid:
    """Per-block sparsity levels around a start allocation (see the module docstring)."""

    start: tuple[float, ...]
    delta: tuple[float, ...]  # sparsity of one level, per block
    kmin: tuple[int, ...]
    kmax: tuple[int, ...]

    @property
    def num_blocks(self) -> int:
        return len(self.start)

    def sparsity(self, index: int, level: int) -> float:
        return self.start[index] + level * self.delta[index]

    def sparsities(self, levels: Sequence[int]) -> list[float]:
        return [self.sparsity(i, k) for i, k in enumerate(levels)]

    def block_levels(self, index: int) -> list[int]:
        return list(range(self.kmin[index], self.kmax[index] + 1))


def level_grid(start: Sequence[float], weights: Sequence[float] | None, step: float,
               levels: int, lo: float = 0.0, hi: float = 0.99) -> LevelGrid:
    """The level grid around ``start`` (block sizes ``weights``; None: equal sizes)."""
    s0 = as_vector(start, "start allocation")
    w = check_weights(weights, s0.numel())
    w = torch.ones_like(s0) if w is None else w
    delta = step * w.mean() / w
    kmin, kmax = [], []
    for s, d in zip(s0.tolist(), delta.tolist(), strict=True):
        if s < lo - TOL or s > hi + TOL:
            raise UserError(f"start sparsity {s} is outside [{lo}, {hi}]")
        kmin.append(max(-levels, math.ceil((lo - s) / d - _EPS)))
        kmax.append(min(levels, math.floor((hi - s) / d + _EPS)))
    return LevelGrid(tuple(s0.tolist()), tuple(delta.tolist()), tuple(kmin), tuple(kmax))


# ---------------------------------------------------------------- mutation
def mutate(parent: Levels, grid: LevelGrid, rng: random.Random) -> Levels:
    """One offspring: 1-3 flips (biased to fewer), each moving one level between two blocks."""
    child = list(parent)
    n = len(child)
    flips = min(rng.randint(1, 3), rng.randint(1, 3))
    for _ in range(flips):
        down = [i for i in range(n) if child[i] - 1 >= grid.kmin[i]]
        up = [i for i in range(n) if child[i] + 1 <= grid.kmax[i]]
        if not down or not up:
            break
        d = down[rng.randrange(len(down))]
        u = up[rng.randrange(len(up))]
        child[d] -= 1
        child[u] += 1
    return tuple(child)


def offspring(parent: Levels, grid: LevelGrid, count: int, rng: random.Random) -> list[Levels]:
    """Up to ``count`` distinct mutants of ``parent`` (fewer when the grid has fewer)."""
    out: list[Levels] = []
    seen: set[Levels] = set()
    attempts = 0
    while len(out) < count and attempts < 50 * count:
        attempts += 1
        child = mutate(parent, grid, rng)
        if child in seen:
            continue
        seen.add(child)
        out.append(child)
    return out


# ---------------------------------------------------------------- the search
@dataclass
class SearchResult:
    """Best level vector, its fitness, and the history of the search."""

    levels: Levels
    fitness: float
    start_fitness: float
    curve: list[float] = field(default_factory=list)  # best fitness after each generation
    evaluations: list[int] = field(default_factory=list)  # candidate evaluations per stage
    improved_generations: list[int] = field(default_factory=list)
    trajectory: list[tuple[int, Levels, float]] = field(default_factory=list)
    """``(generation, levels, fitness)`` of the start and of the parent after each improvement."""


@dataclass
class EvolveState:
    """Everything :func:`evolve` carries from one generation to the next: continuing from it
    gives exactly the result of an uninterrupted run (with the fitness's own draws restored)."""

    generation: int
    parent: Levels
    best: float
    start: float
    curve: list[float]
    improved: list[int]
    trajectory: list[tuple[int, Levels, float]]
    evaluations: list[int]
    rng: object  # random.Random.getstate()
    memo: dict[Levels, float]

    def to_json(self) -> dict:
        version, internal, gauss = self.rng  # type: ignore[misc]
        return {"generation": self.generation, "parent": list(self.parent), "best": self.best,
                "start": self.start, "curve": self.curve, "improved": self.improved,
                "trajectory": [[g, list(lv), f] for g, lv, f in self.trajectory],
                "evaluations": self.evaluations, "rng": [version, list(internal), gauss],
                "memo": [[list(k), v] for k, v in self.memo.items()]}

    @classmethod
    def from_json(cls, d: dict) -> EvolveState:
        version, internal, gauss = d["rng"]
        return cls(int(d["generation"]), tuple(d["parent"]), float(d["best"]),
                   float(d["start"]), [float(x) for x in d["curve"]],
                   [int(x) for x in d["improved"]],
                   [(int(g), tuple(lv), float(f)) for g, lv, f in d["trajectory"]],
                   [int(x) for x in d["evaluations"]], (version, tuple(internal), gauss),
                   {tuple(k): float(v) for k, v in d["memo"]})


def evolve(grid: LevelGrid, fitness: Fitness, config: SearchConfig,
           on_generation: Callable[[int, float], None] | None = None,
           resume: EvolveState | None = None,
           on_state: Callable[[EvolveState], None] | None = None) -> SearchResult:
    """EvoPress's (1 + offspring) evolution from the start (all levels 0).

    ``fitness(candidates, stage)`` is called with the candidates of each selection stage.
    Fitness on the last stage (always the same tokens) is memoised per level vector, so the
    parent is not re-evaluated and the curve is exactly monotone. ``on_state`` receives the
    state after every generation; ``resume`` continues from such a state.
    """
    rng = random.Random(config.seed)
    last = len(config.tokens) - 1
    memo: dict[Levels, float] = {}
    evaluations = [0] * len(config.tokens)

    def final_fitness(cands: list[Levels]) -> list[float]:
        todo = [c for c in cands if c not in memo]
        if todo:
            evaluations[last] += len(todo)
            for c, f in zip(todo, fitness(todo, last), strict=True):
                memo[c] = float(f)
        return [memo[c] for c in cands]

    if resume is None:
        parent: Levels = tuple([0] * grid.num_blocks)
        best = start = final_fitness([parent])[0]
        curve, improved = [start], []
        trajectory = [(0, parent, start)]
        first = 0
    else:
        if len(resume.parent) != grid.num_blocks or len(resume.evaluations) != len(evaluations):
            raise ValueError("the saved search state is for another grid or configuration")
        parent, best, start = resume.parent, resume.best, resume.start
        curve, improved = list(resume.curve), list(resume.improved)
        trajectory = list(resume.trajectory)
        evaluations[:] = resume.evaluations
        memo.update(resume.memo)
        rng.setstate(resume.rng)  # type: ignore[arg-type]
        first = resume.generation
    for gen in range(first, config.generations):
        cands = offspring(parent, grid, config.offspring, rng)
        for stage, keep in enumerate(config.survivors):
            if stage == last:
                if parent not in cands:
                    cands.append(parent)
                scores = final_fitness(cands)
            elif len(cands) <= keep:
                continue  # nothing to select: skip the evaluation
            else:
                evaluations[stage] += len(cands)
                scores = [float(f) for f in fitness(cands, stage)]
            order = sorted(range(len(cands)), key=lambda i: (scores[i], cands[i] != parent))
            cands = [cands[i] for i in order[:keep]]
        if memo[cands[0]] < best:
            improved.append(gen + 1)
            trajectory.append((gen + 1, cands[0], memo[cands[0]]))
        parent, best = cands[0], memo[cands[0]]
        curve.append(best)
        if on_state is not None:
            on_state(EvolveState(gen + 1, parent, best, start, list(curve), list(improved),
                                 list(trajectory), list(evaluations), rng.getstate(),
                                 dict(memo)))
        if on_generation is not None:
            on_generation(gen + 1, best)
    return SearchResult(levels=parent, fitness=best, start_fitness=start, curve=curve,
                        evaluations=evaluations, improved_generations=improved,
                        trajectory=trajectory)


def checkpoints(count: int, wanted: int) -> list[int]:
    """Indices of up to ``wanted`` of ``count`` trajectory points, evenly spaced, always the
    first (the start) and the last; ``wanted >= 2``."""
    if count <= wanted:
        return list(range(count))
    return sorted({round(i * (count - 1) / (wanted - 1)) for i in range(wanted)})


def check_budget(grid: LevelGrid, levels: Sequence[int], target: float,
                 weights: Sequence[float] | None) -> list[float]:
    """The sparsities of ``levels``; raises if the (weighted) mean misses ``target``."""
    if sum(levels) != 0:
        raise AssertionError(f"level vector {levels} does not sum to 0")
    s = grid.sparsities(levels)
    err = weighted_mean(s, weights) - target
    if abs(err) > TOL:
        raise UserError(f"the search's start allocation misses the sparsity budget {target} "
                        f"by {err:.3g}; start from an allocation that meets it (file: "
                        "allocations are used as written)")
    return s
