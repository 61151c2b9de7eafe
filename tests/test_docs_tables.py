"""Every table the docs produce with ``sparsealloc table`` regenerates identically from the
committed result files, and every committed compare.md from its compare.json."""

from __future__ import annotations

import glob
import json
import re
import shlex
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sparsealloc.cli import app
from sparsealloc.report.compare import render_markdown

ROOT = Path(__file__).resolve().parents[1]
DOCS = ("RESULTS.md", "FINDINGS.md", "BENCHMARKS.md", "README.md")
FENCE = re.compile(r"```[^\n]*\n(.*?)```\n+((?:\|[^\n]*\n)+)", re.S)


def _commands(text: str) -> list[tuple[str, str]]:
    """(command, the table printed right after its code block) for each `sparsealloc table`."""
    out = []
    for block, table in FENCE.findall(text):
        joined = block.replace("\\\n", " ")
        for line in joined.splitlines():
            if line.strip().startswith("sparsealloc table"):
                out.append((line.strip(), table))
    return out


CASES = [(doc, cmd, table) for doc in DOCS for cmd, table in _commands((ROOT / doc).read_text())]


def test_the_docs_quote_table_commands():
    assert len(CASES) >= 2


@pytest.mark.parametrize("doc, command, expected", CASES,
                         ids=[f"{d}:{i}" for i, (d, _, _) in enumerate(CASES)])
def test_doc_table_regenerates(monkeypatch, doc, command, expected):
    monkeypatch.chdir(ROOT)
    args = []
    for word in shlex.split(command)[1:]:  # expand globs the way the shell would
        matches = sorted(glob.glob(word)) if any(c in word for c in "*?[") else [word]
        args += matches
    res = CliRunner().invoke(app, args, env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    got = [line for line in res.output.splitlines() if line.startswith("|")]
    assert got == expected.strip().splitlines()


COMPARES = sorted(glob.glob(str(ROOT / "results" / "*" / "compare.json")))


@pytest.mark.parametrize("path", COMPARES, ids=[Path(p).parent.name for p in COMPARES])
def test_committed_compare_md_regenerates(path):
    md = Path(path).with_name("compare.md")
    record = json.loads(Path(path).read_text())
    assert render_markdown(record) == md.read_text()
