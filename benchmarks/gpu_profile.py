#!/usr/bin/env python
"""Where a decode step's time goes on a GPU: the device's kernels against the step's wall time and the host's.

For a model shape of gpu.py (random weights, built once under /tmp/shardserve-bench) and each batch size of
--batch (one engine for all), the engine is stepped to the middle of a decode (every request prefilled, none
finished); then --steps steps are timed, and as many again are profiled with torch.profiler. It prints the wall
time per step, the kernels' busy time per step (their sum: with async scheduling the host's work hides behind
it, so a wall time well above it means the host is what a step waits for), the host's phases per step
(schedule, prepare, forward launch or graph replay, sampling, the wait for the step's tokens, the engine's
processing) and the kernels that take the most of it. The Chrome trace goes to --out (open it in Perfetto).

  python3 benchmarks/gpu_profile.py --model llama-3.2-1b --batch 256,1    # on the GPU
  python3 benchmarks/gpu_profile.py --smoke                                 # the flow at toy sizes on a CPU
"""
from __future__ import annotations

import argparse
import functools
import gzip
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu import build_model, random_prompts  # noqa: E402

# The host's phases of a step: (object path from the engine, method, label). Labeled with record_function
# here, in the benchmark, so the engine carries no profiling code.
PHASES = [("scheduler", "schedule", "host: schedule"),
          ("executor.worker.runner", "_prepare", "host: prepare inputs"),
          ("executor.worker.runner", "_forward", "host: forward (eager)"),
          ("executor.worker.runner.graphs", "run", "host: forward (graph replay)"),
          ("executor.worker.runner", "_sampling_batch", "host: sampling batch"),
          ("executor.worker.runner", "sampler", "host: sample"),
          ("executor.worker.runner", "collect", "host: wait + read tokens"),
          ("", "_process", "host: process outputs")]


def wrap_phases(engine, wrap) -> None:
    """Each phase's method on the engine replaced by `wrap(label, method)` (a phase the engine lacks: left out)."""
    for path, method, label in PHASES:
        try:
            owner = functools.reduce(getattr, [p for p in path.split(".") if p], engine)
            fn = getattr(owner, method) if owner is not None else None
        except AttributeError:
            continue
        if fn is not None:
            setattr(owner, method, wrap(label, fn))


def label_phases(engine) -> None:
    from torch.profiler import record_function

    def wrap(label, fn):
        def labeled(*args, **kwargs):
            with record_function(label):
                return fn(*args, **kwargs)
        return labeled
    wrap_phases(engine, wrap)


def profile_batch(llm, batch: int, steps: int, out: Path, name: str, cuda: bool) -> None:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from shardserve import SamplingParams
    from shardserve.inputs import TokensPrompt
    from shardserve.sampling_params import RequestOutputKind

    engine = llm.llm_engine
    vocab = engine.source.hf_config.vocab_size
    # as LLM.generate: only the final output is made (a streamed request's would be made every step)
    params = SamplingParams(temperature=0, ignore_eos=True, max_tokens=32 + 4 * steps,
                            output_kind=RequestOutputKind.FINAL_ONLY)
    for i, prompt in enumerate(random_prompts(vocab, batch, 128, seed=1)):
        engine.add_request(f"b{batch}-{i}", TokensPrompt(prompt_token_ids=prompt), params)
    while any(r.num_output_tokens < 8 for r in engine.scheduler.requests.values()):
        engine.step()  # prefills, CUDA graphs and kernels warm

    def sync():
        if cuda:
            torch.cuda.synchronize()

    sync()
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    sync()
    wall_ms = (time.perf_counter() - start) / steps * 1e3

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            engine.step()
        sync()
    while engine.has_unfinished_requests():
        engine.step()

    trace = out / f"trace-{name}-b{batch}.json"
    prof.export_chrome_trace(str(trace))
    with open(trace, "rb") as src, gzip.open(f"{trace}.gz", "wb") as dst:
        shutil.copyfileobj(src, dst)
    trace.unlink()

    events = prof.key_averages()
    device_time = (lambda e: e.self_device_time_total) if cuda else (lambda e: e.self_cpu_time_total)
    kernels = sorted((e for e in events if device_time(e) > 0 and (not cuda or e.device_type.name == "CUDA")
                      and not e.key.startswith("host: ")), key=device_time, reverse=True)
    busy_ms = sum(device_time(e) for e in kernels) / steps / 1e3
    print(f"\n## {name}, batch {batch}, {'GPU ' + torch.cuda.get_device_name() if cuda else 'CPU'}, "
          f"async scheduling {engine.async_scheduling}")
    print(f"wall {wall_ms:.3f} ms/step; {'kernels busy' if cuda else 'CPU ops'} {busy_ms:.3f} ms/step "
          f"({busy_ms / wall_ms:.0%} of the wall)")
    # (a label also names its range on the device's timeline: the host's is the CPU entry with the host's time)
    phases = {}
    for e in sorted(events, key=lambda e: e.cpu_time_total):
        if e.key.startswith("host: ") and e.device_type.name == "CPU":
            phases[e.key] = e
    print("| host phase | ms/step (CPU, inclusive) | calls/step |")
    print("| --- | --- | --- |")
    for _, _, label in PHASES:
        if label in phases:
            e = phases[label]
            print(f"| {label[6:]} | {e.cpu_time_total / steps / 1e3:.3f} | {e.count / steps:.1f} |")
    print(f"| kernel{' (device)' if cuda else ' (CPU op)'} | ms/step | calls/step |")
    print("| --- | --- | --- |")
    for e in kernels[:25]:
        print(f"| {e.key[:90]} | {device_time(e) / steps / 1e3:.4f} | {e.count / steps:.1f} |")
    print(f"trace: {trace}.gz")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama-3.2-1b", help="a shape of gpu.py's SHAPES")
    p.add_argument("--batch", default="256,1", help="batch sizes, comma-separated (one engine for all)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--out", default="gpu-profile-out")
    p.add_argument("--smoke", action="store_true", help="toy sizes on a CPU: checks the script, not speed")
    a = p.parse_args()
    if a.smoke:
        a.model, a.dtype, a.batch, a.steps = "tiny", "float32", "4,1", 4
    batches = [int(b) for b in a.batch.split(",")]

    import torch

    from shardserve import LLM

    cuda = torch.cuda.is_available() and not a.smoke
    llm = LLM(model=str(build_model(a.model, a.dtype)), dtype=a.dtype, max_num_seqs=max(batches), seed=0,
              max_model_len=2048 + 64, gpu_memory_utilization=0.85,
              max_num_batched_tokens=max(4096, max(batches) * 16), async_scheduling=a.async_scheduling,
              device="cuda" if cuda else "cpu")
    label_phases(llm.llm_engine)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    name = a.model + ("" if a.async_scheduling is None else "-async" if a.async_scheduling else "-sync")
    for batch in batches:
        profile_batch(llm, batch, a.steps, out, name, cuda)


if __name__ == "__main__":
    main()
