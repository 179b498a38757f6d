"""Fused RMSNorm, rotary and SwiGLU kernels against the torch layers they replace: the Triton kernels (on
GPUs; in Triton's interpreter without one) and the C kernels CPUs run in fp32 and bf16."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from shardserve.layers import cpu_kernels, fused_kernels
from shardserve.layers.activation import GeluAndMul, SiluAndMul
from shardserve.layers.attention import triton_backend
from shardserve.layers.layernorm import RMSNorm
from shardserve.layers.rotary import RotaryEmbedding, _rotate

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
needs_c = pytest.mark.skipif(not cpu_kernels.available(), reason="no C compiler to build the CPU kernels")
# (implementation, device, dtype): the C kernels are what a CPU runs in fp32 and bf16, Triton the GPU's kernels
CASES = [pytest.param(("c", torch.device("cpu"), dtype), marks=needs_c, id=f"c-{str(dtype)[6:]}")
         for dtype in (torch.float32, torch.bfloat16)] + [
    pytest.param(("triton", DEVICE, dtype), id=f"triton-{str(dtype)[6:]}",
                 marks=pytest.mark.skipif(not triton_backend.available(), reason="triton is not installed"))
    for dtype in [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE.type == "cuda" else [])]


@pytest.fixture
def impl(request, monkeypatch):
    name, device, dtype = request.param
    if name == "triton":  # on a CPU the C kernels would take fp32 tensors: send them to Triton's interpreter
        monkeypatch.setattr(fused_kernels, "_use_c", lambda x: False)
    return device, dtype


def _tol(dtype):
    return dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)


def assert_matches_torch(out: torch.Tensor, ref: torch.Tensor) -> None:
    """Close as _tol says; in bf16 on a CPU also rounded where the torch expression rounds: nearly every element
    the same bits (a kernel rounding once where torch rounds per op would differ in many), the rest an ulp or
    two off (float noise in the fp32 sums before a rounding). Near zero the kernels may be the more exact (tanh
    GELU of a large negative gate: e-12 where torch's tanh saturates to 0)."""
    torch.testing.assert_close(out, ref, **_tol(out.dtype))
    if out.dtype == torch.bfloat16 and out.device.type == "cpu":
        assert ((out == ref) | ((out.float() - ref.float()).abs() < 1e-6)).float().mean() > 0.98
        torch.testing.assert_close(out.float(), ref.float(), atol=1e-5, rtol=2 ** -6)


@pytest.mark.parametrize("impl", CASES, indirect=True)
@pytest.mark.parametrize("rows, hidden", [(7, 64), (7, 100), (700, 96)])  # 700 rows: split across threads
def test_rms_norm_with_and_without_residual(impl, rows, hidden, monkeypatch):
    device, dtype = impl
    g = torch.Generator().manual_seed(0)
    norm = RMSNorm(hidden, eps=1e-6).to(device, dtype)
    norm.weight.copy_(torch.randn(hidden, generator=g))
    x, residual = (torch.randn(rows, hidden, generator=g).to(device, dtype) for _ in range(2))
    with torch.inference_mode():
        out = fused_kernels.rms_norm(x, norm.weight, norm.eps)
        normed, new_residual = fused_kernels.rms_norm(x, norm.weight, norm.eps, residual)
        monkeypatch.setenv("SHARDSERVE_FUSED_KERNELS", "0")  # the layer's torch path, on any device
        ref = norm(x)
        ref_normed, ref_residual = norm(x, residual)
    assert_matches_torch(out, ref)
    assert_matches_torch(normed, ref_normed)
    assert_matches_torch(new_residual, ref_residual)


@pytest.mark.parametrize("impl", CASES, indirect=True)
@pytest.mark.parametrize("num_heads, num_kv_heads, head_dim", [(4, 2, 32), (6, 6, 24)])
def test_rotary_in_place_matches_torch(impl, num_heads, num_kv_heads, head_dim):
    from transformers import LlamaConfig
    device, dtype = impl
    rope = RotaryEmbedding(LlamaConfig(rope_theta=10000.0), head_dim, 128).to(device)
    g = torch.Generator().manual_seed(1)
    # q and k as the attention layer has them: views into one fused QKV projection output
    qkv = torch.randn(9, (num_heads + 2 * num_kv_heads) * head_dim, generator=g).to(device, dtype)
    q, k, _ = qkv.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], -1)
    q, k = q.view(9, num_heads, head_dim), k.view(9, num_kv_heads, head_dim)
    cos, sin = rope.cos_sin(torch.tensor([0, 1, 5, 17, 3, 100, 127, 2, 64], device=device), dtype)
    ref_q, ref_k = _rotate(q, cos, sin), _rotate(k, cos, sin)
    v_before = qkv[:, (num_heads + num_kv_heads) * head_dim:].clone()
    fused_kernels.rotary_(q, k, cos, sin)
    assert_matches_torch(q, ref_q)
    assert_matches_torch(k, ref_k)
    assert torch.equal(qkv[:, (num_heads + num_kv_heads) * head_dim:], v_before)  # v untouched


@pytest.mark.parametrize("impl", [c for c in CASES if c.id.startswith("triton")], indirect=True)
@pytest.mark.parametrize("num_heads, num_kv_heads, head_dim", [(4, 2, 32), (6, 6, 24)])
def test_qk_norm_then_rotary_in_one_kernel_matches_torch(impl, num_heads, num_kv_heads, head_dim):
    """Qwen3's per-head q/k RMSNorm folded into the rotary kernel (Triton only): the two norm layers' torch
    path, then the rotation. (CPUs run the norms as layers: the C rotary kernel does not normalise.)"""
    from transformers import LlamaConfig
    device, dtype = impl
    rope = RotaryEmbedding(LlamaConfig(rope_theta=10000.0), head_dim, 128).to(device)
    g = torch.Generator().manual_seed(3)
    q_norm, k_norm = (RMSNorm(head_dim, eps=1e-6).to(device, dtype) for _ in range(2))
    for norm in (q_norm, k_norm):
        norm.weight.copy_(torch.randn(head_dim, generator=g))
    qkv = (3 * torch.randn(9, (num_heads + 2 * num_kv_heads) * head_dim, generator=g)).to(device, dtype)
    q, k, _ = qkv.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], -1)
    q, k = q.view(9, num_heads, head_dim), k.view(9, num_kv_heads, head_dim)
    cos, sin = rope.cos_sin(torch.tensor([0, 1, 5, 17, 3, 100, 127, 2, 64], device=device), dtype)
    v_before = qkv[:, (num_heads + num_kv_heads) * head_dim:].clone()
    with torch.inference_mode(), pytest.MonkeyPatch.context() as m:
        m.setenv("SHARDSERVE_FUSED_KERNELS", "0")
        ref_q, ref_k = _rotate(q_norm(q), cos, sin), _rotate(k_norm(k), cos, sin)
    fused_kernels.rotary_(q, k, cos, sin, (q_norm.weight, k_norm.weight), 1e-6)
    assert_matches_torch(q, ref_q)
    assert_matches_torch(k, ref_k)
    assert torch.equal(qkv[:, (num_heads + num_kv_heads) * head_dim:], v_before)  # v untouched


@pytest.mark.parametrize("impl", [c for c in CASES if c.id.startswith("triton")], indirect=True)
@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("num_heads, num_kv_heads, head_dim", [(4, 2, 32), (6, 3, 24)])
def test_rotary_writes_the_kv_cache_as_the_attention_store_does(impl, qk_norm, num_heads, num_kv_heads, head_dim):
    """The rotary kernel writing the rotated keys and the values into the paged cache (the Triton backend's
    store folded in, one launch fewer a layer): the same q and k, and the same cache bit for bit, as rotating
    and then `triton_kernels.store_kv`; a padding row (slot -1) writes nothing."""
    from transformers import LlamaConfig

    from shardserve.layers.attention import triton_kernels
    device, dtype = impl
    rope = RotaryEmbedding(LlamaConfig(rope_theta=10000.0), head_dim, 128).to(device)
    g = torch.Generator().manual_seed(5)
    weights = tuple(torch.randn(head_dim, generator=g).to(device, dtype) for _ in range(2)) if qk_norm else None
    qkv = torch.randn(7, (num_heads + 2 * num_kv_heads) * head_dim, generator=g).to(device, dtype)
    slots = torch.tensor([5, 0, 17, -1, 31, 8, 22], device=device)   # blocks of 4 tokens, out of order
    positions = torch.tensor([0, 1, 5, 0, 100, 127, 64], device=device)
    cos, sin = rope.cos_sin(positions, dtype)
    results = []
    for fused in (False, True):
        x = qkv.clone()
        q, k, v = x.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], -1)
        q, k, v = (t.view(7, -1, head_dim) for t in (q, k, v))
        cache = torch.full((2, 9, num_kv_heads, 4, head_dim), 7.0, dtype=dtype, device=device)
        fused_kernels.rotary_(q, k, cos, sin, weights, 1e-6, (v, cache, slots) if fused else None)
        if not fused:
            triton_kernels.store_kv(k, v, cache, slots)
        results.append((x, cache))
    (x_ref, cache_ref), (x, cache) = results
    assert torch.equal(x, x_ref) and torch.equal(cache, cache_ref)
    written = torch.zeros(9 * 4, dtype=torch.bool)
    written[slots[slots >= 0].cpu()] = True
    assert (cache.transpose(2, 3).reshape(2, 9 * 4, -1)[:, ~written.to(device)] == 7).all()  # the rest untouched


@pytest.mark.parametrize("impl", CASES, indirect=True)
@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("rows, inter", [(5, 40), (300, 688)])  # widths off the 16-lane vectors; threads
def test_gated_act_and_mul_matches_torch(impl, rows, inter, act, monkeypatch):
    device, dtype = impl
    g = torch.Generator().manual_seed(2)
    wide = (6 * torch.randn(rows, 2 * inter + 8, generator=g)).to(device, dtype)  # large |gate|: exp's range ends
    x = wide[:, 8:]                                            # rows of a wider tensor: a row stride of its own
    gate, up = x.chunk(2, dim=-1)
    module, ref = (SiluAndMul(), F.silu(gate) * up) if act == "silu" else \
        (GeluAndMul("tanh"), F.gelu(gate, approximate="tanh") * up)
    # the layer takes the fused path where the device has one (a GPU's Triton, a CPU's C); Triton's
    # interpreter on a CPU is called directly
    out = module(x) if fused_kernels.enabled(x) else fused_kernels.act_and_mul(x, tanh_gelu=act != "silu")
    assert_matches_torch(out, ref)
    monkeypatch.setenv("SHARDSERVE_FUSED_KERNELS", "0")
    assert not fused_kernels.enabled(x)
    torch.testing.assert_close(module(x), ref, atol=0, rtol=0)
