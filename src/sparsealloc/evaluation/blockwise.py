"""Perplexity computed block by block with the shared runner (models that do not fit).

The windows are embedded by the runner's capture, walked through every block (one block's
weights at a time when streaming), then the final norm and lm_head run in chunks over the
vocabulary: a running log-sum-exp, so the (tokens x vocab) logits are never held at once.
The numbers are those of :func:`.perplexity.window_nlls` on the whole model: identical when a
batch's logits fit in memory (the same float32 cross-entropy), else a float64 log-sum-exp over
vocabulary chunks (within float32 rounding of it).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..runner import BlockRunner

GROUP_BYTES = 1 << 30  # hidden states of one group of windows (inputs + outputs), at most
LOGITS_BYTES = 1 << 30  # float32 logits of one batch held at once, at most


@contextlib.contextmanager
def on(modules: list[nn.Module], device: torch.device, dtype: torch.dtype | None) -> Iterator[None]:
    """Move ``modules`` to ``device`` (and ``dtype``) for the context, then back."""
    homes = []
    for m in modules:
        p = next(m.parameters())
        homes.append((p.device, p.dtype))
        m.to(device, dtype or p.dtype)
    try:
        yield
    finally:
        for m, (dev, dt) in zip(modules, homes, strict=True):
            m.to(dev, dt)


def head_nlls(hidden: Tensor, ids: Tensor, final_norm: nn.Module | None, lm_head: nn.Module,
              softcap: float | None, logits_bytes: int = LOGITS_BYTES) -> Tensor:
    """Mean next-token NLL of every window (float64) from the last block's hidden states.

    When the (tokens x vocab) float32 logits fit in ``logits_bytes``, the whole-model path's
    own computation (float32 cross-entropy) runs, so the numbers are identical to it. Else the
    vocabulary is walked in chunks with a float64 log-sum-exp (more accurate than float32
    cross-entropy, which differs from it by ~1e-6 relative on a 50k vocabulary).
    """
    x = final_norm(hidden) if final_norm is not None else hidden
    target = ids[:, 1:].to(x.device)
    weight = lm_head.weight
    vocab, tokens = weight.shape[0], x.shape[0] * x.shape[1]
    if tokens * vocab * 4 <= logits_bytes:
        logits = lm_head(x)
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, vocab).float(), target.reshape(-1),
                               reduction="none").view(target.shape)
        return loss.mean(dim=1).double().cpu()
    x = x[:, :-1]
    bias = getattr(lm_head, "bias", None)
    chunk = max(1, logits_bytes // (tokens * 8))
    lse: Tensor | None = None
    picked = torch.zeros(target.shape, dtype=torch.float64, device=x.device)
    for start in range(0, vocab, chunk):
        stop = min(start + chunk, vocab)
        logits = F.linear(x, weight[start:stop], None if bias is None else bias[start:stop])
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        logits = logits.double()
        part = torch.logsumexp(logits, dim=-1)
        lse = part if lse is None else torch.logaddexp(lse, part)
        inside = (target >= start) & (target < stop)
        local = (target - start).clamp(0, stop - start - 1)
        picked = torch.where(inside, logits.gather(-1, local.unsqueeze(-1)).squeeze(-1), picked)
    assert lse is not None
    return (lse - picked).mean(dim=1).cpu()


@torch.no_grad()
def blockwise_window_nlls(
    runner: BlockRunner, windows: Tensor, final_norm: nn.Module | None, lm_head: nn.Module,
    softcap: float | None = None, batch_size: int = 1,
    outside: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    hidden_size: int | None = None, group_bytes: int = GROUP_BYTES,
    logits_bytes: int = LOGITS_BYTES,
) -> Tensor:
    """Mean next-token NLL of every window (N,), walking the blocks with ``runner``.

    ``outside()`` makes the weights outside the blocks real (streaming) while the windows are
    embedded and while the head runs. Windows are processed in groups whose hidden states
    (inputs and outputs of a block) stay under ``group_bytes``.
    """
    n, seqlen = windows.shape
    itemsize = (runner.compute_dtype or torch.float32).itemsize
    per_window = 2 * seqlen * (hidden_size or 1) * itemsize
    group = max(batch_size, min(n, group_bytes // max(per_window, 1)))
    out = []
    for start in range(0, n, group):
        ids = windows[start : start + group]
        with outside():
            acts = runner.capture(ids, batch_size)
        for _ in runner.sequential(acts, desc="perplexity (blocks)"):
            pass
        with outside(), on([m for m in (final_norm, lm_head) if m is not None], runner.device,
                           runner.compute_dtype):
            for b, h in enumerate(acts.hidden):
                batch = ids[b * batch_size : (b + 1) * batch_size]
                out.append(head_nlls(h.to(runner.device), batch, final_norm, lm_head, softcap,
                                     logits_bytes))
    return torch.cat(out)
