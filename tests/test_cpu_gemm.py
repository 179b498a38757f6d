"""Packed CPU GEMM weights (oneDNN, MKL): the same products as F.linear, the kernel chosen by
SHARDSERVE_CPU_GEMM, and no packing when memory is short."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from shardserve.layers import cpu_gemm
from shardserve.layers.linear import ColumnParallelLinear, RowParallelLinear

KERNELS = [pytest.param("onednn", marks=pytest.mark.skipif(not cpu_gemm._onednn_available(),
                                                          reason="this torch build has no oneDNN")),
           pytest.param("mkl", marks=pytest.mark.skipif(not cpu_gemm._mkl_available(),
                                                       reason="this torch build has no MKL packed GEMM (e.g. aarch64)"))]


def _model(dtype=torch.float32):
    torch.manual_seed(0)
    model = torch.nn.Sequential(ColumnParallelLinear(48, 96, bias=True), RowParallelLinear(96, 40, bias=True))
    for p in model.parameters():
        p.data.normal_()
    return model.to(dtype)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("rows", [1, 7, 32, 300])  # 300 is past MKL's packed range: it falls back to F.linear
def test_packed_layers_compute_what_f_linear_computes(kernel, rows, monkeypatch):
    monkeypatch.setenv("SHARDSERVE_CPU_GEMM", kernel)
    model = _model()
    x = torch.randn(rows, 48)
    expected = F.linear(F.linear(x, model[0].weight, model[0].bias), model[1].weight, model[1].bias)
    assert cpu_gemm.prepack_model(model, batch_hint=32) == 2
    assert model[0].packed.kernel == kernel
    torch.testing.assert_close(model(x), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(not cpu_gemm._onednn_available(), reason="this torch build has no oneDNN")
def test_onednn_packs_bf16_and_takes_strided_inputs():
    """bf16 weights are packed where the CPU runs oneDNN's bf16 products (AVX-512), and left to F.linear where it
    does not (AVX2 only): the products are right either way."""
    model = _model(torch.bfloat16)
    assert cpu_gemm.prepack_model(model, batch_hint=32) == (2 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else 0)
    wide = torch.randn(9, 3 * 48, dtype=torch.bfloat16)
    x = wide[:, 48:96]  # a column slice, as q/k/v are of a merged projection
    expected = F.linear(x.float(), model[0].weight.float(), model[0].bias.float())
    torch.testing.assert_close(model[0](x).float(), expected, atol=0.1, rtol=0.02)


def test_kernel_choice_from_the_environment(monkeypatch):
    monkeypatch.setenv("SHARDSERVE_CPU_GEMM", "torch")
    model = _model()
    assert cpu_gemm.gemm_kernel() == "torch"
    assert cpu_gemm.prepack_model(model, batch_hint=32) == 0 and model[0].packed is None
    monkeypatch.setenv("SHARDSERVE_CPU_GEMM", "blas")
    with pytest.raises(ValueError, match="SHARDSERVE_CPU_GEMM='blas' is not one of onednn, mkl, torch"):
        cpu_gemm.gemm_kernel()
    monkeypatch.delenv("SHARDSERVE_CPU_GEMM")
    assert cpu_gemm.gemm_kernel() == ("onednn" if cpu_gemm._onednn_available() else
                                      "mkl" if cpu_gemm._mkl_available() else "torch")


def test_no_packing_when_memory_is_short(monkeypatch):
    model = _model()
    monkeypatch.setattr(cpu_gemm, "_available_memory", lambda: 1024)
    assert cpu_gemm.prepack_model(model, batch_hint=32) == 0
    assert model[0].packed is None and model[1].packed is None
