"""Adding the step's LoRA adapters to the linear layers' outputs.

For one forward pass the model runner gives each linear layer that some adapter of the step changes its
`LoRAWeights` (`active_loras`); the layer then adds `((x A^T) * mask) B^T` to its output. With several adapters
in the step, A holds all their A's side by side (and B their B's), and the mask keeps, for each token's row, only
its own adapter's columns (none for a token without one): one pair of matmuls serves every adapter of the step,
where a matmul per adapter on its tokens' rows cost a gather, two matmuls and a scatter each (Punica's batched
LoRA, done with a mask: the few extra columns cost far less than the calls they save). Without adapters in the
step a layer does its matmul and nothing more. A mixture of experts' stacked projections take a pair per expert
(A: (experts, columns, in), B: (experts, out, columns)), keyed by (the experts' module, "w13" or "w2"), and
apply them themselves (layers/fused_moe.py).
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class LoRAWeights:
    a: torch.Tensor   # (columns, in): the A's of the layer's projections (of the step's adapters), stacked
    b: torch.Tensor   # (out, columns): their B's, block-diagonal, the scaling folded in
    mask: torch.Tensor | None = None   # (tokens, columns): 1 where a row's adapter owns the column; None: all


# What an adapter changes: a linear layer, or a mixture of experts' stacked projection (module, "w13" / "w2").
LoRATarget = nn.Module | tuple[nn.Module, str]

# The pass's adapted layers and their weights.
_ACTIVE: dict[LoRATarget, LoRAWeights] = {}


@contextmanager
def active_loras(weights: dict[LoRATarget, LoRAWeights]) -> Iterator[None]:
    global _ACTIVE
    _ACTIVE = weights
    try:
        yield
    finally:
        _ACTIVE = {}


def active_lora(target: LoRATarget) -> LoRAWeights | None:
    """The pass's adapters of `target`, if any."""
    return _ACTIVE.get(target)


def add_lora(layer: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """`y` (the layer's output for input `x`) with the pass's adapters of this layer added, in place."""
    w = _ACTIVE.get(layer)
    if w is None:
        return y
    xa = x @ w.a.t()
    if w.mask is not None:
        xa.mul_(w.mask)
    return y.addmm_(xa, w.b.t())


@dataclass
class StackedLoRAs:
    """Several adapters' weights side by side, per layer. `layouts[layer]`: its columns' owners, as (the adapter's
    index in the list stacked, its width) in order; `owners[layout]`: the owner of each column."""
    weights: dict[LoRATarget, LoRAWeights]
    layouts: dict[LoRATarget, tuple[tuple[int, int], ...]]
    owners: dict[tuple[tuple[int, int], ...], torch.Tensor]


def stack_loras(adapters: list[dict[LoRATarget, LoRAWeights]]) -> StackedLoRAs:
    by_layer: dict[LoRATarget, list[tuple[int, LoRAWeights]]] = {}
    for k, adapter in enumerate(adapters):
        for layer, w in adapter.items():
            by_layer.setdefault(layer, []).append((k, w))
    stacked = StackedLoRAs({}, {}, {})
    for layer, pairs in by_layer.items():  # columns are A's second-last dimension and B's last (experts' too)
        a = torch.cat([w.a for _, w in pairs], dim=-2)
        stacked.weights[layer] = LoRAWeights(a, torch.cat([w.b for _, w in pairs], dim=-1))
        layout = stacked.layouts[layer] = tuple((k, w.a.size(-2)) for k, w in pairs)
        if layout not in stacked.owners:
            stacked.owners[layout] = torch.tensor([k for k, width in layout for _ in range(width)],
                                                  dtype=torch.int32, device=a.device)
    return stacked


def step_loras(stacked: StackedLoRAs, token_owner: torch.Tensor) -> dict[LoRATarget, LoRAWeights]:
    """The stacked weights with each layer's mask for this step: `token_owner[i]` is the index of token row i's
    adapter (-1: none). Layers of one layout share a mask."""
    masks = {}
    step = {}
    for layer, w in stacked.weights.items():
        layout = stacked.layouts[layer]
        if layout not in masks:
            masks[layout] = (token_owner[:, None] == stacked.owners[layout][None, :]).to(w.a.dtype)
        step[layer] = LoRAWeights(w.a, w.b, masks[layout])
    return step
