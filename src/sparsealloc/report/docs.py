"""The tables the docs quote: each ``sparsealloc table`` command in a fenced code block and
the markdown table printed right after that block.

``tests/test_docs_tables.py`` checks that every quoted table regenerates from the committed
result files; ``tools/refresh_doc_tables.py`` (``make docs``) rewrites them after result
files were added to a command.
"""

from __future__ import annotations

import glob
import re
import shlex
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["DOCS", "DocTable", "table_arguments", "doc_tables", "refresh", "prose_figures",
           "section", "table_figures"]

# The docs whose quoted tables are checked and refreshed.
DOCS = ("RESULTS.md", "FINDINGS.md", "BENCHMARKS.md", "README.md")

# A fenced block, blank lines, then the table (consecutive lines starting with "|"). The block
# never spans a fence: a block with no table after it is not joined to the next one's table.
_FENCE = re.compile(r"```[^\n]*\n((?:(?!```).)*?)```\n+((?:\|[^\n]*\n)+)", re.S)

# A paired change as the tables print it: "-38.4% ± 2.0%".
_FIGURE = re.compile(r"[+-]?\d+(?:\.\d+)?% ± \d+(?:\.\d+)?%")


@dataclass(frozen=True)
class DocTable:
    """One quoted table: its command (continuation lines joined) and where its table lies."""

    command: str
    table: str
    start: int
    end: int


def doc_tables(text: str) -> list[DocTable]:
    """Every ``sparsealloc table`` command of ``text`` with the table printed after its block.

    A block holding several table commands pairs each with the same table; only the last is
    what the table shows, so :func:`refresh` uses the last one.
    """
    out = []
    for match in _FENCE.finditer(text):
        joined = match.group(1).replace("\\\n", " ")
        for line in joined.splitlines():
            if line.strip().startswith("sparsealloc table"):
                out.append(DocTable(line.strip(), match.group(2), match.start(2), match.end(2)))
    return out


def table_arguments(command: str) -> list[str]:
    """The command's arguments after ``sparsealloc``, globs expanded as a shell would."""
    args: list[str] = []
    for word in shlex.split(command)[1:]:
        matches = sorted(glob.glob(word)) if any(c in word for c in "*?[") else [word]
        args += matches
    return args


def refresh(text: str, run: Callable[[str], str]) -> tuple[str, int]:
    """``text`` with each quoted table replaced by ``run(command)``'s table lines.

    ``run`` returns the command's printed output; its lines starting with ``|`` are the table.
    Returns the new text and the number of tables that changed.
    """
    last: dict[int, DocTable] = {}
    for entry in doc_tables(text):
        last[entry.start] = entry
    changed = 0
    for entry in sorted(last.values(), key=lambda e: e.start, reverse=True):
        lines = [line for line in run(entry.command).splitlines() if line.startswith("|")]
        if not lines:
            raise ValueError(f"`{entry.command}` printed no table")
        new = "\n".join(lines) + "\n"
        if new != entry.table:
            changed += 1
            text = text[: entry.start] + new + text[entry.end:]
    return text, changed


def prose_figures(text: str) -> list[str]:
    """The ``mean% ± se%`` figures ``text`` quotes outside its tables and code blocks."""
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    lines = [line for line in prose.splitlines() if not line.lstrip().startswith("|")]
    return _FIGURE.findall("\n".join(lines))


def table_figures(text: str) -> set[str]:
    """The ``mean% ± se%`` figures in the quoted (regenerated) tables of ``text``."""
    return {fig for entry in doc_tables(text) for fig in _FIGURE.findall(entry.table)}


def section(text: str, heading: str) -> str:
    """The part of ``text`` from the line ``heading`` to the next heading of its level or
    higher (lines in code blocks are not headings). Raises ``KeyError`` when no line is
    ``heading``."""
    lines = text.splitlines(keepends=True)
    level = len(heading) - len(heading.lstrip("#"))
    start, fenced = None, False
    for i, line in enumerate(lines):
        if line.startswith("```"):
            fenced = not fenced
            continue
        depth = len(line) - len(line.lstrip("#"))
        if fenced or not depth or not line[depth:].startswith(" "):
            continue
        if start is None and line.rstrip("\n") == heading:
            start = i
        elif start is not None and depth <= level:
            return "".join(lines[start:i])
    if start is None:
        raise KeyError(heading)
    return "".join(lines[start:])
