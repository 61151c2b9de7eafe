"""Every registered option group's values, and what an allocation records.

``AllocationOptions(owl_m=3, absorb_gamma=0.02)`` takes the recorded (flat) keys; each group
(``owl``, ``alpha``, ``absorb``, ...) validates its own values. ``record()`` gives the flat keys
back, as every result file stores them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import UserError
from .registry import OPTION_GROUPS, key_of, quiet_defaults


class AllocationOptions:
    """Hyperparameters of every allocator and modifier, by recorded key (``owl_m``, ...)."""

    def __init__(self, **flat: Any) -> None:
        unknown = set(flat)
        self._groups: dict[str, Any] = {}
        for prefix, options in OPTION_GROUPS.items():
            values = {}
            for f in dataclasses.fields(options):
                key = key_of(prefix, f)
                if key in flat:
                    values[f.name] = flat[key]
                    unknown.discard(key)
            self._groups[prefix] = options(**values)
        if unknown:
            raise UserError(f"unknown allocation option(s) {', '.join(sorted(unknown))}; known: "
                            f"{', '.join(sorted(self.record()))}")

    def of(self, prefix: str) -> Any:
        """The options dataclass of a group (an allocator's name, ``absorb``, ...)."""
        return self._groups.get(prefix) or OPTION_GROUPS.get(prefix, _Empty)()

    def __getattr__(self, key: str) -> Any:
        groups = self.__dict__.get("_groups", {})
        for prefix, values in groups.items():
            for f in dataclasses.fields(values):
                if key_of(prefix, f) == key:
                    return getattr(values, f.name)
        raise AttributeError(key)

    def replace(self, **flat: Any) -> AllocationOptions:
        return AllocationOptions(**(self.record() | flat))

    def record(self, prefix: str | None = None) -> dict:
        """Flat ``{key: value}`` of every group (or of one)."""
        out = {}
        for p, values in self._groups.items():
            if prefix is None or p == prefix:
                out.update({key_of(p, f): getattr(values, f.name)
                            for f in dataclasses.fields(values)})
        return out

    def recorded(self, prefix: str) -> dict:
        """What a row using group ``prefix`` records: its options, less the ``when_set`` ones
        left at their defaults (see :func:`~.registry.option`)."""
        quiet = quiet_defaults()
        return {k: v for k, v in self.record(prefix).items()
                if not (k in quiet and v == quiet[k])}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, AllocationOptions) and self.record() == other.record()

    def __repr__(self) -> str:
        return f"AllocationOptions({self.record()})"


DERIVED_SUFFIXES = ("_used", "_curve", "_tuned_on")
DERIVED_KEYS = frozenset({"search", "advice"})


def set_options(recorded: dict) -> dict:
    """The options of a recorded allocation that were *set*: without what the allocation
    recorded about its own run (a tuned value ``*_used``, its ``*_curve`` and ``*_tuned_on``,
    the search's result ``search``, ``advice`` on a choice at the end of a grid). Two rows with
    the same set options are the same row, whatever their runs recorded."""
    return {k: v for k, v in recorded.items()
            if k not in DERIVED_KEYS and not k.endswith(DERIVED_SUFFIXES)}


@dataclass(frozen=True)
class _Empty:
    pass


@dataclass
class Allocation:
    """One allocation: sparsity per block and what produced it."""

    spec: str
    target_sparsity: float
    block_sparsity: list[float]
    scores: list[float] | None = None
    score_name: str | None = None
    absorption: list[float] | None = None
    base_block_sparsity: list[float] | None = None
    options: dict = field(default_factory=dict)
    expert_sparsity: list[dict[str, float]] | None = None  # per block: "path.number" -> s

    def record(self) -> dict:
        return asdict(self)
