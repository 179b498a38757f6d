#!/usr/bin/env python
"""The Triton attention kernels' tuning knobs on a GPU (issue 8): each config of `num_warps` and tile size
timed with `triton.testing.do_bench` at the GPU benchmark's model shapes, against the config the engine runs.

Decode is memory-bound: its figure is the keys and values it reads per second, against the device's copy
bandwidth. Every config's output is checked against the engine's config (a faster wrong kernel is flagged, not
ranked). At head_dim 128 the engine's config runs at the register ceiling (benchmarks/RESULTS.md, 2026-12-03):
this says whether that costs time.

  python3 benchmarks/gpu_kernels.py                # on the GPU: bf16, both shapes
  python3 benchmarks/gpu_kernels.py --smoke        # toy sizes in Triton's interpreter on a CPU: checks the script
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from gpu import SHAPES, work_bandwidth  # noqa: E402  (the models gpu.py builds, its bandwidth measurement)

ENGINE = {"decode": {"block_n": 64, "num_warps": 4}, "prefill": {"block": 64, "num_warps": 4}}
DECODE_CONFIGS = [{"block_n": n, "num_warps": w} for n in (32, 64, 128) for w in (4, 8)]
PREFILL_CONFIGS = [{"block": b, "num_warps": w} for b in (32, 64, 128) for w in (4, 8)]


def bench(fn, device: str) -> float:
    """Milliseconds per call."""
    if device == "cuda":
        import triton.testing
        return triton.testing.do_bench(fn)
    fn()  # the interpreter: once, to check the flow
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def cases(smoke: bool):
    """(name, kind, sizes) the kernels are timed at."""
    if smoke:
        return [("decode 4 x 40", "decode", (4, 40)), ("decode 1 x 200 (split)", "decode", (1, 200)),
                ("prefill 2 x 24", "prefill", (2, 24))]
    return [("decode 256 x 256 (throughput run)", "decode", (256, 256)),
            ("decode 256 x 1024", "decode", (256, 1024)),
            ("decode 1 x 4096 (batch 1, split)", "decode", (1, 4096)),
            ("prefill 256 x 128 (throughput run)", "prefill", (256, 128)),
            ("prefill 4 x 1024", "prefill", (4, 1024))]


def run_case(kind: str, sizes: tuple[int, int], heads: int, kv_heads: int, head_dim: int, dtype, device: str,
             block_size: int = 16):
    """{config: (ms, max abs difference from the engine's config)} and the bytes a decode reads."""
    import torch

    from shardserve.layers.attention import triton_kernels
    seqs, length = sizes
    blocks_per_seq = -(-length // block_size)
    g = torch.Generator().manual_seed(0)
    cache = torch.randn(2, seqs * blocks_per_seq, kv_heads, block_size, head_dim, generator=g).to(device, dtype)
    tables = torch.randperm(seqs * blocks_per_seq, generator=g).view(seqs, blocks_per_seq).to(device)
    scale = head_dim ** -0.5
    if kind == "decode":
        q = torch.randn(seqs, heads, head_dim, generator=g).to(device, dtype)
        lens = torch.full((seqs,), length, device=device)

        def call(config):
            return triton_kernels.paged_decode(q, cache, tables, lens, scale, **config)
        configs, read = DECODE_CONFIGS, 2 * seqs * length * kv_heads * head_dim * cache.element_size()
    else:
        q = torch.randn(seqs * length, heads, head_dim, generator=g).to(device, dtype)
        starts = torch.arange(seqs, device=device) * length
        lens, contexts = torch.full((seqs,), length, device=device), torch.zeros(seqs, dtype=torch.long, device=device)

        def call(config):
            return triton_kernels.paged_prefill(q, cache, tables, starts, lens, contexts, length, scale,
                                                torch.empty_like(q), **config)
        configs, read = PREFILL_CONFIGS, 0
    if device != "cuda":  # the interpreter runs small tiles only
        configs = [{**c, **{k: 16 for k in ("block_n", "block") if k in c}} for c in configs[:2]]
    reference = call(ENGINE[kind] if device == "cuda" else configs[0]).float()
    results = {}
    for config in configs:
        try:
            diff = (call(config).float() - reference).abs().max().item()
            results[json.dumps(config)] = (bench(lambda: call(config), device), diff)
        except Exception as error:  # out of resources, say: reported, not fatal
            results[json.dumps(config)] = (None, f"{type(error).__name__}: {error}"[:120])
    return results, read


def kernel_bench_setup(description: str):
    """What a kernel benchmark's command line gives (--models, --dtype, --smoke, --json-out) and where it runs:
    (args, device, dtype, device name, copy bandwidth GB/s). --smoke: the interpreter on a CPU, fp32."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="qwen3-0.6b,llama-3.2-1b")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--smoke", action="store_true", help="toy sizes in Triton's interpreter on a CPU")
    p.add_argument("--json-out")
    a = p.parse_args()
    if a.smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before any kernel is defined
    import torch
    device = "cpu" if a.smoke else "cuda"
    dtype = torch.float32 if a.smoke else getattr(torch, a.dtype)
    bandwidth = work_bandwidth(argparse.Namespace(device=device))["bandwidth_gbs"]
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu (interpreter)"
    return a, device, dtype, name, bandwidth


def main() -> None:
    a, device, dtype, name, bandwidth = kernel_bench_setup(__doc__)
    print(f"{name}: copy bandwidth {bandwidth:,.0f} GB/s; engine config {json.dumps(ENGINE)}")
    report = {"device": name, "bandwidth_gbs": bandwidth, "cases": []}
    for model in a.models.split(","):
        fields = SHAPES[model][1]
        heads, kv_heads = fields["num_attention_heads"], fields["num_key_value_heads"]
        head_dim = fields.get("head_dim", fields["hidden_size"] // heads)
        if a.smoke:
            heads, kv_heads, head_dim = 4, 2, 16
        print(f"\n{model} (heads {heads}, KV heads {kv_heads}, head_dim {head_dim}), {dtype}")
        print("| case | config | ms | KV read GB/s (of copy) | max diff from the engine's |")
        print("| --- | --- | --- | --- | --- |")
        for case, kind, sizes in cases(a.smoke):
            results, read = run_case(kind, sizes, heads, kv_heads, head_dim, dtype, device)
            report["cases"].append({"model": model, "case": case, "results": results, "kv_bytes": read})
            for config, (ms, diff) in results.items():
                rate = f"{read / ms / 1e6:,.0f} ({read / ms / 1e6 / bandwidth:.0%})" if ms and read else "-"
                shown = f"{ms:.4f}" if ms else "failed"
                print(f"| {case} | {config} | {shown} | {rate} | {diff if isinstance(diff, str) else f'{diff:.2e}'} |")
    if a.json_out:
        Path(a.json_out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
