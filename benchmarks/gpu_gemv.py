#!/usr/bin/env python
"""A decode step's projections at 1 and a few rows on a GPU (issue 8): the engine's default path (cuBLAS, as
F.linear, after the Triton RMSNorm kernel and before the SwiGLU kernel where the layer has them) against the
engine's GEMV kernel (layers/gemv.py: the norm and SwiGLU folded in), at the tile sizes it picks and over a
sweep of them, at every projection of the benchmark's model shapes.

Why: at batch 1 a decode step reads every weight once, so its floor is the weights' bytes over the copy bandwidth.
The fourteenth session's profile (benchmarks/RESULTS.md) had Qwen3-0.6B's cuBLAS kernels read their weights at
about a third of the copy bandwidth (0.86 ms of a 1.5 ms step), with a norm or SwiGLU launch beside two of the
four. This says, per projection, which path is faster and which tiles are: `gemv.tiles` takes the winners, and
SHARDSERVE_GEMV's default follows the whole step (benchmarks/gpu.py's shardserve-gemv peer). Each output is
checked against the default path's (a faster wrong kernel is flagged, not ranked). do_bench clears the L2 cache
between calls, as a step's weights are cold (the model is far larger than the cache).

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

# (BLOCK_N, BLOCK_K, num_warps); those past 64 fp32 products a thread (rows * BLOCK_N * BLOCK_K, twice when
# gated, over 32 * num_warps; summed over the K loop) are skipped: they spill
CONFIGS = [(n, k, w) for n in (1, 2, 4, 8, 16) for k in (128, 256, 512, 1024, 2048) for w in (4, 8)]


def projections(fields: dict) -> list[tuple[str, int, int, bool, bool]]:
    """(name, out features N, in features K, normed, gated) of one decoder layer's projections and the LM head,
    unsharded; gated: N counts the gate and the up rows."""
    hidden, heads = fields["hidden_size"], fields["num_attention_heads"]
    head_dim = fields.get("head_dim", hidden // heads)
    q, kv, inter = heads * head_dim, fields["num_key_value_heads"] * head_dim, fields["intermediate_size"]
    return [("norm + qkv", q + 2 * kv, hidden, True, False), ("o", hidden, q, False, False),
            ("norm + gate_up + SwiGLU", 2 * inter, hidden, True, True), ("down", hidden, inter, False, False),
            ("lm_head", fields["vocab_size"], hidden, False, False)]


def fits(config, rows: int, gated: bool) -> bool:
    block_n, block_k, warps = config
    return rows * block_n * block_k * (2 if gated else 1) <= 64 * 32 * warps


def main() -> None:
    a, device, dtype, name, bandwidth = kernel_bench_setup(__doc__)
    import torch
    import torch.nn.functional as F

    from shardserve.layers import fused_kernels, gemv
    print(f"{name}: copy bandwidth {bandwidth:,.0f} GB/s, {dtype}")
    report = {"device": name, "bandwidth_gbs": bandwidth, "shapes": []}
    configs = [(2, 64, 4), (4, 32, 4)] if a.smoke else CONFIGS
    for model in a.models.split(","):
        fields = SHAPES[model][1]
        shapes = [("norm + tiny", 40, 24, True, False), ("norm + tiny gated", 40, 24, True, True),
                  ("tiny", 40, 24, False, False)] if a.smoke else projections(fields)
        for rows in (1, gemv.MAX_ROWS):
            total = {"default": 0.0, "gemv": 0.0, "best": 0.0}
            print(f"\n{model}, {rows} row(s): one layer's projections, and the LM head")
            print("| projection | N x K | MB | default ms (of copy bw) | gemv ms (of copy bw) | best gemv ms | "
                  "best config | max rel diff |")
            print("| --- | --- | --- | --- | --- | --- | --- | --- |")
            g = torch.Generator().manual_seed(0)
            for proj, n, k, normed, gated in shapes:
                w = (torch.randn(n, k, generator=g) / k ** 0.5).to(device, dtype)
                x, residual = (torch.randn(rows, k, generator=g).to(device, dtype) for _ in range(2))
                scale = torch.ones(k, dtype=dtype, device=device)

                def default():
                    h = fused_kernels.rms_norm(x, scale, 1e-6, residual)[0] if normed else x
                    y = F.linear(h, w)
                    return fused_kernels.act_and_mul(y) if gated else y

                def fused(config=None):
                    if normed:
                        return gemv.gemv(x, w, None, (scale, 1e-6), residual, gated=gated, config=config)[0]
                    return gemv.gemv(x, w, config=config)

                ref = default().float()
                size = w.numel() * w.element_size()
                timed = {}
                for config in [None] + [c for c in configs if fits(c, rows, gated)]:
                    key = "engine " + json.dumps(gemv.tiles(rows, n // (2 if gated else 1), k, gated)) \
                        if config is None else json.dumps(config)
                    try:
                        out = fused(config).float()
                        diff = ((out - ref).abs().max() / ref.abs().max()).item()
                        if diff > 2e-2:
                            timed[key] = (None, f"wrong: {diff:.2e}")
                            continue
                        timed[key] = (bench(lambda: fused(config), device), diff)
                    except Exception as error:  # out of resources, say: reported, not fatal
                        timed[key] = (None, f"{type(error).__name__}: {error}"[:120])
                base = bench(default, device)
                engine_key = next(iter(timed))
                ok = {c: r for c, r in timed.items() if r[0] is not None}
                best = min(ok, key=lambda c: ok[c][0]) if ok else None
                report["shapes"].append({"model": model, "rows": rows, "projection": proj, "n": n, "k": k,
                                         "bytes": size, "default_ms": base, "gemv": timed, "best": best})
                layers = 1 if proj == "lm_head" else fields["num_hidden_layers"]
                engine_ms = timed[engine_key][0]
                total["default"] += base * layers
                total["gemv"] += (engine_ms or base) * layers
                total["best"] += min(ok[best][0] if best else base, base) * layers

                def rate(t):
                    return f"{t:.4f} ({size / t / 1e6 / bandwidth:.0%})" if t else "failed"
                diff = ok[best][1] if best else float("nan")
                print(f"| {proj} | {n} x {k} | {size / 1e6:.1f} | {rate(base)} | {rate(engine_ms)} | "
                      f"{rate(ok[best][0] if best else None)} | {best} | {diff:.1e} |")
            print(f"\n{model}, {rows} row(s), a step's projections (x{fields['num_hidden_layers']} layers + LM head):"
                  f" default {total['default']:.3f} ms, gemv at the engine's tiles {total['gemv']:.3f} ms, the "
                  f"faster per projection at the best tiles {total['best']:.3f} ms")
            report.setdefault("totals", {})[f"{model}, {rows} rows"] = total
    if a.json_out:
        Path(a.json_out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
