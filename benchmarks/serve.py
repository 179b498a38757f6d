#!/usr/bin/env python
"""Online serving against offline generation, same model, same prompts, same run.

For each peer, its offline `LLM.generate` on the prompt token ids first, then N concurrent streaming clients
(`/v1/completions`, `stream=True`, aiohttp) against its server with the same prompts; the offline engine is
released first, so the two never share the CPU. Peers: shardserve (the Serve app on a local Ray cluster, as
`shardserve serve` starts it) and, with `--peers shardserve,vllm`, vLLM (`vllm serve` and its offline `LLM`
from .venv-vllm, at its best on this CPU as in throughput.py). Reports output tokens/s of both and their
ratio, TTFT and ITL percentiles of the online run, the cores each kind of process used during it, and the
router's added latency: the p50 of one-token requests over HTTP minus the p50 of the same request offline.

Usage: python benchmarks/serve.py [--peers shardserve,vllm] [--concurrency 32] [--num-prompts 64]
                                  [--model-preset small] [--input-len 128] [--output-len 128]
"""
from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import signal
import statistics
import subprocess
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
    arrivals = []  # one time per SSE event with a token (ignore_eos: exactly output_len of them)
    async with http.post(f"http://127.0.0.1:{PORT}/v1/completions", json=body) as r:
        r.raise_for_status()
        pending = b""
        async for data in r.content.iter_any():  # as it arrives, several events at a time under load
            now = time.perf_counter()
            *events, pending = (pending + data).split(b"\n\n")
            arrivals.extend(now for e in events if e.startswith(b"data: {") and b'"index"' in e)  # not usage
    return {"ttft": arrivals[0] - start, "itl": [b - a_ for a_, b in zip(arrivals, arrivals[1:])],
            "tokens": len(arrivals)}


def cpu_ticks() -> dict[int, tuple[str, int]]:
    """pid -> (command, user + system clock ticks) of every process on the machine."""
    out = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().split(b"\0")[0].decode(errors="replace")
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        out[int(pid)] = (cmd or stat[stat.index("(") + 1:stat.rindex(")")], int(fields[11]) + int(fields[12]))
    return out


def cpu_shares(before: dict, after: dict, seconds: float) -> dict[str, float]:
    """Cores each kind of process used between two `cpu_ticks`: the model replica, this client, the HTTP
    proxy (HAProxy or Serve's), the rest of Ray, vLLM's processes, everything else."""
    shares: dict[str, float] = {}
    hz = os.sysconf("SC_CLK_TCK")
    for pid, (cmd, ticks) in after.items():
        used = ticks - before.get(pid, (cmd, 0))[1]
        if used <= 0:
            continue
        kind = ("replica" if "ServeReplica" in cmd else "client" if pid == os.getpid() else
                "vllm" if "vllm" in cmd.lower() else "proxy" if "haproxy" in cmd or "ProxyActor" in cmd else
                "ray" if "ray" in cmd else "other")
        shares[kind] = shares.get(kind, 0.0) + used / hz / seconds
    return shares


async def online(prompts: list[list[int]], a) -> dict:
    import aiohttp  # as vLLM's serving benchmark: a lighter client than httpx, so it takes less of the CPU
    connector = aiohttp.TCPConnector(limit=a.concurrency + 4)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=600)) as http:
        await stream_one(http, prompts[0], a)  # warm-up
        sem = asyncio.Semaphore(a.concurrency)

        async def run(p):
            async with sem:
                return await stream_one(http, p, a)
        ticks = cpu_ticks()
        start = time.perf_counter()
        results = await asyncio.gather(*(run(p) for p in prompts))
        elapsed = time.perf_counter() - start
        cores = cpu_shares(ticks, cpu_ticks(), elapsed)
        # Router overhead probe: sequential one-token requests.
        one = []
        for p in prompts[:a.probe]:
            t = time.perf_counter()
            async with http.post(f"http://127.0.0.1:{PORT}/v1/completions",
                                 json={"model": "bench", "prompt": p, "max_tokens": 1, "temperature": 0.0}) as r:
                r.raise_for_status()
                await r.read()
            one.append(time.perf_counter() - t)
    itl = [x for r in results for x in r["itl"]]
    return {"tok_s": sum(r["tokens"] for r in results) / elapsed, "elapsed": elapsed, "cores": cores,
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


def run_shardserve(model_dir: Path, prompts: list[list[int]], a) -> dict:
    off = offline(model_dir, prompts, a)  # first, while nothing else runs on the machine

    from ray import serve

    from shardserve.cluster.ray_cluster import connect
    from shardserve.router.app import build_app
    from shardserve.router.spec import ModelSpec
    if a.ingress != "default":  # read when the cluster starts
        os.environ["RAY_SERVE_ENABLE_HA_PROXY"] = "1" if a.ingress == "haproxy" else "0"
    connect()  # a local cluster, as `shardserve serve` starts it
    ingress = "HAProxy" if os.environ.get("RAY_SERVE_ENABLE_HA_PROXY") == "1" else "Serve's proxy"
    serve.start(http_options={"host": "127.0.0.1", "port": PORT})
    spec = ModelSpec(model=str(model_dir), served_model_name="bench", dtype="float32", max_num_seqs=a.concurrency,
                     max_model_len=a.input_len + a.output_len, kv_cache_memory_bytes=2 << 30,
                     num_cpus=a.replica_cpus, stream_interval_s=a.stream_interval)
    serve.run(build_app([spec]), name="bench", route_prefix="/", blocking=False)
    handle = serve.get_deployment_handle("model-0", app_name="bench")
    before = handle.info.remote().result()
    on = asyncio.run(online(prompts, a))
    after = handle.info.remote().result()
    serve.shutdown()
    import ray
    ray.shutdown()
    steps = after["num_steps"] - before["num_steps"]
    per_step = lambda key: 1e3 * (after[key] - before[key]) / max(steps, 1)  # noqa: E731
    on["replica"] = (f"replica: {steps} steps, {per_step('step_seconds'):.1f} ms per step inside the engine"
                     + (f", {per_step('hand_off_seconds'):.1f} ms handing off" if after.get("hand_off") else ""))
    return {"name": f"shardserve (ingress: {ingress})", "offline": off, "online": on}


def run_vllm(model_dir: Path, prompts: list[list[int]], a) -> dict:
    """vLLM at its best on this CPU, as throughput.py runs it (both cores, tcmalloc, Intel OpenMP): its
    offline `LLM.generate` in a subprocess, then `vllm serve` with the same engine settings."""
    import urllib.request

    from throughput import CACHE_DIR, VLLM_VENV, run_peer, vllm_preload
    threads = os.cpu_count()
    prompts_file = CACHE_DIR / "serve-prompts.json"
    prompts_file.write_text(json.dumps([prompts[:a.concurrency], prompts]))  # warm-up, timed
    off = run_peer("vllm", argparse.Namespace(model=model_dir, batch=a.concurrency, input_len=a.input_len,
                                              output_len=a.output_len, threads=threads, repeat=1), prompts_file)
    if "error" in off:
        return {"name": "vLLM", "error": f"offline: {off['error']} (log {off['log']})"}
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), VLLM_CPU_OMP_THREADS_BIND=f"0-{threads - 1}",
               VLLM_CPU_NUM_OF_RESERVED_CPU="0", LD_PRELOAD=vllm_preload(), TOKENIZERS_PARALLELISM="false")
    log = CACHE_DIR / "logs" / "vllm-serve.log"
    # vLLM's API server module: the `vllm` command looks up the package `vllm`, and this one is `vllm-cpu`.
    cmd = [str(VLLM_VENV / "bin" / "python"), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
           "--host", "127.0.0.1", "--port", str(PORT),
           "--served-model-name", "bench", "--dtype", "float32", "--max-num-seqs", str(a.concurrency),
           "--max-model-len", str(a.input_len + a.output_len), "--kv-cache-memory-bytes", str(2 << 30),
           "--seed", "0", "--uvicorn-log-level", "warning"]
    with open(log, "w") as out:
        server = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + 600
            while True:  # start-up compiles and warms up for a minute or two
                if server.poll() is not None:
                    return {"name": "vLLM", "error": f"vllm serve exited with {server.returncode} (log {log})"}
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{PORT}/health", timeout=2) as r:
                        if r.status == 200:
                            break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    return {"name": "vLLM", "error": f"vllm serve not up in 600 s (log {log})"}
                time.sleep(2)
            on = asyncio.run(online(prompts, a))
        finally:
            _stop(server)
    return {"name": "vLLM (its OpenAI API server)", "offline": {"tok_s": off["tok_s"], "elapsed": off["seconds"]},
            "online": on}


def _stop(server: subprocess.Popen) -> None:
    """SIGTERM to the server's whole process group (vLLM's engine runs in a child), SIGKILL after 30 s."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(server.pid, sig)
        except ProcessLookupError:
            return
        try:
            server.wait(timeout=30)
            return
        except subprocess.TimeoutExpired:
            pass


def report(r: dict) -> None:
    print(f"\n{r['name']}")
    if "error" in r:
        print(f"  failed: {r['error']}")
        return
    off, on = r["offline"], r["online"]
    print(f"  offline  {off['tok_s']:8.1f} output tok/s  ({off['elapsed']:.1f} s)")
    print(f"  online   {on['tok_s']:8.1f} output tok/s  ({on['elapsed']:.1f} s)   online/offline = "
          f"{on['tok_s'] / off['tok_s']:.2f}")
    print(f"  online   TTFT p50 {1e3 * on['ttft_p50']:.0f} ms, p99 {1e3 * on['ttft_p99']:.0f} ms;  "
          f"ITL p50 {1e3 * on['itl_p50']:.1f} ms, p99 {1e3 * on['itl_p99']:.1f} ms")
    if "replica" in on:
        print(f"  online   {on['replica']}")
    print("  online   cores used: " + ", ".join(f"{k} {v:.2f}" for k, v in sorted(on["cores"].items(),
                                                                                  key=lambda kv: -kv[1])))
    if "one_token_p50" in off:  # the offline probe runs for shardserve's engine
        print(f"  one-token request p50: HTTP {1e3 * on['one_token_p50']:.1f} ms, offline "
              f"{1e3 * off['one_token_p50']:.1f} ms  -> router/HTTP adds "
              f"{1e3 * (on['one_token_p50'] - off['one_token_p50']):.1f} ms")
    else:
        print(f"  one-token request p50: HTTP {1e3 * on['one_token_p50']:.1f} ms")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-preset", default="small")
    p.add_argument("--peers", default="shardserve", help="comma list of shardserve, vllm (vllm serve and "
                   "vLLM's offline LLM from .venv-vllm, built on first use as by throughput.py)")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--num-prompts", type=int, default=None, help="default: 2 x concurrency")
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--replica-cpus", type=float, default=os.cpu_count(),
                   help="CPUs (and so engine threads) of the model replica; default all, as offline")
    p.add_argument("--stream-interval", type=float, default=0.0, help="the replica's stream interval (s)")
    p.add_argument("--probe", type=int, default=20, help="one-token requests for the router-overhead probe")
    p.add_argument("--ingress", choices=("default", "haproxy", "proxy"), default="default",
                   help="HTTP in front of the replicas: HAProxy, Serve's Python proxy, or what `shardserve serve` "
                        "picks (HAProxy where its binary is installed)")
    a = p.parse_args()
    peers = [x.strip() for x in a.peers.split(",") if x.strip()]
    if bad := set(peers) - {"shardserve", "vllm"}:
        raise SystemExit(f"unknown peers {sorted(bad)}")
    n = a.num_prompts or 2 * a.concurrency
    model_dir = build_model(a.model_preset)
    prompts = make_prompts(model_dir, 1, n, a.input_len)[0]
    results = []
    if "shardserve" in peers:
        results.append(run_shardserve(model_dir, prompts, a))
    if "vllm" in peers:
        results.append(run_vllm(model_dir, prompts, a))

    print(f"\nmodel {a.model_preset}, {n} prompts, concurrency {a.concurrency}, {a.input_len} in / {a.output_len} out")
    for r in results:
        report(r)


if __name__ == "__main__":
    main()
