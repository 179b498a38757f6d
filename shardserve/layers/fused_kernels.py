"""Kernels that fuse a layer's small elementwise steps, where each separate torch op is a kernel launch (GPU)
or an operator dispatch and a temporary (CPU), and a round trip through memory:

- `rms_norm`: (residual add +) RMSNorm in one pass: read x (and the residual) once, write the normed row
  (and the new residual) once, instead of the seven kernels of the torch expression;
- `rotary_`: neox-style rotation of q and k in place from the step's cos/sin, one launch for both;
- `act_and_mul`: SwiGLU's silu(gate) * up, or GeGLU's (tanh GELU), in one pass (CPU only: on a GPU torch's
  two kernels stay).

On GPUs they are Triton kernels; on CPUs (fp32, bf16) the C kernels of csrc/fused_ops.c (layers/cpu_kernels.py).
They compute what layers/layernorm.py, layers/rotary.py and layers/activation.py compute in torch (normalise
in fp32, scale in the model dtype), which stay the path for other dtypes and where neither builds.
`enabled(x)` says whether a tensor takes the fused path; SHARDSERVE_FUSED_KERNELS=0 turns them all off.
"""
from __future__ import annotations

import importlib.util
import os

import torch

from shardserve.layers import cpu_kernels

_HAVE_TRITON = importlib.util.find_spec("triton") is not None


def _use_c(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and x.dtype in cpu_kernels.DTYPES and cpu_kernels.available()


def enabled(x: torch.Tensor) -> bool:
    if os.environ.get("SHARDSERVE_FUSED_KERNELS", "1") == "0":
        return False
    return (_HAVE_TRITON and x.is_cuda) or _use_c(x)


if _HAVE_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _rms_norm_kernel(x_ptr, residual_ptr, weight_ptr, out_ptr, residual_out_ptr, eps,
                         stride_x, stride_r, stride_o, stride_ro, N: tl.constexpr, BLOCK: tl.constexpr,
                         HAS_RESIDUAL: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < N
        x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
        if HAS_RESIDUAL:
            x = x + tl.load(residual_ptr + row * stride_r + cols, mask=mask, other=0.0)
            tl.store(residual_out_ptr + row * stride_ro + cols, x, mask=mask)
        h = x.to(tl.float32)
        h = h * tl.rsqrt(tl.sum(h * h, 0) / N + eps)
        w = tl.load(weight_ptr + cols, mask=mask, other=0.0)
        tl.store(out_ptr + row * stride_o + cols, w * h.to(x.dtype), mask=mask)

    @triton.jit
    def _rotary_kernel(q_ptr, k_ptr, cos_ptr, sin_ptr, stride_qt, stride_qh, stride_kt, stride_kh, stride_ct,
                       NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HALF: tl.constexpr,
                       HALF_PAD: tl.constexpr, HEADS_PAD: tl.constexpr):
        token = tl.program_id(0).to(tl.int64)
        d = tl.arange(0, HALF_PAD)
        h = tl.arange(0, HEADS_PAD)
        d_ok = d < HALF
        cos = tl.load(cos_ptr + token * stride_ct + d, mask=d_ok, other=0.0)[None, :]
        sin = tl.load(sin_ptr + token * stride_ct + d, mask=d_ok, other=0.0)[None, :]
        for which in tl.static_range(2):
            if which == 0:
                ptr, stride_t, stride_h, heads = q_ptr, stride_qt, stride_qh, NUM_HEADS
            else:
                ptr, stride_t, stride_h, heads = k_ptr, stride_kt, stride_kh, NUM_KV_HEADS
            mask = (h < heads)[:, None] & d_ok[None, :]
            base = ptr + token * stride_t + h[:, None] * stride_h + d[None, :]
            x1 = tl.load(base, mask=mask, other=0.0)
            x2 = tl.load(base + HALF, mask=mask, other=0.0)
            tl.store(base, (x1 * cos - x2 * sin).to(x1.dtype), mask=mask)
            tl.store(base + HALF, (x2 * cos + x1 * sin).to(x1.dtype), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """x (and residual): [T, N] with contiguous rows. Returns the normed rows, or with `residual`
    (normed, x + residual) as RMSNorm.forward does."""
    rows, n = x.shape
    out = torch.empty_like(x)
    residual_out = torch.empty_like(x) if residual is not None else out
    if rows and _use_c(x):
        assert x.stride(-1) == 1 and (residual is None or residual.stride(-1) == 1) and weight.is_contiguous()
        assert weight.dtype == x.dtype and (residual is None or residual.dtype == x.dtype)
        cpu_kernels.lib().rms_norm(
            x.data_ptr(), residual.data_ptr() if residual is not None else None, weight.data_ptr(), out.data_ptr(),
            residual_out.data_ptr(), rows, n, x.stride(0), residual.stride(0) if residual is not None else 0, eps,
            int(x.dtype == torch.bfloat16), torch.get_num_threads())
    elif rows:
        _rms_norm_kernel[(rows,)](
            x, residual if residual is not None else x, weight, out, residual_out, eps,
            x.stride(0), residual.stride(0) if residual is not None else 0, out.stride(0), residual_out.stride(0),
            N=n, BLOCK=triton.next_power_of_2(n), HAS_RESIDUAL=residual is not None)
    return out if residual is None else (out, residual_out)


def rotary_(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Rotates q: [T, H, D] and k: [T, Hkv, D] (last dim contiguous) in place; cos, sin: [T, 1, D / 2]."""
    tokens, num_heads, head_dim = q.shape
    if not tokens:
        return
    cos, sin = cos.reshape(tokens, -1), sin.reshape(tokens, -1)
    assert cos.stride() == sin.stride() and q.stride(-1) == 1 and k.stride(-1) == 1
    if _use_c(q):
        assert cos.stride(-1) == 1 and q.dtype == k.dtype == cos.dtype == sin.dtype
        cpu_kernels.lib().rotary_neox(
            q.data_ptr(), k.data_ptr(), cos.data_ptr(), sin.data_ptr(), tokens, num_heads, k.shape[1], head_dim,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos.stride(0), int(q.dtype == torch.bfloat16),
            torch.get_num_threads())
        return
    half = head_dim // 2
    _rotary_kernel[(tokens,)](
        q, k, cos, sin, q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos.stride(0),
        NUM_HEADS=num_heads, NUM_KV_HEADS=k.shape[1], HALF=half, HALF_PAD=triton.next_power_of_2(half),
        HEADS_PAD=triton.next_power_of_2(max(num_heads, k.shape[1])))


def act_and_mul(x: torch.Tensor, tanh_gelu: bool = False) -> torch.Tensor:
    """x: [T, 2 * n] CPU fp32 or bf16 rows (last dim contiguous) holding gate then up -> [T, n] act(gate) * up,
    act SiLU or (tanh_gelu) GELU's tanh approximation."""
    rows, width = x.shape
    assert _use_c(x) and x.stride(-1) == 1
    out = torch.empty(rows, width // 2, dtype=x.dtype)
    if rows:
        cpu_kernels.lib().gated_act_and_mul(x.data_ptr(), out.data_ptr(), rows, width // 2, x.stride(0),
                                            int(tanh_gelu), int(x.dtype == torch.bfloat16), torch.get_num_threads())
    return out
