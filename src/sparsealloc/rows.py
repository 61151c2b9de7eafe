"""One row of a run, typed and validated once at the edge: what to prune and how.

``RowSpec.parse`` (the CLI and Python callers) checks the sparsity, the pattern against it, the
pruner, the allocation spec and the options; everything below receives the typed object.
``parse_row`` reads ``compare --row "LABEL|ALLOCATION|key=value,..."``: a label, an allocation
spec, and allocation options (recorded keys such as ``owl_m=3``, ``absorb_final=damage``)
that override the command's for that row only.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, field

from .allocation import AllocationOptions, AllocationSpec, parse_allocation_spec
from .allocation.registry import option_fields
from .errors import UserError
from .protocol import check_sparsity
from .pruners import get_pruner
from .pruners.masks import Pattern, check_pattern_target, parse_pattern


@dataclass(frozen=True)
class RowSpec:
    """A pruner, a pattern, a target sparsity, an allocation (with its options), a label."""

    pruner: str
    pattern: Pattern
    target: float
    allocation: str
    spec: AllocationSpec
    options: AllocationOptions = field(default_factory=AllocationOptions)
    label: str | None = None

    @classmethod
    def parse(cls, pruner: str, pattern: str | Pattern, sparsity: float, allocation: str,
              options: AllocationOptions | None = None, label: str | None = None) -> RowSpec:
        check_sparsity(sparsity)
        pat = pattern if isinstance(pattern, Pattern) else parse_pattern(pattern)
        check_pattern_target(pat, sparsity)
        name = get_pruner(pruner).name
        spec = parse_allocation_spec(allocation)
        return cls(name, pat, float(sparsity), allocation.strip(), spec,
                   options or AllocationOptions(), label)

    @property
    def pattern_text(self) -> str:
        return str(self.pattern)

    def title(self) -> str:
        """The row's label: given, or ``pruner target allocation``."""
        return self.label or f"{self.pruner} {self.target:.0%} {self.allocation}"


@dataclass(frozen=True)
class RowTemplate:
    """``--row``: an allocation with options of its own, crossed with pruners and sparsities."""

    label: str | None
    allocation: str
    overrides: dict

    def options(self, base: AllocationOptions) -> AllocationOptions:
        return base.replace(**self.overrides) if self.overrides else base


def _converters() -> dict[str, typing.Any]:
    out = {}
    for _, key, _f, hint in option_fields():
        out[key] = hint
    return out


def _convert(key: str, text: str, hint: typing.Any) -> typing.Any:
    """A ``--row`` value by the option's type (numbers stay numbers: ``absorb_gamma=-0.04``
    is allowed here, for ablations)."""
    if typing.get_origin(hint) is tuple:
        item = typing.get_args(hint)[0]
        return tuple(item(x) for x in text.replace(";", ",").split(",") if x)
    args = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    for kind in args:
        if kind is str:
            continue
        try:
            return kind(text)
        except (TypeError, ValueError):
            pass
    if str in args:
        return text
    raise UserError(f"--row: {key}={text!r} is not a {'/'.join(a.__name__ for a in args)}")


def parse_row(text: str) -> RowTemplate:
    """``LABEL|ALLOCATION|key=value,key=value`` (label and options optional)."""
    parts = [p.strip() for p in str(text).split("|")]
    if len(parts) > 3 or not parts[-1 if len(parts) == 1 else 1]:
        raise UserError(f"--row {text!r}: write LABEL|ALLOCATION|key=value,... (e.g. "
                        "'owl M3|owl|owl_m=3')")
    label, allocation, opts = (parts + ["", ""])[:3] if len(parts) > 1 else ("", parts[0], "")
    parse_allocation_spec(allocation)
    hints = _converters()
    overrides = {}
    for item in filter(None, (p.strip() for p in opts.split(","))):
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or key not in hints:
            raise UserError(f"--row {text!r}: unknown option {key!r}; known: "
                            f"{', '.join(sorted(hints))}")
        overrides[key] = _convert(key, value.strip(), hints[key])
    AllocationOptions().replace(**overrides)  # validates the values now
    return RowTemplate(label or None, allocation, overrides)


__all__ = ["RowSpec", "RowTemplate", "parse_row"]
