"""PyPI wheel downloads into the cache: atomic, checked, re-fetched when damaged."""

import hashlib
import subprocess

import pytest
from typer.testing import CliRunner

from sparsealloc import cache
from sparsealloc.cli import app
from sparsealloc.errors import UserError

CONTENT = b"wheel bytes"
GOOD = hashlib.sha256(CONTENT).hexdigest()


def fake_pip(monkeypatch, content: bytes, calls: list):
    def run(cmd, **kwargs):
        calls.append(cmd)
        dest = cmd[cmd.index("--dest") + 1]
        with open(f"{dest}/demo_pkg-1.0-py3-none-any.whl", "wb") as fh:
            fh.write(content)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(cache.subprocess, "run", run)


def test_download_checks_sha256_and_moves_into_place(tmp_path, monkeypatch):
    calls: list = []
    fake_pip(monkeypatch, CONTENT, calls)
    path = cache.pip_download("demo-pkg", "1.0", tmp_path, sha256=GOOD)
    assert path.parent == tmp_path and path.read_bytes() == CONTENT
    assert cache.pip_download("demo-pkg", "1.0", tmp_path, sha256=GOOD) == path
    assert len(calls) == 1  # the second call used the cached wheel
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary folder left


def test_wrong_digest_is_one_clear_error_and_leaves_nothing(tmp_path, monkeypatch):
    fake_pip(monkeypatch, b"tampered", [])
    with pytest.raises(UserError, match="expected " + GOOD):
        cache.pip_download("demo-pkg", "1.0", tmp_path, sha256=GOOD)
    assert list(tmp_path.iterdir()) == []


def test_damaged_cached_wheel_is_downloaded_again(tmp_path, monkeypatch):
    (tmp_path / "demo_pkg-1.0-py3-none-any.whl").write_bytes(b"truncated")
    calls: list = []
    fake_pip(monkeypatch, CONTENT, calls)
    path = cache.pip_download("demo-pkg", "1.0", tmp_path, sha256=GOOD)
    assert len(calls) == 1 and path.read_bytes() == CONTENT


def test_pip_failure_names_the_package_and_the_fix(tmp_path, monkeypatch):
    monkeypatch.setattr(cache.subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(
        cmd, 1, "", "ERROR: No matching distribution found for demo-pkg==1.0"))
    with pytest.raises(UserError, match=r"demo-pkg==1.0 .*No matching distribution"):
        cache.pip_download("demo-pkg", "1.0", tmp_path)
    assert list(tmp_path.iterdir()) == []


def _fill(root):
    (root / "search_db" / "m1" / "wanda-1").mkdir(parents=True)
    (root / "search_db" / "m1" / "wanda-1" / "block000.pt").write_bytes(b"x" * 3000)
    (root / "search_db" / "m2").mkdir(parents=True)
    (root / "search_db" / "m2" / "e.pt").write_bytes(b"x" * 1000)
    (root / "spectra").mkdir()
    (root / "spectra" / "s.json").write_bytes(b"x" * 10)


def test_cache_command_lists_by_size_and_clears_one_part(tmp_path, monkeypatch):
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path))
    _fill(tmp_path)
    assert cache.cache_usage() == [("search_db", 4000), ("spectra", 10)]
    assert cache.cache_usage("search_db") == [("search_db/m1", 3000), ("search_db/m2", 1000)]
    runner = CliRunner()
    res = runner.invoke(app, ["cache", "search_db"])
    assert res.exit_code == 0 and res.output.index("search_db/m1") < res.output.index("m2")
    res = runner.invoke(app, ["cache", "--clear", "search_db/m1"])
    assert res.exit_code == 0, res.output
    assert not (tmp_path / "search_db" / "m1").exists() and (tmp_path / "search_db" / "m2").exists()
    assert (tmp_path / "spectra" / "s.json").exists()


@pytest.mark.parametrize("part, needle", [("..", "not inside the cache"),
                                          ("search_db/../../x", "not inside the cache"),
                                          ("", "needs a part of the cache"),
                                          (".", "needs a part of the cache"),
                                          ("nothing", "nothing named 'nothing'")])
def test_cache_clear_refuses_anything_but_a_part_of_the_cache(tmp_path, monkeypatch, part,
                                                              needle):
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path / "c"))
    (tmp_path / "c").mkdir()
    _fill(tmp_path / "c")
    (tmp_path / "x").write_text("outside")
    with pytest.raises(UserError, match=needle):
        cache.clear_cache(part)
    assert (tmp_path / "x").exists() and (tmp_path / "c" / "search_db" / "m1").exists()
