"""Streaming weights, dtypes, block-sequential perplexity, the streaming save, memory refusal."""

import gc
import json

import pytest
import torch
from tiny_models import save_tiny

from sparsealloc.allocation import AllocationOptions
from sparsealloc.blockwise import measured_sparsity
from sparsealloc.evaluation.blockwise import blockwise_window_nlls
from sparsealloc.evaluation.perplexity import window_nlls
from sparsealloc.jobs.prune import prune_row
from sparsealloc.models.arch import weight_out_in
from sparsealloc.outputs import SAVE_MARKER
from sparsealloc.plan import compute_allocation
from sparsealloc.probe.coefficients import absorption_coefficients
from sparsealloc.protocol import Protocol
from sparsealloc.rows import RowSpec
from sparsealloc.session import Session

ARCHS = ["llama", "gemma3", "qwen2"]


def _prune(session, pruner):
    """Prune ``session`` uniformly at 50% with ``pruner``; the row's record."""
    row = RowSpec.parse(pruner, "unstructured", 0.5, "uniform")
    return prune_row(session, row, compute_allocation(session, "uniform", 0.5))

def _proto(text, **kw):
    return Protocol(**{"nsamples": 2, "seqlen": 16, "calib": str(text), "eval_seqlen": 16,
                       **kw})


def _pair(tmp_path, arch, **kw):
    folder, text = save_tiny(tmp_path, arch)
    mem = Session(str(folder), _proto(text, stream="off", **kw), progress=False)
    streamed = Session(str(folder), _proto(text, stream="on", **kw), progress=False)
    assert not mem.streaming and streamed.streaming
    return mem, streamed, text


def _masks(session):
    out = []
    for i in range(session.arch.num_blocks):
        with session.hold(i):
            out += [(weight_out_in(m) == 0).clone() for m in session.arch.linears(i).values()]
    return out


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("pruner", ["wanda", "sparsegpt", "magnitude"])
def test_streamed_prune_matches_in_memory(tmp_path, arch, pruner):
    mem, streamed, text = _pair(tmp_path, arch)
    for s in (mem, streamed):
        alloc = compute_allocation(s, "owl", 0.5, AllocationOptions())
        loads = streamed.weights.block_loads
        s.record = prune_row(s, RowSpec.parse(pruner, "unstructured", 0.5, "uniform"), alloc)
        if s is streamed:  # the record's zero counts come from the prune: one read per block
            assert streamed.weights.block_loads - loads == s.arch.num_blocks
        after = measured_sparsity(s.arch, s.hold)  # counted again, afterwards
        assert s.record["measured_block_sparsity"] == after["per_block"]
        assert s.record["block_weight_sparsity"] == after["block_weights"]
        s.ppl = s.perplexity([str(text)])[str(text)]
    assert mem.record["block_sparsity"] == streamed.record["block_sparsity"]
    assert mem.record["measured_block_sparsity"] == streamed.record["measured_block_sparsity"]
    assert all(torch.equal(a, b) for a, b in zip(_masks(mem), _masks(streamed), strict=True))
    assert streamed.ppl["ppl"] == pytest.approx(mem.ppl["ppl"], rel=1e-5)
    # never more than one block's weights materialised at once
    w = streamed.weights
    assert w.materialised == 0
    assert 0 < w.peak_block_params <= max(w.block_size)
    assert all(p.is_meta for p in streamed.arch.blocks.parameters())


@pytest.mark.parametrize("arch", ARCHS)
def test_streamed_alpha_and_probe_match(tmp_path, arch):
    mem, streamed, _ = _pair(tmp_path, arch)
    a = [compute_allocation(s, "alpha", 0.5, AllocationOptions()).block_sparsity
         for s in (mem, streamed)]
    assert a[0] == pytest.approx(a[1], abs=1e-9)
    for mode in ("prune", "noise"):
        r = [absorption_coefficients(s, mode=mode, nsamples=2, use_cache=False)
             for s in (mem, streamed)]
        assert r[0] == pytest.approx(r[1], rel=1e-6)
    assert streamed.weights.peak_block_params <= max(streamed.weights.block_size)


@pytest.mark.parametrize("arch", ARCHS)
def test_blockwise_perplexity_equals_whole_model(tmp_path, arch):
    folder, text = save_tiny(tmp_path, arch)
    s = Session(str(folder), _proto(text, stream="off"), progress=False)
    windows = s.eval_ids(str(text))
    whole = window_nlls(s.model, windows, progress=False)
    cap = getattr(s.model.config, "final_logit_softcapping", None)
    blockwise = blockwise_window_nlls(s.runner, windows, s.arch.final_norm,
                                      s.model.get_output_embeddings(), softcap=cap,
                                      hidden_size=32, group_bytes=2 * 16 * 32 * 4 * 2)
    assert torch.equal(blockwise, whole)  # the same float32 cross-entropy: identical
    chunked = blockwise_window_nlls(s.runner, windows, s.arch.final_norm,
                                    s.model.get_output_embeddings(), softcap=cap, hidden_size=32,
                                    logits_bytes=16 * 20 * 8)  # 7 chunks of 20 ids
    assert chunked.tolist() == pytest.approx(whole.tolist(), rel=1e-6)
    streamed = Session(str(folder), _proto(text, stream="on"), progress=False)
    assert streamed.window_perplexity(windows)["mean_nll"] == float(whole.mean())


def test_bf16_save_stays_bf16_and_reloads_to_same_logits(tmp_path):
    from transformers import AutoModelForCausalLM

    folder, text = save_tiny(tmp_path, "llama")
    for stream in ("off", "on"):
        s = Session(str(folder), _proto(text, stream=stream, dtype="bfloat16",
                                        compute_dtype="bfloat16"), progress=False)
        assert s.storage_dtype == torch.bfloat16
        _prune(s, "wanda")
        out = s.save(tmp_path / f"saved-{stream}")
        index = out / "model.safetensors.index.json"
        assert index.is_file() if stream == "on" else (out / "model.safetensors").is_file()
        again = AutoModelForCausalLM.from_pretrained(out, dtype="auto")
        assert next(again.parameters()).dtype == torch.bfloat16
        windows = s.eval_ids(str(text))
        ours = s.window_perplexity(windows)["mean_nll"]
        theirs = float(window_nlls(again.eval(), windows, progress=False).mean())
        assert theirs == pytest.approx(ours, rel=1e-6)
        if stream == "on":
            names = json.loads(index.read_text())["weight_map"]
            assert len(set(names.values())) == s.arch.num_blocks + 1


def test_streamed_save_marked_and_reloads(tmp_path):
    from sparsealloc.models.load import load_model

    mem, streamed, text = _pair(tmp_path, "llama")
    for s in (mem, streamed):
        _prune(s, "sparsegpt")
    a, b = mem.save(tmp_path / "a"), streamed.save(tmp_path / "b")
    assert json.loads((b / SAVE_MARKER).read_text())["complete"] is True
    assert not [p for p in b.parent.iterdir() if p.name.startswith(".b.")]  # no tmp left
    ma, mb = load_model(str(a)).model, load_model(str(b)).model
    for (na, pa), (nb, pb) in zip(ma.state_dict().items(), mb.state_dict().items(), strict=True):
        assert na == nb and torch.equal(pa, pb), na


def test_memory_estimate_refuses_one_line_exit_2(tmp_path, monkeypatch, capsys):
    from sparsealloc.cli import main

    folder, text = save_tiny(tmp_path)
    monkeypatch.setenv("SPARSEALLOC_MEMORY_LIMIT", "300KiB")
    monkeypatch.setattr("sys.argv", ["sparsealloc", "prune", "--model", str(folder), "--calib",
                                     str(text), "--ppl", str(text), "--nsamples", "64",
                                     "--seqlen", "64", "--quiet", "--stream", "--out",
                                     str(tmp_path / "run")])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main()
    err = capsys.readouterr().err
    assert exc.value.code == 2
    assert len(err.strip().splitlines()) == 1 and "lower --nsamples to 13" in err
    assert not (tmp_path / "run" / "result.json").exists()


def test_auto_stream_when_weights_exceed_memory_share(tmp_path, monkeypatch):
    folder, text = save_tiny(tmp_path)
    monkeypatch.setenv("SPARSEALLOC_MEMORY_LIMIT", "200KiB")
    assert Session(str(folder), _proto(text), progress=False).streaming
    monkeypatch.setenv("SPARSEALLOC_MEMORY_LIMIT", "100GiB")
    assert not Session(str(folder), _proto(text), progress=False).streaming


def test_streamed_zeroshot_runs_offloaded_and_matches(tmp_path, monkeypatch):
    pytest.importorskip("lm_eval")
    from sparsealloc.evaluation.zeroshot import evaluate_zeroshot

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.delenv("SPARSEALLOC_HUB", raising=False)
    monkeypatch.setenv("SPARSEALLOC_MEMORY_LIMIT", "200KiB")  # half of it: part goes to disk
    mem, streamed, _ = _pair(tmp_path, "llama")
    rows, placed = [], []
    for s in (mem, streamed):
        with s.zeroshot_model() as model:
            placed.append(set(getattr(model, "hf_device_map", {"": "in memory"}).values()))
            rows.append(evaluate_zeroshot(model, s.tokenizer, ["arc_easy"], limit=4,
                                          batch_size=2, progress=False)["zeroshot"]["arc_easy"])
    assert rows[0]["correct"] == rows[1]["correct"]
    assert "disk" in placed[1]  # really offloaded
    _prune(streamed, "wanda")
    with pytest.raises(Exception, match="--save DIR"), streamed.zeroshot_model():
        pass


def test_stream_refuses_moe_with_one_line(tmp_path):
    from tiny_models import save_tiny_moe

    from sparsealloc.errors import UserError

    folder, text = save_tiny_moe(tmp_path, "mixtral")
    with pytest.raises(UserError, match="mixture-of-experts.*--no-stream") as exc:
        Session(str(folder), _proto(text, stream="on"), progress=False)
    assert "\n" not in str(exc.value)


@pytest.mark.parametrize("pruner", ["wanda", "sparsegpt"])
def test_activations_on_disk_change_nothing(tmp_path, pruner):
    from sparsealloc.runner import DiskHidden

    folder, text = save_tiny(tmp_path, "llama")
    runs = []
    for offload in ("memory", "disk"):
        s = Session(str(folder), _proto(text, stream="on", offload_activations=offload,
                                        nsamples=4, batch_size=2), progress=False)
        acts = s.capture()
        assert isinstance(acts.hidden, DiskHidden) == (offload == "disk")
        assert len(acts.hidden) == 2 and acts.hidden[-1].shape == (2, 16, 32)
        coeffs = absorption_coefficients(s, mode="prune", nsamples=2, use_cache=False)
        alloc = compute_allocation(s, "owl", 0.5, AllocationOptions())
        rec = prune_row(s, RowSpec.parse(pruner, "unstructured", 0.5, "uniform"), alloc)
        runs.append((s, coeffs, alloc.block_sparsity, rec["measured_block_sparsity"],
                     s.perplexity([str(text)])[str(text)]["ppl"]))
    (mem, *a), (disk, *b) = runs
    assert a == b  # coefficients, allocation, sparsity and perplexity: identical
    assert all(torch.equal(x, y) for x, y in zip(_masks(mem), _masks(disk), strict=True))
    folder = disk.runner.offload
    assert folder.is_dir() and len(list(folder.iterdir())) <= 3  # captured + at most 2 passes
    del disk, runs, s
    gc.collect()
    assert not folder.exists()  # removed with the session


def test_refusal_names_disk_offload_when_it_would_fit(tmp_path, monkeypatch, capsys):
    from sparsealloc.errors import UserError

    folder, text = save_tiny(tmp_path)
    monkeypatch.setenv("SPARSEALLOC_MEMORY_LIMIT", "300KiB")
    with pytest.raises(UserError, match="lower --nsamples to 13 or less, or --seqlen; or pass "
                       "--offload-activations disk") as exc:
        Session(str(folder), Protocol(nsamples=64, seqlen=64, calib=str(text), stream="on"),
                progress=False)
    assert "\n" not in str(exc.value)
    Session(str(folder), Protocol(nsamples=64, seqlen=64, calib=str(text), stream="on",
                                  offload_activations="disk"), progress=False)  # fits
    with pytest.raises(UserError, match="lower the calibration batch_size to 13 or less"):
        Session(str(folder), Protocol(nsamples=64, seqlen=64, calib=str(text), stream="on",
                                      offload_activations="disk", batch_size=64),
                progress=False)
    with pytest.raises(UserError, match="--offload-activations must be memory or disk"):
        Protocol(offload_activations="ssd")


def test_hub_cache_model_streams(tmp_path, monkeypatch):
    """A hub id found in the local Hugging Face cache streams from its snapshot folder."""
    import shutil

    folder, text = save_tiny(tmp_path, "qwen2")
    cache = tmp_path / "hub"
    snapshot = cache / "models--tiny-org--tiny-qwen2" / "snapshots" / ("0" * 40)
    shutil.copytree(folder, snapshot)
    (cache / "models--tiny-org--tiny-qwen2" / "refs").mkdir()
    (cache / "models--tiny-org--tiny-qwen2" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    hub = Session("tiny-org/tiny-qwen2", _proto(text, stream="on"), progress=False)
    local = Session(str(folder), _proto(text, stream="off"), progress=False)
    assert hub.streaming and hub.weights.checkpoint.folder == snapshot
    for s in (hub, local):
        s.record = _prune(s, "wanda")
    assert hub.record["measured_block_sparsity"] == local.record["measured_block_sparsity"]
    assert all(torch.equal(a, b) for a, b in zip(_masks(hub), _masks(local), strict=True))
