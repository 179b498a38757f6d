#!/usr/bin/env python
"""What LoRA adapters cost: offline generation through no adapter, one, and four at once (requests spread over
them in one batch), shardserve against vLLM, same run, same model, same PEFT adapters, same prompts.

The model: a preset's random Llama (benchmarks/throughput.py), or its mixture of experts (`--model-preset
qwen3-moe`), in --dtype; the adapters: random rank-8 PEFT adapters on all seven projections (a mixture of experts'
routers and every expert's projections too, a pair each), made as tests/conftest.py makes them. Each engine runs
in its own subprocess with enable_lora=True, max_loras=4, max_lora_rank=16: one warm-up call per mode, then a
timed greedy `generate` of
--num-prompts requests (ignore_eos, so every request makes --output-len tokens). Prints output tokens per second
for each mode, each mode's share of the base model's, and ours / vLLM's.

Usage: .venv/bin/python benchmarks/lora.py [--model-preset small] [--peers shardserve,vllm]
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import (CACHE_DIR, KV_CACHE_BYTES, build_model, chosen_peers, finish_worker,  # noqa: E402
                        make_prompts, note_if_busy, offline_arguments, run_worker, worker_error)

PEERS = ("shardserve", "vllm")
MODES = {"base": 0, "one adapter": 1, "four adapters": 4}   # mode -> adapters the batch's requests spread over


def make_adapters(model: Path, count: int) -> list[str]:
    """`count` random rank-8 adapters of the model, cached beside it."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from conftest import make_lora_dir
    folders = []
    for i in range(count):
        folder = CACHE_DIR / f"{model.name}-lora-{i}"
        if not (folder / "adapter_config.json").exists():
            make_lora_dir(folder, str(model), rank=8, alpha=16, seed=i + 1)
        folders.append(str(folder))
    return folders


def worker(a: argparse.Namespace) -> None:
    try:
        mod = importlib.import_module(a.worker)
        tokens_prompt = importlib.import_module(f"{a.worker}.inputs").TokensPrompt
        lora_request = importlib.import_module(f"{a.worker}.lora.request").LoRARequest
        adapters = [lora_request(f"lora-{i}", i + 1, path) for i, path in enumerate(json.loads(a.adapters))]
        llm = mod.LLM(model=str(a.model), dtype=a.dtype, max_num_seqs=a.num_prompts,
                      max_model_len=a.input_len + a.output_len, kv_cache_memory_bytes=KV_CACHE_BYTES, seed=0,
                      enable_lora=True, max_loras=4, max_lora_rank=16)
        params = mod.SamplingParams(temperature=0, max_tokens=a.output_len, ignore_eos=True)
        warmup, *timed = json.loads(Path(a.prompts_file).read_text())
        res = {}
        for (mode, count), prompts in zip(MODES.items(), timed):
            loras = [adapters[i % count] if count else None for i in range(len(prompts))]
            llm.generate([tokens_prompt(prompt_token_ids=p) for p in warmup], params, use_tqdm=False,
                         lora_request=loras[:len(warmup)])
            start = time.perf_counter()
            outs = llm.generate([tokens_prompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False,
                                lora_request=loras)
            wall = time.perf_counter() - start
            tokens = sum(len(o.outputs[0].token_ids) for o in outs)
            res[mode] = {"tok_s": tokens / wall, "tokens": tokens, "wall_s": wall,
                         "first_tokens": [list(o.outputs[0].token_ids[:8]) for o in outs[:4]]}
    except Exception as e:  # report and let the parent go on
        res = worker_error(e)
    finish_worker(res)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    offline_arguments(p, PEERS, output_len=64)
    p.add_argument("--adapters", help=argparse.SUPPRESS)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="every engine's")
    a = p.parse_args()
    if a.worker:
        return worker(a)
    peers = chosen_peers(p, a, PEERS)
    a.model = build_model(a.model_preset)
    adapters = make_adapters(a.model, max(MODES.values()))
    prompts_file = CACHE_DIR / f"lora-prompts-{os.getpid()}.json"
    prompts_file.write_text(json.dumps(make_prompts(a.model, 1 + len(MODES), a.num_prompts, a.input_len)))
    print(f"model {a.model} ({a.dtype})  {a.num_prompts} requests, {a.input_len} in / {a.output_len} out, greedy, "
          f"rank-8 adapters on all projections  threads {a.threads}", flush=True)
    results = {}
    for peer in peers:
        note_if_busy(peer)
        results[peer] = run_worker(peer, Path(__file__), [
            "--prompts-file", str(prompts_file), "--model", str(a.model), "--num-prompts", str(a.num_prompts),
            "--input-len", str(a.input_len), "--output-len", str(a.output_len), "--adapters", json.dumps(adapters),
            "--dtype", a.dtype],
            a.threads, f"lora-{peer}")
        print(f"  {peer}: {results[peer].get('error', 'done')}", flush=True)
    prompts_file.unlink()
    ok = {peer: r for peer, r in results.items() if "error" not in r}
    print(f"\n{'engine':<12}" + "".join(f"{m + ' tok/s':>22}" for m in MODES) + f"{'one/base':>10}{'four/base':>11}")
    for peer, r in ok.items():
        print(f"{peer:<12}" + "".join(f"{r[m]['tok_s']:>22.0f}" for m in MODES) +
              f"{r['one adapter']['tok_s'] / r['base']['tok_s']:>10.2f}"
              f"{r['four adapters']['tok_s'] / r['base']['tok_s']:>11.2f}")
    if len(ok) == 2:
        ours, theirs = ok["shardserve"], ok["vllm"]
        for mode in MODES:
            same = ours[mode]["first_tokens"] == theirs[mode]["first_tokens"]
            print(f"ours / vLLM, {mode}: {ours[mode]['tok_s'] / theirs[mode]['tok_s']:.2f}  "
                  f"(first tokens {'the same' if same else 'DIFFERENT'})")


if __name__ == "__main__":
    main()
