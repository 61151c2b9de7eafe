"""Zero-shot accuracy of a dense model with lm-evaluation-harness (offline task data).

Example::

    .venv/bin/python bench/zeroshot_dense.py --model smollm2-135m --limit 500 \
        --batch-size 16 --out bench/results/zeroshot_dense_smollm2-135m.json

``--model`` is a packaged short name (waits, polling once a minute, until another
process has finished converting it into ``<cache>/models/<name>/``), or a local
transformers folder. The model is loaded in float32 on the CPU.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from sparsealloc.data.tasks import PAPER_TASKS, TASKS, validate_task_names
from sparsealloc.evaluation.zeroshot import evaluate_zeroshot
from sparsealloc.io import write_json


def _cache_root() -> Path:
    env = os.environ.get("SPARSEALLOC_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "sparsealloc"


def _folder_ready(folder: Path) -> bool:
    try:
        from sparsealloc.models.packaged import COMPLETE_MARKER

        return (folder / COMPLETE_MARKER).is_file()
    except ImportError:
        return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


def wait_for_model(spec: str, wait_minutes: float) -> Path | None:
    """The cached folder of a packaged short name, once complete; None for a local folder."""
    if Path(spec).expanduser().is_dir():
        return None
    folder = _cache_root() / "models" / spec.lower()
    deadline = time.monotonic() + wait_minutes * 60
    announced = False
    while not _folder_ready(folder):
        if time.monotonic() > deadline:
            sys.exit(f"error: {folder} did not appear within {wait_minutes:g} minutes")
        if not announced:
            print(f"waiting for {folder} (polling every minute)", file=sys.stderr, flush=True)
            announced = True
        time.sleep(60)
    return folder


def load(spec: str) -> tuple[Any, Any, dict[str, Any]]:
    """Float32 CPU model + tokenizer: the project's loader if present, else transformers."""
    import torch

    try:
        from sparsealloc.models.load import load_model
    except ImportError:
        load_model = None
    start = time.perf_counter()
    if load_model is not None:
        loaded = load_model(spec, dtype=torch.float32, device="cpu")
        model, tok, source = loaded.model, loaded.tokenizer, dict(loaded.source)
        source["loader"] = "sparsealloc.models.load.load_model"
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = Path(spec).expanduser()
        folder = str(path if path.is_dir() else _cache_root() / "models" / spec.lower())
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(folder)
        source = {"spec": spec, "path": folder, "loader": "transformers.from_pretrained"}
    model = model.float().eval()
    source["load_seconds_total"] = round(time.perf_counter() - start, 2)
    source["dtype"] = str(next(model.parameters()).dtype)
    source["params"] = sum(p.numel() for p in model.parameters())
    return model, tok, source


def table(result: dict[str, Any]) -> str:
    lines = [
        "| task | n | acc | acc_norm | chance | seconds |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, row in result["zeroshot"].items():
        norm = row.get("acc_norm")
        lines.append(
            f"| {name} | {row['n']} | {row['acc']:.4f} ± {row['acc_stderr']:.4f} | "
            f"{'' if norm is None else f'{norm:.4f}'} | {row['chance']:.2f} | "
            f"{row['seconds']:.0f} |"
        )
    lines.append(f"| **mean (acc)** | | **{result['zeroshot_mean']:.4f}** | | | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="packaged short name or local folder")
    parser.add_argument("--tasks", default=",".join(PAPER_TASKS),
                        help=f"comma-separated, from: {', '.join(TASKS)}")
    parser.add_argument("--limit", type=int, default=500,
                        help="first N documents per task (0 = full split)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = all cores)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--wait-minutes", type=float, default=120,
                        help="how long to wait for a packaged model to be converted")
    parser.add_argument("--out", type=Path, required=True, help="result JSON")
    args = parser.parse_args(argv)

    import torch

    tasks = validate_task_names(args.tasks)
    if args.threads:
        torch.set_num_threads(args.threads)
    wait_for_model(args.model, args.wait_minutes)

    wall = time.perf_counter()
    model, tok, source = load(args.model)
    start = time.perf_counter()
    command = " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv])

    def timing() -> dict[str, Any]:
        return {
            "eval_seconds": round(time.perf_counter() - start, 1),
            "total_seconds": round(time.perf_counter() - wall, 1),
            "torch_threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
            "load_average": os.getloadavg(),  # others share this machine's cores
            "machine": platform.platform(),
            "torch": torch.__version__,
        }

    partial: dict[str, Any] = {}

    def checkpoint(name: str, row: dict[str, Any]) -> None:  # partial results, long runs
        partial[name] = row
        write_json(args.out, {"model": source, "complete": False, "zeroshot": partial,
                              "timing": timing(), "command": command})

    result = evaluate_zeroshot(model, tok, tasks, limit=args.limit or None,
                               batch_size=args.batch_size, seed=args.seed, progress=True,
                               on_task=checkpoint)
    eval_seconds = time.perf_counter() - start
    out = {"model": source, "complete": True, **result, "timing": timing(), "command": command}
    write_json(args.out, out)
    print(table(result))
    print(f"eval {eval_seconds:.0f} s, total {out['timing']['total_seconds']:.0f} s "
          f"-> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
