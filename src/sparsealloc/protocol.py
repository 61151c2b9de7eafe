"""The experimental protocol: every choice papers differ on, explicit and recorded."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from .errors import check


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

    def __post_init__(self) -> None:
        check(self.nsamples >= 1, f"--nsamples must be at least 1 (got {self.nsamples})")
        check(self.seqlen >= 2, f"--seqlen must be at least 2 (got {self.seqlen})")
        check(self.eval_tokens is None or self.eval_tokens >= 1,
              f"--eval-tokens must be positive (got {self.eval_tokens})")
        if self.eval_seqlen is None:
            self.eval_seqlen = self.seqlen

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
