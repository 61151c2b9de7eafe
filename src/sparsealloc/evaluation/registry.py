"""Evaluation kinds (perplexity, zero-shot): one registry, one result contract.

Each kind says whether a request asks for it and returns the keys it adds to a result record
(perplexity: ``ppl`` and ``ppl_details``; zero-shot: ``zeroshot``, ``zeroshot_mean``,
``zeroshot_mean_stderr``, ``zeroshot_protocol``). A session is passed in; the kinds use its
model, tokenizer, windows and timings.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

from ..protocol import EvalRequest
from .zeroshot import evaluate_zeroshot


class Evaluation(ABC):
    name: ClassVar[str]

    @abstractmethod
    def wanted(self, request: EvalRequest) -> bool:
        """Does the request ask for this kind?"""

    @abstractmethod
    def run(self, session: Any, request: EvalRequest) -> dict:
        """The keys this kind adds to the record."""


EVALUATIONS: dict[str, Evaluation] = {}


def register(cls: type[Evaluation]) -> type[Evaluation]:
    EVALUATIONS[cls.name] = cls()
    return cls


@register
class Perplexity(Evaluation):
    """Paper-style perplexity over non-overlapping windows of each corpus."""

    name = "perplexity"

    def wanted(self, request: EvalRequest) -> bool:
        return bool(request.ppl)

    def run(self, session: Any, request: EvalRequest) -> dict:
        details = session.perplexity(request.ppl)
        return {"ppl": {k: v["ppl"] for k, v in details.items()}, "ppl_details": details}


@register
class ZeroShot(Evaluation):
    """Zero-shot accuracy with lm-evaluation-harness on the in-memory model."""

    name = "zeroshot"

    def wanted(self, request: EvalRequest) -> bool:
        return bool(request.tasks)

    def run(self, session: Any, request: EvalRequest) -> dict:
        with session.timed("eval_zeroshot"), session.zeroshot_model() as model:
            return evaluate_zeroshot(model, session.tokenizer, request.tasks,
                                     limit=request.limit, batch_size=request.batch_size,
                                     progress=session.progress)


def evaluate(session: Any, request: EvalRequest) -> dict:
    """Every kind the request asks for, merged into one record."""
    out: dict = {}
    for kind in EVALUATIONS.values():
        if kind.wanted(request):
            out.update(kind.run(session, request))
    return out
