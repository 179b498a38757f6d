"""Fused RMSNorm and rotary kernels against the torch layers they replace on GPUs (in Triton's interpreter
without a GPU)."""
from __future__ import annotations

import pytest
import torch

from shardserve.layers import fused_kernels
from shardserve.layers.attention import triton_backend
from shardserve.layers.layernorm import RMSNorm
from shardserve.layers.rotary import RotaryEmbedding, _rotate

pytestmark = pytest.mark.skipif(not triton_backend.available(), reason="triton is not installed")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE.type == "cuda" else [])


def _tol(dtype):
    return dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [64, 96])
def test_rms_norm_with_and_without_residual(hidden, dtype, monkeypatch):
    g = torch.Generator().manual_seed(0)
    norm = RMSNorm(hidden, eps=1e-6).to(DEVICE, dtype)
    norm.weight.copy_(torch.randn(hidden, generator=g))
    x, residual = (torch.randn(7, hidden, generator=g).to(DEVICE, dtype) for _ in range(2))
    with torch.inference_mode():
        out = fused_kernels.rms_norm(x, norm.weight, norm.eps)
        normed, new_residual = fused_kernels.rms_norm(x, norm.weight, norm.eps, residual)
        monkeypatch.setenv("SHARDSERVE_FUSED_KERNELS", "0")  # the layer's torch path, on any device
        ref = norm(x)
        ref_normed, ref_residual = norm(x, residual)
    torch.testing.assert_close(out, ref, **_tol(dtype))
    torch.testing.assert_close(normed, ref_normed, **_tol(dtype))
    torch.testing.assert_close(new_residual, ref_residual, **_tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_heads, num_kv_heads, head_dim", [(4, 2, 32), (6, 6, 24)])
def test_rotary_in_place_matches_torch(num_heads, num_kv_heads, head_dim, dtype):
    from transformers import LlamaConfig
    rope = RotaryEmbedding(LlamaConfig(rope_theta=10000.0), head_dim, 128).to(DEVICE)
    g = torch.Generator().manual_seed(1)
    # q and k as the attention layer has them: views into one fused QKV projection output
    qkv = torch.randn(9, (num_heads + 2 * num_kv_heads) * head_dim, generator=g).to(DEVICE, dtype)
    q, k, _ = qkv.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], -1)
    q, k = q.view(9, num_heads, head_dim), k.view(9, num_kv_heads, head_dim)
    cos, sin = rope.cos_sin(torch.tensor([0, 1, 5, 17, 3, 100, 127, 2, 64], device=DEVICE), dtype)
    ref_q, ref_k = _rotate(q, cos, sin), _rotate(k, cos, sin)
    v_before = qkv[:, (num_heads + num_kv_heads) * head_dim:].clone()
    fused_kernels.rotary_(q, k, cos, sin)
    torch.testing.assert_close(q, ref_q, **_tol(dtype))
    torch.testing.assert_close(k, ref_k, **_tol(dtype))
    assert torch.equal(qkv[:, (num_heads + num_kv_heads) * head_dim:], v_before)  # v untouched
