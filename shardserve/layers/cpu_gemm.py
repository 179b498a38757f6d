"""CPU GEMMs with each weight packed once, at load, into the layout of the kernel that runs it.

`SHARDSERVE_CPU_GEMM` picks the kernel:
- `onednn` (the default where torch has it): oneDNN's inner product (torch's mkldnn ops) on a weight
  reordered for 32-row batches, as vLLM's CPU backend does on x86. On an AMD Zen 5 machine it ran the
  models' fp32 products 2-3x faster than `F.linear` (MKL) at every batch size from 1 to 2,048 rows, and
  bf16 ones 1.2-2.5x (benchmarks/RESULTS.md); the 32-row layout was as fast as any other at all of them.
- `mkl`: MKL's packed layout (fp32 only), 1.3-3.5x faster than `F.linear` at decode sizes on an Intel
  Xeon but slower at prefill sizes, where layers then fall back to `F.linear`. Not measured against
  oneDNN on Intel: this is the choice to try there.
- `torch`: plain `F.linear`.
Other devices and dtypes always use `F.linear`, and so does bf16 on a CPU without AVX-512 (AVX2 only).
"""
from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

KERNELS = ("onednn", "mkl", "torch")


def _onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def onednn_bf16_available() -> bool:
    """oneDNN's bf16 products need AVX-512 (BW, VL, DQ) or AVX-NE-CONVERT; on an AVX2-only CPU its reorder fails."""
    supported = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return supported is not None and bool(supported())


def _mkl_available() -> bool:
    return torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_reorder_linear_weight")


def gemm_kernel() -> str:
    """The kernel CPU layers pack their weights for: $SHARDSERVE_CPU_GEMM, else the best one this torch has."""
    name = os.environ.get("SHARDSERVE_CPU_GEMM", "").lower()
    if name and name not in KERNELS:
        raise ValueError(f"SHARDSERVE_CPU_GEMM={name!r} is not one of {', '.join(KERNELS)}.")
    if name in ("", "onednn") and _onednn_available():
        return "onednn"
    if name in ("", "mkl") and _mkl_available():
        return "mkl"
    return "torch"


def packed_gemm_supported(weight: torch.Tensor, kernel: str | None = None) -> bool:
    kernel = kernel or gemm_kernel()
    if weight.device.type != "cpu" or kernel not in ("onednn", "mkl"):
        return False
    return weight.dtype == torch.float32 or (kernel == "onednn" and weight.dtype == torch.bfloat16
                                             and onednn_bf16_available())


class PackedWeight:
    """A weight [out, in] in a kernel's layout, beside the original (which the layer keeps: tied embeddings
    and loaders read it, and MKL falls back to it for odd shapes)."""

    def __init__(self, weight: torch.Tensor, batch_hint: int, kernel: str):
        self.weight = weight.detach()
        self.version = weight._version  # the weight's in-place writes so far (a detached view shares the count)
        self.batch_hint = 32 if kernel == "onednn" else batch_hint
        self.kernel = kernel
        if kernel == "onednn":
            self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight, self.batch_hint)
        else:
            self.packed = torch.ops.mkl._mkl_reorder_linear_weight(self.weight, self.batch_hint)

    def stale(self, weight: torch.Tensor) -> bool:
        """Whether `weight` (the layer's now) changed since it was packed: written in place (a weight update
        through `load_weights`), or replaced."""
        return weight._version != self.version or weight.data_ptr() != self.weight.data_ptr() \
            or weight.shape != self.weight.shape

    def runs(self, x: torch.Tensor) -> bool:
        # MKL's packing is slower than plain MKL past a few times its batch size (a prefill); oneDNN's is not.
        return self.kernel == "onednn" or (x.dim() == 2 and x.size(0) <= 4 * self.batch_hint)

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.kernel == "onednn":
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, bias, "none", [], "")
        return torch.ops.mkl._mkl_linear(x.contiguous(), self.packed, self.weight, bias, self.batch_hint)


def _available_memory() -> int | None:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def prepack_model(model: torch.nn.Module, batch_hint: int) -> int:
    """Pack the weight of every layer that takes a packed weight (a `packed` attribute); returns how many.

    Packed copies sit beside the originals, so packing is skipped when they would take more than a
    quarter of the free memory (a large model on CPU then keeps plain GEMMs rather than running short).
    Mixtures of experts rewrite their experts' weights in place into their own kernel's layout
    (layers/fused_moe.py), on CPUs in fp32 and bf16."""
    for module in model.modules():
        if hasattr(module, "pack_for_cpu"):
            module.pack_for_cpu()
    kernel = gemm_kernel()
    layers = [m for m in model.modules() if hasattr(m, "packed") and packed_gemm_supported(m.weight, kernel)]
    needed = sum(m.weight.numel() * m.weight.element_size() for m in layers)
    free = _available_memory()
    if free is not None and needed > free // 4:
        logger.info("Not packing %d GEMM weights (%.0f MiB): free memory is %.0f MiB", len(layers),
                    needed / 2**20, free / 2**20)
        return 0
    for module in layers:
        module.packed = PackedWeight(module.weight, batch_hint, kernel)
    if layers:
        logger.info("CPU GEMMs: %d weights packed for %s", len(layers), kernel)
    return len(layers)


def repack_changed(model: torch.nn.Module) -> int:
    """Pack again the weights that changed since they were packed (after a caller's weight update); returns how
    many. A pass over the layers when none did."""
    layers = [m for m in model.modules() if isinstance(getattr(m, "packed", None), PackedWeight)
              and m.packed.stale(m.weight)]
    for module in layers:
        module.packed = PackedWeight(module.weight, module.packed.batch_hint, module.packed.kernel)
    if layers:
        logger.info("CPU GEMMs: %d changed weights packed again", len(layers))
    return len(layers)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
           packed: PackedWeight | None) -> torch.Tensor:
    if packed is not None and packed.runs(x):
        return packed.linear(x, bias)
    return F.linear(x, weight, bias)
