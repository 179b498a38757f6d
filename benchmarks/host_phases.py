#!/usr/bin/env python
"""The host's share of a decode step, phase by phase, on any machine (issue 8): what bounds a GPU step at a few
hundred requests once the kernels are fast, measured where there is no GPU.

--requests requests of a `gpu.py` shape (random weights; default the tiny Llama) are stepped until every one
is decoding; then each of `gpu_profile.py`'s host phases (schedule, prepare inputs, forward, sampling batch,
sample, wait + read tokens, process outputs) is timed by wrapping it, over --steps steps: ms per step. With
--against REV the same runs in a git worktree of that commit too, the two alternated --rounds times (one
process each run), so a change's effect is read against this machine's noise, which on a 2-core machine is as
large as many a change.

  python3 benchmarks/host_phases.py                                   # 256 requests of 128 + 128 tokens
  python3 benchmarks/host_phases.py --prompt 1024 --output-kind DELTA  # long contexts, streamed outputs
  python3 benchmarks/host_phases.py --against HEAD~3 --rounds 3
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from gpu import build_model, random_prompts  # noqa: E402
from gpu_profile import PHASES, wrap_phases  # noqa: E402


def measure(a) -> dict[str, float]:
    """ms per step of each phase (and of the whole step), in this process's shardserve."""
    from shardserve import LLM, SamplingParams
    from shardserve.inputs import TokensPrompt
    from shardserve.sampling_params import RequestOutputKind

    llm = LLM(model=str(build_model(a.model, "float32")), dtype="float32", device=a.device, seed=0,
              max_num_seqs=a.requests, max_model_len=a.prompt + a.output + 16,
              max_num_batched_tokens=max(4096, a.prompt * 8), async_scheduling=a.async_scheduling)
    engine = llm.llm_engine
    params = SamplingParams(temperature=0, ignore_eos=True, max_tokens=a.output,
                            output_kind=RequestOutputKind[a.output_kind])
    vocab = engine.source.hf_config.vocab_size
    for i, prompt in enumerate(random_prompts(vocab, a.requests, a.prompt, seed=1)):
        engine.add_request(f"r{i}", TokensPrompt(prompt_token_ids=prompt), params)
    while any(r.num_output_tokens == 0 for r in engine.scheduler.requests.values()):
        engine.step()
    spent: dict[str, float] = {}

    def wrap(label, fn):
        spent[label] = 0.0

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[label] += time.perf_counter() - start
        return timed
    wrap_phases(engine, wrap)
    steps, start = 0, time.perf_counter()
    while engine.has_unfinished_requests() and steps < a.steps:
        engine.step()
        steps += 1
    wall = time.perf_counter() - start
    return {"step": wall / steps * 1e3, **{label: t / steps * 1e3 for label, t in spent.items()}}


def run_child(a, tree: Path) -> dict[str, float]:
    """`measure` in a fresh process whose shardserve is the one in `tree`."""
    args = [sys.executable, __file__, "--child", "--model", a.model, "--device", a.device, "--requests",
            str(a.requests), "--prompt", str(a.prompt), "--output", str(a.output), "--steps", str(a.steps),
            "--output-kind", a.output_kind]
    if a.async_scheduling is not None:
        args.append("--async-scheduling" if a.async_scheduling else "--no-async-scheduling")
    run = subprocess.run(args, env={**os.environ, "PYTHONPATH": str(tree)}, capture_output=True,
                         text=True, cwd="/tmp")
    if run.returncode != 0:
        raise SystemExit(f"the run in {tree} failed:\n{run.stderr[-3000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def worktree(rev: str) -> Path:
    repo = HERE.parent
    sha = subprocess.run(["git", "rev-parse", "--short", rev], cwd=repo, capture_output=True, text=True,
                         check=True).stdout.strip()
    path = Path("/tmp") / f"shardserve-at-{sha}"
    if not (path / "shardserve").is_dir():
        subprocess.run(["git", "worktree", "add", "--detach", "-f", str(path), sha], cwd=repo, check=True,
                       capture_output=True)
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", help="a shape of gpu.py's SHAPES")
    p.add_argument("--device", default="cpu")
    p.add_argument("--requests", type=int, default=256)
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--output", type=int, default=128)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--output-kind", default="FINAL_ONLY", choices=["FINAL_ONLY", "DELTA", "CUMULATIVE"],
                   help="what the requests ask for: FINAL_ONLY as LLM.generate, DELTA as the server's streams")
    p.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--against", metavar="REV", help="also run a worktree of this commit, alternating")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--smoke", action="store_true", help="toy sizes: checks the script, not speed")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.smoke:
        a.requests, a.prompt, a.output, a.steps, a.rounds = 4, 8, 16, 4, 1
    if a.child:
        print(json.dumps(measure(a)))
        return
    trees = {"this tree": HERE.parent}
    if a.against:
        trees[a.against] = worktree(a.against)
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in trees}
    for _ in range(a.rounds):
        for name, tree in trees.items():
            runs[name].append(run_child(a, tree))
    print(f"{a.requests} requests of {a.prompt} + {a.output} tokens ({a.model}, {a.device}, {a.output_kind}, "
          f"async scheduling {a.async_scheduling}); ms per step, one figure per run:")
    print("| phase | " + " | ".join(trees) + " |")
    print("| --- |" + " --- |" * len(trees))
    for label in ["step"] + [label for _, _, label in PHASES]:
        if any(label in r for results in runs.values() for r in results):
            cells = [" / ".join(f"{r[label]:.3f}" if label in r else "-" for r in results)
                     for results in runs.values()]
            print(f"| {label.removeprefix('host: ')} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
