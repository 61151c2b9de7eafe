"""The Session's dense copy: taken only when needed, restored exactly, never silently lost."""

import pytest
import torch
from tiny_models import save_tiny

from sparsealloc.jobs.prune import prune_row
from sparsealloc.models.arch import weight_out_in
from sparsealloc.plan import compute_allocation
from sparsealloc.protocol import Protocol
from sparsealloc.rows import RowSpec
from sparsealloc.session import Session

ROW = RowSpec.parse("wanda", "unstructured", 0.5, "uniform")


def _session(tmp_path, keep_dense):
    folder, text = save_tiny(tmp_path)
    proto = Protocol(nsamples=2, seqlen=16, calib=str(text))
    return Session(str(folder), proto, progress=False, keep_dense=keep_dense)


def _weights(session):
    return [weight_out_in(m).clone() for i in range(session.arch.num_blocks)
            for m in session.arch.linears(i).values()]


def test_restore_gives_back_the_dense_weights(tmp_path):
    s = _session(tmp_path, keep_dense=True)
    dense = _weights(s)
    prune_row(s, ROW, compute_allocation(s, "uniform", 0.5))
    assert any(not torch.equal(a, b) for a, b in zip(dense, _weights(s), strict=True))
    s.restore_dense()
    assert all(torch.equal(a, b) for a, b in zip(dense, _weights(s), strict=True))
    # the allocators still read dense weights after a prune
    prune_row(s, ROW, compute_allocation(s, "uniform", 0.5))
    assert torch.equal(next(iter(s.dense_weights(0).values())), dense[0])


def test_single_prune_keeps_no_copy_and_refuses_to_restore(tmp_path):
    s = _session(tmp_path, keep_dense=False)
    prune_row(s, ROW, compute_allocation(s, "uniform", 0.5))
    assert s._dense is None
    with pytest.raises(RuntimeError, match="not kept"):
        s.restore_dense()
    with pytest.raises(RuntimeError, match="not kept"):
        s.dense_weights(0)


def test_cache_fingerprint_follows_the_weights_not_the_folder_name(tmp_path):
    a = _session(tmp_path / "a", keep_dense=True)
    folder, text = save_tiny(tmp_path / "b", seed=1)  # same folder name, other weights
    b = Session(str(folder), Protocol(nsamples=2, seqlen=16, calib=str(text)), progress=False)
    same = _session(tmp_path / "c", keep_dense=True)
    assert a.model_id == b.model_id
    assert a.weights_fingerprint != b.weights_fingerprint
    assert a.weights_fingerprint == same.weights_fingerprint
    # computed after a prune, it still describes the dense weights
    prune_row(same, ROW, compute_allocation(same, "uniform", 0.5))
    del same.__dict__["weights_fingerprint"]
    assert same.weights_fingerprint == a.weights_fingerprint


def test_one_disk_cache_for_derived_results(tmp_path, monkeypatch):
    """Spectra (and absorption probes) go through Session.disk_cached, keyed by the weights."""
    import sparsealloc.session as session_mod

    calls = []
    real = session_mod.block_alphas

    def counting(blocks):
        calls.append(len(blocks))
        return real(blocks)

    monkeypatch.setattr(session_mod, "block_alphas", counting)
    first = _session(tmp_path, keep_dense=False)
    a = first.alphas()
    assert first.alphas() == a and len(calls) == 1  # memory
    again = Session(first.spec, first.protocol, progress=False, keep_dense=False)
    assert again.alphas() == pytest.approx(a) and len(calls) == 1  # disk
    changed = Session(first.spec, first.protocol, progress=False, keep_dense=False)
    with torch.no_grad():  # other weights: another key
        next(iter(changed.arch.linears(0).values())).weight.mul_(2)
    changed.alphas()
    assert len(calls) == 2
