#!/usr/bin/env python
"""Two settings of one running server, compared in alternating runs.

`serve.py` starts a fresh cluster for each round, and on a shared 2-core VM its rounds drift by +-15%, more than
most changes to the serving path are worth. Here one local Ray cluster serves the app (as `shardserve serve`
starts it) for the whole run. Runs of N concurrent streaming clients alternate between arm A and arm B
(A B B A A B ...). Before each run, that arm's shell command switches the server to it, for example with `chrt`
on its processes or a file the code under test reads. Each adjacent A/B pair ran within seconds, so its B/A
ratio is nearly free of the host's drift. The summary is each pair's ratio and their mean.

The commands get SHARDSERVE_BENCH_DRIVER_PID, this process's pid: the cluster's processes descend from it.

Usage: python benchmarks/serve_ab.py --a CMD --b CMD [--pairs 6] [--num-prompts 128] [--concurrency 32]
                                     [--model-preset small] [--input-len 128] [--output-len 128]
"""
from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve import make_work, online, serving  # noqa: E402
from throughput import build_model  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--a", required=True, help="shell command that switches the server to arm A")
    p.add_argument("--b", required=True, help="shell command that switches the server to arm B")
    p.add_argument("--pairs", type=int, default=6)
    p.add_argument("--num-prompts", type=int, default=128)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--model-preset", default="small")
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    a = p.parse_args()
    a.probe, a.stream_interval = 3, 1  # what serve.online reads besides the above
    model_dir = build_model(a.model_preset)
    works = iter(make_work(model_dir, a, 2 * a.pairs))  # each run its own prompts: none in the prefix cache

    from shardserve.router.spec import ModelSpec
    spec = ModelSpec(model=str(model_dir), served_model_name="bench", dtype="float32", max_num_seqs=a.concurrency,
                     max_model_len=a.input_len + a.output_len, kv_cache_memory_bytes=2 << 30,
                     num_cpus=os.cpu_count())
    env = dict(os.environ, SHARDSERVE_BENCH_DRIVER_PID=str(os.getpid()))
    tok_s: dict[str, list[float]] = {"A": [], "B": []}
    with serving(spec) as engine_info:
        for i in range(a.pairs):
            for arm in ("A", "B") if i % 2 == 0 else ("B", "A"):
                subprocess.run(a.a if arm == "A" else a.b, shell=True, check=True, env=env)
                r = asyncio.run(online(next(works), a, engine_info=engine_info))
                tok_s[arm].append(r["tok_s"])
                cores = ", ".join(f"{k} {v:.2f}" for k, v in sorted(r["cores"].items(), key=lambda kv: -kv[1]))
                print(f"{arm}: {r['tok_s']:7.1f} tok/s, ITL p50 {1e3 * r['itl_p50']:.1f} ms, p99 "
                      f"{1e3 * r['itl_p99']:.0f} ms; {r['replica']}; cores: {cores}", flush=True)
    ratios = [b / a_ for a_, b in zip(tok_s["A"], tok_s["B"])]
    print(f"\nB/A per pair: {' / '.join(f'{x:.3f}' for x in ratios)}")
    print(f"mean B/A {statistics.mean(ratios):.3f}; tok/s means: A {statistics.mean(tok_s['A']):.1f}, "
          f"B {statistics.mean(tok_s['B']):.1f}")


if __name__ == "__main__":
    main()
