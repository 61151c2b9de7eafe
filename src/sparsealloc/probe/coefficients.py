"""Absorption coefficients r_l as a library function, computed on calibration data and cached.

r_l = E[R_final / R_l]: drift where the perturbation ends (see ``final``) over drift where it
was injected. r_l > 1: block l's perturbations are amplified by the rest of the network;
r_l < 1: absorbed. ``run_probe`` runs the probe on a session's dense model and calibration
data; ``absorption_coefficients`` caches r_l per model, configuration and protocol.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

from .engine import Probe, ProbeConfig

# ``session`` below is a :class:`sparsealloc.session.Session` (which calls these through
# ``Session.absorption``; the probe layer sits below the session and does not import it).


def _logit_softcap(model) -> float | None:
    cfg = getattr(model, "config", None)
    cap = getattr(cfg, "final_logit_softcapping", None)
    return float(cap) if cap else None


def run_probe(session: Any, config: ProbeConfig) -> dict:
    """Run the probe on the session's dense model and calibration data."""
    session.restore_dense()
    acts = session.capture()
    with session.head() as lm_head:  # streaming: lm_head and final norm read for the probe
        probe = Probe(session.runner, config, lm_head=lm_head,
                      logit_softcap=_logit_softcap(session.model), progress=session.progress)
        with session.timed("probe"):
            result = probe.run(acts)
    p = session.protocol
    result["protocol"] = {"seqlen": p.seqlen, "calib": p.calib, "seed": p.seed,
                          "sequences": min(config.nsamples, p.nsamples),
                          "data_sources": session.data_sources}
    return result


def _cache_key(session: Any, config: ProbeConfig) -> str:
    p = session.protocol
    blob = json.dumps({"model": session.model_id, "weights": session.weights_fingerprint,
                       "cfg": config.record(), "seqlen": p.seqlen,
                       "calib": p.calib, "seed": p.seed, "nsamples": p.nsamples,
                       "batch": p.batch_size, "bos_per_window": p.bos_per_window},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def absorption_coefficients(session: Any, eta: float = 1e-2, final: str = "last",
                            mode: str = "noise", positions: str = "all", nsamples: int = 16,
                            draws: int = 1, scale: str = "state", pruner: str = "wanda",
                            sparsity: float = 0.7, pattern: str = "unstructured",
                            use_cache: bool = True) -> list[float]:
    """r_l per block for one eta (or for the pruning perturbation when ``mode="prune"``).

    Cached on disk per model, configuration and protocol (``$SPARSEALLOC_CACHE/absorption``)
    and in the session, so repeated runs and every row of ``compare`` reuse it.
    """
    # every final (last, norm, kl, abs) comes from one probe, so switching --absorb-final is free
    config = ProbeConfig(etas=[eta], mode=mode, draws=draws, nsamples=nsamples,
                         positions=positions, scale=scale, kl=True,
                         pruner=pruner, sparsity=sparsity, pattern=pattern)
    result = session.disk_cached("absorption", _cache_key(session, config),
                                 lambda: run_probe(session, config),
                                 valid=lambda r: final in r["absorption"],  # older probes lack it
                                 use_cache=use_cache)
    if final not in result["absorption"]:
        raise KeyError(f"final '{final}' not computed by this probe")
    values = [float(x) for x in result["absorption"][final][config.keys[0]]]
    if final == "damage":
        return relative_damage(values)
    return values


def relative_damage(damage: list[float]) -> list[float]:
    """Each block's damage over their geometric mean: a scale-free coefficient centred on 1.

    The ratios (``last``, ``norm``, ``kl``, ``abs``) are centred on 1 by construction (1: the
    rest of the network neither amplifies nor absorbs), which the correction's clip of
    ``|ln r|`` relies on. Raw damage (sqrt KL) has a scale of its own: at 60-70% sparsity it
    is ~0.1-0.8, so ``ln`` of it sits below -ln 3 for most blocks and the clip would flatten
    them all to the same value. Dividing by the geometric mean keeps the ordering and makes
    the clip mean "3x the typical block's damage".
    """
    logs = [math.log(max(x, 1e-30)) for x in damage]
    centre = sum(logs) / len(logs)
    return [math.exp(v - centre) for v in logs]
