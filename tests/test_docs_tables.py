"""Every table the docs produce with ``sparsealloc table`` regenerates identically from the
committed result files, and every committed compare.md from its compare.json."""

from __future__ import annotations

import glob
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sparsealloc.cli import app
from sparsealloc.report.compare import render_markdown
from sparsealloc.report.docs import DOCS, doc_tables, refresh, table_arguments

ROOT = Path(__file__).resolve().parents[1]
CASES = [(doc, entry.command, entry.table) for doc in DOCS
         for entry in doc_tables((ROOT / doc).read_text())]


def test_the_docs_quote_table_commands():
    assert len(CASES) >= 2


def test_refresh_rewrites_only_the_stale_table():
    text = ("x\n```\nsparsealloc table a.json\n```\n\n| old |\n|---|\n\ny\n"
            "```bash\nsparsealloc table \\\n  b.json\n```\n| same |\n")
    outputs = {"sparsealloc table a.json": "note\n| new |\n|---|\n| 1 |\n",
               "sparsealloc table    b.json": "| same |\n"}
    new, changed = refresh(text, outputs.__getitem__)
    assert changed == 1
    assert new == text.replace("| old |\n|---|\n", "| new |\n|---|\n| 1 |\n")
    # a block with no table after it is not joined to the next block's table
    loose = "```\nsparsealloc table --plot x.png FILES\n```\n\ntext\n\n" + text
    assert [e.command for e in doc_tables(loose)] == [e.command for e in doc_tables(text)]


@pytest.mark.parametrize("doc, command, expected", CASES,
                         ids=[f"{d}:{i}" for i, (d, _, _) in enumerate(CASES)])
def test_doc_table_regenerates(monkeypatch, doc, command, expected):
    monkeypatch.chdir(ROOT)
    res = CliRunner().invoke(app, table_arguments(command), env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    got = [line for line in res.output.splitlines() if line.startswith("|")]
    assert got == expected.strip().splitlines()


COMPARES = sorted(glob.glob(str(ROOT / "results" / "*" / "compare.json")))


@pytest.mark.parametrize("path", COMPARES, ids=[Path(p).parent.name for p in COMPARES])
def test_committed_compare_md_regenerates(path):
    md = Path(path).with_name("compare.md")
    record = json.loads(Path(path).read_text())
    assert render_markdown(record) == md.read_text()
