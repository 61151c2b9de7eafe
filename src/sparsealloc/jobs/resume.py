"""``compare --resume``: take over the rows an earlier run of the same comparison finished.

The earlier run's ``compare.json`` or ``compare.partial.json`` in ``--out`` is read before any
work. A row is taken over when a row of the same label and calibration seed was run there with
the same pruner (and pruner options), pattern, target sparsity, allocation and allocation
options, on the same model, protocol and evaluation; every other row runs. What cannot be
reused is refused in one line, before anything is written: another model, protocol or
evaluation, a row of the same label and seed made with other options, or rows the command does
not ask for (the rewritten file would drop them). A run made with another sparsealloc version
or thread count is resumed with a warning: float results can differ between the two.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..allocation.options import set_options
from ..allocation.registry import option_fields, quiet_defaults
from ..errors import UserError
from ..io import jsonable, read_json
from ..protocol import EvalRequest
from ..pruners import get_pruner
from ..report.seeds import same_value
from ..rows import RowSpec

FILES = ("compare.json", "compare.partial.json")
IGNORED_PROTOCOL = ("seed", "data_sources")
"""Protocol keys that may differ: every row records its seed; data paths move between hosts."""

_HOW = "use another --out, or drop --resume to start over"


def evaluation_record(request: EvalRequest) -> dict:
    """What a compare record says it evaluated (the batch size only changes speed)."""
    return {k: v for k, v in asdict(request).items() if k != "batch_size"}


@dataclass
class Prior:
    """The earlier run: its record, its pruned rows (unclaimed until taken) and dense row."""

    path: Path
    record: dict
    rows: list[dict]
    dense: dict | None
    taken: set[int] = field(default_factory=set)

    def take(self, row: RowSpec, seed: int) -> dict | None:
        """The earlier record of ``row`` with ``seed`` (None when it has to run)."""
        for i, rec in enumerate(self.rows):
            if i in self.taken or title_of(rec) != row.title() or seed_of(rec, self) != seed:
                continue
            why = differences(rec, row)
            if why:
                raise UserError(f"--resume: {self.path} has row '{row.title()}' (seed {seed}) "
                                f"made with other settings ({'; '.join(why)}); {_HOW}")
            self.taken.add(i)
            return rec
        return None

    def check_all_taken(self) -> None:
        """Refuse (before any work) when rows of the earlier run are not asked for again."""
        left = [f"'{title_of(r)}' (seed {seed_of(r, self)})" for i, r in enumerate(self.rows)
                if i not in self.taken]
        if left:
            raise UserError(f"--resume: {self.path} has rows this command does not ask for "
                            f"({', '.join(left)}); add them, or {_HOW}")

    def provenance(self, reused: int) -> list[dict]:
        """The ``resumed`` entries of the new record: earlier ones, then this one."""
        rec = self.record
        return list(rec.get("resumed", [])) + [{
            "from": str(self.path), "rows_reused": reused,
            "sparsealloc_version": rec.get("sparsealloc_version"),
            "environment": rec.get("environment"), "timings": rec.get("timings"),
            "peak_rss_mb": rec.get("peak_rss_mb")}]


def title_of(rec: dict) -> str:
    label, seed = str(rec.get("label", "")), rec.get("seed")
    suffix = f" (seed {seed})"
    return label[: -len(suffix)] if seed is not None and label.endswith(suffix) else label


def seed_of(rec: dict, prior: Prior) -> int:
    return int(rec.get("seed", prior.record.get("protocol", {}).get("seed", 0)))


def _groups() -> dict[str, str]:
    return {key: prefix for prefix, key, _f, _h in option_fields()}


def differences(rec: dict, row: RowSpec) -> list[str]:
    """How an earlier row record differs from ``row`` (empty: the same row)."""
    out = []
    pruner = jsonable(get_pruner(row.pruner).config())
    checks = (("pruner", rec.get("pruner"), pruner),
              ("pattern", rec.get("pattern", "unstructured"), row.pattern_text),
              ("target sparsity", rec.get("target_sparsity"), row.target),
              ("allocation", rec.get("allocation"), row.allocation))
    out += [f"{what} {old} there, {new} now" for what, old, new in checks
            if not same_value(old, new)]
    recorded = set_options((rec.get("allocation_details") or {}).get("options") or {})
    now, group_of = row.options.record(), _groups()
    used = {group_of.get(k) for k in recorded} - {None}
    # a when_set option left at its default is not recorded: absent there means the default
    recorded = {k: v for k, v in quiet_defaults().items() if group_of.get(k) in used} | recorded
    for key, old in sorted(recorded.items()):
        if key not in now:
            out.append(f"{key}={old} there, an option this version does not have")
        elif not same_value(old, now[key]):
            out.append(f"{key}={old} there, {now[key]} now")
    # an option added to a group the row used: the row predates it, it ran without it
    out += [f"{key} not recorded there (made before it existed)" for key in sorted(now)
            if group_of.get(key) in used and key not in recorded]
    return out


def _stripped(protocol: dict) -> dict:
    return {k: v for k, v in protocol.items() if k not in IGNORED_PROTOCOL}


def load_prior(run_dir: Path, model: str, architecture: dict, protocol: dict,
               request: EvalRequest) -> Prior | None:
    """The earlier run in ``run_dir`` (the file with more rows), checked against this one; None
    when there is none."""
    found = []
    for name in FILES:
        path = run_dir / name
        if not path.is_file():
            continue
        try:
            rec = read_json(path)
        except (OSError, ValueError) as exc:
            raise UserError(f"--resume: cannot read {path} ({exc}); {_HOW}") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("rows"), list):
            raise UserError(f"--resume: {path} is not a compare record; {_HOW}")
        found.append((len(rec["rows"]), name == "compare.json", path, rec))
    if not found:
        return None
    _, _, path, rec = max(found, key=lambda f: (f[0], f[1]))
    if rec.get("model") != model or rec.get("architecture") != jsonable(architecture):
        raise UserError(f"--resume: {path} is a comparison of {rec.get('model')!r}, not of "
                        f"{model!r}; {_HOW}")
    old, new = _stripped(rec.get("protocol") or {}), _stripped(jsonable(protocol))
    diff = [f"{k} {json.dumps(old.get(k))} there, {json.dumps(new.get(k))} now"
            for k in sorted(set(old) | set(new)) if not same_value(old.get(k), new.get(k))]
    if diff:
        raise UserError(f"--resume: {path} used another protocol ({'; '.join(diff)}); {_HOW}")
    _check_evaluation(path, rec, request)
    rows = [r for r in rec["rows"] if r.get("label") != "dense"]
    return Prior(path, rec, rows, rec.get("dense"))


def _check_evaluation(path: Path, rec: dict, request: EvalRequest) -> None:
    want = jsonable(evaluation_record(request))
    had = rec.get("evaluation")
    if had is None:  # records before compare wrote its evaluation: read it off the rows
        if request.tasks:
            raise UserError(f"--resume: {path} does not say which zero-shot tasks and --limit "
                            f"it used (an older version wrote it); {_HOW}")
        corpora = {c for r in rec["rows"] for c in (r.get("ppl") or {})}
        had = {"ppl": sorted(corpora) if corpora else want["ppl"], "tasks": [],
               "limit": None}
        want = want | {"ppl": sorted(want["ppl"])}
    diff = [f"{k} {json.dumps(had.get(k))} there, {json.dumps(want[k])} now" for k in want
            if not same_value(had.get(k), want[k])]
    if diff:
        raise UserError(f"--resume: {path} evaluated other things ({'; '.join(diff)}); {_HOW}")


def version_warnings(prior: Prior, version: str, environment: dict) -> list[str]:
    """Lines to warn with when the earlier rows were made by other code or another thread
    count (float summation order: at 70% sparsity a thread count alone can move perplexity)."""
    rec, out = prior.record, []
    if rec.get("sparsealloc_version") != version:
        out.append(f"resuming rows made by sparsealloc {rec.get('sparsealloc_version')} (this "
                   f"is {version})")
    env = rec.get("environment")
    if env is None:
        out.append("resuming rows whose record predates the environment field (thread count "
                   "and library versions unknown): float results may differ from new rows")
    else:
        diff = [f"{k} {env.get(k)} there, {v} now" for k, v in environment.items()
                if env.get(k) != v]
        if diff:
            out.append(f"resuming rows made in another environment ({'; '.join(diff)}): float "
                       "results may differ from new rows")
    return out
