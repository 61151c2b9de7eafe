"""PyPI wheel downloads into the cache: atomic, checked, re-fetched when damaged."""

import hashlib
import subprocess

import pytest

from sparsealloc import cache
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
