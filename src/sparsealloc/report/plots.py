"""Matplotlib figures for allocations, probes and comparisons (written atomically as PNG)."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ..io import atomic_write  # noqa: E402


def _save(fig, path: str | Path) -> Path:
    out = atomic_write(path, lambda p: fig.savefig(p, dpi=110, bbox_inches="tight"))
    plt.close(fig)
    return out


def plot_allocations(allocs: dict[str, list[float]], path: str | Path, title: str = "") -> Path:
    """Sparsity per block, one line per allocation."""
    fig, ax = plt.subplots(figsize=(8, 4))
    for name, values in allocs.items():
        ax.plot(range(len(values)), values, marker="o", ms=3, label=name)
    ax.set_xlabel("block")
    ax.set_ylabel("sparsity")
    ax.set_title(title or "sparsity per block")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def _mat(rows: list[list[float | None]]) -> np.ndarray:
    return np.array([[np.nan if v is None else v for v in row] for row in rows], dtype=float)


def plot_probe(result: dict, folder: str | Path, model: str = "") -> list[Path]:
    """The four probe figures: drift curves, drift heatmap, r_l per block, r_l versus eta."""
    folder = Path(folder)
    keys = result["keys"]
    L = result["num_blocks"]
    outs = []
    key = keys[len(keys) // 2] if len(keys) > 2 else keys[-1]
    drift = _mat(result["drift"][key])
    # 1. drift vs depth for each injection block
    fig, ax = plt.subplots(figsize=(8, 4.5))
    cmap = plt.get_cmap("viridis")
    for l in range(L):
        ax.plot(range(l, L), drift[l, l:], color=cmap(l / max(L - 1, 1)), lw=1)
    ax.set_yscale("log")
    ax.set_xlabel("block k")
    ax.set_ylabel("relative drift R[l][k]")
    ax.set_title(f"{model} drift after injection at block l (colour), {key}")
    sm = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(0, L - 1))
    fig.colorbar(sm, ax=ax, label="injection block l")
    outs.append(_save(fig, folder / "drift_curves.png"))
    # 2. heatmap
    fig, ax = plt.subplots(figsize=(6, 5))
    with np.errstate(divide="ignore", invalid="ignore"):
        im = ax.imshow(np.log10(drift), origin="lower", cmap="magma", aspect="auto")
    ax.set_xlabel("block k")
    ax.set_ylabel("injection block l")
    ax.set_title(f"{model} log10 drift, {key}")
    fig.colorbar(im, ax=ax)
    outs.append(_save(fig, folder / "drift_heatmap.png"))
    # 3. r_l vs block for each eta
    fig, ax = plt.subplots(figsize=(8, 4))
    for final, by_key in result["absorption"].items():
        style = {"last": "-", "norm": "--", "kl": ":"}.get(final, "-")
        for k in keys:
            ax.plot(range(L), by_key[k], style, marker="o", ms=3, label=f"{k} ({final})")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_yscale("log")
    ax.set_xlabel("block l")
    ax.set_ylabel("absorption coefficient r_l")
    ax.set_title(f"{model} r_l > 1 amplifies, < 1 absorbs")
    ax.legend(fontsize=7, ncol=2)
    outs.append(_save(fig, folder / "absorption.png"))
    # 4. r_l vs eta for a few blocks
    etas = [float(k) for k in keys if _is_number(k)]
    if len(etas) > 1:
        fig, ax = plt.subplots(figsize=(7, 4))
        last = result["absorption"]["last"]
        for l in sorted({0, 1, L // 4, L // 2, (3 * L) // 4, L - 2}):
            if 0 <= l < L:
                ax.plot(etas, [last[k][l] for k in keys if _is_number(k)], marker="o",
                        label=f"block {l}")
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("eta (relative perturbation)")
        ax.set_ylabel("r_l")
        ax.set_title(f"{model} amplification-to-absorption transition")
        ax.legend(fontsize=8)
        outs.append(_save(fig, folder / "absorption_vs_eta.png"))
    return outs


def _is_number(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def plot_compare(rows: list[dict], path: str | Path, title: str = "") -> Path:
    """Perplexity bars (log scale; zero-shot mean when no perplexity was evaluated) and the
    allocations per block, side by side."""
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(13, 4.5))
    labels = [r["label"] for r in rows]
    ppl = np.array([r.get("ppl_main") or np.nan for r in rows], dtype=float)
    if np.isfinite(ppl).any():
        values, name, fmt = ppl, "perplexity", "{:.1f}"
        a1.set_yscale("log")
    else:
        values = np.array([r.get("zeroshot_mean", np.nan) for r in rows], dtype=float)
        name, fmt = "zero-shot mean accuracy", "{:.3f}"
    a1.bar(range(len(rows)), np.nan_to_num(values, nan=0.0), color="tab:blue")
    a1.set_xticks(range(len(rows)), labels, rotation=30, ha="right", fontsize=8)
    a1.set_ylabel(name)
    for i, v in enumerate(values):
        if np.isfinite(v):
            a1.text(i, v, fmt.format(v), ha="center", va="bottom", fontsize=7)
    seen = set()
    for r in rows:
        name = r["allocation"]
        if name in seen or not r.get("block_sparsity"):
            continue
        seen.add(name)
        a2.plot(r["block_sparsity"], marker="o", ms=3, label=name)
    a2.set_xlabel("block")
    a2.set_ylabel("sparsity")
    a2.legend(fontsize=8)
    a2.grid(alpha=0.3)
    fig.suptitle(title)
    return _save(fig, path)


def plot_search(curves: dict[str, list[float]], path: str | Path, title: str = "",
                checks: dict[str, dict] | None = None) -> Path:
    """Best fitness (KL against the dense model) after each generation, one line per search;
    with ``checks`` (a search's held-out record), its checkpoints' held-out KL on a second
    axis and the returned generation as a dotted line."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, values in curves.items():
        ax.plot(range(len(values)), values, marker="o" if len(values) < 40 else None, ms=3,
                label=name)
    ax.set_xlabel("generation (0: start allocation)")
    ax.set_ylabel("KL(dense || pruned), calibration tokens")
    ax.set_title(title or "evolutionary search")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right")
    checks = {k: v for k, v in (checks or {}).items() if v}
    if checks:
        ax2 = ax.twinx()
        for name, check in checks.items():
            points = check["checkpoints"]
            ax2.plot([c["generation"] for c in points], [c["holdout_kl"] for c in points],
                     "x--", color="tab:red", label=f"{name}: held-out ({check['tokens']} tokens)")
            ax.axvline(check["chosen_generation"], color="tab:red", ls=":", lw=1)
        ax2.set_ylabel("KL, held-out tokens", color="tab:red")
        ax2.legend(loc="center right", fontsize=7)
    return _save(fig, path)


def plot_frontier(settings: list[dict], path: str | Path, title: str = "",
                  labels: Callable[[list[dict]], list[str]] | None = None) -> Path:
    """Each setting's allocations (mean over seeds) on one figure, one panel per setting;
    the searched reference in black. ``labels`` names a panel's rows (in the order given, by
    perplexity) in its legend; by default each row's allocation."""
    n = max(len(settings), 1)
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(10 * cols, 4.5 * rows), squeeze=False,
                             layout="constrained")  # keeps each legend clear of the next panel
    for ax, s in zip(axes.flat, settings, strict=False):
        drawn = [e for e in sorted(s["rows"], key=lambda e: e["ppl_mean"])
                 if e.get("allocation_mean")]
        names = labels(drawn) if labels else [e["allocation"] for e in drawn]
        for e, name in zip(drawn, names, strict=True):
            alloc = e["allocation_mean"]
            label = f"{name} ({e['ppl_mean']:.0f})"
            if e.get("searched_reference"):
                ax.plot(alloc, color="black", lw=2.2, label=label, zorder=5)
            else:
                ax.plot(alloc, lw=1.1, alpha=0.85, label=label)
        ax.set_title(f"{s['model']}, {s['pruner']} {s['target_sparsity']:.0%}", fontsize=9)
        ax.set_xlabel("block")
        ax.set_ylabel("sparsity")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.01, 0.5))
    for ax in list(axes.flat)[len(settings):]:
        ax.axis("off")
    fig.suptitle(title or "allocations per block (legend: perplexity)")
    return _save(fig, path)
