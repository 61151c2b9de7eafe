"""The perturbation probe: drift and realignment of perturbed hidden states across depth.

For every injection block l, a perturbed copy of the residual stream h_l is propagated
through blocks l+1..L-1 beside the clean stream, and at every k >= l we record the
relative L2 drift R[l][k] = ||h'_k - h_k|| / ||h_k|| and cos(h'_k, h_k), per token,
averaged over tokens, then over sequences and draws (spread: std over sequences).

Efficiency: the clean pass runs once; at block k every live perturbed stream (all
injection blocks l < k, all etas, all draws) goes through block k in one batched
forward, so no block before l is ever re-run for an injection at l. Cost in block
forwards (noise mode): N * (L + E * D * L (L - 1) / 2) for N sequences, E etas, D draws (a
stream injected at l goes through the L - 1 - l blocks after it).

Modes:
- ``noise``: h'_l = h_l + eta * s * g / ||g||, g ~ N(0, I) per token, with s = ||h_l||
  (``scale="state"``, the seed paper) or s = ||h_l - h_{l-1}|| (``scale="update"``: the
  size of what block l wrote, which is what pruning block l perturbs).
- ``prune``: h'_l = output of block l pruned alone (any pruner, sparsity, pattern) on the
  clean input; every other block dense.
``positions="skip-first"`` leaves position 0 (often a massive-activation sink) unperturbed.

Finals: ``last`` (relative drift at the last block's output), ``norm`` (after the final norm,
what the LM head reads) and, with ``kl=True``, ``kl``: KL(p_clean || p_perturbed) of the next-
token distribution on every ``kl_stride``-th token; its coefficient is sqrt(KL) / R_l.
``abs``: the *absolute* gain ||h'_L - h_L|| / ||h'_l - h_l|| (token means). Relative drift
falls with depth whenever the residual stream grows, even if the rest of the network passes
the error on unchanged; ``abs`` separates that dilution from real absorption (gain < 1: the
later blocks shrink or cancel the error) and amplification (gain > 1).
``damage`` (with ``kl=True``): sqrt(KL) itself, not divided by the injected drift: how much the
output moves when block l is perturbed, local error and propagation together. It is not the
seed's coefficient; it is the reference point that tells whether the ratio adds anything.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor

from ..blockwise import prune_block
from ..errors import UserError
from ..models.arch import weight_out_in
from ..progress import progress_bar
from ..pruners import get_pruner
from ..pruners.masks import parse_pattern
from ..runner import Activations, BlockCall, BlockRunner

FINALS = ("last", "norm", "kl")  # measured at the end; "abs" comes from the drift matrix


@dataclass
class ProbeConfig:
    """What to probe. See the module docstring for the meaning of each field."""

    etas: list[float] = field(default_factory=lambda: [1e-4, 1e-3, 1e-2, 5e-2])
    mode: str = "noise"
    draws: int = 1
    nsamples: int = 8
    positions: str = "all"
    scale: str = "state"
    kl: bool = False
    seed: int = 0
    pruner: str = "wanda"
    sparsity: float = 0.7
    pattern: str = "unstructured"
    max_batch: int = 32
    kl_stride: int = 8

    def __post_init__(self) -> None:
        if self.mode not in ("noise", "prune"):
            raise UserError(f"--mode must be noise or prune (got {self.mode!r})")
        if self.positions not in ("all", "skip-first"):
            raise UserError(f"--positions must be all or skip-first (got {self.positions!r})")
        if self.scale not in ("state", "update"):
            raise UserError(f"--scale must be state or update (got {self.scale!r})")
        if self.mode == "noise":
            if not self.etas or any(not (e > 0 and math.isfinite(e)) for e in self.etas):
                raise UserError(f"--eta needs positive numbers, e.g. 1e-4,1e-2 (got {self.etas})")
        if self.draws < 1 or self.nsamples < 1:
            raise UserError("--draws and --nsamples must be at least 1")

    @property
    def keys(self) -> list[str]:
        if self.mode == "prune":
            return [f"prune:{self.pruner}@{self.sparsity:g}:{self.pattern}"]
        return [f"{e:g}" for e in self.etas]

    @property
    def draws_per_key(self) -> int:
        return self.draws if self.mode == "noise" else 1

    def record(self) -> dict:
        return asdict(self)


@dataclass
class _Stream:
    key: int
    origin: int
    draw: int
    states: list[Tensor]  # per batch


class _Stats:
    """Per (key, origin l, block k, sequence) accumulators of token-mean quantities."""

    NAMES = ("drift", "drift_skip_first", "drift_first_token", "cosine", "drift_abs")

    def __init__(self, keys: int, blocks: int, seqs: int, draws: int) -> None:
        shape = (keys, blocks, blocks, seqs)
        self.sums = {n: torch.zeros(shape, dtype=torch.float64) for n in self.NAMES}
        self.final = {f: torch.zeros((keys, blocks, seqs), dtype=torch.float64) for f in FINALS}
        self.draws = draws

    def add(self, name: str, key: int, l: int, k: int, seq0: int, values: Tensor) -> None:
        self.sums[name][key, l, k, seq0 : seq0 + values.numel()] += values.double() / self.draws

    def add_final(self, name: str, key: int, l: int, seq0: int, values: Tensor) -> None:
        self.final[name][key, l, seq0 : seq0 + values.numel()] += values.double() / self.draws


def _relative_drift(pert: Tensor, clean: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-token relative L2 drift, cosine and absolute L2 drift, shapes (b, T)."""
    diff = torch.linalg.vector_norm(pert - clean, dim=-1)
    norm = torch.linalg.vector_norm(clean, dim=-1).clamp_min(1e-12)
    cos = torch.nn.functional.cosine_similarity(pert, clean, dim=-1, eps=1e-12)
    return diff / norm, cos, diff


def _expand_call(call: BlockCall, batch: int, repeats: int) -> BlockCall:
    """A call for ``repeats`` stacked copies of a batch of size ``batch``."""

    def rep(obj):
        if isinstance(obj, Tensor) and obj.dim() > 0 and obj.shape[0] == batch and batch > 1:
            return obj.repeat(repeats, *([1] * (obj.dim() - 1)))
        if isinstance(obj, tuple):
            return tuple(rep(o) for o in obj)
        if isinstance(obj, list):
            return [rep(o) for o in obj]
        if isinstance(obj, dict):
            return {k: rep(v) for k, v in obj.items()}
        return obj

    if repeats == 1:
        return call
    return BlockCall(args=rep(call.args), kwargs=rep(call.kwargs),
                     hidden_in_kwargs=call.hidden_in_kwargs)


def _noise(clean: Tensor, prev: Tensor, eta: float, scale: str, skip_first: bool,
           gen: torch.Generator) -> Tensor:
    g = torch.randn(clean.shape, generator=gen, dtype=torch.float32).to(clean.dtype)
    g = g / torch.linalg.vector_norm(g, dim=-1, keepdim=True).clamp_min(1e-12)
    ref = clean if scale == "state" else clean - prev
    size = eta * torch.linalg.vector_norm(ref, dim=-1, keepdim=True)
    pert = clean + size * g
    if skip_first:
        pert[:, 0] = clean[:, 0]
    return pert


class Probe:
    """Runs one probe over a runner's captured calibration activations."""

    def __init__(self, runner: BlockRunner, config: ProbeConfig, lm_head=None,
                 logit_softcap: float | None = None, progress: bool = True) -> None:
        self.runner = runner
        self.cfg = config
        self.lm_head = lm_head
        self.softcap = logit_softcap
        self.progress = progress

    # ------------------------------------------------------------------ helpers
    def _forward_streams(self, k: int, streams: list[_Stream], calls: list[BlockCall]) -> None:
        if not streams:
            return
        step = max(1, self.cfg.max_batch)
        for b, call in enumerate(calls):
            batch = streams[0].states[b].shape[0]
            for start in range(0, len(streams), step):
                group = streams[start : start + step]
                x = torch.cat([s.states[b] for s in group])
                y = self.runner.forward_block(k, x, _expand_call(call, batch, len(group)))
                for s, out in zip(group, y.split(batch), strict=True):
                    s.states[b] = out

    def _pruned_outputs(self, k: int, prev: list[Tensor], calls: list[BlockCall]) -> list[Tensor]:
        linears = self.runner.arch.linears(k)
        dense = {n: weight_out_in(m).clone() for n, m in linears.items()}
        acts = Activations(hidden=prev, calls=[[None] * k + [c] for c in calls])
        try:
            prune_block(self.runner, k, acts, get_pruner(self.cfg.pruner), self.cfg.sparsity,
                        parse_pattern(self.cfg.pattern))
            return self.runner.run_block(k, acts)
        finally:
            with torch.no_grad():
                for n, m in linears.items():
                    weight_out_in(m).copy_(dense[n])

    def _logprobs(self, h: Tensor) -> Tensor:
        logits = self.lm_head(h).double()  # float64: tiny KLs must not round below zero
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return torch.log_softmax(logits, dim=-1)

    # ------------------------------------------------------------------ main loop
    @torch.no_grad()
    def run(self, acts: Activations) -> dict:
        cfg, runner = self.cfg, self.runner
        nb = min(len(acts.hidden), cfg.nsamples)
        hidden = [h for h in acts.hidden[:nb]]
        calls = [c for c in acts.calls[:nb]]
        seq_offsets = [0]
        for h in hidden:
            seq_offsets.append(seq_offsets[-1] + h.shape[0])
        nseq, L, K, D = seq_offsets[-1], runner.num_blocks, len(cfg.keys), cfg.draws_per_key
        stats = _Stats(K, L, nseq, D)
        norm_first = torch.zeros(L, dtype=torch.float64)
        norm_others = torch.zeros(L, dtype=torch.float64)
        streams: list[_Stream] = []
        start_forwards, t0 = runner.block_forwards, time.perf_counter()
        final_norm = runner.arch.final_norm
        tokens = slice(1, None) if cfg.positions == "skip-first" else slice(None)  # absolute gain
        prev = hidden
        for k in progress_bar(range(L), desc=f"probe ({cfg.mode})", enable=self.progress):
            with runner.on_device(k) as block:
                clean = [runner.forward_block(k, h, c[k], block)
                         for h, c in zip(prev, calls, strict=True)]
                self._forward_streams(k, streams, [c[k] for c in calls])
                new = self._inject(k, clean, prev, calls)
            streams.extend(new)
            for b, h in enumerate(clean):
                n = torch.linalg.vector_norm(h, dim=-1)
                norm_first[k] += float(n[:, 0].sum()) / nseq
                norm_others[k] += float(n[:, 1:].median(dim=1).values.sum()) / nseq
                for s in streams:
                    drift, cos, absolute = _relative_drift(s.states[b], h)
                    o = seq_offsets[b]
                    stats.add("drift", s.key, s.origin, k, o, drift.mean(1))
                    stats.add("drift_skip_first", s.key, s.origin, k, o, drift[:, 1:].mean(1))
                    stats.add("drift_first_token", s.key, s.origin, k, o, drift[:, 0])
                    stats.add("cosine", s.key, s.origin, k, o, cos.mean(1))
                    stats.add("drift_abs", s.key, s.origin, k, o, absolute[:, tokens].mean(1))
                    if k == L - 1:
                        self._finals(stats, s, b, o, h, final_norm)
            prev = clean
        seconds = time.perf_counter() - t0
        forwards = runner.block_forwards - start_forwards
        T = hidden[0].shape[1]
        return self._summarise(stats, norm_first, norm_others, forwards, T, seconds)

    def _inject(self, k: int, clean: list[Tensor], prev: list[Tensor],
                calls: list[list[BlockCall]]) -> list[_Stream]:
        cfg = self.cfg
        if cfg.mode == "prune":
            outs = self._pruned_outputs(k, prev, [c[k] for c in calls])
            if cfg.positions == "skip-first":
                for o, c in zip(outs, clean, strict=True):
                    o[:, 0] = c[:, 0]
            return [_Stream(0, k, 0, outs)]
        new = []
        for ki, eta in enumerate(cfg.etas):
            for d in range(cfg.draws):
                states = []
                for b, (c, p) in enumerate(zip(clean, prev, strict=True)):
                    seed = ((cfg.seed * 1_000_003 + k) * 1009 + ki) * 101 + d
                    gen = torch.Generator().manual_seed(seed * 7919 + b)
                    states.append(_noise(c, p, eta, cfg.scale, cfg.positions == "skip-first",
                                         gen))
                new.append(_Stream(ki, k, d, states))
        return new

    def _finals(self, stats: _Stats, s: _Stream, b: int, o: int, clean: Tensor,
                final_norm) -> None:
        tokens = slice(1, None) if self.cfg.positions == "skip-first" else slice(None)
        drift, _, _ = _relative_drift(s.states[b][:, tokens], clean[:, tokens])
        stats.add_final("last", s.key, s.origin, o, drift.mean(1))
        if final_norm is not None:
            hn, pn = final_norm(clean[:, tokens]), final_norm(s.states[b][:, tokens])
            d2, _, _ = _relative_drift(pn, hn)
            stats.add_final("norm", s.key, s.origin, o, d2.mean(1))
            if self.cfg.kl and self.lm_head is not None:
                step = max(1, self.cfg.kl_stride)  # the LM head is costly: every step-th token
                lp, lq = self._logprobs(hn[:, ::step]), self._logprobs(pn[:, ::step])
                kl = (lp.exp() * (lp - lq)).sum(-1).clamp_min(0.0)
                stats.add_final("kl", s.key, s.origin, o, kl.mean(1))

    def _summarise(self, stats: _Stats, norm_first: Tensor, norm_others: Tensor,
                   forwards: int, T: int, seconds: float) -> dict:
        cfg = self.cfg
        L = stats.sums["drift"].shape[1]
        lower = torch.tril(torch.ones(L, L, dtype=torch.bool), diagonal=-1)  # k < l
        out: dict = {"keys": cfg.keys, "num_blocks": L}
        for name, arr in stats.sums.items():
            mean = arr.mean(-1)
            mean[:, lower] = float("nan")
            out[name] = {key: mean[i].tolist() for i, key in enumerate(cfg.keys)}
        std = stats.sums["drift"].std(-1) if stats.sums["drift"].shape[-1] > 1 else \
            torch.zeros_like(stats.sums["drift"][..., 0])
        std[:, lower] = float("nan")
        out["spread"] = {key: std[i].tolist() for i, key in enumerate(cfg.keys)}
        diag = torch.arange(L)
        inj_name = "drift_skip_first" if cfg.positions == "skip-first" else "drift"
        injected = stats.sums[inj_name][:, diag, diag, :]  # (K, L, seqs)
        out["injected_drift"] = {key: injected[i].mean(-1).tolist()
                                 for i, key in enumerate(cfg.keys)}
        absorption, absorption_spread = {}, {}
        for final, arr in stats.final.items():
            if final == "kl" and not cfg.kl:
                continue
            if final == "norm" and not arr.any():
                continue
            num = arr.sqrt() if final == "kl" else arr
            ratio = num / injected.clamp_min(1e-30)
            absorption[final] = {key: ratio[i].mean(-1).tolist() for i, key in enumerate(cfg.keys)}
            absorption_spread[final] = {key: (ratio[i].std(-1) if ratio.shape[-1] > 1 else
                                              torch.zeros(L)).tolist()
                                        for i, key in enumerate(cfg.keys)}
            if final == "kl":
                out["final_kl"] = {key: arr[i].mean(-1).tolist() for i, key in enumerate(cfg.keys)}
                damage = arr.sqrt()  # not divided by the injected drift: total output damage
                absorption["damage"] = {key: damage[i].mean(-1).tolist()
                                        for i, key in enumerate(cfg.keys)}
                absorption_spread["damage"] = {key: (damage[i].std(-1) if damage.shape[-1] > 1
                                                     else torch.zeros(L)).tolist()
                                               for i, key in enumerate(cfg.keys)}
        gain = (stats.sums["drift_abs"][:, :, L - 1, :]
                / stats.sums["drift_abs"][:, diag, diag, :].clamp_min(1e-30))  # (K, L, seqs)
        absorption["abs"] = {key: gain[i].mean(-1).tolist() for i, key in enumerate(cfg.keys)}
        absorption_spread["abs"] = {key: (gain[i].std(-1) if gain.shape[-1] > 1 else
                                          torch.zeros(L)).tolist()
                                    for i, key in enumerate(cfg.keys)}
        out["absorption"] = absorption
        out["absorption_spread"] = absorption_spread
        out["hidden_norm_first_token"] = norm_first.tolist()
        out["hidden_norm_others_median"] = norm_others.tolist()
        dense_pass = 128 * 2048 * L
        out["cost"] = {
            "block_forwards_sequences": forwards,
            "token_block_forwards": forwards * T,
            "seconds": seconds,
            "ratio_to_default_calibration_pass": forwards * T / dense_pass,
            "default_calibration_pass": "128 x 2048 tokens through every block once",
        }
        out["config"] = cfg.record()
        return out
