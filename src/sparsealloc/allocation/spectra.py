"""Per-block heavy-tail exponents of a model's weights, with an on-disk cache.

``block_alphas`` fits :func:`.alpha.hill_alpha` to the ESD of every linear
weight of every block and averages per block (the reference's
``mapping_type="block_wise"``: ``np.mean`` over the block's layers).

Cache key: sha256 over, for every matrix in order, its block/position, shape,
dtype and *all of its bytes* (a full hash: any change of any weight changes
the key; hashing runs at roughly 1 GB/s, small next to the SVDs), plus the
estimator settings and a format version.  The cache is one JSON file per key
in ``cache_path`` (a folder); ``None`` disables caching.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import UserError
from ..io import read_json, write_json
from .alpha import esd_eigenvalues, hill_alpha

CACHE_VERSION = 1


def weights_fingerprint(
    blocks_linears: Sequence[Sequence[Tensor]], extra: dict | None = None
) -> str:
    """sha256 (hex) of all weight bytes, shapes, dtypes and block structure, plus ``extra``."""
    h = hashlib.sha256()
    h.update(json.dumps({"version": CACHE_VERSION, **(extra or {})}, sort_keys=True).encode())
    for b, mats in enumerate(blocks_linears):
        for j, W in enumerate(mats):
            t = W.detach()
            h.update(f"|{b}.{j}:{tuple(t.shape)}:{t.dtype}|".encode())
            flat = t.contiguous().reshape(-1).cpu()
            if flat.numel():
                h.update(flat.view(torch.uint8).numpy())  # buffer, no copy
    return h.hexdigest()


def block_alphas(
    blocks_linears: Sequence[Sequence[Tensor]],
    cache_path: Path | str | None = None,
    xmin_method: str = "alpha_peak",
    bins: int = 100,
    window_mode: str = "reference",
    eig_dtype: torch.dtype = torch.float32,
    eig_method: str = "svd",
) -> tuple[list[float], list[list[dict[str, Any]]]]:
    """Mean alpha per block and the per-matrix fit details.

    Args:
        blocks_linears: for every decoder block, the weight matrices (2-D,
            ``out x in``) of its prunable linear layers.
        cache_path: folder for cached results, or ``None``.
        xmin_method, bins, window_mode: passed to :func:`.alpha.hill_alpha`.
        eig_dtype: SVD precision (float32 as the reference, or float64).
        eig_method: ``"svd"`` (reference) or ``"gram"`` (faster on CPU); see
            :func:`.alpha.esd_eigenvalues`.

    Returns:
        ``(alphas, details)``: ``alphas[l]`` is the mean over block ``l``'s
        matrices whose fit succeeded; ``details[l][j]`` is the dict from
        ``hill_alpha`` plus ``shape`` (a failed fit has ``alpha = nan`` and
        ``error``).
    """
    if not blocks_linears or any(len(m) == 0 for m in blocks_linears):
        raise UserError("no linear layers found in some decoder block; cannot compute alphas")
    settings = {"xmin_method": xmin_method, "bins": bins, "window_mode": window_mode,
                "eig_dtype": str(eig_dtype), "eig_method": eig_method}
    cache_file = None
    if cache_path is not None:
        key = weights_fingerprint(blocks_linears, settings)
        cache_file = Path(cache_path) / f"alphas-{key[:32]}.json"
        if cache_file.is_file():
            try:
                data = read_json(cache_file)
                if data.get("key") == key:
                    return [float(a) for a in data["alphas"]], data["details"]
            except (OSError, ValueError, KeyError):
                pass  # unreadable cache: recompute and overwrite

    alphas: list[float] = []
    details: list[list[dict[str, Any]]] = []
    for b, mats in enumerate(blocks_linears):
        rows: list[dict[str, Any]] = []
        for W in mats:
            try:
                fit = hill_alpha(esd_eigenvalues(W, eig_dtype, eig_method), xmin_method, bins,
                                 window_mode=window_mode)
            except UserError as err:
                fit = {"alpha": math.nan, "error": str(err)}
            fit["shape"] = list(W.shape)
            rows.append(fit)
        good = [r["alpha"] for r in rows if math.isfinite(r["alpha"])]
        if not good:
            raise UserError(f"no weight matrix of block {b} has a usable spectrum for alpha")
        alphas.append(sum(good) / len(good))
        details.append(rows)

    if cache_file is not None:
        write_json(cache_file, {"key": key, "settings": settings, "alphas": alphas,
                                "details": details})
    return alphas, details
