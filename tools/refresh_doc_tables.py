"""Rewrite the tables the docs quote from their ``sparsealloc table`` commands.

Usage (from the repository root): ``python tools/refresh_doc_tables.py [DOC ...]``
(default: every doc ``tests/test_docs_tables.py`` checks). Add a new result file to a quoted
command, run this, and review the diff; the test then holds the docs to the files.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from typer.testing import CliRunner

from sparsealloc.cli import app
from sparsealloc.report.docs import DOCS, refresh, table_arguments

ROOT = Path(__file__).resolve().parents[1]


def run_table(command: str) -> str:
    """The output of one quoted command, run in-process at the repository root."""
    res = CliRunner().invoke(app, table_arguments(command), env={"COLUMNS": "200"})
    if res.exit_code != 0:
        raise SystemExit(f"`{command}` failed: {res.output.strip()}")
    return res.output


def main(argv: list[str]) -> int:
    docs = argv or list(DOCS)
    for name in docs:
        path = ROOT / name
        text, changed = refresh(path.read_text(), run_table)
        if changed:
            path.write_text(text)
        print(f"{name}: {changed} table(s) rewritten")
    return 0


if __name__ == "__main__":
    os.chdir(ROOT)
    raise SystemExit(main(sys.argv[1:]))
