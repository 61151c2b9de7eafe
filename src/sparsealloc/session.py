"""A loaded model with everything computed once and reused: calibration activations,
dense statistics (OWL), spectra (AlphaPruning), absorption coefficients, dense weights.

``compare`` runs many rows off one Session; each row restores the dense weights first.
"""

from __future__ import annotations

import hashlib
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, TypeVar

import torch

from .blockwise import PruneReport, check_patterns, prune_sequential
from .cache import cache_root
from .data.corpora import Corpus, calibration_windows, eval_windows, load_corpus, tokenize
from .errors import UserError
from .evaluation.perplexity import perplexity
from .io import read_json, write_json
from .models.arch import discover, in_features, weight_out_in
from .models.load import load_model
from .probe.coefficients import absorption_coefficients
from .protocol import Protocol
from .pruners import Pruner, get_pruner
from .pruners.masks import UNSTRUCTURED, Pattern, parse_pattern
from .pruners.nm_levels import check_levels_meet, nm_levels
from .pruners.wanda import InputNormStats
from .runner import Activations, BlockRunner, collect_inputs
from .stats.spectra import block_alphas

T = TypeVar("T")


@dataclass
class Pruned:
    """What :meth:`Session.prune` did: the pruner, its seconds, every block's pattern and the
    runner's report (experts without tokens, statistics passes)."""

    pruner: Pruner
    seconds: float
    patterns: list[Pattern]
    report: PruneReport


class Session:
    """One model under one protocol."""

    def __init__(self, model: str, protocol: Protocol, progress: bool = True,
                 keep_dense: bool = True) -> None:
        self.spec = model
        self.protocol = protocol
        self.progress = progress
        self.timings: dict[str, float] = {}
        with self.timed("load"):
            loaded = load_model(model, device="cpu")
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.source = loaded.source
        self.arch = discover(self.model)
        config = self.model.config
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        note = protocol.check_positions(getattr(text_config, "max_position_embeddings", None),
                                        self.model_id)
        if note is not None:
            print(f"warning: {note}", file=sys.stderr, flush=True)
        self.runner = BlockRunner(self.model, device=protocol.device, progress=progress,
                                  arch=self.arch)
        # A copy of the dense prunable weights, taken the first time a prune needs it (the
        # model is still dense then). keep_dense=False (one prune, nothing after it) skips the
        # copy and halves the weights' memory; restoring after a prune then fails loudly.
        self.keep_dense = keep_dense
        self._dense: dict[tuple[int, str], torch.Tensor] | None = None
        self.modified = False
        self._captured: Activations | None = None
        self.data_sources: dict[str, dict] = {}
        self.cache: dict[str, object] = {}
        self.counters: dict[str, int] = {}

    # ---------------------------------------------------------------- helpers
    @contextmanager
    def timed(self, stage: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[stage] = self.timings.get(stage, 0.0) + time.perf_counter() - start

    @property
    def model_id(self) -> str:
        """Stable identifier of the model for cache keys."""
        return str(self.source.get("name") or self.source.get("path") or self.spec)

    @cached_property
    def weights_fingerprint(self) -> str:
        """A short hash of the dense prunable weights, for on-disk cache keys.

        Two local folders with the same name (or a folder overwritten with other weights)
        must never share cached probe results. Hashes every layer's shape, float64 sum and a
        strided sample of ~4k values: cheap, and it changes whenever the weights do.
        """
        h = hashlib.sha256()
        for i in range(self.arch.num_blocks):
            for name, w in self.dense_weights(i).items():
                flat = w.detach().reshape(-1)
                step = max(1, flat.numel() // 4096)
                h.update(f"{i}.{name}:{tuple(w.shape)}:{float(flat.double().sum()):.10e}".encode())
                h.update(flat[::step].float().cpu().numpy().tobytes())
        return h.hexdigest()[:16]

    def cache_dir(self, kind: str) -> Path:
        safe = self.model_id.replace("/", "__").replace(":", "_")
        return cache_root() / kind / safe

    @cached_property
    def params_per_block(self) -> list[int]:
        return self.arch.params_per_block()

    def restore_dense(self) -> None:
        """Put the dense weights back into every prunable layer (before each prune)."""
        if self._dense is None:
            if self.modified:
                raise RuntimeError("the dense weights were not kept (Session(keep_dense=False)) "
                                   "and the model has been pruned")
            if self.keep_dense:
                self._dense = {
                    (i, n): weight_out_in(m).clone()
                    for i in range(self.arch.num_blocks)
                    for n, m in self.arch.linears(i).items()
                }
            return
        with torch.no_grad():
            for (i, n), w in self._dense.items():
                weight_out_in(self.arch.linears(i)[n]).copy_(w)
        self.modified = False

    def dense_weights(self, index: int) -> dict[str, torch.Tensor]:
        """Block ``index``'s dense weights (the kept copy, or the model's own before pruning)."""
        if self._dense is not None:
            return {n: self._dense[(index, n)] for n in self.arch.linear_names[index]}
        if self.modified:
            raise RuntimeError("the dense weights were not kept and the model has been pruned")
        return {n: weight_out_in(m) for n, m in self.arch.linears(index).items()}

    # ---------------------------------------------------------------- shared statistics
    def memo(self, key: str, compute: Callable[[], T], counter: str | None = None) -> T:
        """``compute()`` once per session (the result is reused by every row); ``counter``
        counts how often it actually ran (recorded as ``shared_work``)."""
        if key not in self.cache:
            if counter is not None:
                self.counters[counter] = self.counters.get(counter, 0) + 1
            self.cache[key] = compute()
        return self.cache[key]  # type: ignore[return-value]

    def disk_cached(self, kind: str, key: str, compute: Callable[[], T],
                    valid: Callable[[Any], bool] = lambda _: True, use_cache: bool = True) -> T:
        """The one on-disk cache of derived results (spectra, absorption probes): JSON under
        ``cache_dir(kind)/key.json``, keyed by the caller from :attr:`weights_fingerprint` and
        the settings; reused in memory for the session; recomputed when absent, unreadable
        or not ``valid`` (e.g. written by an older probe)."""
        memo_key = f"{kind}:{key}"
        if memo_key in self.cache and valid(self.cache[memo_key]):
            return self.cache[memo_key]  # type: ignore[return-value]
        path = self.cache_dir(kind) / f"{key}.json"
        result = None
        if use_cache and path.is_file():
            try:
                result = read_json(path)
            except (OSError, ValueError):
                result = None
        if result is None or not valid(result):
            result = compute()
            write_json(path, result)
        self.cache[memo_key] = result
        return result  # type: ignore[return-value]

    def dense_pass(self, desc: str) -> Iterator[tuple[int, Activations]]:
        """Walk the dense model block by block on the calibration data: yields ``(index,
        activations entering it)``; the block runs on them after the body (the runner's
        sequential protocol)."""
        self.restore_dense()
        acts = self.capture()
        for index in self.runner.sequential(acts, desc=desc):
            yield index, acts

    def owl_norms(self) -> list[dict[str, torch.Tensor]]:
        """Wanda's per-column input norms of every linear on the dense model (OWL, DLP)."""
        def compute() -> list[dict[str, torch.Tensor]]:
            norms = []
            with self.timed("dense_stats"):
                for index, acts in self.dense_pass("dense statistics"):
                    linears = self.arch.linears(index)
                    stats = {n: InputNormStats(in_features(m)) for n, m in linears.items()}
                    with collect_inputs(linears, stats):
                        self.runner.run_block(index, acts)
                    norms.append({n: st.scaler_row.clone() for n, st in stats.items()})
            return norms

        return self.memo("owl_norms", compute, counter="dense_stats_passes")

    def alphas(self) -> list[float]:
        """AlphaPruning's mean heavy-tail exponent per block of the dense weights (cached on
        disk by a hash of the weights)."""
        def compute() -> list[float]:
            blocks = [list(self.dense_weights(i).values()) for i in range(self.arch.num_blocks)]
            with self.timed("spectra"):
                return block_alphas(blocks)[0]

        key = hashlib.sha256(f"{self.weights_fingerprint}:alpha_peak:v1".encode()).hexdigest()
        return self.disk_cached("spectra", key[:16], compute)

    def absorption(self, **probe: Any) -> list[float]:
        """Absorption coefficients r_l of the dense model (see
        :func:`sparsealloc.probe.coefficients.absorption_coefficients` for the arguments)."""
        return absorption_coefficients(self, **probe)

    # ---------------------------------------------------------------- pruning
    def block_patterns(self, pattern: Pattern, block_sparsity: Sequence[float], target: float,
                       spec: str = "") -> list[Pattern]:
        """One pattern per block: the pattern itself, or under N:M one N per block from the
        allocation (mixed N:M, M fixed; see :mod:`sparsealloc.pruners.nm_levels`)."""
        if not pattern.is_nm:
            return [pattern] * self.arch.num_blocks
        levels = nm_levels(block_sparsity, pattern.m, self.params_per_block, target=target)
        check_levels_meet(levels, pattern.m, target, self.params_per_block, spec)
        return [Pattern("nm", n, pattern.m) if n > 0 else UNSTRUCTURED for n in levels]

    def prune(self, pruner_name: str, pattern_text: str, block_sparsity: Sequence[float],
              target: float | None = None, spec: str = "",
              expert_sparsity: Sequence[Mapping[str, float]] | None = None) -> Pruned:
        """Prune the model from its dense weights, block by block on the calibration data
        (under N:M each block gets its own N from ``block_sparsity``; ``expert_sparsity``
        splits a block's budget over its experts). The model stays pruned until the next
        :meth:`restore_dense`."""
        pruner = get_pruner(pruner_name)
        pattern = parse_pattern(pattern_text)
        check_patterns(self.arch, pattern)
        target = pattern.nm_sparsity if target is None else target
        patterns = self.block_patterns(pattern, block_sparsity, target, spec)
        sparsities = [p.nm_sparsity for p in patterns] if pattern.is_nm else list(block_sparsity)
        self.restore_dense()
        acts = self.capture()
        start = time.perf_counter()
        with self.timed("prune"):
            self.modified = True
            report = prune_sequential(self.runner, acts, pruner, sparsities, patterns,
                                      expert_sparsity=expert_sparsity)
        return Pruned(pruner, time.perf_counter() - start, patterns, report)

    # ---------------------------------------------------------------- data
    def corpus(self, name: str, split: str) -> Corpus:
        corpus = load_corpus(name, split, self.protocol.data_dir)
        self.data_sources[f"{name}:{split}"] = corpus.describe()
        return corpus

    @cached_property
    def calibration_ids(self) -> torch.Tensor:
        p = self.protocol
        with self.timed("calibration_data"):
            ids = tokenize(self.tokenizer, self.corpus(p.calib, "calibration"))
            return calibration_windows(ids, p.nsamples, p.seqlen, p.seed, self.window_bos)

    def capture(self) -> Activations:
        """Embedded calibration batches (computed once; a fresh copy per call)."""
        if self._captured is None:
            with self.timed("embed"):
                self._captured = self.runner.capture(self.calibration_ids,
                                                     self.protocol.batch_size)
        return self._captured.clone()

    @cached_property
    def window_bos(self) -> int | None:
        """The BOS id every window starts with (``--bos-per-window``), else None."""
        if not self.protocol.bos_per_window:
            return None
        bos = getattr(self.tokenizer, "bos_token_id", None)
        if bos is None:
            raise UserError(
                f"--bos-per-window: the tokenizer of {self.model_id} has no BOS token; "
                "run without --bos-per-window"
            )
        return int(bos)

    def eval_ids(self, name: str, split: str = "eval") -> torch.Tensor:
        key = f"eval_ids:{name}:{split}"
        if key not in self.cache:
            ids = tokenize(self.tokenizer, self.corpus(name, split))
            self.cache[key] = eval_windows(ids, self.protocol.eval_seqlen,
                                           self.protocol.eval_tokens, self.window_bos)
        return self.cache[key]

    def perplexity(self, corpora: list[str], split: str = "eval",
                   stage: str = "eval_ppl") -> dict[str, dict]:
        """Perplexity of the model as it is now on each corpus (``split``: the role, see
        :func:`sparsealloc.data.corpora.load_corpus`)."""
        out = {}
        self.model.to(self.protocol.device)
        try:
            with self.timed(stage):
                for name in corpora:
                    out[name] = perplexity(self.model, self.eval_ids(name, split),
                                           self.protocol.device, progress=self.progress,
                                           desc=f"ppl {name}")
        finally:
            self.model.to("cpu")
        return out
