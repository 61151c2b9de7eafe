"""``--allocation`` values: ``NAME[:ARG][+absorb]``, or ``search[:SPEC]``.

``NAME`` is a registered allocator (``uniform``, ``owl``, ``alpha``, ``linear``, ``dlp``,
``lsa``, ``file``, ...); ``:ARG`` is what it takes (``file:PATH``, ``linear:auto``);
``+absorb`` adds the absorption-aware correction; ``search`` / ``search:SPEC`` runs the
evolutionary search from SPEC's allocation (uniform by default). Parsed once, at the edge.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

from ..errors import UserError
from .registry import allocation_choices, get_allocator

ABSORB_SUFFIX = "+absorb"
SEARCH_PREFIX = "search"


class AllocationSpec(NamedTuple):
    """A parsed ``--allocation`` value."""

    name: str
    arg: str | None = None
    absorb: bool = False
    search: bool = False

    @property
    def base(self) -> str:
        """The base allocation without modifiers, as written (``owl``, ``linear:auto``)."""
        return self.name if self.arg is None or self.name == "file" else f"{self.name}:{self.arg}"

    @property
    def path(self) -> Path | None:
        """The file of ``file:PATH``."""
        return Path(self.arg).expanduser() if self.name == "file" and self.arg else None

    def tuned(self) -> bool:
        """Does computing it prune on the tuning slice (a dense copy is kept then)?"""
        return get_allocator(self.name).tuned(self.arg)


def parse_allocation_spec(text: str) -> AllocationSpec:
    """Parse and validate ``"owl"``, ``"alpha+absorb"``, ``"file:PATH"``, ``"linear:auto"``,
    ``"search:owl+absorb"``, ... (names case-insensitive; a path is kept verbatim)."""
    raw = str(text).strip()
    head, colon, rest = raw.partition(":")
    if head.strip().lower() == SEARCH_PREFIX:
        start = rest.strip() if colon else "uniform"
        if not start or start.lower().split(":")[0].strip() == SEARCH_PREFIX:
            raise UserError(f"allocation {raw!r}: write search or search:SPEC with a start "
                            "allocation, e.g. search:owl+absorb")
        return parse_allocation_spec(start)._replace(search=True)
    absorb = raw.lower().endswith(ABSORB_SUFFIX)
    core = raw[: -len(ABSORB_SUFFIX)] if absorb else raw
    name, colon, arg = core.partition(":")
    name = name.strip().lower()
    arg = arg.strip() if name == "file" else arg.strip().lower()
    if not name:
        raise UserError(f"unknown allocation {raw!r}; choose one of {allocation_choices()}")
    try:
        allocator = get_allocator(name)
    except UserError:
        raise UserError(f"unknown allocation {raw!r}; choose one of {allocation_choices()}") \
            from None
    allocator.check_arg(arg if colon else None)
    return AllocationSpec(name, arg if colon else None, absorb)
