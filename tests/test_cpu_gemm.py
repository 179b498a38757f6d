"""MKL packed GEMM weights: the same products as F.linear, and no packing when memory is short."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from shardserve.layers import cpu_gemm
from shardserve.layers.linear import ColumnParallelLinear, RowParallelLinear

needs_mkl = pytest.mark.skipif(not cpu_gemm.packed_gemm_supported(torch.empty(1)),
                               reason="this torch build has no MKL packed GEMM (e.g. aarch64 wheels)")


def _model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(ColumnParallelLinear(48, 96, bias=True), RowParallelLinear(96, 40, bias=True))
    for p in model.parameters():
        p.data.normal_()
    return model


@needs_mkl
@pytest.mark.parametrize("rows", [1, 7, 32, 300])  # 300 is past the packed path's batch range
def test_packed_layers_compute_what_f_linear_computes(rows):
    model = _model()
    x = torch.randn(rows, 48)
    expected = F.linear(F.linear(x, model[0].weight, model[0].bias), model[1].weight, model[1].bias)
    assert cpu_gemm.prepack_model(model, batch_hint=32) == 2
    assert model[0].packed is not None
    torch.testing.assert_close(model(x), expected, atol=1e-4, rtol=1e-4)


def test_no_packing_when_memory_is_short(monkeypatch):
    model = _model()
    monkeypatch.setattr(cpu_gemm, "_available_memory", lambda: 1024)
    assert cpu_gemm.prepack_model(model, batch_hint=32) == 0
    assert model[0].packed is None and model[1].packed is None
