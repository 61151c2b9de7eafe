"""The experimental protocol: every choice papers differ on, explicit and recorded."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from .errors import UserError, check


def check_device(device: str) -> str:
    """``--device``: ``cpu``, ``cuda`` or ``cuda:N`` that this torch build can use."""
    text = str(device).strip()
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        raise UserError(f"unknown --device {text!r}: use cpu, cuda or cuda:N") from None
    if dev.type == "cpu":
        return text
    if dev.type != "cuda":
        raise UserError(f"--device {text}: only cpu and cuda[:N] are supported")
    if not torch.cuda.is_available():
        why = ("this torch build has no CUDA support" if torch.version.cuda is None
               else "no CUDA GPU is visible")
        raise UserError(f"--device {text}: {why}; run with --device cpu")
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UserError(f"--device {text}: only {torch.cuda.device_count()} CUDA device(s) "
                        f"visible; use cuda:0 .. cuda:{torch.cuda.device_count() - 1}")
    return text


DTYPES = ("auto", "float32", "bfloat16", "float16")
STREAM_MODES = ("auto", "on", "off")
OFFLOAD_MODES = ("memory", "disk")


@dataclass
class Protocol:
    """Calibration and evaluation settings.

    Attributes:
        nsamples: calibration sequences (papers: 128).
        seqlen: tokens per calibration sequence (papers: 2048).
        seed: seed of the calibration window sampling (papers: 0).
        calib: calibration corpus: ``c4`` (papers), ``wiki``, ``wikitext2`` or a text file.
        eval_seqlen: window length of perplexity evaluation (default: ``seqlen``).
        eval_tokens: evaluate only the first N tokens (whole windows) of each corpus.
        data_dir: folder holding a local WikiText-2 copy.
        device: compute device for blocks and evaluation.
        batch_size: sequences per block forward.
        bos_per_window: start every calibration and perplexity window with the tokenizer's
            BOS token followed by ``seqlen - 1`` text tokens. Off by default: the papers cut
            windows from one token stream, so only the first window has BOS. Models trained
            to always see BOS first (Gemma) score text far worse without it.
        allow_long_seqlen: run with ``seqlen`` / ``eval_seqlen`` beyond the positions the model
            was trained for (refused otherwise); recorded.
        dtype: storage dtype of the weights (``auto``: the checkpoint's own).
        compute_dtype: dtype each block computes in (``auto``: float32 on CPU, the storage
            dtype on CUDA). Statistics always accumulate in float32 or float64.
        stream: read one block's weights at a time from the checkpoint (``auto``: when the
            weights exceed a share of the available memory; see :mod:`sparsealloc.memory`).
        offload_activations: where the calibration hidden states wait between blocks:
            ``memory``, or ``disk`` (one file per batch; a pass holds one batch in memory).
            Results are identical; disk is slower.
    """

    nsamples: int = 128
    seqlen: int = 2048
    seed: int = 0
    calib: str = "c4"
    eval_seqlen: int | None = None
    eval_tokens: int | None = None
    data_dir: str | None = None
    device: str = "cpu"
    batch_size: int = 1
    bos_per_window: bool = False
    allow_long_seqlen: bool = False
    dtype: str = "float32"
    compute_dtype: str = "auto"
    stream: str = "auto"
    offload_activations: str = "memory"

    def __post_init__(self) -> None:
        check(self.nsamples >= 1, f"--nsamples must be at least 1 (got {self.nsamples})")
        check(self.seqlen >= 2, f"--seqlen must be at least 2 (got {self.seqlen})")
        check(self.eval_seqlen is None or self.eval_seqlen >= 2,
              f"--eval-seqlen must be at least 2 (got {self.eval_seqlen})")
        if self.eval_seqlen is None:
            self.eval_seqlen = self.seqlen
        check(self.eval_tokens is None or self.eval_tokens >= self.eval_seqlen,
              f"--eval-tokens {self.eval_tokens} is less than one perplexity window of "
              f"{self.eval_seqlen} tokens (--eval-seqlen); give at least {self.eval_seqlen}")
        check(self.batch_size >= 1, f"--batch-size must be at least 1 (got {self.batch_size})")
        self.device = check_device(self.device)
        check(self.dtype in DTYPES, f"--dtype must be one of {', '.join(DTYPES)} "
              f"(got {self.dtype!r})")
        check(self.compute_dtype in DTYPES, f"--compute-dtype must be one of "
              f"{', '.join(DTYPES)} (got {self.compute_dtype!r})")
        check(self.stream in STREAM_MODES, f"stream must be one of {', '.join(STREAM_MODES)} "
              f"(got {self.stream!r})")
        check(self.offload_activations in OFFLOAD_MODES, "--offload-activations must be "
              f"memory or disk (got {self.offload_activations!r})")

    def check_positions(self, max_positions: int | None, model: str) -> str | None:
        """Refuse windows longer than the model's positions (a warning with allow_long_seqlen)."""
        longest = max(self.seqlen, self.eval_seqlen or 0)
        if max_positions is None or longest <= max_positions:
            return None
        which = "--seqlen" if self.seqlen >= (self.eval_seqlen or 0) else "--eval-seqlen"
        message = (f"{which} {longest} exceeds the {max_positions} positions {model} was "
                   f"trained for (max_position_embeddings)")
        if not self.allow_long_seqlen:
            raise UserError(f"{message}; use {which} {max_positions} or less, or pass "
                            "--allow-long-seqlen to run anyway (recorded)")
        return message + "; running anyway (--allow-long-seqlen)"

    def record(self) -> dict:
        d = asdict(self)
        d["perplexity"] = ("non-overlapping windows of eval_seqlen over the whole tokenised "
                           "corpus (documents joined by blank lines); exp of mean window NLL")
        d["calibration_windows"] = "random starts in the concatenated calibration documents"
        if self.bos_per_window:
            d["perplexity"] += "; every window is BOS + eval_seqlen - 1 text tokens"
            d["calibration_windows"] += "; every window is BOS + seqlen - 1 text tokens"
        return d


def check_sparsity(value: float, what: str = "--sparsity") -> float:
    check(0.0 <= value < 1.0, f"{what} must be in [0, 1) (got {value}); e.g. {what} 0.7")
    return value


@dataclass
class EvalRequest:
    """What to evaluate: perplexity corpora and zero-shot tasks (lm-eval)."""

    ppl: list[str] = field(default_factory=lambda: ["wikitext2"])
    tasks: list[str] = field(default_factory=list)
    limit: int | None = None
    batch_size: int = 8

    def __post_init__(self) -> None:
        if self.limit is not None:
            check(bool(self.tasks), "--limit applies to zero-shot tasks: give --tasks too, or "
                  "drop --limit (perplexity size is set with --eval-tokens)")
            check(self.limit >= 1, f"--limit must be at least 1 (got {self.limit})")
        check(self.batch_size >= 1, f"--batch-size must be at least 1 (got {self.batch_size})")
