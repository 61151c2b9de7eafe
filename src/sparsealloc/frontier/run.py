"""The ``search`` allocator on a Session: level database, KL fitness, evolutionary search."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm.auto import tqdm

from ..allocation.search import (
    EvolveState,
    SearchConfig,
    SearchResult,
    check_budget,
    checkpoints,
    evolve,
    level_grid,
)
from ..errors import UserError
from ..io import read_json, write_json
from ..progress import progress_enabled
from ..pruners import get_pruner, parse_pattern
from ..session import Session
from ..tuning import tune_corpus
from .database import LevelDatabase, build_database
from .fitness import KLFitness, LevelLoader, logit_softcap

log = logging.getLogger(__name__)

FITNESS = ("KL(dense || candidate) of the next-token distribution, mean over the scored "
           "calibration tokens; every block pruned at its level on dense inputs (the database)")


@dataclass
class SearchOutcome:
    """The searched allocation and everything recorded about the search."""

    block_sparsity: list[float]
    record: dict


def database_key(session: Session, pruner: str, pruner_config: dict, pattern: str) -> str:
    p = session.protocol
    blob = json.dumps({"model": session.model_id, "weights": session.weights_fingerprint,
                       "pruner": pruner_config, "pattern": pattern, "seqlen": p.seqlen,
                       "calib": p.calib, "seed": p.seed, "nsamples": p.nsamples,
                       "batch": p.batch_size, "bos_per_window": p.bos_per_window},
                      sort_keys=True)
    return f"{pruner}-{hashlib.sha256(blob.encode()).hexdigest()[:16]}"


def search_allocation(session: Session, start: list[float], target: float,
                      config: SearchConfig, pruner: str = "wanda",
                      pattern: str = "unstructured", stride: int = 1,
                      use_cache: bool = True, holdout: int = 0,
                      num_checkpoints: int = 8) -> SearchOutcome:
    """Search per-block sparsities from ``start`` (level 0), budget exact.

    With ``holdout`` tokens, the start and up to ``num_checkpoints`` points of the search's
    trajectory are scored (the same KL) on that many tokens of the calibration corpus's tune
    slice, and the best of them is returned; without, the last. The database is cached on
    disk under ``$SPARSEALLOC_CACHE/search_db`` (``use_cache``); the model is dense again
    afterwards.
    """
    pat = parse_pattern(pattern)
    if pat.is_nm:
        raise UserError(f"the search allocator needs unstructured pruning: the pattern {pattern} "
                        "fixes every block's sparsity at N/M; use --pattern unstructured")
    prune = get_pruner(pruner)
    available = session.protocol.nsamples * session.protocol.seqlen
    if max(config.tokens) > available:  # checked again, exactly, by KLFitness
        raise UserError(f"--search-tokens {max(config.tokens)} exceeds the {available} "
                        "calibration tokens (--nsamples x --seqlen); lower it or raise --nsamples")
    heldout = (tune_corpus(session.protocol.calib, "the search's held-out check (--search-"
                           "holdout)", "or turn the check off: --search-holdout 0")
               if holdout else None)
    weights = session.params_per_block
    grid = level_grid(start, weights, config.step, config.levels, config.lo, config.hi)
    check_budget(grid, [0] * grid.num_blocks, target, weights)  # the start meets the budget
    if not session.keep_dense:
        raise RuntimeError("the search needs a Session with keep_dense=True (it loads pruned "
                           "weights into the model and restores the dense ones)")
    session.restore_dense()  # dense model, dense copy kept (session.dense_weights)

    db_key = database_key(session, prune.name, prune.config(), str(pat))
    folder = session.cache_dir("search_db") / db_key if use_cache else None
    db = LevelDatabase(folder, session.dense_weights)
    wanted = [[grid.sparsity(i, k) for k in grid.block_levels(i)] for i in range(len(start))]
    t0 = time.perf_counter()
    with session.timed("search_database"):
        build_database(db, session.runner, session.capture, prune, pat, wanted)
    db_seconds = time.perf_counter() - t0

    device = session.protocol.device
    session.model.to(device)
    bar = tqdm(total=config.generations, desc="search", leave=False, dynamic_ncols=True,
               disable=not progress_enabled(session.progress))

    def tick(_gen: int, best: float) -> None:
        bar.update(1)
        bar.set_postfix(best_kl=f"{best:.5g}")

    t1 = time.perf_counter()
    lm_head, softcap = session.model.get_output_embeddings(), logit_softcap(session.model)
    loader = LevelLoader(session.arch, db, grid)
    check: dict | None = None
    try:
        with session.timed("search"):
            fitness = KLFitness(session.runner, session.capture(), lm_head, softcap, db, grid,
                                config.tokens, stride=stride, seed=config.seed, loader=loader)
            held, held_seconds = None, 0.0
            if heldout is not None:  # its dense reference now, while the model is dense
                t2 = time.perf_counter()
                acts = session.heldout_capture(*heldout, holdout)
                held = KLFitness(session.runner, acts, lm_head, softcap, db, grid,
                                 [acts.num_tokens], stride=stride, loader=loader)
                held_seconds = time.perf_counter() - t2
            progress = SearchProgress.open(
                session.cache_dir("search_progress") if use_cache else None,
                [db_key, asdict(grid), asdict(config), stride, target])
            resume = progress.load(fitness) if progress else None
            if resume is not None:
                bar.update(resume.generation)
            result = evolve(grid, fitness, config, on_generation=tick, resume=resume,
                            on_state=(lambda st: progress.save(st, fitness)) if progress
                            else None)
            chosen = len(result.trajectory) - 1
            if held is not None:
                t2 = time.perf_counter()
                chosen, check = held_out_choice(result, held, num_checkpoints)
                check["corpus"] = f"{heldout[0]}:{heldout[1]}"
                check["seconds"] = held_seconds + time.perf_counter() - t2
    finally:
        bar.close()
        session.model.to("cpu")
        session.restore_dense()
    search_seconds = time.perf_counter() - t1
    if progress:
        progress.done()
    generation, levels, final = result.trajectory[chosen]
    sparsity = check_budget(grid, levels, target, weights)
    record = {
        "fitness": FITNESS,
        "start_block_sparsity": list(grid.start),
        "start_fitness": result.start_fitness,
        "final_fitness": final,
        "relative_improvement": ((result.start_fitness - final)
                                 / result.start_fitness if result.start_fitness > 0 else 0.0),
        "fitness_curve": result.curve,
        "improved_generations": result.improved_generations,
        "chosen_generation": generation,
        "last_fitness": result.fitness,
        "holdout": check,
        "levels": list(levels),
        "level_sparsity_step": list(grid.delta),
        "level_range": [list(grid.kmin), list(grid.kmax)],
        "config": asdict(config) | {"stride": stride},
        "resumed_at_generation": resume.generation if resume is not None else None,
        "tokens_per_stage": fitness.tokens_per_stage,
        "final_stage_batches": fitness.final_batches,
        "cost": {
            "database_seconds": db_seconds,
            "search_seconds": search_seconds,  # the held-out check included
            "holdout_seconds": check["seconds"] if check else 0.0,
            "database_entries_built": db.built,
            "database_entries_reused": db.reused,
            "database_bytes": db.bytes,
            "database_folder": str(folder) if folder is not None else None,
            "candidate_evaluations_per_stage": result.evaluations,
            "token_block_forwards": fitness.token_block_forwards,
        },
        "pruner": prune.config(),
        "pattern": str(pat),
    }
    return SearchOutcome(block_sparsity=sparsity, record=record)


class SearchProgress:
    """A search's state after its latest generation, in the cache, so that a search stopped by
    a crash or a session's end goes on from there when run again (the same model, protocol,
    pruner, start, grid and search options); removed when the search ends."""

    def __init__(self, path: Path, identity: str) -> None:
        self.path, self.identity = path, identity

    @classmethod
    def open(cls, folder: Path | None, identity: list) -> SearchProgress | None:
        if folder is None:
            return None
        key = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str)
                             .encode()).hexdigest()[:20]
        return cls(folder / f"{key}.json", key)

    def load(self, fitness: KLFitness) -> EvolveState | None:
        if not self.path.is_file():
            return None
        try:
            saved = read_json(self.path)
            if saved.get("identity") != self.identity:
                return None
            state = EvolveState.from_json(saved["state"])
            fitness.set_rng_state(saved["fitness_rng"])
        except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
            log.warning("ignoring the unreadable search progress %s (%s)", self.path, exc)
            return None
        log.warning("the search goes on from generation %d (%s)", state.generation, self.path)
        return state

    def save(self, state: EvolveState, fitness: KLFitness) -> None:
        write_json(self.path, {"identity": self.identity, "state": state.to_json(),
                               "fitness_rng": fitness.rng_state()})

    def done(self) -> None:
        self.path.unlink(missing_ok=True)


def held_out_choice(result: SearchResult, held: KLFitness,
                    wanted: int) -> tuple[int, dict]:
    """Score up to ``wanted`` trajectory points on the held-out tokens; the index of the best
    (ties: the earlier, closer to the start) and the record of the check."""
    picks = checkpoints(len(result.trajectory), wanted)
    points = [result.trajectory[i] for i in picks]
    scores = held.kl_shared([levels for _, levels, _ in points], held.final_batches)
    best = min(range(len(picks)), key=lambda j: (scores[j], j))
    return picks[best], {
        "tokens": held.tokens_per_stage[-1],
        "checkpoints": [{"generation": g, "fitness": f, "holdout_kl": h}
                        for (g, _, f), h in zip(points, scores, strict=True)],
        "start_holdout_kl": scores[0],
        "chosen_holdout_kl": scores[best],
        "chosen_generation": points[best][0],
        "last_holdout_kl": scores[-1],
    }
