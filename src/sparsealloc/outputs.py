"""Where commands write, and what they may replace there.

Every command validates its output locations before any work (``check_out_dir``,
``check_save_target``) and clears its own stale outputs only when the work is about to start
(``start_run_dir``), so a run rejected for bad input never touches earlier results and a crashed
rerun never leaves old figures beside new partial results.

``--save DIR`` replaces DIR only when it is a model folder that sparsealloc wrote (it carries
:data:`SAVE_MARKER`), or any model folder (holding ``config.json``) with ``--overwrite``; an
empty folder is used as is; anything else is refused. Nothing else is ever deleted, except
sparsealloc's own leftovers of an interrupted save to the same place (hidden ``.DIR.*.tmp`` /
``.DIR.*.old`` folders that carry the marker of a process that is no longer running).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from . import __version__
from .errors import UserError
from .io import write_error

SAVE_MARKER = "sparsealloc_saved.json"
"""Written into every folder ``--save`` creates (first, into its temporary folder)."""

OUTPUTS: dict[str, tuple[str, ...]] = {
    "prune": ("result.json",),
    "eval": ("result.json",),
    "allocate": ("allocation.json", "allocation.png", "search.json", "search.png",
                 "search-*.json", "search-*.png"),
    "probe": ("probe.json", "drift_curves.png", "drift_heatmap.png", "absorption.png",
              "absorption_vs_eta.png"),
    "compare": ("compare.json", "compare.partial.json", "compare.md", "compare.png"),
}
"""The files each command writes into its ``--out`` folder (all of them cleared at its start;
an entry may be a glob pattern)."""


def _nearest_existing(path: Path) -> Path:
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _check_writable(path: Path, option: str) -> None:
    """Fail now, with one line, when ``path`` could not be created or written later."""
    base = _nearest_existing(path)
    if not base.is_dir():
        raise UserError(f"{option} {path}: {base} is a file, not a folder; choose another path")
    try:  # a real probe: permission bits say nothing to root, and some mounts refuse anyway
        os.rmdir(tempfile.mkdtemp(prefix=".sparsealloc-write-test-", dir=base))
    except OSError as exc:
        why = "read-only file system" if _read_only_fs(base) else (exc.strerror or str(exc))
        raise UserError(f"{option} {path}: cannot write in {base} ({why}); "
                        "choose a writable location") from None


def _read_only_fs(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def check_out_dir(out: str | Path | None, option: str = "--out") -> Path | None:
    """Validate an output folder without creating or changing anything."""
    if out is None:
        return None
    path = Path(out).expanduser()
    if path.exists() and not path.is_dir():
        raise UserError(f"{option} {path} is an existing file, not a folder; "
                        "give a folder path (it is created if missing)")
    _check_writable(path, option)
    return path


def start_run_dir(out: str | Path | None, command: str,
                  keep: tuple[str, ...] = ()) -> Path | None:
    """Create ``out`` and remove ``command``'s previous outputs there (nothing else), except the
    files named in ``keep`` (``compare --resume`` keeps the partial record it has rewritten)."""
    if out is None:
        return None
    path = Path(out).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
        for name in OUTPUTS[command]:
            for stale in path.glob(name):  # names, or patterns of names (search-*.json)
                if stale.name not in keep:
                    stale.unlink(missing_ok=True)
    except OSError as exc:
        raise write_error(path, exc) from None
    return path


# ---------------------------------------------------------------- --save targets
def is_model_folder(path: Path) -> bool:
    return (path / "config.json").is_file()


def is_ours(path: Path) -> bool:
    return (path / SAVE_MARKER).is_file()


def check_save_target(save: str | Path, overwrite: bool = False) -> Path:
    """Validate ``--save DIR`` before any work: what may be replaced there (module docstring)."""
    path = Path(save).expanduser()
    if path.exists() or path.is_symlink():
        if not path.is_dir():
            raise UserError(f"--save {path} is an existing file; give a folder path")
        if any(path.iterdir()):
            if not is_model_folder(path):
                if overwrite:
                    raise UserError(f"--save {path} exists and is not a model folder (no "
                                    "config.json); --overwrite only replaces model folders: "
                                    "choose a new path")
                raise UserError(f"{path} exists and is not a sparsealloc model folder; choose a "
                                "new path or pass --overwrite")
            if not (is_ours(path) or overwrite):
                raise UserError(f"{path} exists and is not a sparsealloc model folder; choose a "
                                "new path or pass --overwrite")
    _check_writable(path.parent if path.exists() else path, "--save")
    return path


def write_marker(folder: Path, **fields) -> None:
    """Mark ``folder`` as written by this process (``pid`` tells a live save from a dead one)."""
    record = {"sparsealloc_version": __version__, "pid": os.getpid(), "created": time.time(),
              **fields}
    (folder / SAVE_MARKER).write_text(json.dumps(record, indent=2) + "\n")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_saves(out: Path) -> list[Path]:
    """Delete our leftovers of interrupted saves to ``out`` (``.out.*.tmp`` / ``.out.*.old``).

    Only folders that carry our marker, written by a process that is no longer running, are
    removed; a save in progress in another process keeps its temporary folder.
    """
    removed = []
    if not out.parent.is_dir():
        return removed
    for kind in ("tmp", "old"):
        for leftover in out.parent.glob(f".{out.name}.*.{kind}"):
            marker = leftover / SAVE_MARKER
            if not (leftover.is_dir() and marker.is_file()):
                continue
            try:
                pid = int(json.loads(marker.read_text()).get("pid", -1))
            except (OSError, ValueError):
                continue
            if pid == os.getpid() or not _pid_alive(pid):
                shutil.rmtree(leftover, ignore_errors=True)
                removed.append(leftover)
    return removed


def replace_dir(new: Path, out: Path) -> None:
    """Move the finished folder ``new`` onto ``out`` (replacing a folder checked before)."""
    if not out.exists():
        os.replace(new, out)
        return
    old = out.parent / f".{out.name}.{os.getpid()}.old"
    shutil.rmtree(old, ignore_errors=True)
    old.mkdir()
    write_marker(old)
    try:
        os.replace(out, old / "previous")
    except OSError as exc:
        if exc.errno in (errno.EXDEV, errno.EBUSY):
            raise write_error(out, exc) from None
        raise
    os.replace(new, out)
    shutil.rmtree(old, ignore_errors=True)
