#!/usr/bin/env python
"""Online serving against offline generation, same model, same prompts, same run.

The offline `LLM.generate` on the prompt token ids in this process first, then N concurrent streaming
clients (`/v1/completions`, `stream=True`) against the Serve app on a local Ray cluster with the same
prompts (the offline engine is released first, so they never share the CPU). Reports output tokens/s of both and their ratio, TTFT and ITL
percentiles of the online run, and the router's added latency: the p50 of one-token requests over HTTP
minus the p50 of the same request offline.

Usage: python benchmarks/serve.py [--model-preset small] [--concurrency 32] [--input-len 128] [--output-len 128]
"""
from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # keep Ray on loopback (MACHINE-NOTES)
sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import build_model, make_prompts  # noqa: E402

PORT = 8321


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


async def stream_one(http, prompt: list[int], a) -> dict:
    body = {"model": "bench", "prompt": prompt, "max_tokens": a.output_len, "temperature": 0.0,
            "ignore_eos": True, "stream": True}
    start = time.perf_counter()
    arrivals = []  # one SSE event per generated token (ignore_eos: exactly output_len of them)
    async with http.stream("POST", f"http://127.0.0.1:{PORT}/v1/completions", json=body) as r:
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices"):
                arrivals.append(time.perf_counter())
    return {"ttft": arrivals[0] - start, "itl": [b - a_ for a_, b in zip(arrivals, arrivals[1:])],
            "tokens": len(arrivals), "end": arrivals[-1]}


async def online(prompts: list[list[int]], a) -> dict:
    import httpx
    limits = httpx.Limits(max_connections=a.concurrency + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        await stream_one(http, prompts[0], a)  # warm-up
        sem = asyncio.Semaphore(a.concurrency)

        async def run(p):
            async with sem:
                return await stream_one(http, p, a)
        start = time.perf_counter()
        results = await asyncio.gather(*(run(p) for p in prompts))
        elapsed = time.perf_counter() - start
        # Router overhead probe: sequential one-token requests.
        one = []
        for p in prompts[:a.probe]:
            t = time.perf_counter()
            r = await http.post(f"http://127.0.0.1:{PORT}/v1/completions",
                                json={"model": "bench", "prompt": p, "max_tokens": 1, "temperature": 0.0})
            r.raise_for_status()
            one.append(time.perf_counter() - t)
    itl = [x for r in results for x in r["itl"]]
    return {"tok_s": sum(r["tokens"] for r in results) / elapsed, "elapsed": elapsed,
            "ttft_p50": pct([r["ttft"] for r in results], 0.5), "ttft_p99": pct([r["ttft"] for r in results], 0.99),
            "itl_p50": pct(itl, 0.5), "itl_p99": pct(itl, 0.99), "one_token_p50": statistics.median(one)}


def offline(model_dir: Path, prompts: list[list[int]], a) -> dict:
    from shardserve import LLM, SamplingParams
    from shardserve.inputs import TokensPrompt
    llm = LLM(str(model_dir), dtype="float32", max_num_seqs=a.concurrency, max_model_len=a.input_len + a.output_len,
              kv_cache_memory_bytes=2 << 30)
    params = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=a.output_len)
    llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts[:a.concurrency]], params,
                 use_tqdm=False)  # warm-up
    start = time.perf_counter()
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    one = []
    for p in prompts[:a.probe]:
        t = time.perf_counter()
        llm.generate([TokensPrompt(prompt_token_ids=p)], SamplingParams(temperature=0.0, max_tokens=1), use_tqdm=False)
        one.append(time.perf_counter() - t)
    result = {"tok_s": sum(len(o.outputs[0].token_ids) for o in outs) / elapsed, "elapsed": elapsed,
              "one_token_p50": statistics.median(one)}
    llm.shutdown()
    del llm
    gc.collect()
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-preset", default="small")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--num-prompts", type=int, default=None, help="default: 2 x concurrency")
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--replica-cpus", type=float, default=os.cpu_count(),
                   help="CPUs (and so engine threads) of the model replica; default all, as offline")
    p.add_argument("--stream-interval", type=float, default=0.0, help="the replica's stream interval (s)")
    p.add_argument("--probe", type=int, default=20, help="one-token requests for the router-overhead probe")
    a = p.parse_args()
    n = a.num_prompts or 2 * a.concurrency
    model_dir = build_model(a.model_preset)
    prompts = make_prompts(model_dir, 1, n, a.input_len)[0]
    off = offline(model_dir, prompts, a)  # first, while nothing else runs on the machine

    from ray import serve

    from shardserve.router.app import build_app
    from shardserve.router.spec import ModelSpec
    from shardserve.cluster.ray_cluster import connect
    connect()  # a local cluster, as `shardserve serve` starts it
    serve.start(http_options={"host": "127.0.0.1", "port": PORT})
    spec = ModelSpec(model=str(model_dir), served_model_name="bench", dtype="float32", max_num_seqs=a.concurrency,
                     max_model_len=a.input_len + a.output_len, kv_cache_memory_bytes=2 << 30,
                     num_cpus=a.replica_cpus, stream_interval_s=a.stream_interval)
    serve.run(build_app([spec]), name="bench", route_prefix="/", blocking=False)
    handle = serve.get_deployment_handle("model-0", app_name="bench")
    before = handle.info.remote().result()
    on = asyncio.run(online(prompts, a))
    after = handle.info.remote().result()
    steps = after["num_steps"] - before["num_steps"]
    print(f"replica: {steps} steps, {1e3 * (after['step_seconds'] - before['step_seconds']) / max(steps, 1):.1f} ms "
          f"per step inside the engine")
    serve.shutdown()
    import ray
    ray.shutdown()

    print(f"\nmodel {a.model_preset}, {n} prompts, concurrency {a.concurrency}, {a.input_len} in / {a.output_len} out")
    print(f"offline  {off['tok_s']:8.1f} output tok/s  ({off['elapsed']:.1f} s)")
    print(f"online   {on['tok_s']:8.1f} output tok/s  ({on['elapsed']:.1f} s)   online/offline = "
          f"{on['tok_s'] / off['tok_s']:.2f}")
    print(f"online   TTFT p50 {1e3 * on['ttft_p50']:.0f} ms, p99 {1e3 * on['ttft_p99']:.0f} ms;  "
          f"ITL p50 {1e3 * on['itl_p50']:.1f} ms, p99 {1e3 * on['itl_p99']:.1f} ms")
    print(f"one-token request p50: HTTP {1e3 * on['one_token_p50']:.1f} ms, offline {1e3 * off['one_token_p50']:.1f} ms"
          f"  -> router/HTTP adds {1e3 * (on['one_token_p50'] - off['one_token_p50']):.1f} ms")


if __name__ == "__main__":
    main()
