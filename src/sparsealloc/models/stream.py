"""Streaming weights: a model skeleton without weights, filled one decoder block at a time.

The skeleton is built on the meta device (accelerate's ``init_empty_weights``: parameters
take no memory; buffers such as rotary tables are real). :class:`StreamedWeights` reads a
block's parameters from the checkpoint's safetensors files (``safe_open``: one tensor at a
time, memory-mapped) when the runner reaches the block and puts meta tensors back when it is
done. Embeddings, final norm and lm_head ("outside" weights) are read only while in use.

A block changed while ``keep_changes`` is set (pruning) is written, whole, to an *overlay*
shard in the scratch folder when it is released; later reads of that block (evaluation, the
streaming save) come from the overlay, and :meth:`StreamedWeights.clear_overlay` returns to
the dense checkpoint. Overlay files are named and keyed as the saved model's shards, so the
streaming save moves them into place.

``materialised`` / ``peak_block_params`` count the block parameters held at any moment: the
tests check that no more than one block's weights are ever materialised.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..errors import UserError

_FLOATS = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
           "F64": torch.float64}
_INT_SIZES = {"I8": 1, "U8": 1, "BOOL": 1, "I16": 2, "I32": 4, "I64": 8}
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        lib = ctypes.CDLL("libc.so.6")
        return lib if hasattr(lib, "malloc_trim") else None
    except OSError:
        return None


_LIBC = _libc()


def release_heap() -> None:
    """Give freed heap memory back to the OS (glibc ``malloc_trim``).

    Without it, the heap fragments as blocks come and go and the resident memory creeps up
    block after block (measured: +0.5 GB a minute over the blocks of a 29 GiB model).
    """
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def checkpoint_files(folder: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file of a model folder (sharded with an index, or single)."""
    index = folder / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        return {key: folder / name for key, name in weight_map.items()}
    single = folder / SINGLE_FILE
    if single.is_file():
        with safe_open(str(single), framework="pt") as fh:
            return {key: single for key in fh.keys()}  # noqa: SIM118 (safe_open has no iter)
    raise UserError(f"{folder} has no {SINGLE_FILE} or {INDEX_FILE}: streaming needs "
                    "safetensors weights; run with --no-stream")


class Checkpoint:
    """Read tensors by name from a folder's safetensors files.

    Files are opened per read and closed after it: safetensors memory-maps them, and pages of
    a mapping kept open stay resident (and count in the process's RSS) long after the block
    that needed them was dropped.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.files = checkpoint_files(folder)

    def __contains__(self, key: str) -> bool:
        return key in self.files

    @contextlib.contextmanager
    def _handle(self, path: Path) -> Iterator[Any]:
        with safe_open(str(path), framework="pt") as fh:
            yield fh

    def read(self, key: str) -> torch.Tensor:
        return self.read_many([key])[key]

    def read_many(self, keys: list[str]) -> dict[str, torch.Tensor]:
        """Tensors by name, each file opened once."""
        by_file: dict[Path, list[str]] = {}
        for key in keys:
            by_file.setdefault(self.files[key], []).append(key)
        out = {}
        for path, names in by_file.items():
            with self._handle(path) as fh:
                for key in names:
                    out[key] = fh.get_tensor(key)
        return {key: out[key] for key in keys}

    def _headers(self) -> Iterator[tuple[str, str, list[int]]]:
        """(name, safetensors dtype, shape) of every tensor, from the files' headers."""
        by_file: dict[Path, list[str]] = {}
        for key, path in self.files.items():
            by_file.setdefault(path, []).append(key)
        for path, names in by_file.items():
            with self._handle(path) as fh:
                for key in names:
                    sl = fh.get_slice(key)
                    yield key, sl.get_dtype(), list(sl.get_shape())

    def dtype(self) -> torch.dtype:
        """The dtype of the checkpoint's first floating-point tensor (its storage dtype)."""
        for _, name, _ in self._headers():
            if name in _FLOATS:
                return _FLOATS[name]
        return torch.float32

    def nbytes(self, dtype: torch.dtype | None = None) -> int:
        """Bytes of all tensors, at ``dtype`` when given for floating ones (else as stored)."""
        total = 0
        for _, name, shape in self._headers():
            n = 1
            for d in shape:
                n *= d
            if name in _FLOATS:
                total += n * (dtype or _FLOATS[name]).itemsize
            else:
                total += n * _INT_SIZES.get(name, 8)
        return total


@dataclass
class _Slot:
    """One parameter of the skeleton, possibly shared by several modules (tied weights)."""

    key: str  # checkpoint tensor name
    owners: list[tuple[nn.Module, str]]
    shape: torch.Size
    dtype: torch.dtype


def shard_name(number: int, total: int) -> str:
    return f"model-{number:05d}-of-{total:05d}.safetensors"


class StreamedWeights:
    """Materialise and release the weights of a meta-device skeleton, block by block.

    Args:
        model: the skeleton (parameters on the meta device).
        blocks_attr: path of the decoder block list (``Architecture.blocks_attr``).
        num_blocks: number of decoder blocks.
        checkpoint: where the dense weights are read from.
        dtype: storage dtype of the weights once read.
        scratch: folder for overlay shards (pruned blocks).
    """

    def __init__(self, model: nn.Module, blocks_attr: str, num_blocks: int,
                 checkpoint: Checkpoint, dtype: torch.dtype, scratch: Path) -> None:
        self.checkpoint = checkpoint
        self.dtype = dtype
        self.scratch = scratch
        self.num_blocks = num_blocks
        self.block_slots: list[list[_Slot]] = [[] for _ in range(num_blocks)]
        self.outside_slots: list[_Slot] = []
        self.overlay: dict[int, Path] = {}
        self.keep_changes = False
        self.materialised = 0  # block parameters held now
        self.peak_block_params = 0
        self.block_loads = 0
        groups: dict[int, _Slot] = {}
        modules = dict(model.named_modules(remove_duplicate=False))
        for name, param in model.named_parameters(remove_duplicate=False):
            owner_name, _, attr = name.rpartition(".")
            owner = (modules[owner_name], attr)
            slot = groups.get(id(param))
            if slot is None:
                slot = groups[id(param)] = _Slot(name, [], param.shape, param.dtype)
                prefix = blocks_attr + "."
                head, _, rest = name.partition(prefix) if name.startswith(prefix) else ("", "", "")
                if rest:
                    self.block_slots[int(rest.split(".", 1)[0])].append(slot)
                else:
                    self.outside_slots.append(slot)
            elif slot.key not in checkpoint and name in checkpoint:
                slot.key = name  # a tied weight stored under its other name
            slot.owners.append(owner)
        missing = [s.key for s in groups.values() if s.key not in checkpoint]
        if missing:
            raise UserError(f"cannot stream {checkpoint.folder}: its checkpoint has no tensor "
                            f"'{missing[0]}' (names differ from the model class); run with "
                            "--no-stream")
        self.block_size = [sum(s.shape.numel() for s in slots) for slots in self.block_slots]
        self.prefix = blocks_attr

    # ------------------------------------------------------------------ materialise
    @staticmethod
    def _set(slot: _Slot, tensor: torch.Tensor) -> None:
        param = nn.Parameter(tensor, requires_grad=False)
        for module, attr in slot.owners:
            module._parameters[attr] = param

    @staticmethod
    def _drop(slot: _Slot) -> None:
        StreamedWeights._set(slot, torch.empty(slot.shape, dtype=slot.dtype, device="meta"))

    def _fill(self, slots: list[_Slot], source: dict[str, torch.Tensor] | None = None) -> None:
        if source is None:
            source = self.checkpoint.read_many([slot.key for slot in slots])
        for slot in slots:
            t = source[slot.key]
            self._set(slot, t.to(self.dtype) if t.is_floating_point() else t)

    def block_tensors(self, index: int, dense: bool = False) -> dict[str, torch.Tensor]:
        """Block ``index``'s parameters by checkpoint name (the overlay unless ``dense``)."""
        path = self.overlay.get(index)
        if path is not None and not dense:
            with safe_open(str(path), framework="pt") as fh:
                return {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
        return self.checkpoint.read_many([s.key for s in self.block_slots[index]])

    @contextlib.contextmanager
    def block(self, index: int) -> Iterator[None]:
        """Block ``index``'s weights are real inside the context (nested uses share them)."""
        slots = self.block_slots[index]
        if slots and not slots[0].owners[0][0]._parameters[slots[0].owners[0][1]].is_meta:
            yield  # already held by an outer context
            return
        self._fill(slots, self.block_tensors(index))
        self.block_loads += 1
        self.materialised += self.block_size[index]
        self.peak_block_params = max(self.peak_block_params, self.materialised)
        try:
            yield
            if self.keep_changes and index not in self.overlay:
                self._write_overlay(index)
        finally:
            for slot in slots:
                self._drop(slot)
            self.materialised -= self.block_size[index]
            release_heap()

    @contextlib.contextmanager
    def outside(self) -> Iterator[None]:
        """Embeddings, final norm, lm_head (every parameter outside the blocks) are real."""
        slots = self.outside_slots
        if not slots or not slots[0].owners[0][0]._parameters[slots[0].owners[0][1]].is_meta:
            yield
            return
        self._fill(slots)
        try:
            yield
        finally:
            for slot in slots:
                self._drop(slot)
            release_heap()

    # ------------------------------------------------------------------ overlay
    def overlay_name(self, index: int) -> str:
        return shard_name(index + 1, self.num_blocks + 1)

    def _write_overlay(self, index: int) -> None:
        self.scratch.mkdir(parents=True, exist_ok=True)
        tensors: dict[str, torch.Tensor] = {}
        for slot in self.block_slots[index]:
            module, attr = slot.owners[0]
            tensors[slot.key] = module._parameters[attr].detach().to("cpu", self.dtype) \
                .contiguous()
        path = self.scratch / self.overlay_name(index)
        save_file(tensors, str(path), metadata={"format": "pt"})
        self.overlay[index] = path

    def clear_overlay(self) -> None:
        """Back to the dense checkpoint: forget every pruned block."""
        for path in self.overlay.values():
            path.unlink(missing_ok=True)
        self.overlay.clear()

    def close(self) -> None:
        self.clear_overlay()
        shutil.rmtree(self.scratch, ignore_errors=True)
