from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN


class SiluAndMul(nn.Module):
    """SwiGLU on the merged gate/up projection: silu(gate) * up."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up


def get_act_fn(name: str) -> nn.Module:
    if name not in ACT2FN:
        raise ValueError(f"Unsupported activation {name!r}.")
    return ACT2FN[name]
