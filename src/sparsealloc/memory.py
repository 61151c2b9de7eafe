"""Memory policy: when to stream the weights, and whether a run can fit at all.

The budget is the memory available now (``MemAvailable`` of ``/proc/meminfo``) or
``$SPARSEALLOC_MEMORY_LIMIT`` (bytes, or a number with KiB / MiB / GiB), whichever is given.
Streaming is chosen when the weights exceed :data:`STREAM_SHARE` of it. A streamed run still
holds the calibration activations (inputs and outputs of the current block), one block in its
storage and compute dtype, and the largest weight outside the blocks (embeddings / lm_head);
when that does not fit, the run stops before loading anything, with one line.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError

STREAM_SHARE = 0.5
LIMIT_ENV = "SPARSEALLOC_MEMORY_LIMIT"
_UNITS = {"": 1, "b": 1, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
          "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}


def parse_bytes(text: str) -> int:
    m = re.fullmatch(r"\s*([0-9.]+)\s*([a-zA-Z]*)\s*", text)
    if m is None or m.group(2).lower() not in _UNITS:
        raise UserError(f"${LIMIT_ENV}={text!r} is not a size: use e.g. 8GiB, 512MiB or bytes")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def available_bytes() -> int:
    """Memory this run may use: $SPARSEALLOC_MEMORY_LIMIT, else MemAvailable."""
    limit = os.environ.get(LIMIT_ENV)
    if limit:
        return parse_bytes(limit)
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 2**62  # unknown: never stream automatically, never refuse


def gib(n: float) -> str:
    """A byte count in GiB, or MiB / KiB when smaller."""
    if n >= 2**30:
        return f"{n / 2**30:.1f} GiB"
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def choose_stream(mode: str, weights_bytes: int, available: int) -> bool:
    """``--stream`` (on), ``--no-stream`` (off), or auto: stream when the weights exceed
    :data:`STREAM_SHARE` of the available memory."""
    if mode in ("on", "off"):
        return mode == "on"
    return weights_bytes > STREAM_SHARE * available


@dataclass
class StreamedNeed:
    """What a streamed run holds at once (bytes)."""

    activations: int
    block: int
    outside: int

    @property
    def total(self) -> int:
        return self.activations + self.block + self.outside


def streamed_need(nsamples: int, seqlen: int, hidden: int, compute_itemsize: int,
                  block_bytes: int, compute_block_bytes: int, outside_bytes: int) -> StreamedNeed:
    """Calibration hidden states twice (a block's inputs and outputs) of ``nsamples`` sequences
    (with ``--offload-activations disk``: of one batch), one block in storage and compute
    dtype, the largest weights outside the blocks."""
    acts = 2 * nsamples * seqlen * hidden * compute_itemsize
    return StreamedNeed(acts, block_bytes + compute_block_bytes, outside_bytes)


def check_fits(need: StreamedNeed, available: int, sequences: int, option: str = "--nsamples",
               offloaded: StreamedNeed | None = None) -> None:
    """Refuse, with one line, a run whose streamed working set exceeds the available memory.

    ``sequences``: the sequences whose activations ``need`` holds, set by ``option``
    (``--nsamples``; the calibration ``batch_size``, one sequence from the CLI, when the
    activations are offloaded to disk).
    ``offloaded``: the same run's need with ``--offload-activations disk`` (None when the run
    already offloads); named in the line when it would fit.
    """
    if need.total <= available:
        return
    per_sample = need.activations / max(sequences, 1)
    room = available - need.block - need.outside
    fit = int(room // per_sample) if per_sample > 0 and room > 0 else 0
    options = []
    if fit >= 1:
        options.append(f"lower {option} to {fit} or less, or --seqlen")
    if offloaded is not None and offloaded.total <= available:
        options.append(f"pass --offload-activations disk (then about {gib(offloaded.total)})")
    hint = ("; or ".join(options) if options
            else "one block and the embeddings alone exceed it: use a machine with more memory")
    raise UserError(
        f"this run needs about {gib(need.total)} even with streamed weights "
        f"(activations {gib(need.activations)}, one block {gib(need.block)}, embeddings / "
        f"lm_head {gib(need.outside)}) but {gib(available)} is available; {hint}"
    )
