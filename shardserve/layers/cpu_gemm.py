"""Float32 GEMMs on x86 CPUs with MKL's packed weight layout.

At decode batch sizes (tens of rows) MKL's packed GEMM runs the same products 1.3-3.5x faster than
`F.linear` on the 2-core machines we measure on (benchmarks/RESULTS.md); at prefill sizes (thousands of
rows) it is slower, so those keep `F.linear`. The packing is tuned for a batch size but correct for any. Where torch was built without MKL (e.g. aarch64 wheels), or for other
dtypes and devices, layers keep using `F.linear`.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F


def packed_gemm_supported(weight: torch.Tensor) -> bool:
    return (os.environ.get("SHARDSERVE_CPU_PACKED_GEMM", "1") != "0" and weight.device.type == "cpu"
            and weight.dtype == torch.float32 and torch.backends.mkl.is_available()
            and hasattr(torch.ops.mkl, "_mkl_reorder_linear_weight"))


class PackedWeight:
    """A weight [out, in] repacked for MKL, keeping the original (MKL falls back to it for odd shapes)."""

    def __init__(self, weight: torch.Tensor, batch_hint: int):
        self.weight = weight
        self.batch_hint = batch_hint
        self.packed = torch.ops.mkl._mkl_reorder_linear_weight(weight.detach(), batch_hint)

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return torch.ops.mkl._mkl_linear(x.contiguous(), self.packed, self.weight, bias, self.batch_hint)


def prepack_model(model: torch.nn.Module, batch_hint: int) -> int:
    """Pack the weight of every layer that takes a packed weight (a `packed` attribute); returns how many."""
    count = 0
    for module in model.modules():
        if hasattr(module, "packed") and packed_gemm_supported(module.weight):
            module.packed = PackedWeight(module.weight, batch_hint)
            count += 1
    return count


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
           packed: PackedWeight | None) -> torch.Tensor:
    # Past a few times the packing's batch size (a prefill), plain MKL is as fast or faster.
    if packed is not None and x.dim() == 2 and x.size(0) <= 4 * packed.batch_hint:
        return packed.linear(x, bias)
    return F.linear(x, weight, bias)
