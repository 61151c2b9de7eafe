"""The allocation frontier: EvoPress-style evolutionary search over per-block sparsities.

``database`` (every block pruned at every level on dense inputs, bit-packed masks or
weights on disk), ``fitness`` (KL against the dense model on calibration tokens), ``run``
(the ``search`` allocator on a Session), ``report`` (search.json and the fitness curve).
The evolutionary loop itself is pure: :mod:`sparsealloc.allocation.search`.
"""

from .database import LevelDatabase, build_database, pack_mask, unpack_mask
from .fitness import KLFitness
from .run import SearchOutcome, search_allocation

__all__ = [
    "KLFitness",
    "LevelDatabase",
    "SearchOutcome",
    "build_database",
    "pack_mask",
    "search_allocation",
    "unpack_mask",
]
