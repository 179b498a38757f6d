"""Kernels that fuse a layer's small elementwise steps, where each separate torch op is a kernel launch (GPU)
or an operator dispatch and a temporary (CPU), and a round trip through memory:

- `rms_norm`: (residual add +) RMSNorm in one pass: read x (and the residual) once, write the normed row
  (and the new residual) once, instead of the seven kernels of the torch expression;
- `rotary_`: neox-style rotation of q and k in place from the step's cos/sin, one launch for both; on a GPU
  it can first apply Qwen3's and Gemma 3's per-head RMSNorm of q and k (otherwise two copies out of the QKV
  output and two more launches), and then write the rotated keys and the values into the paged KV cache at
  their slots (the attention backend's store, one launch per layer fewer: at batch 1 a decode step is a chain
  of small kernels, each costing its launch gap);
- `act_and_mul`: SwiGLU's silu(gate) * up, or GeGLU's (tanh GELU), in one pass.

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
    def _rotary_kernel(q_ptr, k_ptr, cos_ptr, sin_ptr, q_norm_ptr, k_norm_ptr, eps, stride_qt, stride_qh,
                       stride_kt, stride_kh, stride_ct, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, stride_vt,
                       stride_vh, NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr,
                       HALF: tl.constexpr, HALF_PAD: tl.constexpr, HEADS_PAD: tl.constexpr,
                       HAS_NORM: tl.constexpr, STORE_KV: tl.constexpr, BLOCK_SIZE: tl.constexpr):
        token = tl.program_id(0).to(tl.int64)
        d = tl.arange(0, HALF_PAD)
        h = tl.arange(0, HEADS_PAD)
        d_ok = d < HALF
        cos = tl.load(cos_ptr + token * stride_ct + d, mask=d_ok, other=0.0)[None, :]
        sin = tl.load(sin_ptr + token * stride_ct + d, mask=d_ok, other=0.0)[None, :]
        for which in tl.static_range(2):
            if which == 0:
                ptr, stride_t, stride_h, heads, norm_ptr = q_ptr, stride_qt, stride_qh, NUM_HEADS, q_norm_ptr
            else:
                ptr, stride_t, stride_h, heads, norm_ptr = k_ptr, stride_kt, stride_kh, NUM_KV_HEADS, k_norm_ptr
            mask = (h < heads)[:, None] & d_ok[None, :]
            base = ptr + token * stride_t + h[:, None] * stride_h + d[None, :]
            x1 = tl.load(base, mask=mask, other=0.0)
            x2 = tl.load(base + HALF, mask=mask, other=0.0)
            if HAS_NORM:  # each head's RMSNorm first, as _rms_norm_kernel computes it: fp32, scaled in x's dtype
                h1, h2 = x1.to(tl.float32), x2.to(tl.float32)
                scale = tl.rsqrt((tl.sum(h1 * h1, 1) + tl.sum(h2 * h2, 1)) / (2 * HALF) + eps)[:, None]
                w1 = tl.load(norm_ptr + d, mask=d_ok, other=0.0)[None, :]
                w2 = tl.load(norm_ptr + HALF + d, mask=d_ok, other=0.0)[None, :]
                x1, x2 = w1 * (h1 * scale).to(x1.dtype), w2 * (h2 * scale).to(x2.dtype)
            y1, y2 = (x1 * cos - x2 * sin).to(x1.dtype), (x2 * cos + x1 * sin).to(x1.dtype)
            tl.store(base, y1, mask=mask)
            tl.store(base + HALF, y2, mask=mask)
            if STORE_KV and which == 1:  # the cache layout of layers/attention/triton_kernels.py; slot < 0: padding
                slot = tl.load(slot_ptr + token)
                dst = ((slot // BLOCK_SIZE * NUM_KV_HEADS + h[:, None]) * BLOCK_SIZE + slot % BLOCK_SIZE) * \
                    (2 * HALF) + d[None, :]
                keep = mask & (h[:, None] * 0 + slot >= 0)   # (a scalar condition as a tile's, for the interpreter)
                tl.store(k_cache_ptr + dst, y1, mask=keep)
                tl.store(k_cache_ptr + dst + HALF, y2, mask=keep)
                v_src = v_ptr + token * stride_vt + h[:, None] * stride_vh + d[None, :]
                tl.store(v_cache_ptr + dst, tl.load(v_src, mask=keep), mask=keep)
                tl.store(v_cache_ptr + dst + HALF, tl.load(v_src + HALF, mask=keep), mask=keep)

    @triton.jit
    def _act_and_mul_kernel(x_ptr, out_ptr, stride_x, stride_o, N: tl.constexpr, BLOCK: tl.constexpr,
                            TANH_GELU: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < N
        gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
        up = tl.load(x_ptr + row * stride_x + N + cols, mask=mask, other=0.0)
        tl.store(out_ptr + row * stride_o + cols, gated_act(gate, up, TANH_GELU), mask=mask)

    @triton.jit
    def gated_act(gate, up, TANH_GELU: tl.constexpr):
        """act(gate) * up: the activation in fp32 of the gate as rounded, rounded once, then the product in the
        gate's dtype, as torch's two ops. SiLU, or (TANH_GELU) GELU's tanh approximation."""
        g = gate.to(tl.float32)
        if TANH_GELU:
            inner = 0.7978845608028654 * (g + 0.044715 * g * g * g)
            t = tl.exp(-2.0 * tl.abs(inner))  # tanh(inner) = sign * (1 - t) / (1 + t), with no overflow
            tanh = (1.0 - t) / (1.0 + t)
            act = 0.5 * g * (1.0 + tl.where(inner < 0, -tanh, tanh))
        else:
            act = g / (1.0 + tl.exp(-g))
        return act.to(gate.dtype) * up.to(gate.dtype)


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


def rotary_(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
            norm_weights: tuple[torch.Tensor, torch.Tensor] | None = None, eps: float = 0.0,
            kv_store: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> None:
    """Rotates q: [T, H, D] and k: [T, Hkv, D] (last dim contiguous) in place; cos, sin: [T, 1, D / 2].
    Triton only: `norm_weights`, (q's, k's) per-head RMSNorm weights, applied (with `eps`) before rotating;
    `kv_store`, (v: [T, Hkv, D], kv_cache: [2, num_blocks, Hkv, block_size, D], slot_mapping: [T]): the rotated
    keys and the values written into the cache as `triton_kernels.store_kv` writes them."""
    tokens, num_heads, head_dim = q.shape
    if not tokens:
        return
    cos, sin = cos.reshape(tokens, -1), sin.reshape(tokens, -1)
    assert cos.stride() == sin.stride() and q.stride(-1) == 1 and k.stride(-1) == 1
    if _use_c(q):
        assert norm_weights is None and kv_store is None, "the C rotary kernel only rotates"
        assert cos.stride(-1) == 1 and q.dtype == k.dtype == cos.dtype == sin.dtype
        cpu_kernels.lib().rotary_neox(
            q.data_ptr(), k.data_ptr(), cos.data_ptr(), sin.data_ptr(), tokens, num_heads, k.shape[1], head_dim,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos.stride(0), int(q.dtype == torch.bfloat16),
            torch.get_num_threads())
        return
    half = head_dim // 2
    q_norm, k_norm = norm_weights or (q, k)  # (unread without a norm)
    v, k_cache, v_cache, slot_mapping, block_size = k, k, k, cos, 1  # (unread without a store)
    if kv_store is not None:
        v, kv_cache, slot_mapping = kv_store
        assert v.stride(-1) == 1 and kv_cache.is_contiguous() and kv_cache.shape[2] == k.shape[1]
        k_cache, v_cache, block_size = kv_cache[0], kv_cache[1], kv_cache.shape[3]
    _rotary_kernel[(tokens,)](
        q, k, cos, sin, q_norm, k_norm, eps, q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos.stride(0),
        v, k_cache, v_cache, slot_mapping, v.stride(0), v.stride(1),
        NUM_HEADS=num_heads, NUM_KV_HEADS=k.shape[1], HALF=half, HALF_PAD=triton.next_power_of_2(half),
        HEADS_PAD=triton.next_power_of_2(max(num_heads, k.shape[1])), HAS_NORM=norm_weights is not None,
        STORE_KV=kv_store is not None, BLOCK_SIZE=block_size)


def act_and_mul(x: torch.Tensor, tanh_gelu: bool = False) -> torch.Tensor:
    """x: [T, 2 * n] rows (last dim contiguous) holding gate then up -> [T, n] act(gate) * up, act SiLU or
    (tanh_gelu) GELU's tanh approximation."""
    rows, width = x.shape
    assert x.stride(-1) == 1
    n = width // 2
    out = torch.empty(rows, n, dtype=x.dtype, device=x.device)
    if rows and _use_c(x):
        cpu_kernels.lib().gated_act_and_mul(x.data_ptr(), out.data_ptr(), rows, n, x.stride(0),
                                            int(tanh_gelu), int(x.dtype == torch.bfloat16), torch.get_num_threads())
    elif rows:
        block = min(1024, triton.next_power_of_2(n))
        _act_and_mul_kernel[(rows, triton.cdiv(n, block))](x, out, x.stride(0), out.stride(0), N=n, BLOCK=block,
                                                           TANH_GELU=tanh_gelu)
    return out
