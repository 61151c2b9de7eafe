"""The one block-sequential runner used by calibration, pruning, OWL statistics and the probe.

Protocol (SparseGPT / Wanda / OWL): the calibration sequences are embedded once;
every decoder block is then run on the outputs of the blocks before it (already
pruned, when pruning). Only the block being processed is moved to the compute
device; hidden states live on the storage device (CPU by default).

Streaming (:mod:`sparsealloc.models.stream`): with a ``weights`` provider, a block's weights
exist only while the runner holds it (:meth:`BlockRunner.holding`, entered by
:meth:`BlockRunner.on_device`). With a ``compute_dtype``, hidden states, the captured call
arguments and the block on the device are in that dtype; the block goes back to its storage
dtype afterwards.

Capture records, for every calibration batch and every block, everything the
model passed to that block (positional arguments and keyword arguments:
attention masks, position embeddings, position ids, ...). It does so by
replacing every block's ``forward`` with a recorder for one cheap pass, so
architectures that give different blocks different masks or rotary tables
(Gemma 3's sliding and global layers) are served faithfully.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, overload

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .models.arch import Architecture, discover
from .progress import progress_bar


class _StopForward(Exception):
    """Raised by the last block's recorder: nothing after the blocks needs computing."""


@dataclass
class BlockCall:
    """How the model called one block: the arguments around the hidden states."""

    args: tuple
    kwargs: dict[str, Any]
    hidden_in_kwargs: bool

    def invoke(self, block: nn.Module, hidden: torch.Tensor, device: torch.device,
               dtype: torch.dtype | None = None) -> torch.Tensor:
        args = _to(self.args, device, dtype)
        kwargs = _to(self.kwargs, device, dtype)
        if self.hidden_in_kwargs:
            out = block(*args, hidden_states=hidden, **kwargs)
        else:
            out = block(hidden, *args, **kwargs)
        return out if isinstance(out, torch.Tensor) else out[0]


def _to(obj: Any, device: torch.device, dtype: torch.dtype | None = None) -> Any:
    """``obj`` on ``device``; floating tensors also in ``dtype`` when given."""
    if isinstance(obj, torch.Tensor):
        if dtype is not None and obj.is_floating_point() and obj.dtype != dtype:
            return obj.to(device, dtype)
        return obj if obj.device == device else obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to(o, device, dtype) for o in obj)
    if isinstance(obj, list):
        return [_to(o, device, dtype) for o in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device, dtype) for k, v in obj.items()}
    return obj


class WeightsProvider(Protocol):
    """Makes a block's weights real for the duration of a context (streaming)."""

    def block(self, index: int) -> contextlib.AbstractContextManager[None]: ...


class DiskHidden(Sequence[torch.Tensor]):
    """Hidden states on disk, one safetensors file per batch (``--offload-activations disk``).

    Read back one batch at a time, so a pass over the blocks holds one batch's inputs and
    outputs in memory instead of all of them. A store is written once (``append`` while it is
    built) and never changed: a pass writes a new store (:meth:`refilled`). Its folder is
    removed when the store is garbage-collected.
    """

    def __init__(self, root: Path) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.folder = Path(tempfile.mkdtemp(prefix="hidden.", dir=root))
        self._count = 0
        weakref.finalize(self, shutil.rmtree, self.folder, True)

    def _path(self, index: int) -> Path:
        return self.folder / f"{index:07d}.safetensors"

    def append(self, tensor: torch.Tensor) -> None:
        save_file({"hidden": tensor.detach().cpu().contiguous()}, str(self._path(self._count)))
        self._count += 1

    def __len__(self) -> int:
        return self._count

    @overload
    def __getitem__(self, index: int) -> torch.Tensor: ...
    @overload
    def __getitem__(self, index: slice) -> list[torch.Tensor]: ...
    def __getitem__(self, index: int | slice) -> torch.Tensor | list[torch.Tensor]:
        if isinstance(index, slice):
            return [self[i] for i in range(self._count)[index]]
        if not -self._count <= index < self._count:
            raise IndexError(f"batch {index} of {self._count}")
        return load_file(str(self._path(index % self._count)))["hidden"]

    def refilled(self, tensors: Iterable[torch.Tensor]) -> DiskHidden:
        """A new store beside this one holding ``tensors`` (written as they come)."""
        out = DiskHidden(self.folder.parent)
        for t in tensors:
            out.append(t)
        return out


Hidden = list[torch.Tensor] | DiskHidden


@dataclass
class Activations:
    """Hidden states entering the current block, one tensor per batch, and the block calls."""

    hidden: Hidden
    calls: list[list[BlockCall]] = field(default_factory=list)  # [batch][block]

    @property
    def num_tokens(self) -> int:
        """Tokens over all batches (batch x sequence length)."""
        return sum(int(h.shape[0] * h.shape[1]) for h in self.hidden)

    def clone(self) -> Activations:
        if isinstance(self.hidden, DiskHidden):  # never changed in place: shared
            return Activations(hidden=self.hidden, calls=self.calls)
        return Activations(hidden=[h.clone() for h in self.hidden], calls=self.calls)


class BlockRunner:
    """Runs a causal LM block by block.

    Args:
        model: a Hugging Face causal LM (any architecture whose blocks sit in a ModuleList).
        device: where each block is computed ("cpu" or "cuda[:i]").
        storage_device: where hidden states are kept between blocks (default CPU).
        progress: show progress bars.
        weights: streaming provider (None: the weights are in memory).
        compute_dtype: dtype blocks compute in (None: their own).
        offload: folder for hidden states on disk (:class:`DiskHidden`; None: in memory).
    """

    def __init__(
        self,
        model: nn.Module,
        device: str | torch.device = "cpu",
        storage_device: str | torch.device = "cpu",
        progress: bool = True,
        arch: Architecture | None = None,
        weights: WeightsProvider | None = None,
        compute_dtype: torch.dtype | None = None,
        offload: Path | None = None,
    ) -> None:
        self.model = model
        self.arch = arch or discover(model)
        self.device = torch.device(device)
        self.storage = torch.device(storage_device)
        self.progress = progress
        self.block_forwards = 0  # counts block forwards over one batch (cost accounting)
        self.weights = weights
        self.compute_dtype = compute_dtype
        self.offload = offload

    @property
    def num_blocks(self) -> int:
        return self.arch.num_blocks

    # ------------------------------------------------------------------ capture
    @torch.no_grad()
    def capture(self, input_ids: torch.Tensor, batch_size: int = 1) -> Activations:
        """Embed ``input_ids`` (N, T) and record every block's call, batch by batch.

        The model runs on the CPU for this pass (only embeddings, masks and rotary
        tables are computed: every block is replaced by a recorder).
        """
        blocks = self.arch.blocks
        n = input_ids.shape[0]
        hidden: Hidden = DiskHidden(self.offload) if self.offload is not None else []
        calls: list[list[BlockCall]] = []
        current: list[BlockCall] = []

        def recorder(index: int) -> Callable[..., torch.Tensor]:
            def forward(*args: Any, **kwargs: Any) -> torch.Tensor:
                if args:
                    h, rest, in_kw = args[0], tuple(args[1:]), False
                else:
                    h, rest, in_kw = kwargs.pop("hidden_states"), (), True
                if index == 0:
                    hidden.append(_to(h.detach(), self.storage, self.compute_dtype))
                current.append(BlockCall(args=rest, kwargs=dict(kwargs), hidden_in_kwargs=in_kw))
                if index == len(blocks) - 1:
                    raise _StopForward
                return h

            return forward

        for i, block in enumerate(blocks):
            block.forward = recorder(i)
        try:
            batches = range(0, n, batch_size)
            for start in progress_bar(batches, desc="embedding", enable=self.progress):
                current = []
                ids = input_ids[start : start + batch_size]
                with contextlib.suppress(_StopForward):
                    self.model(input_ids=ids, use_cache=False)
                calls.append(current)
        finally:
            for block in blocks:
                del block.forward
        return Activations(hidden=hidden, calls=calls)

    # ------------------------------------------------------------------ forwards
    @contextlib.contextmanager
    def holding(self, index: int) -> Iterator[nn.Module]:
        """Block ``index`` with real weights (read from the checkpoint when streaming)."""
        block = self.arch.blocks[index]
        if self.weights is None:
            yield block
            return
        with self.weights.block(index):
            yield block

    @contextlib.contextmanager
    def on_device(self, index: int) -> Iterator[nn.Module]:
        """Move block ``index`` to the compute device (and dtype) for the context."""
        with self.holding(index) as block:
            first = next(block.parameters())
            home, home_dtype = first.device, first.dtype
            dtype = self.compute_dtype or home_dtype
            moved = home != self.device or dtype != home_dtype
            if moved:
                block.to(self.device, dtype)
            try:
                yield block
            finally:
                if moved:
                    block.to(home, home_dtype)

    @torch.no_grad()
    def forward_block(
        self, index: int, hidden: torch.Tensor, call: BlockCall, block: nn.Module | None = None
    ) -> torch.Tensor:
        """Run block ``index`` on one batch of hidden states; returns on the storage device."""
        block = block if block is not None else self.arch.blocks[index]
        out = call.invoke(block, _to(hidden, self.device, self.compute_dtype), self.device,
                          self.compute_dtype)
        self.block_forwards += hidden.shape[0]
        return out.to(self.storage)

    def _outputs(self, index: int, acts: Activations) -> Iterator[torch.Tensor]:
        block = self.arch.blocks[index]
        for h, calls in zip(acts.hidden, acts.calls, strict=True):
            yield self.forward_block(index, h, calls[index], block)

    @torch.no_grad()
    def run_block(self, index: int, acts: Activations) -> list[torch.Tensor]:
        """Outputs of block ``index`` (already on device) for every batch of ``acts``."""
        return list(self._outputs(index, acts))

    @torch.no_grad()
    def pass_block(self, index: int, acts: Activations) -> None:
        """Run block ``index`` over every batch and keep nothing (for the forward hooks that
        collect statistics)."""
        for _ in self._outputs(index, acts):
            pass

    @torch.no_grad()
    def advance(self, index: int, acts: Activations) -> None:
        """Replace ``acts``' hidden states by block ``index``'s outputs (on disk when they
        were)."""
        outputs = self._outputs(index, acts)
        acts.hidden = (acts.hidden.refilled(outputs) if isinstance(acts.hidden, DiskHidden)
                       else list(outputs))

    def sequential(self, acts: Activations, desc: str = "blocks") -> Iterator[int]:
        """Iterate over blocks in order; after the loop body, propagate ``acts`` through the block.

        The body may run extra passes over the block (to collect statistics) and change
        its weights (pruning); the hidden states given to the next block are the outputs
        of the block as the body left it -- the standard sequential protocol.
        """
        for index in progress_bar(range(self.num_blocks), desc=desc, enable=self.progress):
            with self.on_device(index):
                yield index
                self.advance(index, acts)


@contextlib.contextmanager
def collect_inputs(modules: dict[str, nn.Module], sinks: dict[str, Any]) -> Iterator[None]:
    """Feed the input of each module to ``sinks[name].add_batch(x)`` during forwards."""
    handles = []
    for name, module in modules.items():
        sink = sinks.get(name)
        if sink is None:
            continue

        def hook(_mod: nn.Module, inputs: tuple, sink: Any = sink) -> None:
            sink.add_batch(inputs[0].detach())

        handles.append(module.register_forward_pre_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()
