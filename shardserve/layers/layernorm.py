from __future__ import annotations

import torch
from torch import nn

from shardserve.layers import fused_kernels


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """With `residual`, adds it first and returns (normed, new residual), as pre-norm blocks need."""
        if fused_kernels.enabled(x) and x.stride(-1) == 1:
            if x.dim() == 2:
                return fused_kernels.rms_norm(x, self.weight, self.eps, residual)
            if x.dim() == 3 and residual is None:
                # per-head norms (Qwen3's and Gemma 3's q/k norm): the heads as rows, gathered out of the
                # QKV projection's output by one copy (cheaper than the unfused norm's six passes)
                return fused_kernels.rms_norm(x.reshape(-1, x.shape[-1]), self.weight, self.eps).view(x.shape)
        if residual is not None:
            x = x + residual
            residual = x
        # As transformers: normalise in fp32, scale in the model dtype. (torch's fused F.rms_norm is a few
        # microseconds faster on decode rows but 4x slower on prefill-sized inputs on CPU.)
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        out = self.weight * h.to(x.dtype)
        return out if residual is None else (out, residual)


class GemmaRMSNorm(RMSNorm):
    """Gemma's RMSNorm scales by (1 + weight): checkpoints store the offset from one. It is added once, as the
    weight loads, so the scale is an ordinary RMSNorm weight to every kernel."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__(hidden_size, eps)
        self.weight.weight_loader = lambda param, loaded: param.copy_(loaded + 1)
