#!/usr/bin/env python
"""Priority scheduling: how soon urgent requests are served behind a backlog, shardserve against vLLM.

The same work for each engine and policy, each in its own subprocess, driven through the engine's own
add_request / step loop (`LLM(...).llm_engine`; vLLM's in-process engine core): a backlog of
--background requests at priority 1, more than --max-num-seqs can run at once; once the engine is full
(every running request has its first token), --urgent requests arrive at priority 0. Under "fcfs" every
request has priority 0 and the urgent ones queue behind the backlog; under "priority" they are admitted
as soon as a sequence slot frees. Prints, per engine and policy, the urgent requests' time to first token
and to their last token (from their arrival), the backlog's mean latency, and output tokens per second over
the whole run, so what priority buys the urgent requests and what it costs the rest are side by side.

Usage: .venv/bin/python benchmarks/priority.py --model-preset small --peers shardserve,vllm
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import (CACHE_DIR, KV_CACHE_BYTES, PRESETS, chosen_model, chosen_peers,  # noqa: E402
                        finish_worker, make_prompts, note_if_busy, run_worker, worker_error)

PEERS = ("shardserve", "vllm")
POLICIES = ("fcfs", "priority")


def serve_backlog(engine, make_prompt, params, background: list, urgent: list, policy: str,
                  full_at: int) -> dict:
    """Queue the backlog, step; once `full_at` requests have their first token, queue the urgent ones; step
    until all finish. Times are from each request's own arrival."""
    arrived, first, done, tokens = {}, {}, {}, {}

    def add(request_id: str, prompt: list[int], priority: int) -> None:
        engine.add_request(request_id, make_prompt(prompt), params, priority=priority if policy == "priority" else 0)
        arrived[request_id] = time.perf_counter()

    start = time.perf_counter()
    for i, prompt in enumerate(background):
        add(f"bg-{i}", prompt, 1)
    urgent_in = not urgent
    while engine.has_unfinished_requests():
        outputs = engine.step()
        now = time.perf_counter()
        for out in outputs:
            n = len(out.outputs[0].token_ids)
            if n and out.request_id not in first:
                first[out.request_id] = now
            if out.finished:
                done[out.request_id], tokens[out.request_id] = now, n
        if not urgent_in and len(first) >= full_at:
            for i, prompt in enumerate(urgent):
                add(f"urgent-{i}", prompt, 0)
            urgent_in = True
    wall = time.perf_counter() - start
    ids = {"urgent": [r for r in arrived if r.startswith("urgent")], "bg": [r for r in arrived if r.startswith("bg")]}

    def ms(ts: dict, rs: list[str]) -> list[float]:
        return sorted(1000 * (ts[r] - arrived[r]) for r in rs)
    return {"urgent_ttft_ms": ms(first, ids["urgent"]), "urgent_e2e_ms": ms(done, ids["urgent"]),
            "bg_e2e_ms_mean": statistics.mean(ms(done, ids["bg"])), "tok_s": sum(tokens.values()) / wall,
            "wall_s": wall}


def worker(a: argparse.Namespace) -> None:
    try:
        if a.worker == "shardserve":
            import torch
            torch.set_num_threads(a.threads)
        mod = importlib.import_module(a.worker)
        tokens_prompt = importlib.import_module(f"{a.worker}.inputs").TokensPrompt
        llm = mod.LLM(model=str(a.model), dtype="float32", max_num_seqs=a.max_num_seqs,
                      max_model_len=a.input_len + a.output_len, kv_cache_memory_bytes=KV_CACHE_BYTES, seed=0,
                      scheduling_policy=a.policy)
        params = mod.SamplingParams(temperature=0, ignore_eos=True, max_tokens=a.output_len)
        warmup, work = json.loads(Path(a.prompts_file).read_text())

        def make_prompt(ids):
            return tokens_prompt(prompt_token_ids=ids)
        serve_backlog(llm.llm_engine, make_prompt, params, warmup[:a.max_num_seqs], warmup[-2:], a.policy,
                      a.max_num_seqs)
        res = serve_backlog(llm.llm_engine, make_prompt, params, work[:a.background], work[a.background:],
                            a.policy, a.max_num_seqs)
    except Exception as e:  # report and let the parent go on
        res = worker_error(e)
    finish_worker(res)


def run(peer: str, policy: str, a: argparse.Namespace, prompts_file: Path) -> dict:
    # vLLM's in-process engine core: a step() is one schedule and forward, as shardserve's
    return run_worker(peer, Path(__file__), ["--policy", policy, "--prompts-file", str(prompts_file), "--model",
                                             str(a.model), "--max-num-seqs", str(a.max_num_seqs), "--background",
                                             str(a.background), "--input-len", str(a.input_len), "--output-len",
                                             str(a.output_len)],
                      a.threads, f"priority-{peer}-{policy}", {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model-preset", choices=sorted(PRESETS), default="small")
    src.add_argument("--model", help="HF model directory (with tokenizer) instead of a preset")
    p.add_argument("--max-num-seqs", type=int, default=16)
    p.add_argument("--background", type=int, default=64, help="backlog requests at priority 1")
    p.add_argument("--urgent", type=int, default=4, help="requests at priority 0, once the engine is full")
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--peers", default="shardserve,vllm", help=f"comma list of {','.join(PEERS)}")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--worker", choices=PEERS, help=argparse.SUPPRESS)
    p.add_argument("--policy", choices=POLICIES, help=argparse.SUPPRESS)
    p.add_argument("--prompts-file", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        return worker(a)
    peers = chosen_peers(p, a, PEERS)
    a.model = chosen_model(p, a)
    prompts_file = CACHE_DIR / f"priority-prompts-{os.getpid()}.json"
    prompts_file.write_text(json.dumps(make_prompts(a.model, 2, a.background + a.urgent, a.input_len)))
    print(f"model {a.model}  backlog {a.background} + urgent {a.urgent} requests, {a.input_len} in / "
          f"{a.output_len} out  max_num_seqs {a.max_num_seqs}  threads {a.threads}", flush=True)
    rows = []
    for peer in peers:
        for policy in POLICIES:
            note_if_busy(f"{peer} / {policy}")
            r = run(peer, policy, a, prompts_file)
            if "error" in r:
                print(f"  {peer} / {policy}: failed: {r['error']}", flush=True)
                continue
            rows.append([peer, policy, f"{statistics.median(r['urgent_ttft_ms']):.0f}",
                         f"{max(r['urgent_ttft_ms']):.0f}", f"{statistics.median(r['urgent_e2e_ms']):.0f}",
                         f"{r['bg_e2e_ms_mean']:.0f}", f"{r['tok_s']:.0f}"])
            print(f"  {peer} / {policy}: done in {r['wall_s']:.1f} s", flush=True)
    prompts_file.unlink()
    cols = ["engine", "policy", "urgent TTFT p50 ms", "urgent TTFT max ms", "urgent e2e p50 ms",
            "backlog e2e mean ms", "out tok/s"]
    widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(cols)]
    print()
    for line in [cols, ["-" * w for w in widths], *rows]:
        print("  ".join(v.ljust(w) for v, w in zip(line, widths)))


if __name__ == "__main__":
    main()
