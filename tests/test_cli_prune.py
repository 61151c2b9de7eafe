import json

import pytest
import torch
from tiny_models import save_tiny
from typer.testing import CliRunner

from sparsealloc.cli import app

runner = CliRunner()


def _prune(folder, text, out, *extra):
    args = ["prune", "--model", str(folder), "--calib", str(text), "--ppl", str(text),
            "--nsamples", "4", "--seqlen", "32", "--out", str(out), "--quiet", *extra]
    return runner.invoke(app, args, catch_exceptions=True)


@pytest.mark.parametrize("pruner", ["magnitude", "wanda", "sparsegpt"])
def test_prune_writes_result(tmp_path, pruner):
    folder, text = save_tiny(tmp_path)
    out = tmp_path / "run"
    res = _prune(folder, text, out, "--pruner", pruner, "--sparsity", "0.5")
    assert res.exit_code == 0, res.output
    rec = json.loads((out / "result.json").read_text())
    for key in ("model", "pruner", "pattern", "allocation", "target_sparsity", "block_sparsity",
                "measured_sparsity", "ppl", "protocol", "timings", "peak_rss_mb"):
        assert key in rec
    assert rec["pruner"]["name"] == pruner
    assert abs(rec["measured_sparsity"] - 0.5) < 0.01
    # a dense model's blocks hold nothing but the pruned linears (and 1-D norms)
    assert rec["block_weight_sparsity"] == pytest.approx(rec["measured_sparsity"])
    assert rec["protocol"]["nsamples"] == 4 and rec["protocol"]["seqlen"] == 32
    assert rec["ppl"][str(text)] > 1
    env = rec["environment"]  # what can move float results between runs of one protocol
    assert env["torch_threads"] == torch.get_num_threads() and env["torch"] == torch.__version__


def test_prune_24_pattern(tmp_path):
    folder, text = save_tiny(tmp_path)
    out = tmp_path / "run"
    res = _prune(folder, text, out, "--pattern", "2:4")
    assert res.exit_code == 0, res.output
    rec = json.loads((out / "result.json").read_text())
    assert rec["measured_sparsity"] == pytest.approx(0.5)


def _main(monkeypatch, capsys, *args):
    import sys

    from sparsealloc.cli import main

    monkeypatch.setattr(sys, "argv", ["sparsealloc", *args])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main()
    err = capsys.readouterr().err.strip()
    return exc.value.code, err


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--sparsity", "1.0"], "--sparsity must be in [0, 1)"),
        (["--sparsity", "-0.1"], "--sparsity must be in [0, 1)"),
        (["--pattern", "3:8x"], "pattern"),
        (["--pruner", "nope"], "nope"),
        (["--allocation", "bogus"], "unknown allocation"),
        (["--pattern", "4:7"], "4:7"),
    ],
)
def test_bad_input_one_line_exit_2(tmp_path, monkeypatch, capsys, extra, message):
    folder, text = save_tiny(tmp_path)
    out = tmp_path / "run"
    code, err = _main(monkeypatch, capsys, "prune", "--model", str(folder), "--calib", str(text),
                      "--ppl", str(text), "--nsamples", "2", "--seqlen", "16", "--out", str(out),
                      "--quiet", *extra)
    assert code == 2
    assert err.startswith("error: ") and len(err.splitlines()) == 1
    assert message in err
    assert not (out / "result.json").exists()


def test_unknown_model_and_missing_data(tmp_path, monkeypatch, capsys):
    code, err = _main(monkeypatch, capsys, "prune", "--model", "no-such-model-xyz", "--quiet")
    assert code == 2 and "unknown model" in err
    folder, text = save_tiny(tmp_path)
    code, err = _main(monkeypatch, capsys, "prune", "--model", str(folder), "--calib",
                      str(tmp_path / "missing.txt"), "--quiet")
    assert code == 2 and "missing.txt" in err and len(err.splitlines()) == 1


def test_save_reloads_to_same_perplexity(tmp_path):
    folder, text = save_tiny(tmp_path)
    out, saved = tmp_path / "run", tmp_path / "pruned"
    res = _prune(folder, text, out, "--sparsity", "0.6", "--save", str(saved))
    assert res.exit_code == 0, res.output
    rec = json.loads((out / "result.json").read_text())
    res = runner.invoke(app, ["eval", "--model", str(saved), "--ppl", str(text), "--seqlen", "32",
                              "--out", str(tmp_path / "ev"), "--quiet"])
    assert res.exit_code == 0, res.output
    ev = json.loads((tmp_path / "ev" / "result.json").read_text())
    assert ev["ppl"][str(text)] == pytest.approx(rec["ppl"][str(text)], rel=1e-5)
    assert ev["measured_sparsity"] == pytest.approx(rec["measured_sparsity"], abs=1e-6)


def test_models_lists_packaged_names():
    res = runner.invoke(app, ["models"], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    for name in ("smollm2-135m", "gemma3-270m", "qwen2.5-coder-0.5b"):
        assert name in res.output


def test_unknown_task_is_one_clear_error(tmp_path, monkeypatch, capsys):
    folder, text = save_tiny(tmp_path)
    code, err = _main(monkeypatch, capsys, "eval", "--model", str(folder), "--ppl", "",
                      "--tasks", "boolq,nope", "--quiet")
    assert code == 2 and "nope" in err and "boolq" in err


@pytest.mark.parametrize(
    "args, message",
    [
        (["compare", "--sparsity", "0.6,seventy"], "--sparsity must be numbers"),
        (["probe", "--eta", "1e-3,big"], "--eta must be numbers"),
        (["compare", "--absorb-final", "middle"], "--absorb-final must be one of"),
        (["compare", "--absorb-gamma", "lots"], "--absorb-gamma must be a number, 'auto'"),
    ],
)
def test_bad_option_values_one_line_exit_2(monkeypatch, capsys, args, message):
    code, err = _main(monkeypatch, capsys, *args, "--quiet")
    assert code == 2 and message in err and len(err.splitlines()) == 1
