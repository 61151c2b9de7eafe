"""The level database of the search: every block pruned at every level, on dense inputs.

Built in one pass of the shared runner over the *dense* model (EvoPress's database: each
block's statistics come from dense activations, so a block's pruned weights at a level do
not depend on the levels of the blocks before it). For each block the pruner's statistics
are collected once and every level is pruned from the dense weights with a copy of them.

Storage: a pruner that only zeroes weights (magnitude, Wanda) is stored as bit-packed keep
masks (1 bit per weight, applied to the dense weights on load); one that also updates the
surviving weights (SparseGPT) as weights. Which one is decided from the result, not the
pruner's name. Entries live on disk (one file per block and sparsity, reused by later runs
with the same model, weights, pruner and calibration protocol); masks are also kept in
memory.
"""

from __future__ import annotations

import copy
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import UserError
from ..io import atomic_write
from ..memory import gib
from ..pruners.base import Pruner
from ..pruners.masks import Pattern
from ..runner import Activations, BlockRunner, collect_inputs

DenseWeights = Callable[[int], dict[str, Tensor]]
Entry = dict[str, dict]


def pack_mask(keep: Tensor) -> Tensor:
    """A boolean tensor as uint8 bits (8 weights per byte, row-major)."""
    bits = np.packbits(keep.detach().cpu().reshape(-1).numpy().astype(np.bool_))
    return torch.from_numpy(bits)


def unpack_mask(bits: Tensor, shape: Sequence[int]) -> Tensor:
    """The boolean tensor of ``shape`` that :func:`pack_mask` packed."""
    count = int(np.prod(shape))
    flat = np.unpackbits(bits.cpu().numpy(), count=count).astype(np.bool_)
    return torch.from_numpy(flat).reshape(tuple(shape))


def encode(pruned: Tensor, dense: Tensor) -> dict:
    """A mask entry when ``pruned`` only zeroes weights of ``dense``, else a weight entry."""
    pruned = pruned.detach().cpu()
    dense = dense.detach().cpu()
    keep = pruned != 0
    if torch.equal(pruned[keep], dense[keep].to(pruned.dtype)):
        return {"kind": "mask", "bits": pack_mask(keep), "shape": list(pruned.shape)}
    return {"kind": "weight", "weight": pruned.to(dense.dtype).clone()}


def decode(entry: dict, dense: Tensor) -> Tensor:
    """The pruned weight of one layer (on ``dense``'s device and dtype)."""
    if entry["kind"] == "mask":
        keep = unpack_mask(entry["bits"], entry["shape"]).to(dense.device)
        return torch.where(keep, dense, torch.zeros((), dtype=dense.dtype, device=dense.device))
    return entry["weight"].to(dense.device, dense.dtype)


def entry_bytes(entry: Entry) -> int:
    total = 0
    for layer in entry.values():
        t = layer["bits"] if layer["kind"] == "mask" else layer["weight"]
        total += t.numel() * t.element_size()
    return total


class LevelDatabase:
    """Pruned weights per (block, sparsity), on disk under ``folder`` (None: memory only)."""

    def __init__(self, folder: Path | None, dense: DenseWeights) -> None:
        self.folder = folder
        self.dense = dense
        self._memory: dict[tuple[int, str], Entry] = {}
        self.built = 0
        self.reused = 0
        self.bytes = 0
        self.last_bytes = 0  # size of the entry put last

    @staticmethod
    def key(sparsity: float) -> str:
        return f"{sparsity:.9f}"

    def _path(self, index: int, sparsity: float) -> Path | None:
        if self.folder is None:
            return None
        return self.folder / f"block{index:03d}_{self.key(sparsity)}.pt"

    def has(self, index: int, sparsity: float) -> bool:
        if (index, self.key(sparsity)) in self._memory:
            return True
        path = self._path(index, sparsity)
        return path is not None and path.is_file()

    def put(self, index: int, sparsity: float, entry: Entry) -> None:
        self.built += 1
        self.last_bytes = entry_bytes(entry)
        self.bytes += self.last_bytes
        path = self._path(index, sparsity)
        if path is not None:
            atomic_write(path, lambda p: torch.save(entry, p))
        if path is None or all(layer["kind"] == "mask" for layer in entry.values()):
            self._memory[(index, self.key(sparsity))] = entry

    def entry(self, index: int, sparsity: float) -> Entry:
        key = (index, self.key(sparsity))
        if key in self._memory:
            return self._memory[key]
        path = self._path(index, sparsity)
        if path is None or not path.is_file():
            raise KeyError(f"block {index} at sparsity {sparsity} is not in the database")
        entry = torch.load(path, map_location="cpu", weights_only=True)
        if all(layer["kind"] == "mask" for layer in entry.values()):
            self._memory[key] = entry
        return entry

    def note_reused(self, index: int, sparsity: float) -> None:
        self.reused += 1
        self.bytes += entry_bytes(self.entry(index, sparsity))

    def weights(self, index: int, sparsity: float) -> dict[str, Tensor]:
        """Block ``index``'s pruned weights at ``sparsity`` (``(out, in)`` per layer)."""
        dense = self.dense(index)
        return {name: decode(layer, dense[name])
                for name, layer in self.entry(index, sparsity).items()}


def _proxy(weight: Tensor, device: torch.device) -> nn.Linear:
    out_f, in_f = weight.shape
    layer = nn.Linear(in_f, out_f, bias=False, device=device, dtype=weight.dtype)
    layer.weight.data = weight.detach().to(device).clone()
    return layer


@torch.no_grad()
def _prune_levels(db: LevelDatabase, index: int, sparsities: list[float], pruner: Pruner,
                  pattern: Pattern, stats: dict[str, object], device: torch.device) -> None:
    dense = db.dense(index)
    for s in sparsities:
        entry: Entry = {}
        for name, w in dense.items():
            layer = _proxy(w, device)
            pruner.prune_layer(layer, copy.deepcopy(stats[name]), s, pattern)
            entry[name] = encode(layer.weight, w)
        db.put(index, s, entry)


SPACE_MARGIN = 1 << 30
"""Free space the database always leaves on its disk (bytes)."""


def check_space(db: LevelDatabase, entry_size: int, entries_left: int) -> None:
    """Refuse to go on when the entries still to build (each about ``entry_size`` bytes, the
    size of the first one built: blocks have the same shapes) would not fit on the database's
    disk, leaving :data:`SPACE_MARGIN` free. Entries already written stay valid and are reused
    by the next run."""
    if db.folder is None or entries_left <= 0:
        return
    need = entry_size * entries_left
    free = shutil.disk_usage(db.folder).free
    if need + SPACE_MARGIN > free:
        raise UserError(
            f"the search's level database needs about {gib(need)} more under "
            f"{db.folder} ({entries_left} entries of {gib(entry_size)}) but "
            f"{gib(free)} is free; free some space, point SPARSEALLOC_CACHE at a "
            "larger disk, or use fewer levels (--search-levels 2)")


def build_database(db: LevelDatabase, runner: BlockRunner, acts: Callable[[], Activations],
                   pruner: Pruner, pattern: Pattern, wanted: list[list[float]],
                   desc: str = "search database") -> None:
    """Add every ``wanted[l]`` sparsity of block ``l`` that ``db`` lacks.

    One dense pass of the runner collects each block's statistics on dense inputs (none
    for a data-free pruner such as magnitude); ``acts`` gives the embedded calibration
    batches and is only called when a pass is needed. The model's weights are not changed.
    """
    missing: list[list[float]] = []
    for index, levels in enumerate(wanted):
        todo = []
        for s in levels:
            if db.has(index, s):
                db.note_reused(index, s)
            else:
                todo.append(s)
        missing.append(todo)
    if not any(missing):
        return
    arch = runner.arch
    first = next(iter(db.dense(0).values()))
    left = sum(len(todo) for todo in missing)

    def prune_levels(index: int, stats: dict[str, object]) -> None:
        todo = missing[index]
        if db.built == 0:  # the first entry's size tells what the rest will take
            _prune_levels(db, index, todo[:1], pruner, pattern, stats, runner.device)
            check_space(db, db.last_bytes, left - 1)
            todo = todo[1:]
        _prune_levels(db, index, todo, pruner, pattern, stats, runner.device)

    if pruner.make_stats(_proxy(first[:1], torch.device("cpu"))) is None:  # data-free
        for index, todo in enumerate(missing):
            if todo:
                prune_levels(index, dict.fromkeys(arch.linear_names[index]))
        return
    last = max(i for i, todo in enumerate(missing) if todo)
    state = acts()
    for index in runner.sequential(state, desc=desc):
        if missing[index]:
            linears = arch.linears(index)
            dense = db.dense(index)
            stats = {n: pruner.make_stats(_proxy(dense[n][:1], runner.device)) for n in linears}
            with collect_inputs(linears, stats):
                runner.pass_block(index, state)
            prune_levels(index, stats)
        if index == last:
            break
