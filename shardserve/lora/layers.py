"""Adding the step's LoRA adapters to the linear layers' outputs.

For one forward pass the model runner says which rows of the step's tokens run through which adapter
(`active_loras`); each linear layer then adds, for each adapter with weights for it, `x A^T B^T` to those rows.
Without adapters in the step a layer does its matmul and nothing more.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class LoRAWeights:
    a: torch.Tensor   # (projections x rank, in): the A's of the layer's projections, stacked
    b: torch.Tensor   # (out, projections x rank): their B's, block-diagonal, the scaling folded in


# The pass's adapters: (the adapter's weights by layer, the rows of its tokens, or None for all rows).
_ACTIVE: list[tuple[dict[nn.Module, LoRAWeights], torch.Tensor | None]] = []


@contextmanager
def active_loras(groups: list[tuple[dict[nn.Module, LoRAWeights], torch.Tensor | None]]) -> Iterator[None]:
    global _ACTIVE
    _ACTIVE = groups
    try:
        yield
    finally:
        _ACTIVE = []


def add_lora(layer: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """`y` (the layer's output for input `x`) with the pass's adapters of this layer added, in place."""
    for adapter, rows in _ACTIVE:
        w = adapter.get(layer)
        if w is None:
            continue
        if rows is None:
            y.addmm_(x @ w.a.t(), w.b.t())
        else:
            y.index_add_(0, rows, (x.index_select(0, rows) @ w.a.t()) @ w.b.t())
    return y
