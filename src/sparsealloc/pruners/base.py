"""Pruner interface and registry.

The block runner uses a pruner in three steps per linear layer::

    stats = pruner.make_stats(layer)           # None when no data is needed
    hook -> stats.add_batch(inp)               # inputs entering the linear, any (..., in)
    pruner.prune_layer(layer, stats, sparsity, pattern)
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar, Protocol, TypeVar, runtime_checkable

import torch
from torch import Tensor, nn

from sparsealloc.errors import UserError
from sparsealloc.pruners.masks import Pattern, check_pattern_fits, check_sparsity

__all__ = ["PRUNERS", "LayerStats", "Pruner", "apply_mask", "get_pruner", "register"]


@runtime_checkable
class LayerStats(Protocol):
    """Calibration statistics of one linear layer, fed by a forward pre-hook."""

    def add_batch(self, inp: Tensor) -> None:
        """Accumulate a batch of activations ``inp`` of shape ``(..., in_features)``."""
        ...


class Pruner(ABC):
    """One pruning method. Subclasses set ``name`` and ``default_options``.

    Args (constructor):
        **options: overrides of ``default_options``; unknown keys raise :class:`UserError`.
    """

    name: ClassVar[str]
    default_options: ClassVar[dict[str, Any]] = {}

    def __init__(self, **options: Any) -> None:
        unknown = sorted(set(options) - set(self.default_options))
        if unknown:
            known = ", ".join(sorted(self.default_options)) or "none"
            raise UserError(
                f"unknown option(s) {', '.join(unknown)} for pruner {self.name!r}; known: {known}"
            )
        self.options: dict[str, Any] = {**self.default_options, **options}
        self._validate_options()

    def _validate_options(self) -> None:
        """Check ``self.options``; raise :class:`UserError` on a bad value (default: no-op)."""
        return None

    def config(self) -> dict[str, Any]:
        """JSON-ready description of this pruner (name and all options) for result files."""
        return {"name": self.name, **self.options}

    @abstractmethod
    def make_stats(self, layer: nn.Linear) -> LayerStats | None:
        """Fresh statistics collector for ``layer``, or None when no data is needed.

        Args:
            layer: the linear layer that will be pruned.
        """

    @abstractmethod
    def prune_layer(
        self, layer: nn.Linear, stats: LayerStats | None, sparsity: float, pattern: Pattern
    ) -> None:
        """Prune ``layer.weight`` in place (bias untouched).

        Args:
            layer: the linear layer.
            stats: what :meth:`make_stats` returned, after the calibration batches.
            sparsity: fraction in [0, 1) to prune; 0 prunes nothing. Ignored for N:M
                patterns, which always prune n/m.
            pattern: unstructured or N:M.
        """

    def _check_call(self, layer: nn.Linear, sparsity: float, pattern: Pattern) -> float:
        """Validate a :meth:`prune_layer` call; return the sparsity as float."""
        if not isinstance(layer, nn.Linear):
            raise TypeError(f"{self.name}: expected nn.Linear, got {type(layer).__name__}")
        value = check_sparsity(sparsity)
        check_pattern_fits(layer.weight.shape, pattern)
        return value

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        return f"{type(self).__name__}({opts})"


def apply_mask(layer: nn.Linear, mask: Tensor) -> None:
    """Set ``layer.weight`` to zero where ``mask`` is True (in place, no autograd)."""
    with torch.no_grad():
        layer.weight.masked_fill_(mask.to(layer.weight.device), 0)


PRUNERS: dict[str, type[Pruner]] = {}

_P = TypeVar("_P", bound=type[Pruner])


def register(cls: _P) -> _P:
    """Class decorator adding a :class:`Pruner` subclass to :data:`PRUNERS` under its name."""
    PRUNERS[cls.name] = cls
    return cls


def get_pruner(name: str, **options: Any) -> Pruner:
    """Build the pruner registered as ``name`` (``magnitude``, ``wanda``, ``sparsegpt``).

    Args:
        name: registry key (case-insensitive).
        **options: pruner options, e.g. ``blocksize=128, percdamp=0.01`` for sparsegpt.

    Raises:
        UserError: unknown name (the message lists the known ones) or unknown option.
    """
    key = str(name).strip().lower()
    if key not in PRUNERS:
        raise UserError(f"unknown pruner {name!r}; choose one of: {', '.join(sorted(PRUNERS))}")
    return PRUNERS[key](**options)
