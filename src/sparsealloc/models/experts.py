"""Mixture-of-experts layers: fused expert weights as per-expert linear layers, and back.

transformers 5 stores a block's experts as two fused 3-D parameters, ``gate_up_proj``
``(experts, 2 * intermediate, hidden)`` and ``down_proj`` ``(experts, hidden, intermediate)``,
inside one module called as ``experts(hidden_states, top_k_index, top_k_weights)`` by its MoE
block, after the router. Such a module holds no ``nn.Linear``, so nothing in it would be pruned.

:func:`unfuse_experts` replaces every such module, found from its structure alone (exactly
two 3-D parameters with the same leading dimension E whose shapes chain as
``(E, 2I, H)`` and ``(E, H, I)``), by an :class:`ExpertLinears`: an ``nn.ModuleList`` of E
:class:`ExpertMLP`, each with real ``gate_proj`` / ``up_proj`` / ``down_proj`` linears whose
weights are views of the fused parameters (no copy). Its forward runs the same routing loop as
the fused module's eager forward, so a forward hook on expert e's ``gate_proj`` sees exactly the
tokens routed to expert e, and ``down_proj``'s hook sees exactly what expert e computes on. The
replacement is checked numerically against the fused module before it is installed; a module
that does not reproduce (another gating, a bias, a transposed layout) is left as it was, and
discovery then refuses the model because its weights lie outside the prunable layers.

:func:`fused_experts` puts fused modules back (the per-expert weights stacked into new fused
parameters) for the duration of a ``save_pretrained``, so a saved model is an ordinary
checkpoint of its own class.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn

# Relative error allowed between the fused module and its per-expert replacement on a test input.
_REL_TOL = {torch.float32: 1e-4, torch.float64: 1e-9}
_REL_TOL_HALF = 2e-2


class ExpertMLP(nn.Module):
    """One expert: ``down_proj(act(gate_proj(x)) * up_proj(x))`` with real linear layers."""

    def __init__(self, gate: Tensor, up: Tensor, down: Tensor, act_fn: nn.Module) -> None:
        super().__init__()
        self.gate_proj = _linear(gate)
        self.up_proj = _linear(up)
        self.down_proj = _linear(down)
        object.__setattr__(self, "act_fn", act_fn)  # shared with the fused module, no submodule

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def _linear(weight: Tensor) -> nn.Linear:
    """A bias-free ``nn.Linear`` whose weight *is* ``weight`` (a view: no copy)."""
    layer = nn.Linear(1, 1, bias=False, device="meta")
    layer.in_features, layer.out_features = weight.shape[1], weight.shape[0]
    layer.weight = nn.Parameter(weight, requires_grad=False)
    return layer


class ExpertLinears(nn.ModuleList):
    """The experts of one MoE block as a list of :class:`ExpertMLP`, called like the fused module.

    ``forward(hidden_states (T, H), top_k_index (T, k), top_k_weights (T, k)) -> (T, H)``:
    expert e runs on the tokens that chose it (in the fused module's order) and its output,
    weighted by the router, is added to those tokens' rows.
    """

    def __init__(self, experts: list[ExpertMLP], fused: nn.Module,
                 names: tuple[str, str]) -> None:
        super().__init__(experts)
        object.__setattr__(self, "fused_shell", fused)  # the emptied original, for saving
        self.fused_names = names  # its (gate_up, down) parameter names

    def forward(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        n = len(self)
        out = torch.zeros_like(hidden_states)
        with torch.no_grad():
            mask = nn.functional.one_hot(top_k_index, num_classes=n + 1).permute(2, 1, 0)
            hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
        for e in hit[:, 0].tolist():
            if e == n:  # index n marks a slot routed nowhere (padding)
                continue
            top_k_pos, token_idx = torch.where(mask[e])
            y = self[e](hidden_states[token_idx]) * top_k_weights[token_idx, top_k_pos, None]
            out.index_add_(0, token_idx, y.to(out.dtype))
        return out


def fused_layout(module: nn.Module) -> tuple[str, str] | None:
    """``(gate_up_name, down_name)`` when ``module`` holds fused gated experts, else None.

    Structure only: exactly two direct parameters, both 3-D with the same number of experts
    E >= 2, shaped ``(E, 2I, H)`` and ``(E, H, I)``; and the module is called with the
    routing (a ``forward(hidden_states, top_k_index, top_k_weights)``).
    """
    params = dict(module.named_parameters(recurse=False))
    if len(params) != 2 or any(p.dim() != 3 for p in params.values()):
        return None
    if list(module.children()) and not all(_is_activation(c) for c in module.children()):
        return None
    (a, pa), (b, pb) = params.items()
    for (gu, g), (dn, d) in (((a, pa), (b, pb)), ((b, pb), (a, pa))):
        e, two_i, h = g.shape
        if e >= 2 and d.shape == (e, h, two_i // 2) and two_i % 2 == 0:
            return gu, dn
    return None


def _is_activation(module: nn.Module) -> bool:
    return not any(True for _ in module.parameters())


def _per_expert(module: nn.Module, layout: tuple[str, str]) -> ExpertLinears | None:
    act = getattr(module, "act_fn", None)
    if not callable(act):
        return None
    gate_up, down = getattr(module, layout[0]), getattr(module, layout[1])
    inter = down.shape[2]
    experts = [
        ExpertMLP(gate_up.data[e, :inter], gate_up.data[e, inter:], down.data[e], act)
        for e in range(gate_up.shape[0])
    ]
    return ExpertLinears(experts, module, layout)


@torch.no_grad()
def _reproduces(fused: nn.Module, unfused: ExpertLinears, top_k: int = 2) -> bool:
    """Both modules give the same output on a random routing that reaches every expert."""
    p = next(fused.parameters())
    n, hidden = len(unfused), p.shape[-1]
    k = min(top_k, n)
    tokens = 2 * n
    g = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, hidden, generator=g).to(device=p.device, dtype=p.dtype)
    idx = torch.stack([(torch.arange(tokens) + j) % n for j in range(k)], dim=1).to(p.device)
    w = torch.rand(tokens, k, generator=g).to(device=p.device, dtype=p.dtype)
    try:
        ref = fused(x, idx, w)
    except Exception:  # noqa: BLE001 -- another calling convention: not a routed experts module
        return False
    got = unfused(x, idx, w)
    if not isinstance(ref, Tensor) or ref.shape != got.shape:
        return False
    err = float((got.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30))
    return err <= _REL_TOL.get(p.dtype, _REL_TOL_HALF)


def unfuse_experts(root: nn.Module) -> int:
    """Replace every fused experts module under ``root`` by an :class:`ExpertLinears`.

    Idempotent (already unfused modules are left alone). Returns how many were replaced.
    """
    found = [
        (name, m, layout)
        for name, m in root.named_modules()
        if (layout := fused_layout(m)) is not None
    ]
    replaced = 0
    for name, module, layout in found:
        unfused = _per_expert(module, layout)
        if unfused is None or not _reproduces(module, unfused):
            continue
        for pname in layout:  # the views keep the storage: no copy, no second set of weights
            del module._parameters[pname]
        owner_name, _, attr = name.rpartition(".")
        owner = root.get_submodule(owner_name) if owner_name else root
        setattr(owner, attr, unfused)
        replaced += 1
    return replaced


def _stack(experts: ExpertLinears) -> tuple[Tensor, Tensor]:
    gate_up = torch.stack([torch.cat([e.gate_proj.weight, e.up_proj.weight]) for e in experts])
    down = torch.stack([e.down_proj.weight for e in experts])
    return gate_up, down


@contextlib.contextmanager
@torch.no_grad()
def fused_experts(root: nn.Module) -> Iterator[int]:
    """Within the context, every :class:`ExpertLinears` is its original fused module again.

    The fused parameters are rebuilt from the (possibly pruned) per-expert weights; the
    per-expert weights then become views of them, so the weights are held once. Yields the
    number of modules fused.
    """
    found = [(n, m) for n, m in root.named_modules() if isinstance(m, ExpertLinears)]
    swapped = []
    for name, experts in found:
        shell, layout = experts.fused_shell, experts.fused_names
        gate_up, down = _stack(experts)
        shell.register_parameter(layout[0], nn.Parameter(gate_up, requires_grad=False))
        shell.register_parameter(layout[1], nn.Parameter(down, requires_grad=False))
        inter = down.shape[2]
        for e, expert in enumerate(experts):
            expert.gate_proj.weight = nn.Parameter(gate_up[e, :inter], requires_grad=False)
            expert.up_proj.weight = nn.Parameter(gate_up[e, inter:], requires_grad=False)
            expert.down_proj.weight = nn.Parameter(down[e], requires_grad=False)
        owner_name, _, attr = name.rpartition(".")
        owner = root.get_submodule(owner_name) if owner_name else root
        setattr(owner, attr, shell)
        swapped.append((owner, attr, experts, shell, layout))
    try:
        yield len(swapped)
    finally:
        for owner, attr, experts, shell, layout in swapped:
            setattr(owner, attr, experts)
            for pname in layout:
                del shell._parameters[pname]
