"""A projection of a decode step's few rows on a GPU as one Triton kernel, with the pre-norm that opens a
decoder block and the SwiGLU (or Gemma's tanh GeGLU) that follows an MLP's first projection folded in.

Why: at batch 1 a decode step reads every weight once, so its floor is the weights' bytes over the copy
bandwidth; Qwen3-0.6B's step on an H200 was 5.2x that floor (benchmarks/RESULTS.md, fourteenth session).
cuBLAS's kernels for one row read its 4-12 MB matrices at about a third of the bandwidth, and a layer runs
~12 kernels, each leaving a launch gap in the CUDA graph. Here a layer's projections are four kernels:
- `x + residual -> RMSNorm -> QKV`: every program reads the few activation rows (a few KB) and normalises them
  itself, so the norm costs no launch and no round trip; the first program writes the new residual;
- `o_proj`, `down_proj`: plain, each program a few output features over all of K;
- `x + residual -> RMSNorm -> gate_up -> silu(gate) * up`: a program reads the gate and the up rows of the
  same features, so SwiGLU is its epilogue and the [rows, 2 * intermediate] product is never written.
On Hopper each GEMV is launched with programmatic dependent launch: it starts while the kernel ahead of it
ends and reads its first weight tile meanwhile (`pdl`).
The rounding is the unfused path's (layers/layernorm.py, fused_kernels.py): the sum and the normed rows in the
model dtype, the norm in fp32; each product summed in fp32. Only the order of the dot products' additions
differs from cuBLAS's.

Used where `runs(x, weight)`: a CUDA tensor (or Triton's interpreter, in tests) of at most MAX_ROWS rows, the
weight contiguous, and SHARDSERVE_GEMV=1. Off by default until measured on a GPU against cuBLAS
(`benchmarks/gpu.py --peers shardserve,shardserve-gemv`, `benchmarks/gpu_gemv.py`).
"""
from __future__ import annotations

import importlib.util
import os

import torch

from shardserve.layers.activation import GeluAndMul, SiluAndMul
from shardserve.layers.cpu_gemm import PackedWeight
from shardserve.layers.cpu_gemm import linear as cpu_linear
from shardserve.layers.layernorm import RMSNorm

_HAVE_TRITON = importlib.util.find_spec("triton") is not None
MAX_ROWS = 4  # past a few rows a GEMM's tiles reuse each weight load across rows; a GEMV's registers do not

if _HAVE_TRITON:
    import triton
    import triton.language as tl

    from shardserve.layers.fused_kernels import gated_act

    @triton.jit
    def _gemv_kernel(x_ptr, residual_ptr, norm_ptr, w_ptr, bias_ptr, y_ptr, residual_out_ptr, eps,
                     M, N, K, stride_x, stride_r, stride_w, stride_y, stride_ro,
                     M_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NORM: tl.constexpr,
                     HAS_RESIDUAL: tl.constexpr, HAS_BIAS: tl.constexpr, GATED: tl.constexpr,
                     TANH_GELU: tl.constexpr, PDL: tl.constexpr):
        """y[m, n] = sum_k w[n, k] * a[m, k] for BLOCK_N features n of every row m; a = x, or with NORM
        RMSNorm(x (+ residual)) computed here. GATED: w holds N gate rows then N up rows and
        y = act(gate) * up, act SiLU or (TANH_GELU) GELU's tanh approximation. PDL: launched while the kernel
        before it still runs (see `pdl`).

        A weight tile [BLOCK_N, BLOCK_K] is read once (16 bytes a thread) and used for every row: the products
        [rows, BLOCK_N, BLOCK_K] are summed elementwise over the K loop and reduced once after it. The activation
        rows are read as [rows, BLOCK_N, BLOCK_K] too, each row once per feature of the tile (from L1: a few KB),
        so that every tensor in the loop has the products' layout: a loop that reduced, or that broadcast a row
        read in another layout, would change layouts through shared memory, with barriers, every tile
        (tests/test_triton_compile.py checks there are none)."""
        pid = tl.program_id(0)
        feats = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        feat_ok = feats < N
        w_rows = w_ptr + feats[:, None].to(tl.int64) * stride_w
        ks = tl.arange(0, BLOCK_K)
        rows = tl.arange(0, M_PAD)
        # [rows, BLOCK_N, BLOCK_K] offsets of the activations: every feature of the tile reads its row's K
        row_offsets = rows[:, None, None] + 0 * feats[None, :, None]
        row_ok = row_offsets < M
        # The first weight tile is read before anything else: no kernel writes weights, so with PDL this read
        # overlaps the previous kernel's end. Each later tile is read one iteration ahead of its use. Weights are
        # read once a step: evict_first keeps them from pushing the step's activations out of the caches.
        w_ok = feat_ok[:, None] & (ks < K)[None, :]
        w = tl.load(w_rows + ks[None, :], mask=w_ok, other=0.0, eviction_policy="evict_first")
        w_up = w
        if GATED:
            w_up = tl.load(w_rows + N * stride_w + ks[None, :], mask=w_ok, other=0.0, eviction_policy="evict_first")
        if PDL:  # past this wait the previous kernel's writes are visible, and it no longer reads what we write
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        if NORM:  # each row's mean square first: the rows are a few KB, read again below from the cache
            squares = tl.zeros([M_PAD, BLOCK_N, BLOCK_K], tl.float32)
            for k0 in range(0, K, BLOCK_K):
                cols = k0 + ks[None, None, :]
                ok = row_ok & (cols < K)
                h = tl.load(x_ptr + row_offsets * stride_x + cols, mask=ok, other=0.0)
                if HAS_RESIDUAL:
                    h = h + tl.load(residual_ptr + row_offsets * stride_r + cols, mask=ok, other=0.0)
                h = h.to(tl.float32)
                squares += h * h
            inv_rms = tl.rsqrt(tl.sum(squares, 2) / K + eps)[:, :, None]  # (the same for every feature)
        products = tl.zeros([M_PAD, BLOCK_N, BLOCK_K], tl.float32)
        products_up = tl.zeros([M_PAD, BLOCK_N, BLOCK_K], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + ks[None, None, :]
            ok = row_ok & (cols < K)
            a = tl.load(x_ptr + row_offsets * stride_x + cols, mask=ok, other=0.0)
            if NORM:
                if HAS_RESIDUAL:
                    a = a + tl.load(residual_ptr + row_offsets * stride_r + cols, mask=ok, other=0.0)
                    # the new residual, written by the first feature's copy of the rows (the first program's)
                    tl.store(residual_out_ptr + row_offsets * stride_ro + cols, a,
                             mask=ok & (feats[None, :, None] == 0))
                scale = tl.load(norm_ptr + cols + 0 * row_offsets, mask=ok, other=0.0)
                a = scale * (a.to(tl.float32) * inv_rms).to(a.dtype)
            a = a.to(tl.float32)
            products += w.to(tl.float32)[None, :, :] * a
            if GATED:
                products_up += w_up.to(tl.float32)[None, :, :] * a
            ahead = k0 + BLOCK_K + ks  # the next tile (all masked after the last)
            w_ok = feat_ok[:, None] & (ahead < K)[None, :]
            w = tl.load(w_rows + ahead[None, :], mask=w_ok, other=0.0, eviction_policy="evict_first")
            if GATED:
                w_up = tl.load(w_rows + N * stride_w + ahead[None, :], mask=w_ok, other=0.0,
                               eviction_policy="evict_first")
        y = tl.sum(products, 2)
        if HAS_BIAS:
            y += tl.load(bias_ptr + feats, mask=feat_ok, other=0.0).to(tl.float32)[None, :]
        y = y.to(y_ptr.dtype.element_ty)
        if GATED:  # as act_and_mul computes it from the rounded gate and up
            up = tl.sum(products_up, 2)
            if HAS_BIAS:
                up += tl.load(bias_ptr + N + feats, mask=feat_ok, other=0.0).to(tl.float32)[None, :]
            y = gated_act(y, up, TANH_GELU)
        tl.store(y_ptr + rows[:, None] * stride_y + feats[None, :], y,
                 mask=(rows < M)[:, None] & feat_ok[None, :])


# Read once: every eager step asks `runs` for every projection.
ENABLED = _HAVE_TRITON and os.environ.get("SHARDSERVE_GEMV", "0") == "1"
PDL_ENABLED = os.environ.get("SHARDSERVE_GEMV_PDL", "1") == "1"
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
_PDL_DEVICES: dict[torch.device, bool] = {}


def pdl(device: torch.device) -> bool:
    """Whether the GEMV kernels on `device` are launched with programmatic dependent launch (Hopper on): each
    starts while the kernel ahead of it ends, reads its first weight tile, then waits for that kernel's writes
    (`gdc_wait`). The kernels ahead of one (the GEMVs themselves, decode attention) let it start early
    (`gdc_launch_dependents`). In a CUDA graph the launches keep their programmatic edges. A kernel launched so
    must wait before it exits, or the next one's wait would not cover the kernels before: every program of the
    GEMV waits unconditionally. SHARDSERVE_GEMV_PDL=0 turns it off (to measure it)."""
    if not (ENABLED and PDL_ENABLED and device.type == "cuda" and not _INTERPRETED):
        return False
    if device not in _PDL_DEVICES:
        _PDL_DEVICES[device] = torch.cuda.get_device_capability(device)[0] >= 9 and _triton_has_pdl()
    return _PDL_DEVICES[device]


def _triton_has_pdl() -> bool:
    """Whether this Triton has grid-dependency control in kernels and the PDL launch option."""
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
    except ImportError:
        return False
    return hasattr(tl.extra.cuda, "gdc_wait") and "launch_pdl" in CUDAOptions.__dataclass_fields__


def runs(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `x @ weight.T` takes the GEMV kernel."""
    return (ENABLED and (x.is_cuda or _INTERPRETED) and x.dim() == 2 and 0 < x.shape[0] <= MAX_ROWS
            and x.stride(-1) == 1 and weight.is_contiguous() and x.dtype == weight.dtype)


def fuses(norm, act) -> bool:
    """Whether the kernel computes this norm (RMSNorm: Gemma's too, its offset added at load) and activation
    (SwiGLU, or GeGLU with the tanh GELU)."""
    return isinstance(norm, RMSNorm) and (act is None or type(act) is SiluAndMul or (
        type(act) is GeluAndMul and act.approximate == "tanh"))


def tiles(rows: int, features: int, inner: int, gated: bool) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps): the products a program holds, [rows, BLOCK_N, BLOCK_K] (twice when gated),
    4,096 in all (32 fp32 registers a thread), as wide along K as that allows up to 2,048; and at least 1,024
    wide, 4 warps x 32 threads x 8 elements, below which Triton spreads a tile's rows over the threads and reads
    the weights in pieces narrower than 16 bytes (4 gated rows then hold 8,192 products). The smallest
    projections (1,024 features, one row) still get 512 programs, four an SM. A first guess, for
    benchmarks/gpu_gemv.py's sweep to correct."""
    elements = 4096 // (triton.next_power_of_2(rows) * (2 if gated else 1))  # of the tile, per row
    block_k = min(triton.next_power_of_2(inner), 2048, max(1024, elements))
    return max(1, elements // block_k), block_k, 4


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
         norm: tuple[torch.Tensor, float] | None = None, residual: torch.Tensor | None = None,
         gated: bool = False, tanh_gelu: bool = False, config: tuple[int, int, int] | None = None,
         use_pdl: bool | None = None):
    """x: [M, K] (M <= MAX_ROWS), weight: [N, K] -> [M, N] = x @ weight.T (+ bias).
    `norm` (RMSNorm's weight, eps): the product of RMSNorm(x + residual) (of RMSNorm(x) without `residual`),
    returned with the sum, the next residual (x itself without `residual`), as RMSNorm.forward returns it.
    `gated`: weight's rows are gate then up, and the result silu(gate) * up ((tanh_gelu) tanh-GELU(gate) * up):
    [M, N / 2].
    `config`: (BLOCK_N, BLOCK_K, num_warps) instead of `tiles`' choice (benchmarks); `use_pdl`: instead of
    `pdl(x.device)`."""
    rows, inner = x.shape
    features = weight.shape[0] // (2 if gated else 1)
    assert weight.shape[1] == inner and x.stride(-1) == 1 and weight.is_contiguous()
    y = x.new_empty(rows, features)
    residual_out = x
    if norm is not None and residual is not None:
        assert residual.shape == x.shape and residual.stride(-1) == 1
        residual_out = torch.empty_like(x)
    block_n, block_k, num_warps = config or tiles(rows, features, inner, gated)
    norm_weight, eps = norm if norm is not None else (weight, 0.0)  # (unread without a norm)
    use_pdl = pdl(x.device) if use_pdl is None else use_pdl
    _gemv_kernel[(triton.cdiv(features, block_n),)](
        x, residual if residual is not None else x, norm_weight, weight, bias if bias is not None else weight, y,
        residual_out, eps, rows, features, inner, x.stride(0), residual.stride(0) if residual is not None else 0,
        weight.stride(0), y.stride(0), residual_out.stride(0), M_PAD=triton.next_power_of_2(rows),
        BLOCK_N=block_n, BLOCK_K=block_k, NORM=norm is not None, HAS_RESIDUAL=norm is not None and residual is not None,
        HAS_BIAS=bias is not None, GATED=gated, TANH_GELU=tanh_gelu, PDL=use_pdl, num_warps=num_warps,
        **({"launch_pdl": True} if use_pdl else {}))
    return y if norm is None else (y, residual_out)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
           packed: PackedWeight | None = None) -> torch.Tensor:
    """A layer's product: the GEMV kernel where it runs, else the CPU's packed GEMM or F.linear."""
    return gemv(x, weight, bias) if runs(x, weight) else cpu_linear(x, weight, bias, packed)
