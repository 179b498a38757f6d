#!/usr/bin/env python
"""Online serving against offline generation, same model, same prompts, same run.

For each peer, in each of `--rounds` rounds: its offline `LLM.generate` on the prompt token ids, then N
concurrent streaming clients (`/v1/completions`, `stream=True`, aiohttp) against its server with the same
prompts. The server (and for shardserve its Ray cluster) is started after the offline run and stopped before
the next, so the two never share the CPU. A shared 2-core VM drifts by tens of percent over minutes, so each
round's ratio pairs runs a few seconds apart and the summary is the median round. Each round times its own
prompts, and the warm-ups and probes take sets of their own (`Work`), so no run finds its prompts in a prefix
cache that an earlier run filled: the offline engine lives across rounds and the online servers do not.

Peers: shardserve (the Serve app on a local Ray cluster, as `shardserve serve` starts it) and, with
`--peers shardserve,vllm`, vLLM (its OpenAI server and its offline `LLM` from .venv-vllm, at its best on this
CPU as in throughput.py). Reports output tokens/s of both and their ratio, TTFT and ITL (between chunks)
percentiles of the online run, the cores each kind of process used during it, and the router's added latency:
the p50 of one-token requests over HTTP minus the p50 of the same request offline, and (shardserve) the p50 of
each request's HTTP time minus the replica's own step time for it. The first also holds what the idle cluster beside
the engine costs its forward pass (up to ~10% on two cores, benchmarks/RESULTS.md): on a model whose prefill takes
100+ ms that is most of it.

Usage: python benchmarks/serve.py [--peers shardserve,vllm] [--rounds 3] [--concurrency 32] [--num-prompts 64]
                                  [--model-preset small] [--input-len 128] [--output-len 128] [--stream-interval 1]
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
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
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    arrivals = []  # one time per SSE event with tokens: one token each, or up to --stream-interval
    usage = None
    async with http.post(f"http://127.0.0.1:{PORT}/v1/completions", json=body) as r:
        r.raise_for_status()
        pending = b""
        async for data in r.content.iter_any():  # as it arrives, several events at a time under load
            now = time.perf_counter()
            *events, pending = (pending + data).split(b"\n\n")
            arrivals.extend(now for e in events if e.startswith(b"data: {") and b'"index"' in e)  # not usage
            usage = next((e for e in events if b'"completion_tokens"' in e), usage)
    return {"ttft": arrivals[0] - start, "itl": [b - a_ for a_, b in zip(arrivals, arrivals[1:])],
            "tokens": json.loads(usage[len(b"data: "):])["usage"]["completion_tokens"]}


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


@dataclass
class Work:
    """One timed run's prompts: `timed` for the concurrent run, `probe` for the one-token requests after it, and
    `warm` for warming up (its first prompt online; offline, its first `concurrency`)."""
    timed: list[list[int]]
    probe: list[list[int]]
    warm: list[list[int]]


def make_work(model_dir: Path, a, runs: int) -> list[Work]:
    """`runs` runs' prompts, each its own random sets (the warm-up set shared)."""
    n = a.num_prompts or 2 * a.concurrency
    sets = make_prompts(model_dir, 1 + 2 * runs, n, a.input_len)
    return [Work(timed=sets[1 + 2 * i], probe=sets[2 + 2 * i][:a.probe], warm=sets[0]) for i in range(runs)]


async def online(work: Work, a, engine_info=None) -> dict:
    """The timed concurrent run, then the one-token probe. `engine_info`: an async callable returning the
    server engine's counters (shardserve's replica `info`), read around the timed run only."""
    import aiohttp  # as vLLM's serving benchmark: a lighter client than httpx, so it takes less of the CPU
    connector = aiohttp.TCPConnector(limit=a.concurrency + 4)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=600)) as http:
        await stream_one(http, work.warm[0], a)  # warm-up
        sem = asyncio.Semaphore(a.concurrency)

        async def run(p):
            async with sem:
                return await stream_one(http, p, a)
        before = await engine_info() if engine_info else None
        ticks = cpu_ticks()
        start = time.perf_counter()
        results = await asyncio.gather(*(run(p) for p in work.timed))
        elapsed = time.perf_counter() - start
        cores = cpu_shares(ticks, cpu_ticks(), elapsed)
        after = await engine_info() if engine_info else None
        # Router overhead probe: sequential one-token requests, each also against the replica's own step time
        # for it (the rest is the HTTP path, the router and the async engine).
        one, beside_step = [], []
        step_before = (await engine_info())["step_seconds"] if engine_info else None
        for p in work.probe:
            t = time.perf_counter()
            async with http.post(f"http://127.0.0.1:{PORT}/v1/completions",
                                 json={"model": "bench", "prompt": p, "max_tokens": 1, "temperature": 0.0}) as r:
                r.raise_for_status()
                await r.read()
            one.append(time.perf_counter() - t)
            if engine_info:
                step_after = (await engine_info())["step_seconds"]
                beside_step.append(one[-1] - (step_after - step_before))
                step_before = step_after
    itl = [x for r in results for x in r["itl"]]
    out = {"tok_s": sum(r["tokens"] for r in results) / elapsed, "elapsed": elapsed, "cores": cores,
           "ttft_p50": pct([r["ttft"] for r in results], 0.5), "ttft_p99": pct([r["ttft"] for r in results], 0.99),
           "itl_p50": pct(itl, 0.5), "itl_p99": pct(itl, 0.99), "one_token_p50": statistics.median(one)}
    if beside_step:
        out["one_token_beside_step_p50"] = statistics.median(beside_step)
    if before is not None:
        steps = after["num_steps"] - before["num_steps"]
        per_step = lambda key: 1e3 * (after[key] - before[key]) / max(steps, 1)  # noqa: E731
        out["replica"] = (f"replica: {steps} steps, {per_step('step_seconds'):.1f} ms per step inside the engine"
                          + (f", {per_step('hand_off_seconds'):.1f} ms handing off" if after.get("hand_off") else ""))
    return out


class Offline:
    """shardserve's offline `LLM`, built and warmed up once, timed once per round."""

    def __init__(self, model_dir: Path, warm: list[list[int]], a):
        from shardserve import LLM, SamplingParams
        self.a = a
        self.llm = LLM(str(model_dir), dtype=a.dtype, max_num_seqs=a.concurrency,
                       max_num_batched_tokens=a.max_num_batched_tokens,
                       max_model_len=a.input_len + a.output_len, kv_cache_memory_bytes=2 << 30)
        self.params = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=a.output_len)
        self.one_token = SamplingParams(temperature=0.0, max_tokens=1)
        self.llm.generate(_tokens_prompts(warm[:a.concurrency]), self.params, use_tqdm=False)  # warm-up

    def run(self, work: Work) -> dict:
        prompts = _tokens_prompts(work.timed)
        start = time.perf_counter()
        outs = self.llm.generate(prompts, self.params, use_tqdm=False)
        elapsed = time.perf_counter() - start
        one = []
        for p in _tokens_prompts(work.probe):
            t = time.perf_counter()
            self.llm.generate([p], self.one_token, use_tqdm=False)
            one.append(time.perf_counter() - t)
        return {"tok_s": sum(len(o.outputs[0].token_ids) for o in outs) / elapsed, "elapsed": elapsed,
                "one_token_p50": statistics.median(one)}

    def shutdown(self) -> None:
        self.llm.shutdown()
        del self.llm
        gc.collect()


def _tokens_prompts(prompts: list[list[int]]) -> list:
    from shardserve.inputs import TokensPrompt
    return [TokensPrompt(prompt_token_ids=p) for p in prompts]


def run_shardserve(model_dir: Path, works: list[Work], a) -> dict:
    from shardserve.router.spec import ModelSpec
    if a.ingress != "default":  # read when the cluster starts
        os.environ["RAY_SERVE_ENABLE_HA_PROXY"] = "1" if a.ingress == "haproxy" else "0"
    spec = ModelSpec(model=str(model_dir), served_model_name="bench", dtype=a.dtype, max_num_seqs=a.concurrency,
                     max_num_batched_tokens=a.max_num_batched_tokens,
                     max_model_len=a.input_len + a.output_len, kv_cache_memory_bytes=2 << 30,
                     num_cpus=a.replica_cpus, stream_interval=a.stream_interval, stream_interval_s=a.stream_interval_s)
    offline = Offline(model_dir, works[0].warm, a)
    rounds = []
    try:
        for work in works:
            off = offline.run(work)  # while no cluster runs on the machine
            rounds.append({"offline": off, "online": _serve_round(spec, work, a)})
    finally:
        offline.shutdown()
    ingress = "HAProxy" if os.environ.get("RAY_SERVE_ENABLE_HA_PROXY") == "1" else "Serve's proxy"
    return {"name": f"shardserve (ingress: {ingress})", "rounds": rounds}


def _serve_round(spec, work: Work, a) -> dict:
    """A local Ray cluster, as `shardserve serve` starts it, serving the app for one online run."""
    with serving(spec) as engine_info:
        return asyncio.run(online(work, a, engine_info=engine_info))


@contextlib.contextmanager
def serving(spec):
    """A local Ray cluster serving the app of `spec` on PORT, as `shardserve serve` starts it, stopped on exit.
    Yields an async callable returning the replica's engine counters (`info`)."""
    import ray
    from ray import serve

    from shardserve.cluster.ray_cluster import connect, idle_bookkeeping
    from shardserve.router.app import build_app
    connect()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": PORT})
        serve.run(build_app([spec]), name="bench", route_prefix="/", blocking=False)
        idle_bookkeeping()
        handle = serve.get_deployment_handle("model-0", app_name="bench")
        yield lambda: handle.info.remote()
    finally:
        serve.shutdown()
        ray.shutdown()


def run_vllm(model_dir: Path, works: list[Work], a) -> dict:
    """vLLM at its best on this CPU, as throughput.py runs it (both cores, tcmalloc, Intel OpenMP): in each
    round its offline `LLM.generate` in a subprocess, then its OpenAI server with the same engine settings."""
    from throughput import CACHE_DIR, run_peer
    threads = os.cpu_count()
    prompts_file = CACHE_DIR / "serve-prompts.json"
    rounds = []
    for work in works:
        prompts_file.write_text(json.dumps([work.warm[:a.concurrency], work.timed]))  # warm-up, timed
        off = run_peer("vllm", argparse.Namespace(model=model_dir, batch=a.concurrency, input_len=a.input_len,
                                                  output_len=a.output_len, threads=threads, repeat=1, dtype=a.dtype),
                       prompts_file)
        if "error" in off:
            return {"name": "vLLM", "error": f"offline: {off['error']} (log {off['log']})"}
        on = _vllm_server_round(model_dir, work, a, threads)
        if "error" in on:
            return {"name": "vLLM", "error": on["error"]}
        rounds.append({"offline": {"tok_s": off["tok_s"], "elapsed": off["seconds"]}, "online": on})
    return {"name": "vLLM (its OpenAI API server)", "rounds": rounds}


def _vllm_server_round(model_dir: Path, work: Work, a, threads: int) -> dict:
    import urllib.request

    from throughput import CACHE_DIR, VLLM_VENV, vllm_preload
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), VLLM_CPU_OMP_THREADS_BIND=f"0-{threads - 1}",
               VLLM_CPU_NUM_OF_RESERVED_CPU="0", LD_PRELOAD=vllm_preload(), TOKENIZERS_PARALLELISM="false")
    log = CACHE_DIR / "logs" / "vllm-serve.log"
    # vLLM's API server module: the `vllm` command looks up the package `vllm`, and this one is `vllm-cpu`.
    cmd = [str(VLLM_VENV / "bin" / "python"), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
           "--host", "127.0.0.1", "--port", str(PORT),
           "--served-model-name", "bench", "--dtype", a.dtype, "--max-num-seqs", str(a.concurrency),
           "--max-model-len", str(a.input_len + a.output_len), "--kv-cache-memory-bytes", str(2 << 30),
           "--seed", "0", "--uvicorn-log-level", "warning", "--stream-interval", str(a.stream_interval)]
    if a.max_num_batched_tokens:
        cmd += ["--max-num-batched-tokens", str(a.max_num_batched_tokens)]
    with open(log, "w") as out:
        server = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + 600
            while True:  # start-up compiles and warms up for a minute or two
                if server.poll() is not None:
                    return {"error": f"vllm serve exited with {server.returncode} (log {log})"}
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{PORT}/health", timeout=2) as r:
                        if r.status == 200:
                            break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    return {"error": f"vllm serve not up in 600 s (log {log})"}
                time.sleep(2)
            return asyncio.run(online(work, a))
        finally:
            _stop(server)


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
    for i, rnd in enumerate(r["rounds"], 1):
        off, on = rnd["offline"], rnd["online"]
        print(f"  round {i}: offline {off['tok_s']:7.1f} output tok/s ({off['elapsed']:.1f} s), online "
              f"{on['tok_s']:7.1f} ({on['elapsed']:.1f} s): online/offline = {on['tok_s'] / off['tok_s']:.2f}")
        print(f"    TTFT p50 {1e3 * on['ttft_p50']:.0f} ms, p99 {1e3 * on['ttft_p99']:.0f} ms;  "
              f"ITL p50 {1e3 * on['itl_p50']:.1f} ms, p99 {1e3 * on['itl_p99']:.1f} ms")
        if "replica" in on:
            print(f"    {on['replica']}")
        print("    cores used: " + ", ".join(f"{k} {v:.2f}" for k, v in sorted(on["cores"].items(),
                                                                              key=lambda kv: -kv[1])))
        if "one_token_p50" in off:  # the offline probe runs for shardserve's engine
            print(f"    one-token request p50: HTTP {1e3 * on['one_token_p50']:.1f} ms, offline "
                  f"{1e3 * off['one_token_p50']:.1f} ms  -> router/HTTP adds "
                  f"{1e3 * (on['one_token_p50'] - off['one_token_p50']):.1f} ms"
                  + (f"; beside the replica's own step {1e3 * on['one_token_beside_step_p50']:.1f} ms"
                     if "one_token_beside_step_p50" in on else ""))
        else:
            print(f"    one-token request p50: HTTP {1e3 * on['one_token_p50']:.1f} ms")
    ratios = [rnd["online"]["tok_s"] / rnd["offline"]["tok_s"] for rnd in r["rounds"]]
    line = f"  median of {len(ratios)} rounds: online/offline = {statistics.median(ratios):.2f}"
    if all("one_token_p50" in rnd["offline"] for rnd in r["rounds"]):
        added = [rnd["online"]["one_token_p50"] - rnd["offline"]["one_token_p50"] for rnd in r["rounds"]]
        line += f", router/HTTP adds {1e3 * statistics.median(added):.1f} ms"
    if all("one_token_beside_step_p50" in rnd["online"] for rnd in r["rounds"]):
        beside = [rnd["online"]["one_token_beside_step_p50"] for rnd in r["rounds"]]
        line += f" ({1e3 * statistics.median(beside):.1f} ms beside the replica's own step)"
    print(line)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-preset", default="small")
    p.add_argument("--peers", default="shardserve", help="comma list of shardserve, vllm (vllm serve and "
                   "vLLM's offline LLM from .venv-vllm, built on first use as by throughput.py)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="every engine's")
    p.add_argument("--rounds", type=int, default=3, help="offline then online, this many times; the median "
                   "round is the summary")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--num-prompts", type=int, default=None, help="default: 2 x concurrency")
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--max-num-batched-tokens", type=int,
                   help="the step's token budget of both servers and of shardserve's offline engine (default: each "
                        "engine's own, 2048 for both servers at these lengths)")
    p.add_argument("--replica-cpus", type=float, default=os.cpu_count(),
                   help="CPUs (and so engine threads) of the model replica; default all, as offline")
    p.add_argument("--stream-interval", type=int, default=1, help="vLLM's --stream-interval, for both servers: "
                   "tokens per streamed chunk (the first and the last at once)")
    p.add_argument("--stream-interval-s", type=float, default=0.0, help="shardserve's replica stream interval (s)")
    p.add_argument("--probe", type=int, default=20, help="one-token requests for the router-overhead probe")
    p.add_argument("--ingress", choices=("default", "haproxy", "proxy"), default="default",
                   help="HTTP in front of the replicas: HAProxy, Serve's Python proxy, or what `shardserve serve` "
                        "picks (HAProxy where its binary is installed)")
    a = p.parse_args()
    peers = [x.strip() for x in a.peers.split(",") if x.strip()]
    if bad := set(peers) - {"shardserve", "vllm"}:
        raise SystemExit(f"unknown peers {sorted(bad)}")
    model_dir = build_model(a.model_preset)
    works = make_work(model_dir, a, a.rounds)  # the same prompts for every peer
    results = []
    if "shardserve" in peers:
        results.append(run_shardserve(model_dir, works, a))
    if "vllm" in peers:
        results.append(run_vllm(model_dir, works, a))

    print(f"\nmodel {a.model_preset}, {len(works[0].timed)} prompts, concurrency {a.concurrency}, "
          f"{a.input_len} in / {a.output_len} out")
    for r in results:
        report(r)


if __name__ == "__main__":
    main()
