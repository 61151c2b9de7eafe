"""Find the parts of a causal LM that pruning needs, from the model's structure.

Nothing here looks at the model's name or ``model_type``: the decoder blocks are
the longest ``nn.ModuleList`` of identical modules that hold linear layers; the
prunable layers are the ``nn.Linear`` (and GPT-2 style ``Conv1D``) modules
inside a block; the final norm is the normalisation module applied after the
blocks (a child of the module that owns the block list, holding only vectors of
the hidden size).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import UserError

# A block may hold at most this share of its >=2-D weight entries outside the pruned layers
# (routers, position tables, ...). Beyond it, pruning would leave most of the block dense while
# the measured sparsity over the pruned layers looks right, so discovery refuses the model.
MAX_UNPRUNED_SHARE = 0.05


def is_linear(module: nn.Module) -> bool:
    """True for ``nn.Linear`` and for transformers' ``Conv1D`` (GPT-2's transposed linear)."""
    if isinstance(module, nn.Linear):
        return True
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and module.weight.dim() == 2


def weight_out_in(module: nn.Module) -> torch.Tensor:
    """The layer's weight as an ``(out_features, in_features)`` tensor (a view for Conv1D)."""
    w = module.weight.data
    return w if isinstance(module, nn.Linear) else w.t()


def in_features(module: nn.Module) -> int:
    return weight_out_in(module).shape[1]


@dataclass
class Architecture:
    """What the runner needs to know about a model, discovered from its structure."""

    blocks_owner: nn.Module
    blocks_attr: str
    blocks: nn.ModuleList
    final_norm: nn.Module | None
    linear_names: list[list[str]] = field(default_factory=list)

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def linears(self, index: int) -> dict[str, nn.Module]:
        """Prunable layers of block ``index``, by their name inside the block."""
        block = self.blocks[index]
        return {name: block.get_submodule(name) for name in self.linear_names[index]}

    def params_per_block(self) -> list[int]:
        """Number of prunable weights in each block (what sparsity is counted over)."""
        return [
            sum(weight_out_in(m).numel() for m in self.linears(i).values())
            for i in range(self.num_blocks)
        ]

    def block_weights(self, index: int) -> dict[str, torch.Tensor]:
        """Every weight of block ``index`` with two or more dimensions, by parameter name."""
        return {n: p for n, p in self.blocks[index].named_parameters() if p.dim() >= 2}

    def unpruned_share(self, index: int) -> float:
        """Share of block ``index``'s >=2-D weight entries outside its prunable layers."""
        pruned_ids = {id(m.weight) for m in self.linears(index).values()}
        total = outside = 0
        for p in self.block_weights(index).values():
            total += p.numel()
            if id(p) not in pruned_ids:
                outside += p.numel()
        return outside / total if total else 0.0

    def describe(self) -> dict:
        """JSON-ready summary recorded in every result file."""
        return {
            "blocks": self.blocks_attr,
            "num_blocks": self.num_blocks,
            "block_class": type(self.blocks[0]).__name__,
            "final_norm": type(self.final_norm).__name__ if self.final_norm is not None else None,
            "pruned_layers": self.linear_names[0] if self.linear_names else [],
            "pruned_layers_rule": "every nn.Linear/Conv1D inside decoder blocks; "
            "embeddings and lm_head never pruned",
        }


def _module_lists(model: nn.Module):
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            yield name, module


def _holds_linears(module: nn.Module) -> bool:
    return any(is_linear(m) for m in module.modules())


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder block list: the longest ModuleList of same-class modules that hold linears."""
    best: tuple[str, nn.ModuleList] | None = None
    for name, mlist in _module_lists(model):
        classes = {type(m) for m in mlist}
        if len(classes) != 1 or not _holds_linears(mlist[0]):
            continue
        if best is None or len(mlist) > len(best[1]):
            best = (name, mlist)
    if best is None:
        raise UserError(
            f"unsupported architecture {type(model).__name__}: no list of decoder blocks with "
            "linear layers was found; sparsealloc supports decoder-only causal LMs whose blocks "
            "sit in an nn.ModuleList"
        )
    return best


def _find_final_norm(owner: nn.Module, blocks: nn.ModuleList) -> nn.Module | None:
    """The last direct child of the block owner that holds only hidden-size vectors."""
    hidden = None
    for m in blocks[0].modules():
        if is_linear(m):
            hidden = in_features(m)
            break
    candidate = None
    for child in owner.children():
        if child is blocks:
            continue
        params = list(child.parameters(recurse=True))
        if params and all(p.dim() == 1 and p.shape[0] == hidden for p in params):
            candidate = child
    return candidate


def discover(model: nn.Module) -> Architecture:
    """Discover blocks, their prunable layers and the final norm of ``model``."""
    path, blocks = find_blocks(model)
    owner_path, _, attr = path.rpartition(".")
    owner = model.get_submodule(owner_path) if owner_path else model
    names = [[n for n, m in block.named_modules() if n and is_linear(m)] for block in blocks]
    if not all(names):
        raise UserError(
            f"unsupported architecture {type(model).__name__}: a block has no linear layer"
        )
    arch = Architecture(
        blocks_owner=owner,
        blocks_attr=path,
        blocks=blocks,
        final_norm=_find_final_norm(owner, blocks),
        linear_names=names,
    )
    check_coverage(arch, type(model).__name__)
    return arch


def check_coverage(arch: Architecture, model_class: str) -> None:
    """Refuse a model whose blocks keep a large share of their weights outside the pruned layers.

    Raises:
        UserError: naming the first such block, its share and the weights left out.
    """
    for i in range(arch.num_blocks):
        share = arch.unpruned_share(i)
        if share > MAX_UNPRUNED_SHARE:
            pruned = {id(m.weight) for m in arch.linears(i).values()}
            left = [n for n, p in arch.block_weights(i).items() if id(p) not in pruned]
            raise UserError(
                f"unsupported architecture {model_class}: {share:.0%} of block {i}'s weights "
                f"({', '.join(left[:4])}{', ...' if len(left) > 4 else ''}) are not in "
                f"prunable linear layers (limit {MAX_UNPRUNED_SHARE:.0%}); pruning would leave "
                "them dense, so this architecture is not supported"
            )
