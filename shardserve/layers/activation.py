from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from shardserve.layers import fused_kernels


class SiluAndMul(nn.Module):
    """SwiGLU on the merged gate/up projection: silu(gate) * up."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _fused(x):
            return fused_kernels.act_and_mul(x)
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up


def _fused(x: torch.Tensor) -> bool:
    return x.dim() == 2 and x.stride(-1) == 1 and fused_kernels.enabled(x)


class GeluAndMul(nn.Module):
    """GeGLU on the merged gate/up projection: gelu(gate) * up (`approximate="tanh"`: Gemma's
    gelu_pytorch_tanh)."""

    def __init__(self, approximate: str = "none"):
        super().__init__()
        self.approximate = approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.approximate == "tanh" and _fused(x):
            return fused_kernels.act_and_mul(x, tanh_gelu=True)
        gate, up = x.chunk(2, dim=-1)
        return F.gelu(gate, approximate=self.approximate) * up


def get_act_fn(name: str) -> nn.Module:
    if name not in ACT2FN:
        raise ValueError(f"Unsupported activation {name!r}.")
    return ACT2FN[name]


def activation_from_qualname(qualname: str) -> nn.Module:
    """A torch.nn activation named by its class path in a config file (Sentence Transformers writes e.g.
    "torch.nn.modules.activation.Tanh"). Only argument-free torch.nn module classes are accepted: a config
    file must never be able to name arbitrary code."""
    cls = getattr(nn, qualname.rsplit(".", 1)[-1], None) if qualname.startswith("torch.nn.modules.") else None
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ValueError(f"Unsupported activation {qualname!r}: only torch.nn.modules activations are allowed.")
    try:
        return cls()
    except TypeError:
        raise ValueError(f"Activation {qualname!r} needs constructor arguments; it cannot come from a config.") \
            from None
