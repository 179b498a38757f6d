#!/usr/bin/env python
"""Tensor and pipeline parallelism on Ray workers: TP=1 (in process) vs TP=2 vs PP=2, same model, same run.

Each layout serves the same prompts after one warm-up call. The engine is stepped by hand so every step
is timed; the workers' time inside collectives (all-reduce, all-gather, send/recv) is read from each rank
before and after. On a 2-core CPU a split cannot go faster (TP=1 already uses both cores); what matters is
the overhead it adds: time per step against TP=1's.

Usage: python benchmarks/parallel.py [--model-preset large] [--batch 16] [--input-len 64] [--output-len 32]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # keep Ray on loopback (MACHINE-NOTES)
sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import build_model, make_prompts  # noqa: E402

LAYOUTS = {"TP=1": dict(), "TP=2": dict(tensor_parallel_size=2), "PP=2": dict(pipeline_parallel_size=2)}


def run_layout(name: str, model_dir: Path, prompts: list[list[list[int]]], a) -> dict:
    from shardserve import LLM, SamplingParams
    from shardserve.inputs import TokensPrompt

    threads = max(1, a.cores // (2 if LAYOUTS[name] else 1))
    llm = LLM(str(model_dir), dtype="float32", max_num_seqs=a.batch, max_model_len=a.input_len + a.output_len,
              kv_cache_memory_bytes=2 << 30, num_cpus_per_worker=threads, **LAYOUTS[name])
    engine = llm.llm_engine
    params = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=a.output_len)
    llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts[0]], params, use_tqdm=False)  # warm-up

    comm_before = engine.executor.collective_rpc("comm_stats") if LAYOUTS[name] else None
    for i, ids in enumerate(prompts[1]):
        engine.add_request(f"{name}-{i}", engine.processor.process_prompt(TokensPrompt(prompt_token_ids=ids)),
                           params.clone())
    step_s, tokens = [], 0
    start = time.perf_counter()
    while engine.has_unfinished_requests():
        t = time.perf_counter()
        outputs = engine.step()
        step_s.append(time.perf_counter() - t)
        tokens += sum(len(c.token_ids) for o in outputs if o.finished for c in o.outputs)
    elapsed = time.perf_counter() - start
    result = {"tok_s": tokens / elapsed, "steps": len(step_s), "ms_step": 1e3 * elapsed / len(step_s),
              "ms_decode_step": 1e3 * statistics.median(step_s), "comm_ms_step": 0.0}
    if comm_before is not None:
        comm_after = engine.executor.collective_rpc("comm_stats")
        # The slowest rank's communication time bounds the step.
        result["comm_ms_step"] = 1e3 * max(after["seconds"] - before["seconds"] for before, after
                                           in zip(comm_before, comm_after)) / len(step_s)
    llm.shutdown()
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-preset", default="large")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--input-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--cores", type=int, default=os.cpu_count(), help="CPU cores shared by the layouts' workers")
    p.add_argument("--layouts", default=",".join(LAYOUTS))
    a = p.parse_args()

    model_dir = build_model(a.model_preset)
    prompts = make_prompts(model_dir, 2, a.batch, a.input_len)
    import ray
    ray.init(_node_ip_address="127.0.0.1", num_cpus=a.cores, include_dashboard=False, log_to_driver=False)
    results = {name: run_layout(name, model_dir, prompts, a) for name in a.layouts.split(",")}

    base = results.get("TP=1")
    print(f"\nmodel {a.model_preset}, batch {a.batch}, {a.input_len} in / {a.output_len} out, {a.cores} cores, fp32")
    print(f"{'layout':<7} {'tok/s':>8} {'steps':>6} {'ms/step':>8} {'median':>8} {'comm ms':>8} {'step vs TP=1':>13}")
    for name, r in results.items():
        ratio = f"{r['ms_step'] / base['ms_step']:.2f}x" if base else "-"
        print(f"{name:<7} {r['tok_s']:8.1f} {r['steps']:6d} {r['ms_step']:8.1f} {r['ms_decode_step']:8.1f} "
              f"{r['comm_ms_step']:8.1f} {ratio:>13}")


if __name__ == "__main__":
    main()
