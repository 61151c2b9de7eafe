"""Calibration and perplexity windows, with and without a BOS token per window."""

import json

import pytest
import torch
from tiny_models import save_tiny
from typer.testing import CliRunner

from sparsealloc.cli import app
from sparsealloc.data.corpora import calibration_windows, eval_windows
from sparsealloc.errors import UserError

BOS = 7


def test_eval_windows_cut_one_stream():
    ids = torch.arange(10)
    assert eval_windows(ids, 4).tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert eval_windows(ids, 4, max_tokens=5).tolist() == [[0, 1, 2, 3]]


def test_eval_windows_with_bos_score_every_text_token_once():
    ids = torch.tensor([BOS, 10, 11, 12, 13, 14, 15, 16])  # the tokenizer's own leading BOS
    w = eval_windows(ids, 4, bos=BOS)
    assert w.tolist() == [[BOS, 10, 11, 12], [BOS, 13, 14, 15]]
    # stream without a leading BOS: nothing is dropped
    assert eval_windows(torch.tensor([10, 11, 12, 13]), 3, bos=BOS).tolist() == [
        [BOS, 10, 11], [BOS, 12, 13]]


def test_calibration_windows_with_bos_keep_length_and_are_deterministic():
    ids = torch.arange(100, 200)
    a = calibration_windows(ids, 5, 8, seed=3, bos=BOS)
    b = calibration_windows(ids, 5, 8, seed=3, bos=BOS)
    assert a.shape == (5, 8) and torch.equal(a, b)
    assert (a[:, 0] == BOS).all()
    assert ((a[:, 2:] - a[:, 1:-1]) == 1).all()  # the rest is contiguous text
    with pytest.raises(UserError, match="fewer than --seqlen"):
        calibration_windows(torch.arange(5), 1, 8, bos=BOS)


def test_bos_per_window_without_bos_token_is_one_clear_error(tmp_path):
    folder, text = save_tiny(tmp_path)  # the tiny tokenizer has no BOS token
    res = CliRunner().invoke(app, ["prune", "--model", str(folder), "--calib", str(text),
                                   "--nsamples", "2", "--seqlen", "16", "--ppl", str(text),
                                   "--bos-per-window", "--quiet", "--out",
                                   str(tmp_path / "run")])
    assert res.exit_code != 0
    assert isinstance(res.exception, UserError) and "no BOS token" in str(res.exception)
    assert not (tmp_path / "run" / "result.json").exists()


def test_protocol_records_bos_per_window(tmp_path):
    folder, text = save_tiny(tmp_path)
    out = tmp_path / "run"
    res = CliRunner().invoke(app, ["prune", "--model", str(folder), "--calib", str(text),
                                   "--nsamples", "2", "--seqlen", "16", "--ppl", str(text),
                                   "--quiet", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert json.loads((out / "result.json").read_text())["protocol"]["bos_per_window"] is False


def test_bos_per_window_runs_and_is_recorded(tmp_path):
    from tiny_models import tiny_tokenizer

    folder, text = save_tiny(tmp_path)
    tok = tiny_tokenizer()
    tok.bos_token = "<eos>"
    tok.save_pretrained(folder)
    out = tmp_path / "run"
    res = CliRunner().invoke(app, ["prune", "--model", str(folder), "--calib", str(text),
                                   "--nsamples", "2", "--seqlen", "16", "--ppl", str(text),
                                   "--bos-per-window", "--quiet", "--out", str(out)])
    assert res.exit_code == 0, res.output
    rec = json.loads((out / "result.json").read_text())
    assert rec["protocol"]["bos_per_window"] is True
    assert "BOS" in rec["protocol"]["perplexity"]
