"""Perplexity as the pruning papers compute it.

Non-overlapping windows of ``seqlen`` tokens over the whole tokenised corpus; each window's
mean next-token NLL; perplexity = exp(mean over windows), identical to the reference
implementations' ``exp(sum(loss_i * seqlen) / (n * seqlen))``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..progress import progress_bar


@torch.no_grad()
def window_nlls(
    model: nn.Module,
    windows: torch.Tensor,
    device: str | torch.device = "cpu",
    batch_size: int = 1,
    progress: bool = True,
    desc: str = "perplexity",
) -> torch.Tensor:
    """Mean next-token NLL of every window (N,) -- float64."""
    device = torch.device(device)
    out = []
    for start in progress_bar(range(0, windows.shape[0], batch_size), desc=desc, enable=progress):
        batch = windows[start : start + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits
        loss = F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
            batch[:, 1:].reshape(-1),
            reduction="none",
        ).view(batch.shape[0], -1)
        out.append(loss.mean(dim=1).double().cpu())
        del logits, loss
    return torch.cat(out)


def perplexity(
    model: nn.Module,
    windows: torch.Tensor,
    device: str | torch.device = "cpu",
    batch_size: int = 1,
    progress: bool = True,
    desc: str = "perplexity",
) -> dict:
    """Perplexity over ``windows`` (N, seqlen) plus the numbers behind it."""
    return perplexity_record(window_nlls(model, windows, device, batch_size, progress, desc),
                             windows)


def perplexity_record(nll: torch.Tensor, windows: torch.Tensor) -> dict:
    """The perplexity record (exp of the mean window NLL, and the numbers behind it: each
    window's mean NLL, so that two models scored on the same windows compare paired)."""
    mean = float(nll.mean())
    return {
        "ppl": math.exp(mean) if mean < 700 else float("inf"),
        "mean_nll": mean,
        "windows": int(windows.shape[0]),
        "tokens": int(windows.numel()),
        "window_nll": [float(x) for x in nll.double().tolist()],
    }
