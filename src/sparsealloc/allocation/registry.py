"""The allocator registry and the option groups the CLI is generated from.

An allocator is one class in one file::

    @register
    class OWL(Allocator):
        name = "owl"
        Options = OwlOptions          # a dataclass: defaults, validation, --help text
        score_name = "outlier_ratio"

        def allocate(self, ctx, target, opts, arg):
            ...                        # statistics from ctx.session -> a pure formula
            return Base(sparsity, scores)

Registering it makes ``--allocation owl`` (and ``owl+absorb``, ``search:owl``) valid everywhere
and gives every command the options of its ``Options`` dataclass: a field ``m`` of the group
``owl`` is the CLI option ``--owl-m`` and the recorded key ``owl_m``; the field's metadata
``help`` is its ``--help`` text. Modifiers that are not allocators (the absorption correction,
the search, the per-expert split) register option groups of their own with
:func:`register_options`.
"""

from __future__ import annotations

import dataclasses
import typing
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..errors import UserError


def option(default: Any, help: str, when_set: bool = False,  # noqa: A002 - the CLI's word
           **kwargs: Any) -> Any:
    """A dataclass field of an option group, with its ``--help`` text.

    ``when_set``: an option added after rows were recorded, whose default is how those rows
    ran; a row records it only when it is set to something else, so that rows made before and
    after it existed are the same row (``--resume`` takes them over, the tables pool them)."""
    return field(default=default, metadata={"help": help, "when_set": when_set, **kwargs})


@dataclass(frozen=True)
class NoOptions:
    """An allocator without hyperparameters."""


OPTION_GROUPS: dict[str, type] = {}
"""prefix -> options dataclass; a field ``f`` of group ``p`` is ``--p-f`` / key ``p_f``."""


def register_options(prefix: str, options: type) -> type:
    """Register an option group (an allocator's, or a modifier's such as ``absorb``)."""
    if not dataclasses.is_dataclass(options):
        raise TypeError(f"options of {prefix!r} must be a dataclass")
    known = OPTION_GROUPS.get(prefix)
    if known is not None and known is not options:
        raise ValueError(f"option group {prefix!r} is registered already")
    if dataclasses.fields(options):
        OPTION_GROUPS[prefix] = options
    return options


def key_of(prefix: str, f: dataclasses.Field) -> str:
    """The recorded key (and, with dashes, the CLI option) of an option field."""
    return f"{prefix}_{f.name.rstrip('_')}"


def quiet_defaults() -> dict[str, Any]:
    """``{key: default}`` of every ``when_set`` option (recorded only when not at its default)."""
    return {key_of(prefix, f): f.default for prefix, options in OPTION_GROUPS.items()
            for f in dataclasses.fields(options) if f.metadata.get("when_set")}


def option_fields() -> list[tuple[str, str, dataclasses.Field, Any]]:
    """``(prefix, key, field, type)`` of every registered option, in registration order."""
    out = []
    for prefix, options in OPTION_GROUPS.items():
        hints = typing.get_type_hints(options)
        for f in dataclasses.fields(options):
            out.append((prefix, key_of(prefix, f), f, hints[f.name]))
    return out


@dataclass
class AllocationContext:
    """What an allocator may use: the session (its shared statistics, ``session.memo`` for its
    own) and the row's pruner and pattern (for methods that prune to choose a value)."""

    session: Any
    pruner: str = "wanda"
    pattern: str = "unstructured"

    @property
    def num_blocks(self) -> int:
        return self.session.arch.num_blocks

    @property
    def weights(self) -> list[int]:
        """Prunable parameters per block (budgets are parameter-weighted)."""
        return self.session.params_per_block


@dataclass
class Base:
    """What an allocator returns: one sparsity per block (budget met exactly), the statistic
    it came from (recorded as ``scores``) and anything else worth recording."""

    block_sparsity: Sequence[float]
    scores: list[float] | None = None
    record: dict = field(default_factory=dict)


class Allocator(ABC):
    """One allocation method. Subclasses set ``name`` and, when they have hyperparameters,
    ``Options``; ``arg`` says whether the spec takes ``name:ARG`` ("required", "optional" or
    None); ``tuned`` marks methods that prune on the tuning slice to choose a value (a dense copy
    of the weights is kept for them)."""

    name: ClassVar[str]
    Options: ClassVar[type] = NoOptions
    score_name: ClassVar[str | None] = None
    arg: ClassVar[str | None] = None
    arg_help: ClassVar[str] = ""
    weighted: ClassVar[bool] = True

    def tuned(self, arg: str | None) -> bool:
        """Does this allocation prune on the tuning slice (``linear:auto``)?"""
        return False

    def check_arg(self, arg: str | None) -> None:
        """Validate ``name:ARG`` when the spec is parsed (before any work)."""
        if self.arg is None and arg is not None:
            raise UserError(f"allocation {self.name!r} takes no ':{arg}'")
        if self.arg == "required" and not arg:
            raise UserError(f"allocation {self.name!r} needs {self.name}:{self.arg_help}")

    @abstractmethod
    def allocate(self, ctx: Any, target: float, opts: Any, arg: str | None) -> Base:
        """One sparsity per block for ``target`` from the context's statistics."""


ALLOCATORS: dict[str, type[Allocator]] = {}


def register(cls: type[Allocator]) -> type[Allocator]:
    """Class decorator: add an allocator (and its option group) to the registry."""
    ALLOCATORS[cls.name] = cls
    register_options(cls.name, cls.Options)
    return cls


def get_allocator(name: str) -> Allocator:
    key = name.strip().lower()
    if key not in ALLOCATORS:
        raise UserError(f"unknown allocation '{name}': use one of {allocation_choices()}")
    return ALLOCATORS[key]()


_ORDER = ("uniform", "owl", "alpha", "linear", "dlp", "lsa", "file")


def allocation_choices() -> str:
    names = []
    ranked = sorted(ALLOCATORS.items(), key=lambda kv: (_ORDER.index(kv[0]) if kv[0] in _ORDER
                                                         else len(_ORDER), kv[0]))
    for name, cls in ranked:
        names.append(f"{name}:{cls.arg_help}" if cls.arg == "required" else
                     f"{name}[:{cls.arg_help}]" if cls.arg == "optional" else name)
    return ", ".join(names) + " (optionally followed by +absorb), or search / search:SPEC"
