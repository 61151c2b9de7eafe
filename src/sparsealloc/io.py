"""Atomic output: nothing half-written ever looks like a finished result."""

from __future__ import annotations

import errno
import json
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import UserError

# Write failures a user causes and can fix (a read-only or full disk, no permission): one line.
USER_WRITE_ERRORS = (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT)


def jsonable(obj: Any) -> Any:
    """``obj`` as :func:`write_json` writes it (and it reads back): tensors, numpy values, paths,
    tuples and non-finite floats made JSON-safe."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist") and callable(obj.tolist):  # torch / numpy
        return jsonable(obj.tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    return obj


def current_umask() -> int:
    """The process umask (read by setting it and putting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(path: Path, directory: bool = False) -> None:
    """Give ``path`` the mode a plain ``open``/``mkdir`` would (mkstemp/mkdtemp use 0600/0700)."""
    path.chmod((0o777 if directory else 0o666) & ~current_umask())


def write_error(path: Path, exc: OSError) -> UserError:
    """One line for a write the user can fix (read-only file system, no permission, full disk)."""
    return UserError(f"cannot write {path}: {exc.strerror or exc}; choose a writable location")


def atomic_write(path: str | Path, writer: Callable[[Path], None]) -> Path:
    """Call ``writer(tmp_path)`` then rename the temporary file onto ``path``.

    The temporary file lives in the same folder (so the rename is atomic) and
    keeps the target's suffix (so libraries that infer a format from it work). The finished
    file gets the user's umask, like any other file they create.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}",
                                   dir=path.parent)
    except OSError as exc:
        if exc.errno in USER_WRITE_ERRORS or isinstance(exc, FileExistsError | NotADirectoryError):
            raise write_error(path, exc) from None
        raise
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        writer(tmp_path)
        apply_umask(tmp_path)
        os.replace(tmp_path, path)
    except OSError as exc:
        tmp_path.unlink(missing_ok=True)
        if exc.errno in USER_WRITE_ERRORS:
            raise write_error(path, exc) from None
        raise
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    return path


def write_json(path: str | Path, data: Any) -> Path:
    """Write ``data`` as indented JSON, atomically."""
    text = json.dumps(jsonable(data), indent=2, sort_keys=False) + "\n"
    return atomic_write(path, lambda p: p.write_text(text))


def write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda p: p.write_text(text))


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())
