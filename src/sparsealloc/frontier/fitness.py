"""Fitness of a level vector: KL(dense || candidate) of the next-token distribution.

EvoPress's ``compute_kl_div``: the candidate model (every block at its level, weights from
the :class:`~.database.LevelDatabase`) runs on calibration sequences and its output
distribution is compared with the dense model's, averaged over tokens. The dense outputs are
computed once (one pass of the shared runner) and kept as final-norm hidden states -- the
LM head is applied to them on the fly, since dense log-probabilities over the vocabulary for
every calibration token would not fit in memory. ``stride`` scores every stride-th position
only (the LM head over the vocabulary is a large share of a small model's cost).

Token draws: stage ``i`` of the selection sees ``ceil(tokens_i / tokens per batch)`` whole
calibration batches, drawn afresh (seeded) at every call except for the last stage, whose
batches are drawn once and kept (see :mod:`sparsealloc.allocation.search`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..allocation.search import LevelGrid, Levels
from ..errors import UserError
from ..models.arch import Architecture, weight_out_in
from ..runner import Activations, BlockRunner
from .database import LevelDatabase

_CHUNK = 512  # positions per log-softmax over the vocabulary


def logit_softcap(model: nn.Module) -> float | None:
    """Gemma-style final logit soft-capping, when the model's config has it."""
    cap = getattr(getattr(model, "config", None), "final_logit_softcapping", None)
    return float(cap) if cap else None


def log_probs(hidden: Tensor, lm_head: nn.Module, softcap: float | None) -> Tensor:
    logits = lm_head(hidden).double()  # float64: candidates can differ by ~1e-7 nats
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return torch.log_softmax(logits, dim=-1)


def kl_sum(dense_lp: Tensor, cand_lp: Tensor) -> tuple[float, int]:
    """Sum over positions of KL(p || q) and the number of positions."""
    kl = (dense_lp.exp() * (dense_lp - cand_lp)).sum(-1).clamp_min(0.0)
    return float(kl.sum()), kl.numel()


class LevelLoader:
    """Puts level vectors' weights into the model, rewriting only the blocks that change.

    One loader per model: every :class:`KLFitness` on the same model shares it, so none of
    them trusts a stale idea of what the model holds.
    """

    def __init__(self, arch: Architecture, db: LevelDatabase, grid: LevelGrid) -> None:
        self.arch = arch
        self.db = db
        self.grid = grid
        self.loaded: list[int | None] = [None] * arch.num_blocks

    @torch.no_grad()
    def load(self, levels: Levels) -> None:
        for index, level in enumerate(levels):
            if self.loaded[index] == level:
                continue
            weights = self.db.weights(index, self.grid.sparsity(index, level))
            for name, module in self.arch.linears(index).items():
                weight_out_in(module).copy_(weights[name])
            self.loaded[index] = level


class KLFitness:
    """Callable ``fitness(candidates, stage) -> [KL per candidate]`` for :func:`evolve`.

    Args:
        runner: the shared block runner of the model (whose weights it overwrites).
        acts: the embedded calibration batches (``Session.capture()``), left unchanged.
        lm_head: the output embedding; ``softcap``: final logit soft-capping or None.
        db, grid: the level database and the level grid of the search.
        tokens: calibration tokens per selection stage.
        stride: score every stride-th position.
        seed: seed of the batch draws.
        loader: the model's :class:`LevelLoader` (shared by every fitness on the model);
            None: a new one. The model must be dense when the fitness is made (its outputs
            are the reference).
    """

    def __init__(self, runner: BlockRunner, acts: Activations, lm_head: nn.Module,
                 softcap: float | None, db: LevelDatabase, grid: LevelGrid,
                 tokens: Sequence[int], stride: int = 1, seed: int = 0,
                 loader: LevelLoader | None = None) -> None:
        if stride < 1:
            raise UserError(f"--search-stride must be at least 1 (got {stride})")
        self.runner = runner
        self.arch: Architecture = runner.arch
        self.acts = acts
        self.lm_head = lm_head
        self.softcap = softcap
        self.loader = loader if loader is not None else LevelLoader(runner.arch, db, grid)
        self.stride = stride
        self.gen = torch.Generator().manual_seed(int(seed) + 7_919)
        per_batch = int(acts.hidden[0].shape[0] * acts.hidden[0].shape[1])
        available = acts.num_tokens
        self.batches_per_stage = []
        for t in tokens:
            if t > available:
                raise UserError(
                    f"--search-tokens {t} exceeds the {available} calibration tokens "
                    "(--nsamples x --seqlen); lower it or raise --nsamples"
                )
            self.batches_per_stage.append(math.ceil(t / per_batch))
        self.tokens_per_stage = [n * per_batch for n in self.batches_per_stage]
        self.final_batches = self._draw(self.batches_per_stage[-1])
        self.token_block_forwards = 0  # tokens x blocks run (the dense reference included)
        self.dense_final = self._dense_outputs()

    def rng_state(self) -> list[int]:
        """The state of the batch draws (saved with a search's progress)."""
        return self.gen.get_state().tolist()

    def set_rng_state(self, state: list[int]) -> None:
        self.gen.set_state(torch.tensor(state, dtype=torch.uint8))

    # ---------------------------------------------------------------- helpers
    def _draw(self, count: int) -> list[int]:
        order = torch.randperm(len(self.acts.hidden), generator=self.gen)[:count]
        return sorted(int(i) for i in order)

    def _final(self, hidden: Tensor) -> Tensor:
        h = hidden[:, :: self.stride]
        norm = self.arch.final_norm
        h = h.to(self.runner.device)
        return norm(h) if norm is not None else h

    @torch.no_grad()
    def _run(self, batch: int, first: int = 0, h: Tensor | None = None,
             keep: list[Tensor] | None = None) -> Tensor:
        """Blocks ``first..L-1`` on batch ``batch`` (input ``h``, default the embeddings);
        appends each block's output to ``keep`` when given. Returns the final-norm states."""
        h = self.acts.hidden[batch] if h is None else h
        calls = self.acts.calls[batch]
        for k in range(first, self.arch.num_blocks):
            h = self.runner.forward_block(k, h, calls[k])
            if keep is not None:
                keep.append(h)
        self.token_block_forwards += int(h.shape[0] * h.shape[1]) * (self.arch.num_blocks
                                                                     - first)
        return self._final(h)

    def _kl(self, batch: int, final: Tensor) -> tuple[float, int]:
        """Summed KL of the candidate's final states against the dense ones, in chunks of
        positions (log-probabilities over the vocabulary are large)."""
        dense = self.dense_final[batch]
        total, count = 0.0, 0
        for i in range(0, final.shape[1], _CHUNK):
            d = log_probs(dense[:, i:i + _CHUNK].to(self.runner.device), self.lm_head,
                          self.softcap)
            c = log_probs(final[:, i:i + _CHUNK], self.lm_head, self.softcap)
            s, n = kl_sum(d, c)
            total += s
            count += n
        return total, count

    @torch.no_grad()
    def _dense_outputs(self) -> list[Tensor]:
        """Final-norm hidden states of the dense model (the model must be dense now)."""
        return [self._run(b).to(self.runner.storage) for b in range(len(self.acts.hidden))]

    def load(self, levels: Levels) -> None:
        """Put every block's weights at ``levels`` into the model (only blocks that change)."""
        self.loader.load(levels)

    @torch.no_grad()
    def kl(self, levels: Levels, batches: Sequence[int]) -> float:
        """Mean KL over the scored positions of ``batches`` for one candidate (the plain,
        unshared computation)."""
        self.load(levels)
        total, count = 0.0, 0
        for b in batches:
            s, n = self._kl(b, self._run(b))
            total += s
            count += n
        return total / max(count, 1)

    @torch.no_grad()
    def kl_shared(self, candidates: list[Levels], batches: Sequence[int]) -> list[float]:
        """:meth:`kl` of every candidate, sharing block outputs between candidates.

        Block ``k``'s output depends only on the levels of blocks ``0..k``, so candidates are
        visited in lexicographic order and each one reruns only the blocks from the first
        where it differs from the previous one (offspring of one parent share long
        prefixes). The same block computations on the same inputs: results equal :meth:`kl`.
        """
        order = sorted(range(len(candidates)), key=lambda i: candidates[i])
        totals = [0.0] * len(candidates)
        counts = [0] * len(candidates)
        for b in batches:
            outputs: list[Tensor] = []  # outputs[k]: block k's output for the current prefix
            previous: Levels | None = None
            for i in order:
                cand = candidates[i]
                first = 0 if previous is None else _common_prefix(previous, cand)
                first = min(first, len(outputs))
                del outputs[first:]
                self.load(cand)
                h = outputs[first - 1] if first > 0 else None
                if first == self.arch.num_blocks:  # the same levels again
                    final = self._final(outputs[-1])
                else:
                    final = self._run(b, first, h, keep=outputs)
                s, n = self._kl(b, final)
                totals[i] += s
                counts[i] += n
                previous = cand
        return [t / max(n, 1) for t, n in zip(totals, counts, strict=True)]

    def __call__(self, candidates: list[Levels], stage: int) -> list[float]:
        last = len(self.batches_per_stage) - 1
        batches = (self.final_batches if stage == last
                   else self._draw(self.batches_per_stage[stage]))
        return self.kl_shared(candidates, batches)


def _common_prefix(a: Levels, b: Levels) -> int:
    n = 0
    for x, y in zip(a, b, strict=True):
        if x != y:
            break
        n += 1
    return n
