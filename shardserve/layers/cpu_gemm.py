"""Float32 GEMMs on x86 CPUs with MKL's packed weight layout.

At decode batch sizes (tens of rows) MKL's packed GEMM runs the same products 1.3-3.5x faster than
`F.linear` on the 2-core machines we measure on (benchmarks/RESULTS.md); at prefill sizes (thousands of
rows) it is slower, so those keep `F.linear`. The packing is tuned for a batch size but correct for any.
Where torch was built without MKL (e.g. aarch64 wheels), or for other dtypes and devices, layers keep
using `F.linear`.
"""
from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)


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


def _available_memory() -> int | None:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def prepack_model(model: torch.nn.Module, batch_hint: int) -> int:
    """Pack the weight of every layer that takes a packed weight (a `packed` attribute); returns how many.

    Packed copies sit beside the originals, so packing is skipped when they would take more than a
    quarter of the free memory (a large model on CPU then keeps plain GEMMs rather than running short)."""
    layers = [m for m in model.modules() if hasattr(m, "packed") and packed_gemm_supported(m.weight)]
    needed = sum(m.weight.numel() * m.weight.element_size() for m in layers)
    free = _available_memory()
    if free is not None and needed > free // 4:
        logger.info("Not packing %d GEMM weights (%.0f MiB): free memory is %.0f MiB", len(layers),
                    needed / 2**20, free / 2**20)
        return 0
    for module in layers:
        module.packed = PackedWeight(module.weight, batch_hint)
    return len(layers)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
           packed: PackedWeight | None) -> torch.Tensor:
    # Past a few times the packing's batch size (a prefill), plain MKL is as fast or faster.
    if packed is not None and x.dim() == 2 and x.size(0) <= 4 * packed.batch_hint:
        return packed.linear(x, bias)
    return F.linear(x, weight, bias)
