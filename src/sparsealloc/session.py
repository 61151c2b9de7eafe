"""A loaded model with everything computed once and reused: calibration activations,
dense statistics (OWL), spectra (AlphaPruning), absorption coefficients, dense weights.

``compare`` runs many rows off one Session; each row restores the dense weights first.
"""

from __future__ import annotations

import hashlib
import sys
import time
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path

import torch

from .cache import cache_root
from .data.corpora import Corpus, calibration_windows, eval_windows, load_corpus, tokenize
from .errors import UserError
from .evaluation.perplexity import perplexity
from .models.arch import discover, weight_out_in
from .models.load import load_model
from .protocol import Protocol
from .runner import Activations, BlockRunner


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

    def perplexity(self, corpora: list[str]) -> dict[str, dict]:
        out = {}
        self.model.to(self.protocol.device)
        try:
            with self.timed("eval_ppl"):
                for name in corpora:
                    out[name] = perplexity(self.model, self.eval_ids(name), self.protocol.device,
                                           progress=self.progress, desc=f"ppl {name}")
        finally:
            self.model.to("cpu")
        return out
