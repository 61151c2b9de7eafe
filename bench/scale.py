"""Peak memory of streamed pruning against model size (BENCHMARKS.md, "Scale").

Writes random-weight LLaMA-shaped models in bfloat16, one decoder layer per safetensors shard,
layer by layer (the writer never holds more than one layer), with a character-level tokenizer
and a calibration text. Then prunes each with ``sparsealloc prune --stream --dtype auto`` at 50%
(``--nsamples 2 --seqlen 64``, ``--save``), one process per run, and records the process's peak
RSS (``peak_rss_mb`` of result.json, from ``getrusage``), wall time and seconds per block.
Random weights: perplexity is meaningless, so none is computed; memory and time are the point.

``--table FILES`` prints the BENCHMARKS.md table of result files.

Example (the BENCHMARKS.md table):
    OMP_NUM_THREADS=1 python bench/scale.py --work /work/scale-bench --sizes 0.3,2.7,13,29 \
        --pruners wanda --sparsegpt-max-gb 3 --out results/scale.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

# bf16 GB of weights -> (hidden, intermediate, layers, heads, kv heads)
SHAPES = {
    "0.3": (768, 2048, 12, 12, 12),
    "2.7": (2048, 5504, 24, 16, 16),
    "13": (4096, 11008, 32, 32, 32),
    "29": (5120, 13824, 48, 40, 40),
}
VOCAB = 32000


def char_tokenizer():
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    vocab = {"<unk>": 0, "<eos>": 1, **{ch: i + 2 for i, ch in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>",
                                   pad_token="<eos>")


def write_model(folder: Path, hidden: int, inter: int, layers: int, heads: int, kv: int,
                seed: int = 0) -> int:
    """A random LLaMA in bf16, one layer per shard, written layer by layer; returns bytes."""
    from transformers import LlamaConfig

    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    head_dim = hidden // heads
    total, weight_map = 0, {}
    shards = layers + 1

    def rand(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)

    def write(number: int, tensors: dict[str, torch.Tensor]) -> None:
        nonlocal total
        name = f"model-{number:05d}-of-{shards:05d}.safetensors"
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
        total += sum(t.numel() * t.element_size() for t in tensors.values())

    for i in range(layers):
        p = f"model.layers.{i}."
        write(i + 1, {
            p + "self_attn.q_proj.weight": rand(heads * head_dim, hidden),
            p + "self_attn.k_proj.weight": rand(kv * head_dim, hidden),
            p + "self_attn.v_proj.weight": rand(kv * head_dim, hidden),
            p + "self_attn.o_proj.weight": rand(hidden, heads * head_dim),
            p + "mlp.gate_proj.weight": rand(inter, hidden),
            p + "mlp.up_proj.weight": rand(inter, hidden),
            p + "mlp.down_proj.weight": rand(hidden, inter),
            p + "input_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16),
            p + "post_attention_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16),
        })
    write(shards, {"model.embed_tokens.weight": rand(VOCAB, hidden),
                   "model.norm.weight": torch.ones(hidden, dtype=torch.bfloat16),
                   "lm_head.weight": rand(VOCAB, hidden)})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, vocab_size=VOCAB,
                      max_position_embeddings=4096, tie_word_embeddings=False)
    cfg.dtype = torch.bfloat16
    cfg.save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    return total


def prune(model: Path, text: Path, pruner: str, work: Path, sparsity: float = 0.5) -> dict:
    run, saved = work / f"run-{model.name}-{pruner}", work / f"saved-{model.name}-{pruner}"
    cmd = [sys.executable, "-m", "sparsealloc.cli", "prune", "--model", str(model), "--calib",
           str(text), "--pruner", pruner, "--sparsity", str(sparsity), "--nsamples", "2",
           "--seqlen",
           "64", "--ppl", "", "--dtype", "auto", "--stream", "--save", str(saved),
           "--overwrite", "--out", str(run), "--quiet"]
    start = time.perf_counter()
    subprocess.run(cmd, check=True)
    wall = time.perf_counter() - start
    rec = json.loads((run / "result.json").read_text())
    layers = rec["architecture"]["num_blocks"]
    saved_bytes = sum(p.stat().st_size for p in saved.glob("*.safetensors"))
    shutil.rmtree(saved, ignore_errors=True)  # disk: the next run needs the room
    return {"pruner": pruner, "sparsity": sparsity, "peak_rss_gib": rec["peak_rss_mb"] / 1024,
            "wall_s": wall,
            "prune_s": rec["prune_seconds"], "s_per_block": rec["prune_seconds"] / layers,
            "measured_sparsity": rec["measured_sparsity"], "saved_gib": saved_bytes / 2**30,
            "timings": rec["timings"]}


def table(paths: list[Path]) -> str:
    """The BENCHMARKS.md rows of one or more result files of this script."""
    lines = ["| checkpoint (bf16) | layers x hidden / intermediate | run | peak RSS | wall | "
             "prune s / block |", "|---|---|---|---|---|---|"]
    rows = [row for path in paths for row in json.loads(path.read_text())]
    for row in sorted(rows, key=lambda r: r["weights_gib"]):
        for run in row["runs"]:
            what = (f"{run['pruner']} {run['sparsity']:.0%}" if run["sparsity"] else
                    "read + write + save, sparsity 0")
            lines.append(f"| {row['weights_gib']:.2f} GiB | {row['layers']} x {row['hidden']} / "
                         f"{row['intermediate']} | {what} | {run['peak_rss_gib']:.2f} GiB | "
                         f"{run['wall_s']:.0f} s | {run['s_per_block']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--table", type=Path, nargs="+",
                    help="print the markdown table of these result files and stop")
    ap.add_argument("--work", type=Path, help="folder for models and runs")
    ap.add_argument("--sizes", default="0.3,2.7", help=f"comma separated, of {list(SHAPES)}")
    ap.add_argument("--pruners", default="wanda,sparsegpt")
    ap.add_argument("--sparsegpt-max-gb", type=float, default=1e9,
                    help="run SparseGPT only on models up to this size (it is slow on 1 core)")
    ap.add_argument("--sparsity", type=float, default=0.5,
                    help="0 streams, writes and saves every block without pruning work (the "
                    "I/O path alone, for sizes where pruning on one core takes hours)")
    ap.add_argument("--keep", action="store_true", help="keep the written models")
    ap.add_argument("--reuse", action="store_true", help="reuse a model already written")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if args.table:
        print(table(args.table))
        return
    if args.work is None or args.out is None:
        ap.error("--work and --out are required to run the benchmark")
    text = args.work / "calib.txt"
    args.work.mkdir(parents=True, exist_ok=True)
    text.write_text("Layer-wise sparsity allocation gives each block its share.\n" * 200)
    rows = []
    for size in args.sizes.split(","):
        hidden, inter, layers, heads, kv = SHAPES[size]
        folder = args.work / f"llama-{size}gb"
        start = time.perf_counter()
        if args.reuse and (folder / "model.safetensors.index.json").is_file():
            index = json.loads((folder / "model.safetensors.index.json").read_text())
            nbytes = index["metadata"]["total_size"]
        else:
            nbytes = write_model(folder, hidden, inter, layers, heads, kv)
        row = {"size": size, "weights_gib": nbytes / 2**30, "hidden": hidden,
               "intermediate": inter, "layers": layers,
               "write_s": time.perf_counter() - start, "runs": []}
        for pruner in args.pruners.split(","):
            if pruner == "sparsegpt" and float(size) > args.sparsegpt_max_gb:
                continue
            row["runs"].append(prune(folder, text, pruner, args.work, args.sparsity))
            print(json.dumps({"size": size, **row["runs"][-1]} | {"timings": None}), flush=True)
        rows.append(row)
        if not args.keep:
            shutil.rmtree(folder)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
