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
from sparsealloc.report.docs import (
    DOCS,
    doc_tables,
    prose_figures,
    refresh,
    section,
    table_arguments,
    table_figures,
)

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


# every level: results/frontier/<setting>/compare.md went stale unseen while this looked one deep
COMPARES = sorted(glob.glob(str(ROOT / "results" / "**" / "compare.json"), recursive=True))


@pytest.mark.parametrize("path", COMPARES,
                         ids=[str(Path(p).parent.relative_to(ROOT / "results")) for p in COMPARES])
def test_committed_compare_md_regenerates(path):
    md = Path(path).with_name("compare.md")
    record = json.loads(Path(path).read_text())
    assert render_markdown(record) == md.read_text()


def test_section_and_prose_figures():
    text = ("# A\n## B\nx -1.0% ± 0.5%\n```bash\n# not a heading\n```\n| -2.0% ± 0.1% |\n"
            "### C\n+3% ± 1% and 4% ± 2.5%\n## D\n-9.9% ± 9.9%\n")
    b = section(text, "## B")
    assert b.startswith("## B\n") and b.endswith("4% ± 2.5%\n")
    assert prose_figures(b) == ["-1.0% ± 0.5%", "+3% ± 1%", "4% ± 2.5%"]
    assert section(text, "## D") == "## D\n-9.9% ± 9.9%\n"
    assert table_figures("```\nsparsealloc table x.json\n```\n| -2.0% ± 0.1% |\n") == {
        "-2.0% ± 0.1%"}
    with pytest.raises(KeyError):
        section(text, "## E")


# The prose that states where the project stands: README's advice and RESULTS' summary.
CURRENT_PROSE = [("README.md", None), ("RESULTS.md", "### Where it stands (every session's "
                                                    "runs; read this first)")]


@pytest.mark.parametrize("doc, heading", CURRENT_PROSE, ids=[d for d, _ in CURRENT_PROSE])
def test_current_prose_quotes_only_regenerated_figures(doc, heading):
    """Every ``mean% ± se%`` the current statements quote is in a table the docs regenerate:
    a figure copied by hand goes stale when results are added (README's did, for four
    sessions), and the refreshed tables no longer hold it."""
    text = (ROOT / doc).read_text()
    prose = text if heading is None else section(text, heading)
    figures = set().union(*(table_figures((ROOT / d).read_text()) for d in DOCS))
    quoted = prose_figures(prose)
    assert quoted, f"{doc} quotes no figure: the check would pass vacuously"
    assert [f for f in quoted if f not in figures] == []
