#!/usr/bin/env python
"""A decode step's linear layers on a CPU, layer by layer: shardserve's GEMMs against vLLM's and torch's.

The weights of one decoder layer of a preset's shape (QKV, O, gate/up, down) and its LM head, multiplied by
`--rows` activation rows, each call timed alone (its weight warm in the caches, as a microbenchmark has it;
in an engine's step the weights come from memory). Peers, each in its own subprocess:
  shardserve  the layers' CPU GEMM: oneDNN's inner product on a weight packed at load (layers/cpu_gemm.py)
  torch       F.linear, what transformers runs
  vllm        vLLM's CPU dispatch for these weights: its own oneDNN build (`onednn_mm`), in .venv-vllm
Printed: microseconds per call, and per decode step (the layer's calls times the number of layers, plus the
LM head), with the ratio peer / ours.

Usage: python benchmarks/cpu_gemm.py --model-preset smollm2 --rows 1,16 --dtype bfloat16
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import PRESETS, chosen_peers, finish_worker, run_worker, worker_error  # noqa: E402

PEERS = ("shardserve", "torch", "vllm")


def layer_shapes(preset: str) -> tuple[dict[str, tuple[int, int]], int]:
    """(out, in) of each of one layer's projections and the LM head, and the number of layers."""
    c = PRESETS[preset]
    hidden, heads, kv_heads = c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"]
    head_dim = c.get("head_dim", hidden // heads)
    inter = c["intermediate_size"]
    return {"qkv": ((heads + 2 * kv_heads) * head_dim, hidden), "o": (hidden, heads * head_dim),
            "gate_up": (2 * inter, hidden), "down": (hidden, inter), "lm_head": (c["vocab_size"], hidden)}, \
        c["num_hidden_layers"]


def time_call(fn, min_seconds: float = 0.3) -> float:
    """Seconds per call: the best of three runs of enough calls to take `min_seconds`."""
    for _ in range(5):
        fn()
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < min_seconds / 3:
        fn()
        calls += 1
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls)
    return best


def worker(a: argparse.Namespace) -> None:
    try:
        import torch
        torch.set_num_threads(a.threads)
        dtype = getattr(torch, a.dtype)
        shapes, _ = layer_shapes(a.model_preset)
        g = torch.Generator().manual_seed(0)
        res = {}
        for rows in map(int, a.rows.split(",")):
            for name, (n, k) in shapes.items():
                w = (torch.randn(n, k, generator=g) / k ** 0.5).to(dtype)
                x = torch.randn(rows, k, generator=g).to(dtype)
                if a.worker == "shardserve":
                    from shardserve.layers.cpu_gemm import PackedWeight, gemm_kernel, packed_gemm_supported
                    from shardserve.workers.cpu_malloc import keep_freed_memory
                    keep_freed_memory()  # as a CPU worker runs (vLLM's peer runs on tcmalloc, preloaded)
                    assert packed_gemm_supported(w), f"no packed GEMM for {a.dtype} here"
                    packed = PackedWeight(w, 32, gemm_kernel())
                    fn = lambda: packed.linear(x, None)  # noqa: E731
                elif a.worker == "torch":
                    fn = lambda: torch.nn.functional.linear(x, w)  # noqa: E731
                else:
                    from vllm import _custom_ops as ops
                    handler = ops.create_onednn_mm(w.t(), 32)
                    fn = lambda: ops.onednn_mm(handler, x, None)  # noqa: E731
                res[f"{rows}/{name}"] = time_call(fn)
    except Exception as e:  # noqa: BLE001 - reported by the parent
        finish_worker(worker_error(e))
    finish_worker({"seconds": res})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-preset", choices=sorted(PRESETS), default="smollm2")
    p.add_argument("--rows", default="1,16", help="comma list of activation rows (a decode step's batch)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16")
    p.add_argument("--peers", default=",".join(PEERS), help=f"comma list of {','.join(PEERS)}")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--worker", choices=PEERS, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        return worker(a)
    peers = chosen_peers(p, a, PEERS)
    args = ["--model-preset", a.model_preset, "--rows", a.rows, "--dtype", a.dtype]
    results = {peer: run_worker(peer, Path(__file__), args, a.threads, f"cpu_gemm-{peer}") for peer in peers}
    for peer, res in results.items():
        if "error" in res:
            print(f"{peer}: {res['error']}")
    done = {peer: res["seconds"] for peer, res in results.items() if "seconds" in res}
    shapes, layers = layer_shapes(a.model_preset)
    print(f"\n{a.model_preset}, {a.dtype}, {a.threads} threads: microseconds per call (ratio: peer / ours)")
    print(f"{'rows':>4}  {'weight':<10}" + "".join(f"{peer:>20}" for peer in done))
    for rows in map(int, a.rows.split(",")):
        step = {peer: 0.0 for peer in done}
        for name in shapes:
            for peer in done:
                step[peer] += done[peer][f"{rows}/{name}"] * (1 if name == "lm_head" else layers)
            print(f"{rows:>4}  {name:<10}" + "".join(_cell(done, peer, f"{rows}/{name}", 1e6) for peer in done))
        print(f"{rows:>4}  {'step (ms)':<10}" + "".join(_cell({p: {'': s} for p, s in step.items()}, peer, "", 1e3)
                                                      for peer in done))
    print(json.dumps({"preset": a.model_preset, "dtype": a.dtype, "seconds": done}))


def _cell(done: dict, peer: str, key: str, scale: float) -> str:
    ours = done.get("shardserve", {}).get(key)
    ratio = f" ({done[peer][key] / ours:.2f})" if ours else ""
    return f"{done[peer][key] * scale:>12.1f}{ratio:>8}"


if __name__ == "__main__":
    main()
