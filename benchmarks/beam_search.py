#!/usr/bin/env python
"""Beam search throughput: shardserve's `LLM.beam_search` against transformers' `generate(num_beams=k)`.

Same random-weight model, same prompt token ids, same beam width and lengths, EOS unable to end a beam, one
warm-up call each, in this one run (each peer in its own subprocess). Prints output tokens per second of
the best beams and the ratio.

Usage: .venv/bin/python benchmarks/beam_search.py --model-preset small --beam-width 4 --num-prompts 32
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import PRESETS, build_model, make_prompts  # noqa: E402


def run_shardserve(model: Path, warmup: list[list[int]], prompts: list[list[int]], a) -> float:
    from shardserve import LLM, BeamSearchParams, TokensPrompt
    llm = LLM(str(model), dtype="float32", max_model_len=a.input_len + a.output_len + 1,
              max_num_seqs=a.num_prompts * a.beam_width)
    params = BeamSearchParams(beam_width=a.beam_width, max_tokens=a.output_len, ignore_eos=True)
    llm.beam_search([TokensPrompt(prompt_token_ids=p) for p in warmup[:2]], params)
    start = time.perf_counter()
    llm.beam_search([TokensPrompt(prompt_token_ids=p) for p in prompts], params)
    return time.perf_counter() - start


def run_transformers(model: Path, warmup: list[list[int]], prompts: list[list[int]], a) -> float:
    import torch
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None

    def search(batch):
        with torch.no_grad():
            hf.generate(torch.tensor(batch), do_sample=False, num_beams=a.beam_width, max_new_tokens=a.output_len,
                        pad_token_id=0)
    search(warmup[:2])
    start = time.perf_counter()
    for i in range(0, len(prompts), a.hf_batch):
        search(prompts[i:i + a.hf_batch])
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-preset", choices=sorted(PRESETS), default="small")
    p.add_argument("--beam-width", type=int, default=4)
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--input-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--hf-batch", type=int, default=32, help="prompts per transformers generate call")
    p.add_argument("--worker", choices=["shardserve", "transformers"], help=argparse.SUPPRESS)
    a = p.parse_args()
    model = build_model(a.model_preset)
    warmup, prompts = make_prompts(model, 2, a.num_prompts, a.input_len)  # fresh ids: no prefix-cache hits
    if a.worker:
        seconds = {"shardserve": run_shardserve, "transformers": run_transformers}[a.worker](model, warmup, prompts, a)
        print(json.dumps({"seconds": seconds}))
        return
    print(f"{a.model_preset} model, {a.num_prompts} prompts x {a.input_len} tokens, beam width {a.beam_width}, "
          f"{a.output_len} new tokens")
    results = {}
    for peer in ("shardserve", "transformers"):
        out = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--worker", peer], capture_output=True,
                             text=True, check=True)
        results[peer] = json.loads(out.stdout.strip().splitlines()[-1])["seconds"]
        print(f"  {peer}: {results[peer]:.2f} s, {a.num_prompts * a.output_len / results[peer]:.1f} tok/s")
    print(f"  shardserve / transformers speed: {results['transformers'] / results['shardserve']:.2f}x")


if __name__ == "__main__":
    main()
