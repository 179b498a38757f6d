#!/usr/bin/env python
"""What an idle serving cluster costs the engine beside it on the same cores.

`serve.py` compares online throughput with offline `LLM.generate` run with no cluster on the machine. Online, the
engine also shares its cores with the cluster's own bookkeeping: Ray's GCS, raylet and agents, Serve's controller,
proxy actor and HAProxy manager, and the replica's own Ray threads, each waking on timers (~1,500 wake-ups a
second on an idle 2-core node). This measures that part alone, without HTTP or streaming: the same offline
`generate` in this process, the app of `serve.py` (as `shardserve serve` starts it) idle beside it, alternately
with every process of the cluster stopped (SIGSTOP) and running (A B B A ...). Each adjacent pair ran within a
second or two, so its running / frozen ratio is nearly free of the host's drift; the summary is their median.

Settings read when the cluster starts (`RAY_SERVE_CONTROL_LOOP_INTERVAL_S`, ...) are compared by running this
once with each in the environment.

Usage: python benchmarks/cluster_tax.py [--pairs 16] [--model-preset small] [--batch 32] [--input-len 128]
                                        [--output-len 64]
"""
from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve import cpu_shares, cpu_ticks, serving  # noqa: E402
from throughput import build_model, make_prompts  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, default=16)
    p.add_argument("--model-preset", default="small")
    p.add_argument("--batch", type=int, default=32, help="prompts per generate call (and max_num_seqs)")
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    a = p.parse_args()

    from shardserve import LLM, SamplingParams
    from shardserve.cluster.ray_cluster import _descendants
    from shardserve.inputs import TokensPrompt
    from shardserve.router.spec import ModelSpec
    model_dir = build_model(a.model_preset)
    sets = iter(make_prompts(model_dir, 1 + 2 * a.pairs, a.batch, a.input_len))  # fresh prompts: no prefix hits
    max_len = a.input_len + a.output_len
    llm = LLM(str(model_dir), dtype="float32", max_num_seqs=a.batch, max_model_len=max_len,
              kv_cache_memory_bytes=1 << 30)
    params = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=a.output_len)

    def generate() -> float:
        prompts = [TokensPrompt(prompt_token_ids=ids) for ids in next(sets)]
        start = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        return time.perf_counter() - start

    generate()  # warm-up
    spec = ModelSpec(model=str(model_dir), served_model_name="bench", dtype="float32", max_num_seqs=a.batch,
                     max_model_len=max_len, kv_cache_memory_bytes=1 << 30, num_cpus=os.cpu_count())
    seconds: dict[str, list[float]] = {"frozen": [], "running": []}
    cores: dict[str, float] = {}
    with serving(spec):
        time.sleep(5)  # past start-up's own work
        cluster = list(_descendants(os.getpid()))

        def signal_all(sig: int) -> None:
            for pid in cluster:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
        for i in range(a.pairs):
            for arm in ("frozen", "running") if i % 2 == 0 else ("running", "frozen"):
                if arm == "frozen":
                    signal_all(signal.SIGSTOP)
                    try:
                        seconds[arm].append(generate())
                    finally:
                        signal_all(signal.SIGCONT)
                else:
                    time.sleep(0.3)  # the timers that fell due while it was stopped
                    before, start = cpu_ticks(), time.perf_counter()
                    seconds[arm].append(generate())
                    for kind, used in cpu_shares(before, cpu_ticks(), time.perf_counter() - start).items():
                        cores[kind] = cores.get(kind, 0.0) + used / a.pairs
    ratios = [r / f for f, r in zip(seconds["frozen"], seconds["running"])]
    print(f"\nmodel {a.model_preset}, {a.batch} prompts of {a.input_len} tokens, {a.output_len} out, {a.pairs} pairs")
    print(f"generate with the cluster stopped: {statistics.median(seconds['frozen']):.3f} s median; running: "
          f"{statistics.median(seconds['running']):.3f} s")
    print(f"running / stopped per pair: {' / '.join(f'{x:.3f}' for x in ratios)}")
    print(f"median {statistics.median(ratios):.3f}, mean {statistics.mean(ratios):.3f}")
    print("cores while running (this process is 'client'): " + ", ".join(
        f"{k} {v:.3f}" for k, v in sorted(cores.items(), key=lambda kv: -kv[1])))


if __name__ == "__main__":
    main()
