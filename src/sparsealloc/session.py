"""A loaded model with everything computed once and reused: calibration activations,
dense statistics (OWL), spectra (AlphaPruning), absorption coefficients, dense weights.

``compare`` runs many rows off one Session; each row restores the dense weights first.
"""

from __future__ import annotations

import contextlib
import hashlib
import shutil
import sys
import tempfile
import time
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from .blockwise import PruneReport, check_patterns, prune_sequential
from .cache import cache_root
from .data.corpora import Corpus, calibration_windows, eval_windows, load_corpus, tokenize
from .errors import UserError
from .evaluation.blockwise import blockwise_window_nlls, on
from .evaluation.perplexity import perplexity, perplexity_record
from .io import read_json, write_json
from .memory import (
    STREAM_SHARE,
    StreamedNeed,
    available_bytes,
    check_fits,
    choose_stream,
    streamed_need,
)
from .models.arch import discover, in_features, weight_out_in
from .models.experts import fused_layout
from .models.load import (
    LoadedModel,
    as_dtype,
    checkpoint_folder,
    load_model,
    load_offloaded,
    load_skeleton,
)
from .models.load import save_model as save_in_memory
from .models.shards import save_streamed
from .models.stream import Checkpoint, StreamedWeights
from .probe.coefficients import absorption_coefficients
from .protocol import Protocol
from .pruners import Pruner, get_pruner
from .pruners.masks import UNSTRUCTURED, Pattern, parse_pattern
from .pruners.nm_levels import check_levels_meet, nm_levels
from .pruners.wanda import InputNormStats
from .runner import Activations, BlockRunner, collect_inputs
from .stats.spectra import block_alphas

T = TypeVar("T")


def _scratch_dir(near: str | Path | None, prefix: str) -> Path:
    """A new hidden folder beside ``near`` (the --save folder: same file system, so pruned
    shards are hard-linked), else in the cache's scratch folder."""
    base = Path(near).expanduser().resolve().parent if near else cache_root() / "scratch"
    base.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=prefix, dir=base))


def _no_moe_streaming(spec: str) -> UserError:
    """The refusal of ``--stream`` for MoE models (fused experts are found before the blocks
    are discovered, per-expert linears after)."""
    return UserError(f"{spec} is a mixture-of-experts model: streaming does not support MoE "
                     "yet; run with --no-stream")


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
                 keep_dense: bool = True, scratch_near: str | Path | None = None) -> None:
        self.spec = model
        self.protocol = protocol
        self.progress = progress
        self.timings: dict[str, float] = {}
        self.weights: StreamedWeights | None = None
        self._stream = False
        with self.timed("load"):
            loaded = self._load(model, protocol, scratch_near)
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.source = loaded.source
        self.storage_dtype: torch.dtype = next(self.model.parameters()).dtype
        self.compute_dtype = self._compute_dtype(protocol)
        self.source["compute_dtype"] = str(self.compute_dtype).removeprefix("torch.")
        self.arch = discover(self.model)
        if self._stream:
            self._start_streaming(scratch_near)
        self.source["streamed"] = self.streaming
        note = protocol.check_positions(
            getattr(self.text_config, "max_position_embeddings", None), self.model_id)
        if note is not None:
            print(f"warning: {note}", file=sys.stderr, flush=True)
        offload = None
        if protocol.offload_activations == "disk":
            offload = _scratch_dir(scratch_near, ".sparsealloc-hidden.")
            weakref.finalize(self, shutil.rmtree, offload, True)
        self.runner = BlockRunner(self.model, device=protocol.device, progress=progress,
                                  arch=self.arch, weights=self.weights,
                                  compute_dtype=self.compute_dtype, offload=offload)
        # A copy of the dense prunable weights, taken the first time a prune needs it (the
        # model is still dense then). keep_dense=False (one prune, nothing after it) skips the
        # copy and halves the weights' memory; restoring after a prune then fails loudly.
        self.keep_dense = keep_dense
        self._dense: dict[tuple[int, str], torch.Tensor] | None = None
        self._modified = False
        self._captured: Activations | None = None
        self.data_sources: dict[str, dict] = {}
        self.cache: dict[str, object] = {}
        self.counters: dict[str, int] = {}

    # ---------------------------------------------------------------- loading
    def _load(self, spec: str, protocol: Protocol, scratch_near: str | Path | None
              ) -> LoadedModel:
        """Load in memory, or (streaming) a meta skeleton whose blocks are read one at a time.

        Streaming is chosen by :func:`~sparsealloc.memory.choose_stream` from the checkpoint's
        size; a streamed run that cannot fit stops here, before any weight is read.
        """
        dtype = as_dtype(protocol.dtype)
        folder = checkpoint_folder(spec) if protocol.stream != "off" else None
        if folder is None:
            if protocol.stream == "on":
                raise UserError(f"--stream needs the model's safetensors files; {spec} has none "
                                "(a .gguf, or a hub id not in the local cache): run without "
                                "--stream")
            return load_model(spec, dtype=dtype, device="cpu")
        checkpoint = Checkpoint(folder)
        storage = checkpoint.dtype() if dtype == "auto" else dtype
        available = available_bytes()
        if not choose_stream(protocol.stream, checkpoint.nbytes(storage), available):
            return load_model(spec, dtype=dtype, device="cpu")
        loaded = load_skeleton(spec, folder, storage)
        if any(fused_layout(m) is not None for m in loaded.model.modules()):
            raise _no_moe_streaming(spec)
        self._checkpoint = checkpoint
        self._available = available
        self._stream = True  # StreamedWeights made once the blocks are discovered
        return loaded

    def _start_streaming(self, scratch_near: str | Path | None) -> None:
        if any(self.arch.expert_lists):
            raise _no_moe_streaming(self.spec)
        scratch = _scratch_dir(scratch_near, ".sparsealloc-stream.")
        self.weights = StreamedWeights(self.model, self.arch.blocks_attr, self.arch.num_blocks,
                                       self._checkpoint, self.storage_dtype, scratch)
        weakref.finalize(self, self.weights.close)
        self._check_memory()

    def _check_memory(self) -> None:
        """Refuse (one line, exit 2) a streamed run whose working set cannot fit."""
        assert self.weights is not None
        hidden = int(getattr(self.text_config, "hidden_size", 0) or 0)
        p = self.protocol
        block = max(self.weights.block_size)
        outside = max((s.shape.numel() for s in self.weights.outside_slots), default=0)
        def need(sequences: int) -> StreamedNeed:
            return streamed_need(sequences, p.seqlen, hidden, self.compute_dtype.itemsize,
                                 block * self.storage_dtype.itemsize,
                                 block * self.compute_dtype.itemsize,
                                 outside * self.storage_dtype.itemsize)

        held = min(p.batch_size, p.nsamples)  # on disk: one batch's inputs and outputs
        if p.offload_activations == "disk":
            check_fits(need(held), self._available, held, "the calibration batch_size")
        else:
            check_fits(need(p.nsamples), self._available, p.nsamples, offloaded=need(held))

    def _compute_dtype(self, protocol: Protocol) -> torch.dtype:
        """--compute-dtype, or auto: float32 on CPU, the storage dtype on CUDA."""
        if protocol.compute_dtype != "auto":
            dtype = as_dtype(protocol.compute_dtype)
            assert isinstance(dtype, torch.dtype)
            return dtype
        return torch.float32 if protocol.device == "cpu" else self.storage_dtype

    @property
    def text_config(self) -> Any:
        """The language model's config (a multimodal config's text part)."""
        config = self.model.config
        return config.get_text_config() if hasattr(config, "get_text_config") else config

    @property
    def streaming(self) -> bool:
        return self.weights is not None

    @property
    def modified(self) -> bool:
        """True once a prune changed the model (streaming: pruned blocks go to the overlay)."""
        return self._modified

    @modified.setter
    def modified(self, value: bool) -> None:
        self._modified = value
        if self.weights is not None:
            self.weights.keep_changes = value

    @contextmanager
    def outside_weights(self) -> Iterator[None]:
        """Embeddings, final norm and lm_head are real inside (streaming reads them)."""
        with self.weights.outside() if self.weights is not None else contextlib.nullcontext():
            yield

    @contextmanager
    def head(self) -> Iterator[nn.Module]:
        """The lm_head and final norm, real, in the compute dtype, where hidden states are kept."""
        parts = [m for m in (self.arch.final_norm, self.model.get_output_embeddings())
                 if m is not None]
        with self.outside_weights(), on(parts, self.runner.storage, self.compute_dtype):
            yield self.model.get_output_embeddings()

    def hold(self, index: int) -> contextlib.AbstractContextManager:
        """Block ``index``'s weights are real inside (for measurements over all blocks)."""
        return self.runner.holding(index)

    def save(self, out: str | Path, overwrite: bool = False) -> Path:
        """Save the model in its storage dtype (streaming: shard by shard)."""
        if self.weights is not None:
            return save_streamed(self.weights, self.model.config, self.tokenizer, out,
                                 overwrite=overwrite)
        return save_in_memory(self.model, self.tokenizer, out, overwrite=overwrite)

    def check_tasks(self, tasks: list[str]) -> None:
        """Before a streamed prune: zero-shot tasks cannot run on the pruned blocks' overlay."""
        if tasks and self.weights is not None:
            raise UserError("zero-shot --tasks after a streamed prune are not supported: prune "
                            "with --save DIR, then run sparsealloc eval --model DIR --tasks ...")

    @contextmanager
    def zeroshot_model(self) -> Iterator[nn.Module]:
        """The model for lm-eval: in memory on the device, or (streaming, dense checkpoint)
        loaded by accelerate with CPU / disk offload -- slow but it runs."""
        if self.weights is None:
            self.model.to(self.protocol.device)
            try:
                yield self.model
            finally:
                self.model.to("cpu")
            return
        if self.modified:
            raise UserError("zero-shot evaluation of a streamed, pruned model: save it with "
                            "--save DIR and run sparsealloc eval --model DIR --tasks ...")
        model = load_offloaded(self.weights.checkpoint.folder, self.storage_dtype,
                               self.protocol.device, int(STREAM_SHARE * self._available),
                               self.weights.scratch / "offload")
        try:
            yield model
        finally:
            del model

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
        """Put the dense weights back into every prunable layer (before each prune).

        Streaming: forget the pruned blocks; the next reads come from the checkpoint."""
        if self.weights is not None:
            self.weights.clear_overlay()
            self.modified = False
            return
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
        """Block ``index``'s dense weights (the kept copy, or the model's own before pruning;
        streaming: read from the checkpoint). Half-precision weights come as float32."""
        if self.weights is not None:
            tensors = self.weights.block_tensors(index, dense=True)
            prefix = f"{self.arch.blocks_attr}.{index}."
            out = {}
            for n, m in self.arch.linears(index).items():
                w = tensors[prefix + n + ".weight"].to(self.storage_dtype)
                out[n] = _as_float(w if isinstance(m, nn.Linear) else w.t())
            return out
        if self._dense is not None:
            return {n: _as_float(self._dense[(index, n)])
                    for n in self.arch.linear_names[index]}
        if self.modified:
            raise RuntimeError("the dense weights were not kept and the model has been pruned")
        return {n: _as_float(weight_out_in(m)) for n, m in self.arch.linears(index).items()}

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
                        self.runner.pass_block(index, acts)
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
            with self.timed("embed"), self.outside_weights():
                self._captured = self.runner.capture(self.calibration_ids,
                                                     self.protocol.batch_size)
        return self._captured.clone()

    def heldout_capture(self, name: str, split: str, tokens: int) -> Activations:
        """Embedded windows of ``--seqlen`` over the first ``tokens`` tokens of a held-out
        text (e.g. the calibration corpus's tune slice); computed afresh on each call."""
        ids = tokenize(self.tokenizer, self.corpus(name, split))
        windows = eval_windows(ids, self.protocol.seqlen, tokens, self.window_bos)
        with self.timed("embed"), self.outside_weights():
            return self.runner.capture(windows, self.protocol.batch_size)

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

    def window_perplexity(self, windows: torch.Tensor, desc: str = "perplexity") -> dict:
        """Perplexity of ``windows``: block by block when streaming or when blocks compute in
        another dtype than the weights are stored in; else the whole model at once."""
        if self.weights is None and self.compute_dtype == self.storage_dtype:
            self.model.to(self.protocol.device)
            try:
                return perplexity(self.model, windows, self.protocol.device,
                                  progress=self.progress, desc=desc)
            finally:
                self.model.to("cpu")
        cap = getattr(self.model.config, "final_logit_softcapping", None)
        nll = blockwise_window_nlls(
            self.runner, windows, self.arch.final_norm, self.model.get_output_embeddings(),
            softcap=float(cap) if cap else None, outside=self.outside_weights,
            hidden_size=getattr(self.text_config, "hidden_size", None))
        return perplexity_record(nll, windows)

    def perplexity(self, corpora: list[str], split: str = "eval",
                   stage: str = "eval_ppl") -> dict[str, dict]:
        """Perplexity of the model as it is now on each corpus (``split``: the role, see
        :func:`sparsealloc.data.corpora.load_corpus`); block by block when streaming."""
        with self.timed(stage):
            return {name: self.window_perplexity(self.eval_ids(name, split), f"ppl {name}")
                    for name in corpora}


def _as_float(w: torch.Tensor) -> torch.Tensor:
    """Statistics accumulate in float32 at least: half-precision weights are widened."""
    return w.float() if w.dtype in (torch.float16, torch.bfloat16) else w
