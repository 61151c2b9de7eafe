"""The streaming save: a sharded safetensors folder written without the whole model in memory.

One shard per decoder block (the overlay shard of a pruned block is linked into place: it was
written when the block was pruned) and a last shard with everything outside the blocks, all in
the storage dtype; ``model.safetensors.index.json``, ``config.json``, the tokenizer. The folder
is built and renamed into place by :func:`.load.atomic_save` (markers, --overwrite rules).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..io import write_json
from .load import atomic_save
from .packaged import SOURCE_FILE
from .stream import INDEX_FILE, StreamedWeights, shard_name


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)  # same file system: no copy, the overlay stays valid
    except OSError:
        shutil.copyfile(src, dst)


def _cast(tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: (t.to(dtype) if t.is_floating_point() else t).contiguous()
            for k, t in tensors.items()}


def write_shards(weights: StreamedWeights, folder: Path) -> dict[str, str]:
    """Write every block's shard and the outside shard into ``folder``; the weight map."""
    total = weights.num_blocks + 1
    weight_map: dict[str, str] = {}
    for index in range(weights.num_blocks):
        name = shard_name(index + 1, total)
        path = weights.overlay.get(index)
        if path is not None:
            _link_or_copy(path, folder / name)
            with safe_open(str(path), framework="pt") as fh:
                keys = list(fh.keys())  # noqa: SIM118
        else:
            tensors = _cast(weights.block_tensors(index, dense=True), weights.dtype)
            save_file(tensors, str(folder / name), metadata={"format": "pt"})
            keys = list(tensors)
        weight_map.update(dict.fromkeys(keys, name))
    name = shard_name(total, total)
    outside = _cast(weights.checkpoint.read_many([s.key for s in weights.outside_slots]),
                    weights.dtype)
    save_file(outside, str(folder / name), metadata={"format": "pt"})
    weight_map.update(dict.fromkeys(outside, name))
    return weight_map


def save_streamed(weights: StreamedWeights, config: Any, tokenizer: Any, out_dir: str | Path,
                  *, source: dict[str, Any] | None = None, overwrite: bool = False) -> Path:
    """Save a streamed model (pruned blocks from the overlay, the rest from the checkpoint)."""

    def fill(folder: Path) -> None:
        weight_map = write_shards(weights, folder)
        size = sum((folder / f).stat().st_size for f in set(weight_map.values()))
        index = {"metadata": {"total_size": size}, "weight_map": dict(sorted(weight_map.items()))}
        (folder / INDEX_FILE).write_text(json.dumps(index, indent=2), encoding="utf-8")
        use_cache = getattr(config, "use_cache", None)
        config.use_cache = True
        config.dtype = weights.dtype
        try:
            config.save_pretrained(folder)
        finally:
            config.use_cache = use_cache
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
        if source is not None:
            write_json(folder / SOURCE_FILE, source)

    return atomic_save(out_dir, overwrite, fill)
