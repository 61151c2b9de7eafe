"""Adding an allocator is one class in one file: this test file is that file."""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import pytest
from tiny_models import save_tiny

from sparsealloc import cli
from sparsealloc.allocation import registry
from sparsealloc.allocation.budget import restore_budget
from sparsealloc.allocation.options import AllocationOptions
from sparsealloc.allocation.registry import Allocator, Base, option
from sparsealloc.errors import UserError
from sparsealloc.plan import compute_allocation
from sparsealloc.protocol import Protocol
from sparsealloc.session import Session


@dataclass(frozen=True)
class ToyOptions:
    tilt: float = option(0.1, "toy: sparsity added to the last block (taken from the first)")

    def __post_init__(self) -> None:
        if self.tilt < 0:
            raise UserError("--toy-tilt must be >= 0")


class Toy(Allocator):
    """More sparsity at the end, budget restored exactly."""

    name = "toy"
    Options = ToyOptions
    score_name = "position"

    def allocate(self, ctx, target, opts, arg):
        L = ctx.num_blocks
        raw = [target - opts.tilt if i == 0 else target + opts.tilt if i == L - 1 else target
               for i in range(L)]
        s = restore_budget(raw, target, ctx.weights)
        return Base(s.tolist(), [float(i) for i in range(L)])


@pytest.fixture
def toy(monkeypatch):
    monkeypatch.setattr(registry, "ALLOCATORS", dict(registry.ALLOCATORS))
    monkeypatch.setattr(registry, "OPTION_GROUPS", dict(registry.OPTION_GROUPS))
    import sparsealloc.allocation.options as options_mod

    monkeypatch.setattr(options_mod, "OPTION_GROUPS", registry.OPTION_GROUPS)
    registry.register(Toy)
    return Toy


def test_a_registered_allocator_works_everywhere(toy, tmp_path):
    folder, text = save_tiny(tmp_path)
    session = Session(str(folder), Protocol(nsamples=2, seqlen=16, calib=str(text)),
                      progress=False)
    opts = AllocationOptions(toy_tilt=0.05)
    alloc = compute_allocation(session, "toy", 0.5, opts)
    w = session.params_per_block
    assert sum(a * b for a, b in zip(alloc.block_sparsity, w, strict=True)) / sum(w) == \
        pytest.approx(0.5, abs=1e-9)
    assert alloc.block_sparsity[0] < alloc.block_sparsity[-1]
    assert alloc.options == {"toy_tilt": 0.05} and alloc.score_name == "position"
    assert "toy_tilt" in opts.record()
    # the CLI's options are generated from the registry: --toy-tilt with its help text
    params = inspect.signature(cli._make_allocation_options()).parameters
    assert "toy_tilt" in params
    info = params["toy_tilt"].annotation.__metadata__[0]
    assert info.help.startswith("toy: sparsity added")
    assert "--toy-tilt" in (info.default, *info.param_decls)
    with pytest.raises(UserError, match="--toy-tilt"):
        AllocationOptions(toy_tilt=-1)


def test_unknown_option_keys_are_refused():
    with pytest.raises(UserError, match="unknown allocation option"):
        AllocationOptions(owl_q=3)
