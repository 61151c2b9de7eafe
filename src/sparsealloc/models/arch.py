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
from .experts import unfuse_experts

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
    expert_lists: list[dict[str, int]] = field(default_factory=list)  # per block: path -> E
    router_names: list[list[str]] = field(default_factory=list)

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

    def expert_of(self, index: int, name: str) -> tuple[str, int] | None:
        """``(expert list path, expert number)`` when layer ``name`` of block ``index`` belongs
        to an expert, else None."""
        for path in self.expert_lists[index] if self.expert_lists else {}:
            head, _, rest = name.partition(path + ".")
            if not head and rest:
                number = rest.split(".", 1)[0]
                if number.isdigit():
                    return path, int(number)
        return None

    def experts(self, index: int) -> dict[str, list[str]]:
        """Layers of every expert of block ``index``: ``"path.number"`` -> layer names."""
        out: dict[str, list[str]] = {}
        for name in self.linear_names[index]:
            hit = self.expert_of(index, name)
            if hit is not None:
                out.setdefault(f"{hit[0]}.{hit[1]}", []).append(name)
        return out

    def layer_patterns(self) -> list[str]:
        """Names of the pruned layers over all blocks, expert numbers written as ``*``."""
        out: list[str] = []
        for i in range(self.num_blocks):
            for name in self.linear_names[i]:
                hit = self.expert_of(i, name)
                if hit is not None:
                    name = f"{hit[0]}.*.{name[len(hit[0]) + 1:].split('.', 1)[1]}"
                if name not in out:
                    out.append(name)
        return out

    def describe(self) -> dict:
        """JSON-ready summary recorded in every result file."""
        routers = sorted({n for names in self.router_names for n in names})
        experts = sorted({f"{p} ({e} experts)" for lists in self.expert_lists
                          for p, e in lists.items()})
        return {
            "blocks": self.blocks_attr,
            "num_blocks": self.num_blocks,
            "block_class": type(self.blocks[0]).__name__,
            "final_norm": type(self.final_norm).__name__ if self.final_norm is not None else None,
            "pruned_layers": self.layer_patterns(),
            "pruned_layers_rule": "every nn.Linear/Conv1D inside decoder blocks, every expert's "
            "gate/up/down projection; embeddings, lm_head and routers never pruned",
            "experts": experts,
            "routers_not_pruned": routers,
            "max_unpruned_weight_share": max(self.unpruned_share(i)
                                             for i in range(self.num_blocks)),
        }


def _module_lists(model: nn.Module):
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            yield name, module


def _holds_linears(module: nn.Module) -> bool:
    return any(is_linear(m) for m in module.modules())


def _is_stack(mlist: nn.ModuleList) -> bool:
    """Same-class modules that hold linears (decoder blocks, or the experts of one block)."""
    return len({type(m) for m in mlist}) == 1 and _holds_linears(mlist[0])


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder block list: the longest outermost ModuleList of same-class modules holding
    linears (a list nested inside another, such as a block's experts, is never the blocks)."""
    stacks = [(name, mlist) for name, mlist in _module_lists(model) if _is_stack(mlist)]
    best: tuple[str, nn.ModuleList] | None = None
    for name, mlist in stacks:
        if any(other and name.startswith(other + ".") for other, _ in stacks):
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


def find_experts(block: nn.Module) -> tuple[dict[str, int], list[str]]:
    """Expert lists (path -> number of experts) and router layers of one decoder block."""
    lists = {n: len(m) for n, m in block.named_modules()
             if n and isinstance(m, nn.ModuleList) and len(m) >= 2 and _is_stack(m)}
    routers: list[str] = []
    for path, count in lists.items():
        owner_path, _, attr = path.rpartition(".")
        owner = block.get_submodule(owner_path) if owner_path else block
        for child_name, child in owner.named_children():
            weight = getattr(child, "weight", None)
            if (child_name != attr and not list(child.children())
                    and isinstance(weight, torch.Tensor) and weight.dim() == 2
                    and weight.shape[0] in (count, 1)):
                routers.append(f"{owner_path}.{child_name}" if owner_path else child_name)
    return lists, routers


def discover(model: nn.Module) -> Architecture:
    """Discover blocks, their prunable layers, experts, routers and the final norm of ``model``.

    Fused expert modules are replaced in place by per-expert linears first
    (:func:`.experts.unfuse_experts`; :func:`.experts.fused_experts` undoes it for saving).
    """
    unfuse_experts(model)
    path, blocks = find_blocks(model)
    owner_path, _, attr = path.rpartition(".")
    owner = model.get_submodule(owner_path) if owner_path else model
    found = [find_experts(block) for block in blocks]
    names = [
        [n for n, m in block.named_modules() if n and is_linear(m) and n not in routers]
        for block, (_, routers) in zip(blocks, found, strict=True)
    ]
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
        expert_lists=[lists for lists, _ in found],
        router_names=[routers for _, routers in found],
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
