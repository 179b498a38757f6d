#!/usr/bin/env python
"""Batch-1 decode's matrix-vector products on a GPU (issue 8): cuBLAS, as the engine calls it (F.linear), against
a Triton GEMV candidate over a sweep of its tile sizes, at every projection of the benchmark's model shapes.

Why: at batch 1 a decode step reads every weight once, so its floor is the weights' bytes over the copy bandwidth.
The fourteenth session's profile (benchmarks/RESULTS.md) had Qwen3-0.6B's cuBLAS kernels read their weights at
about a third of the copy bandwidth (0.86 ms of a 1.5 ms step): the projections are small (4-12 MB) and cuBLAS
picks kernels made for larger problems. This measures, in one short run, whether a kernel written for one row
of activations reads them faster: the engine only switches if it does. Each candidate's output is checked against
cuBLAS's (a faster wrong kernel is flagged, not ranked). do_bench clears the L2 cache between calls, as a step's
weights are cold (the model is far larger than the cache).

  python3 benchmarks/gpu_gemv.py                 # on the GPU: bf16, both shapes
  python3 benchmarks/gpu_gemv.py --smoke         # toy sizes in Triton's interpreter on a CPU: checks the script
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from gpu import SHAPES  # noqa: E402
from gpu_kernels import bench, kernel_bench_setup  # noqa: E402

CONFIGS = [{"block_n": n, "block_k": k, "num_warps": w} for n in (2, 4, 8, 16) for k in (256, 512, 1024)
           for w in (4, 8)]


def projections(fields: dict) -> list[tuple[str, int, int]]:
    """(name, out features N, in features K) of one decoder layer's projections and the LM head, unsharded."""
    hidden, heads = fields["hidden_size"], fields["num_attention_heads"]
    head_dim = fields.get("head_dim", hidden // heads)
    q, kv, inter = heads * head_dim, fields["num_key_value_heads"] * head_dim, fields["intermediate_size"]
    return [("qkv", q + 2 * kv, hidden), ("o", hidden, q), ("gate_up", 2 * inter, hidden), ("down", hidden, inter),
            ("lm_head", fields["vocab_size"], hidden)]


def gemv_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def _gemv(x_ptr, w_ptr, y_ptr, N, K, stride_w, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """y[n] = sum_k w[n, k] * x[k] for BLOCK_N rows of w (nn.Linear's [N, K] layout) per program; products
        summed in fp32 per lane across the K loop, reduced once at the end."""
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            col_ok = cols < K
            x = tl.load(x_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + rows[:, None].to(tl.int64) * stride_w + cols[None, :],
                        mask=row_ok[:, None] & col_ok[None, :], other=0.0)
            acc += w.to(tl.float32) * x[None, :]
        tl.store(y_ptr + rows, tl.sum(acc, 1).to(y_ptr.dtype.element_ty), mask=row_ok)

    def gemv(x, w, block_n: int, block_k: int, num_warps: int):
        """x: [1, K], w: [N, K] -> [1, N]."""
        n, k = w.shape
        y = x.new_empty(1, n)
        _gemv[(triton.cdiv(n, block_n),)](x, w, y, n, k, w.stride(0), BLOCK_N=block_n, BLOCK_K=block_k,
                                          num_warps=num_warps)
        return y
    return gemv


def main() -> None:
    a, device, dtype, name, bandwidth = kernel_bench_setup(__doc__)
    import torch
    import torch.nn.functional as F
    gemv = gemv_kernel()
    print(f"{name}: copy bandwidth {bandwidth:,.0f} GB/s, {dtype}")
    report = {"device": name, "bandwidth_gbs": bandwidth, "shapes": []}
    configs = CONFIGS[:2] if a.smoke else CONFIGS
    for model in a.models.split(","):
        fields = SHAPES[model][1]
        shapes = [("tiny", 40, 24)] if a.smoke else projections(fields)
        total = {"cublas": 0.0, "best": 0.0}
        print(f"\n{model}: batch-1 projections (one layer's, and the LM head)")
        print("| projection | N x K | MB | cuBLAS ms (of copy bw) | best Triton ms (of copy bw) | best config | "
              "max rel diff |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        g = torch.Generator().manual_seed(0)
        for proj, n, k in shapes:
            w = (torch.randn(n, k, generator=g) / k ** 0.5).to(device, dtype)
            x = torch.randn(1, k, generator=g).to(device, dtype)
            ref = F.linear(x, w).float()
            size = w.numel() * w.element_size()
            cublas = bench(lambda: F.linear(x, w), device)
            timed = {}
            for config in configs:
                try:
                    out = gemv(x, w, **config).float()
                    diff = ((out - ref).abs().max() / ref.abs().max()).item()
                    if diff > 2e-2:
                        timed[json.dumps(config)] = (None, f"wrong: {diff:.2e}")
                        continue
                    timed[json.dumps(config)] = (bench(lambda: gemv(x, w, **config), device), diff)
                except Exception as error:  # out of resources, say: reported, not fatal
                    timed[json.dumps(config)] = (None, f"{type(error).__name__}: {error}"[:120])
            ok = {c: r for c, r in timed.items() if r[0] is not None}
            best = min(ok, key=lambda c: ok[c][0]) if ok else None
            report["shapes"].append({"model": model, "projection": proj, "n": n, "k": k, "bytes": size,
                                     "cublas_ms": cublas, "triton": timed, "best": best})
            layers = 1 if proj == "lm_head" else fields["num_hidden_layers"]
            total["cublas"] += cublas * layers
            if best is None:
                print(f"| {proj} | {n} x {k} | {size / 1e6:.1f} | {cublas:.4f} | failed | - | - |")
                total["best"] += cublas * layers
                continue
            ms, diff = ok[best]
            total["best"] += min(ms, cublas) * layers

            def rate(t):
                return f"{t:.4f} ({size / t / 1e6 / bandwidth:.0%})"
            print(f"| {proj} | {n} x {k} | {size / 1e6:.1f} | {rate(cublas)} | {rate(ms)} | {best} | {diff:.1e} |")
        print(f"\n{model}: a step's projections (x{fields['num_hidden_layers']} layers + LM head): cuBLAS "
              f"{total['cublas']:.3f} ms, the faster of the two per projection {total['best']:.3f} ms")
        report.setdefault("totals", {})[model] = total
    if a.json_out:
        Path(a.json_out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
