"""An explicit per-block sparsity list from a JSON file (the user's own allocation).

Accepted content: a JSON list of numbers, ``[0.6, 0.65, ...]``, or an object
``{"block_sparsity": [...]}`` (what ``sparsealloc allocate`` writes).  One
value per decoder block, each in [0, 1).  The budget is *not* enforced -- an
explicit list is the user's choice -- but its mean is logged (and a differing
``target`` is warned about) so the run records what was actually used.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from ..errors import UserError
from .budget import check_weights, weighted_mean
from .registry import AllocationContext, Allocator, Base, NoOptions, register

log = logging.getLogger(__name__)

KEY = "block_sparsity"


def file_allocation(
    path: str | Path,
    num_blocks: int,
    target: float | None = None,
    weights: Tensor | Sequence[float] | None = None,
) -> Tensor:
    """Read and validate a per-block sparsity list; return it as a 1-D float64 tensor.

    Raises:
        UserError: missing/unreadable file, bad JSON, not a list of numbers,
            wrong length, or a value outside [0, 1) -- one line saying what
            and how to fix it.
    """
    p = Path(path).expanduser()
    hint = f'write a JSON list of {num_blocks} numbers in [0, 1), e.g. [0.7, 0.7, ...]'
    if not p.is_file():
        raise UserError(f"sparsity file {p} not found; {hint}")
    try:
        data = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"cannot read sparsity file {p} ({err}); {hint}") from None
    except json.JSONDecodeError as err:
        raise UserError(f"sparsity file {p} is not valid JSON ({err.msg} at line {err.lineno}); "
                        f"{hint}") from None
    if isinstance(data, dict):
        if KEY not in data:
            raise UserError(f"sparsity file {p} is an object without a {KEY!r} list; {hint}")
        data = data[KEY]
    if not isinstance(data, list):
        raise UserError(f"sparsity file {p} holds a {type(data).__name__}, not a list; {hint}")
    bad = [v for v in data if isinstance(v, bool) or not isinstance(v, int | float)]
    if bad:
        raise UserError(f"sparsity file {p} has non-numeric entries (e.g. {bad[0]!r}); {hint}")
    if len(data) != num_blocks:
        raise UserError(f"sparsity file {p} has {len(data)} values but the model has "
                        f"{num_blocks} decoder blocks; {hint}")
    out_of_range = [(i, v) for i, v in enumerate(data) if not (math.isfinite(v) and 0 <= v < 1)]
    if out_of_range:
        i, v = out_of_range[0]
        raise UserError(f"sparsity file {p}: block {i} has {v}, outside [0, 1); "
                        f"use fractions, e.g. 0.7 for 70%")
    s = torch.tensor([float(v) for v in data], dtype=torch.float64)
    w = check_weights(weights, num_blocks)
    mean = weighted_mean(s, w)
    kind = "parameter-weighted mean" if w is not None else "mean"
    log.info("sparsity file %s: %d blocks, %s %.6f (budget not enforced)",
             p, num_blocks, kind, mean)
    if target is not None and abs(mean - float(target)) > 1e-9:
        log.warning("sparsity file %s: %s %.6f differs from the target %.6f; using the file as is",
                    p, kind, mean, float(target))
    return s


@register
class FileList(Allocator):
    """``file:PATH``: your own per-block list (JSON), used as written."""

    name = "file"
    arg = "required"
    arg_help = "PATH"

    def check_arg(self, arg: str | None) -> None:
        if not arg:
            raise UserError("allocation 'file:' lacks a path; write file:PATH, e.g. "
                            "file:sparsity.json")

    def allocate(self, ctx: AllocationContext, target: float, opts: NoOptions,
                 arg: str | None) -> Base:
        return Base(file_allocation(arg, ctx.num_blocks).tolist(), record={"path": str(arg)})
